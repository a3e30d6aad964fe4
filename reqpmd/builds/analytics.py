"""Queue analytics from the store: what `reqpmctl stats` shows.

For the builds that ended in a window: how many ended in each state; the time waiting for
a slot (waiting -> building) and from submit to start; the build's duration; each as
count, mean, p50, p90, p99 and max (nearest-rank percentiles: the smallest value with at
least p% of the values at or below it, so every figure is one that was measured);
throughput (builds ended per hour); slot utilisation (the busy slot-seconds of those
builds inside the window over the capacity, max_concurrent_builds x the window); the
busiest hour; and the builds ended in each hour of the window. One indexed query
(builds.finished_at) reads only the window's rows.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from reqpmd.builds.store import Store

BY = ("chroot", "project", "host", "user")
HOUR = 3600.0
MAX_HOURS = 24 * 366  # per-hour counts are kept for windows up to a year
_COLUMNS = (
    "state, chroot, project, submitted_name, submitted_by,"
    " submitted_at, waiting_at, started_at, finished_at"
)


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest rank: the smallest value with at least ``p`` % of the values <= it."""
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, Any]:
    """count, mean, p50, p90, p99, max; only the count when there is nothing to summarise
    (an empty window says so, and divides by nothing)."""
    if not values:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "mean": sum(ordered) / len(ordered),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": ordered[-1],
    }


def window_stats(
    store: Store,
    since: float,
    until: float,
    capacity: int,
    by: str | None = None,
    host: str = "",
) -> dict[str, Any]:
    """The figures of the builds that ended in [since, until), in all and per group."""
    if by is not None and by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}")
    rows = store.rows(
        f"SELECT {_COLUMNS} FROM builds WHERE finished_at >= ? AND finished_at < ?"
        " ORDER BY finished_at",
        (since, until),
    )
    groups: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
    for row in rows:
        groups[_key(row, by, host)].append(row)
    out: dict[str, Any] = {
        "since": since,
        "until": until,
        "capacity": capacity,
        "by": by,
        "all": _figures(rows, since, until, capacity),
    }
    if by is not None:
        out["groups"] = {k: _figures(v, since, until, capacity) for k, v in sorted(groups.items())}
    return out


def _key(row: tuple[Any, ...], by: str | None, host: str) -> str:
    _, chroot, project, name, uid = row[:5]
    if by == "chroot":
        return str(chroot)
    if by == "project":
        return str(project or "(none)")
    if by == "user":
        return str(name or uid)
    return host  # by host: this host's figures (--cluster merges the others')


def _figures(
    rows: Sequence[tuple[Any, ...]], since: float, until: float, capacity: int
) -> dict[str, Any]:
    states: Counter[str] = Counter()
    waits, to_start, durations = [], [], []
    busy = 0.0
    hours = max(1, min(MAX_HOURS, math.ceil((until - since) / HOUR)))
    per_hour = [0] * hours
    for state, _, _, _, _, submitted, waiting, started, finished in rows:
        states[str(state)] += 1
        per_hour[min(hours - 1, int((finished - since) // HOUR))] += 1
        if started is None:
            continue  # ended before it ran (cancelled while queued, refused)
        if waiting is not None:
            waits.append(max(0.0, started - waiting))
        to_start.append(max(0.0, started - submitted))
        durations.append(max(0.0, finished - started))
        busy += max(0.0, min(finished, until) - max(started, since))
    span = max(until - since, 1.0)
    busiest = max(range(hours), key=lambda h: per_hour[h]) if rows else None
    return {
        "builds": len(rows),
        "states": dict(sorted(states.items())),
        "slot_wait": summary(waits),
        "submit_to_start": summary(to_start),
        "duration": summary(durations),
        "per_hour": per_hour,
        "throughput_per_hour": len(rows) / (span / HOUR),
        "utilisation": busy / (capacity * span) if capacity > 0 else None,
        "busiest_hour": None
        if busiest is None
        else {"start": since + busiest * HOUR, "builds": per_hour[busiest]},
    }
