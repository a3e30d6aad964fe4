"""The fault schedule, drawn from one seed before anything runs: the same seed gives the
same faults, targets, times and durations (the processes' own timing still varies).

A fault holds the resources it touches (a daemon, Redis, the small disk) from its start
until it is healed plus a settling margin, so two faults never fight over one target, but
faults on different targets overlap: a daemon killed while Redis restarts, a disk filling
while a paused host wakes.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

HOSTS = ("h1", "h2", "h3")
SMALL_DISK_HOST = "h3"  # its state_dir is a small tmpfs

# kind -> (weight, how long it holds before it is healed: (min, max) seconds)
KINDS: dict[str, tuple[int, tuple[float, float]]] = {
    "kill9": (4, (0.2, 8.0)),  # kill -9 of a daemon, started again after the hold
    "term": (2, (0.2, 3.0)),  # SIGTERM (a clean stop), started again after the hold
    "pause": (2, (1.5, 4.0)),  # SIGSTOP of a daemon and its mock for a lease PLUS this
    "stop_alone": (2, (1.5, 4.0)),  # SIGSTOP of the daemon only (its mock runs on), as pause
    "redis_keep": (2, (0.3, 4.0)),  # kill -9 of Redis, restarted on its data
    "redis_wipe": (2, (0.3, 4.0)),  # kill -9 of Redis, restarted with an empty data dir
    "disk_full": (2, (2.0, 8.0)),  # the small state_dir filled, then freed
    "hostile": (2, (0.5, 1.5)),  # a burst of hostile clients on a daemon's socket
    "limit": (3, (0.0, 0.0)),  # settings set max_concurrent_builds on every host
    # with Sentinel (instead of the two above on Redis): kill -9 of the master, started
    # again (empty) after the hold, before or after the Sentinels promote a replica
    "failover": (3, (0.3, 6.0)),
    "switchover": (1, (2.0, 5.0)),  # SENTINEL FAILOVER, as an operator runs it
}
SINGLE_REDIS_ONLY = ("redis_keep", "redis_wipe")
PAST_A_LEASE = ("pause", "stop_alone")  # held for a lease and more
SENTINEL_ONLY = ("failover", "switchover")
SETTLE = 1.0  # seconds a target rests after a fault before the next one may touch it
LIMITS = (1, 2, 3)


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the run starts
    kind: str
    target: str  # a host, "redis", or "all" (a limit change)
    hold: float  # seconds until it is healed
    value: int = 0  # the new limit (limit changes)

    def describe(self) -> str:
        extra = f" -> {self.value}" if self.kind == "limit" else f" for {self.hold:.1f}s"
        return f"+{self.at:6.1f}s {self.kind:10} {self.target:5}{extra}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resources(kind: str, target: str) -> set[str]:
    if kind == "limit":  # every host answers, and Redis takes the new limit at once
        return {*HOSTS, "redis"}
    if kind == "disk_full":
        return {"disk"}
    return {target}


def default_kinds(sentinel: bool) -> tuple[str, ...]:
    other = SINGLE_REDIS_ONLY if sentinel else SENTINEL_ONLY
    return tuple(k for k in KINDS if k not in other)


def _target(kind: str, rng: random.Random) -> str:
    if kind.startswith("redis") or kind in SENTINEL_ONLY:
        return "redis"
    if kind == "limit":
        return "all"
    if kind == "disk_full":
        return SMALL_DISK_HOST
    return rng.choice(HOSTS)


def plan(
    seed: int, seconds: float, kinds: tuple[str, ...] | None = None, lease: float = 5.0
) -> list[Fault]:
    """Faults starting every 0.5-3 s over ``seconds``; a pause lasts a lease and more."""
    rng = random.Random(seed)
    names = [k for k in KINDS if k in (kinds or default_kinds(sentinel=False))]
    weights = [KINDS[k][0] for k in names]
    busy: dict[str, float] = {}
    faults: list[Fault] = []
    at = rng.uniform(1.0, 3.0)
    limit = 2
    while at < seconds:
        kind = rng.choices(names, weights)[0]
        target = _target(kind, rng)
        low, high = KINDS[kind][1]
        hold = rng.uniform(low, high) + (lease if kind in PAST_A_LEASE else 0.0)
        value = 0
        if kind == "limit":
            value = rng.choice([v for v in LIMITS if v != limit])
        needs = resources(kind, target)
        if all(busy.get(r, 0.0) <= at for r in needs):
            for r in needs:
                busy[r] = at + hold + SETTLE
            if kind == "limit":
                limit = value
            faults.append(Fault(round(at, 2), kind, target, round(hold, 2), value))
        at += rng.uniform(0.5, 3.0)
    return faults


def last_heal(faults: list[Fault]) -> float:
    return max((f.at + f.hold for f in faults), default=0.0)
