"""Queue analytics from the store: what `reqpmctl stats` shows.

For the builds that ended in a window: how many ended in each state; the time waiting for
a slot (waiting -> building) and from submit to start; the build's duration; each as
count, mean, p50, p90, p99 and max (nearest-rank percentiles: the smallest value with at
least p% of the values at or below it, so every figure is one that was measured);
throughput (builds ended per hour); slot utilisation (the busy slot-seconds inside the
window, of those builds and of the builds still running, over the capacity,
max_concurrent_builds x the window); the
busiest hour; and the builds ended in each hour of the window. One indexed query
(builds.finished_at) reads only the window's rows.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from reqpmd.builds.states import FINAL
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
    # builds still running hold slots too: their time inside the window is busy time
    running = store.rows(
        "SELECT chroot, project, submitted_name, submitted_by, started_at FROM builds"
        " WHERE state = 'building' AND started_at IS NOT NULL AND started_at < ?",
        (until,),
    )
    busy: dict[str, float] = defaultdict(float)
    for chroot, project, name, uid, started in running:
        held = max(0.0, until - max(started, since))
        busy[""] += held
        busy[_key(("", chroot, project, name, uid), by, host)] += held
    out: dict[str, Any] = {
        "since": since,
        "until": until,
        "capacity": capacity,
        "by": by,
        "all": _figures(rows, since, until, capacity, busy[""]),
    }
    if by is not None:
        out["groups"] = {
            k: _figures(v, since, until, capacity, busy.get(k, 0.0))
            for k, v in sorted(groups.items())
        }
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
    rows: Sequence[tuple[Any, ...]],
    since: float,
    until: float,
    capacity: int,
    running_busy: float = 0.0,
) -> dict[str, Any]:
    states: Counter[str] = Counter()
    waits, to_start, durations = [], [], []
    busy = running_busy
    # a window asked for as "1h" reaches the daemon a moment later: not a second hour
    hours = max(1, min(MAX_HOURS, math.ceil((until - since) / HOUR - 0.01)))
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


# -- across hosts: compact, mergeable aggregates published with each heartbeat ---------

WINDOWS = {"1h": HOUR, "24h": 24 * HOUR, "7d": 7 * 24 * HOUR}
# upper bounds (seconds) of the histogram buckets; the last one is open-ended
BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
_MEASURES = ("slot_wait", "submit_to_start", "duration")
_END_STATES = frozenset(str(s) for s in FINAL)


def _histogram(values: list[float]) -> dict[str, Any]:
    counts = [0] * (len(BUCKETS) + 1)
    for v in values:
        counts[next((i for i, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))] += 1
    return {"counts": counts, "sum": sum(values), "max": max(values, default=0.0)}


def aggregates(store: Store, now: float) -> dict[str, Any]:
    """This host's figures for each standard window, in a form that adds up across hosts
    (counts and histograms, never raw rows): what the heartbeat carries for --cluster."""
    out: dict[str, Any] = {"at": now}
    for name, span in WINDOWS.items():
        since = now - span
        rows = store.rows(
            f"SELECT {_COLUMNS} FROM builds WHERE finished_at >= ? AND finished_at < ?",
            (since, now),
        )
        states: Counter[str] = Counter()
        measured: dict[str, list[float]] = {m: [] for m in _MEASURES}
        hours = math.ceil(span / HOUR)
        per_hour = [0] * hours
        busy = 0.0
        for state, _, _, _, _, submitted, waiting, started, finished in rows:
            states[str(state)] += 1
            per_hour[min(hours - 1, int((finished - since) // HOUR))] += 1
            if started is None:
                continue
            if waiting is not None:
                measured["slot_wait"].append(max(0.0, started - waiting))
            measured["submit_to_start"].append(max(0.0, started - submitted))
            measured["duration"].append(max(0.0, finished - started))
            busy += max(0.0, min(finished, now) - max(started, since))
        out[name] = {
            "states": dict(states),
            "per_hour": per_hour,
            "busy": busy,
            **{m: _histogram(v) for m, v in measured.items()},
        }
    return out


def valid_aggregate(value: Any, window: str) -> dict[str, Any] | None:
    """One window of another host's aggregates as read from Redis (untrusted): the
    expected shape with finite, non-negative numbers, or None."""
    if not isinstance(value, dict) or not isinstance(value.get(window), dict):
        return None
    w = value[window]
    hours = math.ceil(WINDOWS[window] / HOUR)
    ok = (
        isinstance(w.get("states"), dict)
        and all(k in _END_STATES and _count(v) for k, v in w["states"].items())
        and isinstance(w.get("per_hour"), list)
        and len(w["per_hour"]) == hours
        and all(_count(v) for v in w["per_hour"])
        and _number(w.get("busy"))
        and all(_valid_histogram(w.get(m)) for m in _MEASURES)
    )
    return w if ok else None


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1e15


def _valid_histogram(h: Any) -> bool:
    return (
        isinstance(h, dict)
        and isinstance(h.get("counts"), list)
        and len(h["counts"]) == len(BUCKETS) + 1
        and all(_count(c) for c in h["counts"])
        and _number(h.get("sum"))
        and _number(h.get("max"))
    )


def merged(parts: list[dict[str, Any]], window: str, now: float, capacity: int) -> dict[str, Any]:
    """Several hosts' aggregates of one window as the figures window_stats gives. Means,
    counts and maxima are exact; percentiles are the upper bound of the bucket they fall
    in (capped by the maximum)."""
    span = WINDOWS[window]
    hours = math.ceil(span / HOUR)
    states: Counter[str] = Counter()
    per_hour = [0] * hours
    busy = 0.0
    hists: dict[str, dict[str, Any]] = {
        m: {"counts": [0] * (len(BUCKETS) + 1), "sum": 0.0, "max": 0.0} for m in _MEASURES
    }
    for part in parts:
        states.update(part["states"])
        per_hour = [a + b for a, b in zip(per_hour, part["per_hour"], strict=True)]
        busy += part["busy"]
        for m in _MEASURES:
            h = hists[m]
            h["counts"] = [a + b for a, b in zip(h["counts"], part[m]["counts"], strict=True)]
            h["sum"] += part[m]["sum"]
            h["max"] = max(h["max"], part[m]["max"])
    builds = sum(states.values())
    busiest = max(range(hours), key=lambda i: per_hour[i]) if builds else None
    return {
        "builds": builds,
        "states": dict(sorted(states.items())),
        **{m: _summary_of(hists[m]) for m in _MEASURES},
        "per_hour": per_hour,
        "throughput_per_hour": builds / (span / HOUR),
        "utilisation": busy / (capacity * span) if capacity > 0 else None,
        "busiest_hour": None
        if busiest is None
        else {"start": now - span + busiest * HOUR, "builds": per_hour[busiest]},
        "approximate": ["p50", "p90", "p99"],
    }


def _summary_of(h: dict[str, Any]) -> dict[str, Any]:
    count = sum(h["counts"])
    if count == 0:
        return summary([])

    def at(p: float) -> float:
        rank, seen = max(1, math.ceil(p / 100 * count)), 0
        for i, c in enumerate(h["counts"]):
            seen += c
            if seen >= rank:
                return float(min(BUCKETS[i], h["max"])) if i < len(BUCKETS) else float(h["max"])
        return float(h["max"])

    return {
        "count": count,
        "mean": h["sum"] / count,
        "p50": at(50),
        "p90": at(90),
        "p99": at(99),
        "max": h["max"],
    }
