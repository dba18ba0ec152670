"""k6 threshold syntax: parsing, validation against metric types, evaluation. No I/O.

A threshold is a metric selector and an expression, as in a k6 script's options::

    http_req_duration{scenario:browse}: p(95)<800

The selector is a metric name with an optional submetric filter ``{tag:value,...}``
(k6 trims spaces and quotes around keys and values; so do we). The expression follows
k6's grammar: ``METHOD OPERATOR NUMBER`` with spaces allowed around the operator, where
METHOD is ``avg``, ``min``, ``max``, ``med`` or ``p(N)`` for trends, ``count`` or
``rate`` (per second) for counters, ``rate`` for rates and ``value`` for gauges, and
OPERATOR is one of ``<``, ``<=``, ``>``, ``>=``, ``==``, ``===``, ``!=``.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ThresholdError(ValueError):
    """A malformed or inapplicable threshold; the message says what and how to fix it."""


Tags = tuple[tuple[str, str], ...]

METHODS_BY_KIND: dict[str, tuple[str, ...]] = {
    "trend": ("avg", "min", "max", "med", "p(N)"),
    "counter": ("count", "rate"),
    "rate": ("rate",),
    "gauge": ("value",),
}
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "===": operator.eq, "==": operator.eq,
    "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
# Longest first, so that "<=" is not read as "<" followed by "=5".
_OPERATOR = re.compile(r"===|==|!=|<=|>=|<|>")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_METRIC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
_SELECTOR = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\{[^{}]*\})?\s*")
_PERCENTILE = re.compile(r"p\(\s*([^()]*?)\s*\)")
EXAMPLE = "e.g. 'http_req_duration: p(95)<500' or 'http_req_failed{name:pay}: rate<0.01'"


@dataclass(frozen=True)
class Expression:
    """``p(95)<500``: method ``p``, percentile 95, operator ``<``, bound 500."""

    text: str
    method: str  # avg, min, max, med, p, count, rate, value
    percentile: float | None
    op: str
    bound: float

    @property
    def method_label(self) -> str:
        """The method as k6 prints it: ``p(95)``, ``avg``, ..."""
        if self.method == "p":
            return f"p({format_number(self.percentile or 0.0)})"
        return self.method

    def holds(self, value: float) -> bool:
        return _OPERATORS[self.op](value, self.bound)


@dataclass(frozen=True)
class Threshold:
    metric: str
    tags: Tags  # the submetric filter, in the order given
    expression: Expression
    # k6's threshold object form: stop the test once the threshold fails, but not in
    # its first delay_abort_eval seconds.
    abort_on_fail: bool = False
    delay_abort_eval: float = 0.0

    @property
    def selector(self) -> str:
        return selector_name(self.metric, self.tags)

    @property
    def text(self) -> str:
        """``metric{k:v}: p(95)<500``: names the threshold in verdicts and tables."""
        return f"{self.selector}: {self.expression.text}"

    @property
    def role(self) -> str:
        """The server that holds the metric's rows: ``td`` for trend methods (avg, min,
        max, med, p(N)), ``non_td`` for count, rate and value."""
        return "td" if self.expression.method in ("avg", "min", "max", "med", "p") \
            else "non_td"


def selector_name(metric: str, tags: Tags) -> str:
    """``metric{k:v,k2:v2}`` as k6 names submetrics (``metric`` when there is no filter)."""
    if not tags:
        return metric
    return metric + "{" + ",".join(f"{k}:{v}" for k, v in tags) + "}"


def format_number(value: float) -> str:
    """95.0 -> '95', 99.9 -> '99.9', without float noise."""
    text = f"{value:.10g}"
    return text


def parse_expression(text: str) -> Expression:
    if not isinstance(text, str) or not text.strip():
        raise ThresholdError(f"empty threshold expression; expected METHOD OPERATOR NUMBER, "
                             f"{EXAMPLE}")
    match = _OPERATOR.search(text)
    if not match:
        raise ThresholdError(
            f"malformed threshold expression {text!r}: no comparison operator; expected "
            f"METHOD OPERATOR NUMBER with one of < <= > >= == === !=, {EXAMPLE}")
    left = text[:match.start()].strip()
    right = text[match.end():].strip()
    op = match.group()
    if not left:
        raise ThresholdError(f"malformed threshold expression {text!r}: missing the "
                             f"aggregation method before {op!r}")
    if not right:
        raise ThresholdError(f"malformed threshold expression {text!r}: missing the number "
                             f"after {op!r}")
    if _OPERATOR.search(right) or right[0] in "=!":
        raise ThresholdError(f"malformed threshold expression {text!r}: expected a single "
                             f"operator, one of < <= > >= == === !=")
    if not _NUMBER.fullmatch(right):
        raise ThresholdError(f"malformed threshold expression {text!r}: {right!r} is not a "
                             f"number")
    bound = float(right)
    if not math.isfinite(bound):
        raise ThresholdError(f"malformed threshold expression {text!r}: {right!r} is not a "
                             f"finite number")
    percentile: float | None = None
    method = left
    pmatch = _PERCENTILE.fullmatch(left)
    if pmatch:
        inner = pmatch.group(1)
        if not _NUMBER.fullmatch(inner) or not 0.0 <= float(inner) <= 100.0:
            raise ThresholdError(
                f"malformed threshold expression {text!r}: percentile {inner!r} must be a "
                f"number from 0 to 100, as in p(95) or p(99.9)")
        percentile = float(inner)
        method = "p"
    elif left not in ("avg", "min", "max", "med", "count", "rate", "value"):
        raise ThresholdError(
            f"malformed threshold expression {text!r}: unknown aggregation method {left!r}; "
            f"expected avg, min, max, med or p(N) (trends), count or rate (counters), "
            f"rate (rates), value (gauges)")
    return Expression(text.strip(), method, percentile, op, bound)


def parse_selector(text: str) -> tuple[str, Tags]:
    """``http_req_duration{scenario:browse}`` -> ``('http_req_duration',
    (('scenario', 'browse'),))``."""
    match = _SELECTOR.fullmatch(text)
    if not match:
        raise ThresholdError(
            f"malformed metric {text!r}: expected a metric name, optionally followed by a "
            f"submetric filter in braces, e.g. http_req_duration{{scenario:browse}}")
    name, braces = match.group(1), match.group(2)
    if not _METRIC_NAME.fullmatch(name):
        raise ThresholdError(f"malformed metric name {name!r}: at most 128 letters, digits "
                             f"or underscores, not starting with a digit")
    tags: list[tuple[str, str]] = []
    if braces is not None:
        inner = braces[1:-1]
        if not inner.strip():
            raise ThresholdError(f"malformed metric {text!r}: empty submetric filter {{}}")
        for part in inner.split(","):
            key, sep, value = part.partition(":")
            key, value = _unquote(key), _unquote(value)
            if not sep or not key or not value:
                raise ThresholdError(
                    f"malformed submetric filter {braces!r} in {text!r}: expected "
                    f"tag:value pairs separated by commas, e.g. {{name:search,status:200}}")
            if any(key == seen for seen, _ in tags):
                raise ThresholdError(f"submetric filter {braces!r} in {text!r} names tag "
                                     f"{key!r} twice")
            tags.append((key, value))
    return name, tuple(tags)


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_threshold(text: str) -> Threshold:
    """``METRIC[{tag:value,...}]: EXPRESSION``, the form of ``--threshold``."""
    depth = 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == ":" and depth == 0:
            metric, tags = parse_selector(text[:index])
            return Threshold(metric, tags, parse_expression(text[index + 1:].strip()))
    raise ThresholdError(f"malformed threshold {text!r}: expected METRIC: EXPRESSION, {EXAMPLE}")


def from_options(options: Any, source: str) -> list[Threshold]:
    """The ``thresholds`` of a k6 options object: {metric: [expr | {threshold: expr}]}."""
    if not isinstance(options, dict) or "thresholds" not in options:
        raise ThresholdError(f"{source}: expected a JSON object with a 'thresholds' key, as in "
                             f"k6 options: {{\"thresholds\": {{\"http_req_duration\": "
                             f"[\"p(95)<500\"]}}}}")
    table = options["thresholds"]
    if not isinstance(table, dict):
        raise ThresholdError(f"{source}: 'thresholds' must be an object mapping metric names "
                             f"to lists of threshold expressions")
    result = []
    for name, entries in table.items():
        metric, tags = parse_selector(name)
        if isinstance(entries, str | dict):
            entries = [entries]
        if not isinstance(entries, list):
            raise ThresholdError(f"{source}: thresholds of {name!r} must be a list")
        for entry in entries:
            abort, delay = False, 0.0
            if isinstance(entry, dict):
                abort, delay = _abort_fields(entry, f"{source}: {name}")
                entry = entry.get("threshold")
            if not isinstance(entry, str):
                raise ThresholdError(
                    f"{source}: each threshold of {name!r} must be a string like 'p(95)<500' "
                    f"or an object with a 'threshold' string")
            try:
                expression = parse_expression(entry)
            except ThresholdError as exc:
                raise ThresholdError(f"{source}: {name}: {exc}") from None
            result.append(Threshold(metric, tags, expression, abort, delay))
    return result


def _abort_fields(entry: dict[str, Any], where: str) -> tuple[bool, float]:
    abort = entry.get("abortOnFail", False)
    if abort is None:
        abort = False
    if not isinstance(abort, bool):
        raise ThresholdError(f"{where}: abortOnFail must be true or false, not {abort!r}")
    delay = entry.get("delayAbortEval")
    try:
        seconds = 0.0 if delay in (None, "") else parse_duration(delay)
    except ThresholdError as exc:
        raise ThresholdError(f"{where}: delayAbortEval: {exc}") from None
    return abort, seconds


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                 "h": 3600.0}


def parse_duration(value: object) -> float:
    """Seconds of a k6 duration: ``"10s"``, ``"1m30s"``, ``"500ms"``; a bare number is
    milliseconds, as in k6's options."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ThresholdError(f"{value!r} is not a duration such as '10s' or '1m30s'")
    if isinstance(value, int | float):
        seconds = float(value) / 1000.0
    else:
        text = value.strip()
        if _NUMBER.fullmatch(text):
            seconds = float(text) / 1000.0
        else:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ThresholdError(f"{value!r} is not a duration such as '10s' or '1m30s'")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ThresholdError(f"{value!r} is not a duration such as '10s' or '1m30s'")
    return seconds


