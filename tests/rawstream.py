"""Exact figures computed independently from raw k6 JSON lines, for comparison."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

GROUP_KEYS = ("name", "method", "status", "scenario", "group")


def epoch_ns(text: str) -> int:
    """Independent of common.timebucket: datetime for the second, Decimal for the fraction."""
    head, _, rest = text.partition(".")
    if rest:
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        offset = rest[len(digits):]
    else:
        head, offset = text[:19], text[19:]
        digits = ""
    offset = "+00:00" if offset == "Z" else offset
    whole = int(datetime.fromisoformat(head + offset).timestamp())
    return whole * 10**9 + int(Decimal("0." + (digits or "0")) * 10**9)


def load_points(path: Path, group_keys: tuple[str, ...] = GROUP_KEYS,
                width: int = 10) -> tuple[dict[str, str], list[dict[str, Any]]]:
    kinds: dict[str, str] = {}
    points = []
    for line in path.read_text().splitlines():
        if not line.startswith("{"):
            continue  # k6's end-of-test summary shares stdout with --out json=-
        obj = json.loads(line)
        if obj["type"] == "Metric":
            kinds[obj["data"]["name"]] = obj["data"]["type"]
            continue
        data = obj["data"]
        ns = epoch_ns(data["time"])
        tags = data.get("tags") or {}
        points.append({
            "metric": obj["metric"],
            "tags": tuple(sorted((k, tags[k]) for k in group_keys if k in tags)),
            "bucket": (ns // 10**9) // width * width,
            "ns": ns,
            "value": data["value"],
        })
    return kinds, points


def group(points_by_source: dict[str, list[dict[str, Any]]]) -> dict[tuple[Any, ...], Any]:
    """(metric, tags, bucket) -> {source: [(ns, value), ...]}."""
    out: dict[tuple[Any, ...], Any] = defaultdict(lambda: defaultdict(list))
    for source, points in points_by_source.items():
        for p in points:
            out[(p["metric"], p["tags"], p["bucket"])][source].append((p["ns"], p["value"]))
    return out
