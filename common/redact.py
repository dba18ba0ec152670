"""Keep database passwords (and other secrets) out of everything tdagg prints.

A DSN can carry its password in several places, all of which asyncpg or libpq accept:

* URL userinfo: ``postgresql://user:PASSWORD@host:5432/db`` (percent-escaped or not,
  with ``@`` inside the password, several hosts after the ``@``);
* URL query parameters: ``?password=...``, ``sslpassword=...``, ``passwd=...`` and any
  parameter whose name contains ``password``, ``passwd``, ``token`` or ``secret``;
* libpq keyword/value strings: ``host=h password=secret`` or
  ``password='a b\\'c'`` (single quotes, backslash escapes).

:func:`redact_dsn` replaces each of these with ``***`` and keeps the user, hosts, ports and
database visible. Error text may echo a password in a form none of these patterns match
(decoded, quoted, on its own), so :func:`redact_text` also replaces every known secret
string wherever it occurs; :func:`known_secrets` collects them from the DSNs in use and
from ``PGPASSWORD``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import traceback
import urllib.parse
from collections.abc import Iterable, Mapping

MASK = "***"

_SECRET_WORDS = ("password", "passwd", "token", "secret")
# Names of files or directories that hold a secret are not secrets themselves.
_NOT_SECRET_SUFFIXES = ("file", "path", "dir")
# Shorter secrets are masked only where they stand alone: replacing every "ab" in a
# message would garble it.
_MIN_ANYWHERE = 4

_SCHEME = re.compile(r"(?<![A-Za-z0-9+.\-])[A-Za-z][A-Za-z0-9+.\-]*://")
# key=value, as in a libpq keyword/value DSN, a URL query or Python's repr of keywords.
_KEY_EQ = re.compile(r"(?<![A-Za-z0-9_.%\-])(?P<key>[A-Za-z0-9_.%\-]+)\s*=\s*")
# "key": value and 'key': value, as in JSON or a Python dict's repr.
_KEY_COLON = re.compile(r"(?P<q>[\"'])(?P<key>[A-Za-z0-9_.%\-]+)(?P=q)\s*:\s*")
_URL_END = re.compile(r"[\s\"'<>]")  # where a URL inside a message ends
_PATH_START = re.compile(r"[/?#]")


def is_secret_name(name: str) -> bool:
    """Whether a setting or parameter called ``name`` holds a secret value."""
    lowered = urllib.parse.unquote_plus(name).lower()
    return (any(word in lowered for word in _SECRET_WORDS)
            and not lowered.endswith(_NOT_SECRET_SUFFIXES))


def _quoted_end(text: str, start: int) -> int:
    """End (exclusive) of the quoted value opening at ``start``; backslash escapes."""
    quote = text[start]
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return len(text)  # unterminated: the rest is the value


def _unquoted_end(text: str, start: int, stops: str, space_stops: bool = True) -> int:
    i = start
    while i < len(text) and not (space_stops and text[i].isspace()) and text[i] not in stops:
        i += 2 if text[i] == "\\" else 1
    return min(i, len(text))


def _query_value_end(text: str, start: int, whole: bool) -> int:
    """A URL query value ends at ``&`` or ``#`` (or white space, unless ``text`` is one
    DSN), except that ``&`` followed by something without ``=`` (an unescaped ``&`` in
    the password) is taken as part of it."""
    end = _unquoted_end(text, start, "&#", not whole)
    while end < len(text) and text[end] == "&":
        nxt = _unquoted_end(text, end + 1, "&#", not whole)
        if "=" in text[end + 1:nxt]:
            break
        end = nxt
    return end


def _unescape(value: str) -> str:
    """The value a libpq keyword/value parser would see."""
    if value[:1] in ("'", '"'):
        body = value[1:-1] if len(value) > 1 and value[-1] == value[0] else value[1:]
    else:
        body = value
    return re.sub(r"\\(.)", r"\1", body, flags=re.S)


def _userinfo_password(text: str, start: int, whole: bool) -> tuple[int, int] | None:
    """Span of the password in the URL authority that begins at ``start`` (after ``//``).

    Conservative: the userinfo runs to the *last* ``@`` before the path, so a password
    with an unescaped ``@`` (or ``/``) is masked whole; at worst some host text is too.
    """
    if whole:
        end = len(text)
    else:
        match = _URL_END.search(text, start)
        end = match.start() if match else len(text)
    first_at = text.find("@", start, end)
    if first_at < 0:
        return None
    colon = text.find(":", start, first_at)
    if colon < 0 or any(c in text[start:colon] for c in "/?#"):
        return None
    path = _PATH_START.search(text, first_at, end)
    last_at = text.rfind("@", first_at, path.start() if path else end)
    return colon + 1, last_at


def _secret_spans(text: str, whole: bool = False) -> list[tuple[int, int, str]]:
    """(start, end, raw value) of every secret value found in ``text``."""
    spans: list[tuple[int, int, str]] = []
    for match in _SCHEME.finditer(text):
        found = _userinfo_password(text, match.end(), whole)
        if found is not None:
            spans.append((found[0], found[1], text[found[0]:found[1]]))
    for match in _KEY_EQ.finditer(text):
        if not is_secret_name(match.group("key")):
            continue
        start = match.end()
        before = text[match.start() - 1] if match.start() else ""
        if start < len(text) and text[start] in "'\"":
            end = _quoted_end(text, start)
        elif before in ("?", "&"):
            end = _query_value_end(text, start, whole)
        else:
            end = _unquoted_end(text, start, "")
        spans.append((start, end, text[start:end]))
    for match in _KEY_COLON.finditer(text):
        if not is_secret_name(match.group("key")):
            continue
        start = match.end()
        if start < len(text) and text[start] in "'\"":
            end = _quoted_end(text, start)
        else:
            end = _unquoted_end(text, start, ",}]")
        spans.append((start, end, text[start:end]))
    return [s for s in spans if s[1] > s[0]]


def _mask_spans(text: str, spans: list[tuple[int, int, str]]) -> str:
    out: list[str] = []
    pos = 0
    for start, end, _ in sorted(spans):
        if end <= pos:
            continue
        out.append(text[pos:max(start, pos)])
        if start >= pos:
            out.append(MASK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def dsn_secrets(dsn: str | None) -> list[str]:
    """The secret values in ``dsn`` (a URL or keyword/value DSN), raw and decoded."""
    if not dsn:
        return []
    found: list[str] = []
    for _, _, raw in _secret_spans(dsn, whole=True):
        found.append(raw)
        if "&" in raw:  # asyncpg may name the parts after an unescaped "&" in an error
            found += raw.split("&")
        found.append(_unescape(raw))
        found.append(urllib.parse.unquote(raw))
        found.append(urllib.parse.unquote_plus(raw))
    return _unique(found)


def known_secrets(*dsns: str | None, environ: Mapping[str, str] | None = None) -> list[str]:
    """Secrets of the given DSNs, of ``TDAGG_DSN`` and ``PGPASSWORD``."""
    env = os.environ if environ is None else environ
    found: list[str] = []
    for dsn in (*dsns, env.get("TDAGG_DSN")):
        found += dsn_secrets(dsn)
    if env.get("PGPASSWORD"):
        found.append(env["PGPASSWORD"])
    return _unique(found)


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(s for s in items if s and s != MASK))


def _forms(secret: str) -> set[str]:
    """The ways a message may spell ``secret``."""
    forms = {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
             repr(secret)[1:-1], json.dumps(secret)[1:-1],
             secret.replace("\\", "\\\\").replace("'", "\\'")}
    return {f for f in forms if f}


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every DSN password and every known secret replaced by ``***``."""
    forms: set[str] = set()
    for secret in secrets:
        forms |= _forms(secret)
    for form in sorted(forms, key=len, reverse=True):
        if len(form) >= _MIN_ANYWHERE:
            text = text.replace(form, MASK)
        else:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])", MASK, text)
    return _mask_spans(text, _secret_spans(text))


def redact_dsn(text: str) -> str:
    """A DSN, or text that contains DSNs, with every password replaced by ``***``."""
    stripped = text.strip()
    looks_whole = bool(_SCHEME.match(stripped)) or bool(_KEY_EQ.match(stripped))
    return redact_text(text, dsn_secrets(stripped) if looks_whole else ())


def format_exception(exc: BaseException, secrets: Iterable[str] = ()) -> str:
    """The traceback of ``exc`` as Python would print it, redacted."""
    return redact_text("".join(traceback.format_exception(exc)), secrets)


class RedactingFormatter(logging.Formatter):
    """A log formatter whose output (message and traceback) passes :func:`redact_text`."""

    def __init__(self, fmt: str | None = None, secrets: Iterable[str] = ()) -> None:
        super().__init__(fmt)
        self.secrets = list(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record), self.secrets)
