"""The load generators of a run: the span they sampled, their names, what --wait waits for.

No I/O: the rows come from ``Reader.generators`` (the ``generators`` table, filled by the
servers from each k6-forward's start and end frames).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence

from td_report.database import GeneratorInfo


def printable(text: str) -> str:
    """A forwarder's text (host, script, k6 version) for a terminal: no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text)


def labels(generators: Sequence[GeneratorInfo]) -> dict[str, str]:
    """producer -> a name for humans: the host, with the start of the producer id when
    the host is unknown or shared by several generators (two k6 on one machine)."""
    hosts = Counter(g.host for g in generators)
    names = {}
    for g in generators:
        host = printable(g.host) if g.host else None
        if host and hosts[g.host] == 1:
            names[g.producer] = host
        else:
            names[g.producer] = f"{host or 'generator'} [{printable(g.producer[:8])}]"
    return names


def exit_text(g: GeneratorInfo) -> str:
    """'ok', 'exit 107' (flagged), or '-' when not known (running, pipe mode)."""
    if g.exit_status is None:
        return "-"
    return "ok" if g.exit_status == 0 else f"exit {g.exit_status}"


def failed(generators: Sequence[GeneratorInfo]) -> list[GeneratorInfo]:
    return [g for g in generators if g.exit_status not in (None, 0)]


def count_text(generators: Sequence[GeneratorInfo]) -> str:
    """'3 (1 running, 1 exited non-zero)'."""
    running = sum(1 for g in generators if g.running)
    notes = []
    if running:
        notes.append(f"{running} running")
    if bad := failed(generators):
        notes.append(f"{len(bad)} exited non-zero")
    return f"{len(generators)}" + (f" ({', '.join(notes)})" if notes else "")


def sample_span(generators: Sequence[GeneratorInfo] | None, seen: Collection[str],
                start: float | None, end: float | None) -> tuple[float, float] | str:
    """The run's first to last sample, cut to [start, end); or why it is not known.

    ``seen``: producer ids that wrote gauge rows for the run. The span is taken only when
    every generator has a row and has ended (a running one may still sample, and an
    unrecorded one may have sampled earlier or later); generators that ended without a
    first and last sample sent none and do not count. Within a window, only generators
    whose samples overlap it count.
    """
    if not generators:
        return "the run's first and last sample are not stored (no generator records)"
    names = labels(generators)
    if running := [g for g in generators if g.running]:
        return f"{names[running[0].producer]} has not ended"
    missing = set(seen) - {g.producer for g in generators}
    if missing:
        return (f"{len(missing)} generator(s) in the data have no generator record "
                f"(an older k6-forward?)")
    sampled = [(g.first_sample, g.last_sample) for g in generators
               if g.first_sample is not None and g.last_sample is not None and g.samples != 0]
    if not sampled:
        return "no generator recorded its first and last sample"
    inside = [(a, b) for a, b in sampled
              if (start is None or b >= start) and (end is None or a < end)]
    if not inside:
        return "no generator sampled within the window"
    first = min(a for a, _ in inside)
    last = max(b for _, b in inside)
    if start is not None:
        first = max(first, start)
    if end is not None:
        last = min(last, end)
    if last <= first:
        return "the first and last sample are at the same time"
    return first, last


def waiting_for(generators: Sequence[GeneratorInfo] | None, run_id: str) -> str | None:
    """None when every generator of the run has ended and both servers have written
    all its buckets; else what is still missing, for humans."""
    if generators is None:
        return (f"no generator of run {run_id!r} has started: the database has no "
                f"generators table yet (servers of an older release?)")
    if not generators:
        return f"no generator of run {run_id!r} has started yet"
    names = labels(generators)
    parts = []
    for g in generators:
        name = names[g.producer]
        if g.running:
            parts.append(f"{name} still running")
            continue
        servers = [server for server, at in (("td-server", g.td_written_at),
                                             ("non-td-server", g.non_td_written_at))
                   if at is None]
        if servers:
            parts.append(f"{name}: buckets not yet written by {' and '.join(servers)}")
    if not parts:
        return None
    return (f"{len(parts)} of {len(generators)} generators of run {run_id!r}: "
            + ", ".join(parts))