def load_file(path: Path) -> list[Threshold]:
    """Thresholds from a k6 options JSON file (``k6 run --config`` format)."""
    try:
        options = json.loads(path.read_text())
    except OSError as exc:
        raise ThresholdError(f"cannot read thresholds file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ThresholdError(f"{path}: not valid JSON: {exc}") from None
    return from_options(options, str(path))


def check_applicable(threshold: Threshold, kinds: Mapping[str, str], stored_keys: Iterable[str],
                     run_id: str) -> None:
    """Refuse a threshold on a metric the run lacks, a method its type lacks, or a filter
    on a tag key that was never stored for the run (the forwarder keeps only its --tags)."""
    kind = kinds.get(threshold.metric)
    if kind is None:
        known = ", ".join(sorted(kinds)) or "none"
        raise ThresholdError(f"threshold {threshold.selector}: {threshold.expression.text}: "
                             f"run {run_id!r} has no metric {threshold.metric!r} "
                             f"(its metrics: {known})")
    method = threshold.expression.method
    allowed = METHODS_BY_KIND[kind]
    if (method == "p" and "p(N)" not in allowed) or (method != "p" and method not in allowed):
        raise ThresholdError(
            f"threshold {threshold.selector}: {threshold.expression.text}: aggregation method "
            f"{threshold.expression.method_label} is not supported for {threshold.metric}, a "
            f"{kind} metric; supported: {', '.join(allowed)}")
    stored = set(stored_keys)
    for key, _ in threshold.tags:
        if key not in stored:
            raise ThresholdError(
                f"threshold {threshold.selector}: tag {key!r} is not stored for run {run_id!r}; "
                f"only the tag keys k6-forward grouped by (its --tags) are stored, here: "
                f"{', '.join(sorted(stored)) or 'none'}")


def matches(tags: Mapping[str, str], wanted: Tags) -> bool:
    """k6 submetric semantics: every wanted tag is present with exactly that value."""
    return all(tags.get(key) == value for key, value in wanted)
