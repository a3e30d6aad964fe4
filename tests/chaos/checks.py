"""The invariants, checked on a finished run's history. Pure functions of what was
recorded, so each can be shown to catch its violation on a history made by hand.

1. safety: at no instant more mock builds running than the limit in force;
2. nothing lost: every acknowledged submission ends in exactly one final state, none is
   run to success twice, none is silently dropped;
3. liveness: the queue drains within drain_bound() after the last fault; no slot stays held
   by a dead or paused owner longer than a lease plus SLOT_BOUND; nothing dies by itself;
4. consistency: every store passes PRAGMA integrity_check and the state machine's rules;
   every repository's metadata lists exactly the packages present.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import defaultdict
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

FINAL = {"succeeded", "failed", "cancelled", "timed_out"}
BUILD_MODES = {"rebuild", "buildsrpm"}
FENCE_BOUND = 2.0  # seconds a mock woken after a pause past its lease may run before it is stopped
# From the last fault's end until every build has ended: DRAIN_BASE (a build that mock
# ends with exit 60 is retried max_build_retries times, backing off) and, for each build
# still to end then, per slot of the limit in force, two mock steps and DRAIN_HAND_OVER:
# the queue must keep moving at least that fast
DRAIN_BASE = 90.0
DRAIN_HAND_OVER = 1.0  # seconds per build beside its two mock steps
SLOT_BOUND = 5.0  # seconds past a lease a dead or paused owner's slot may still show
CRASH_KINDS = {"kill9", "term"}


@dataclass
class Violation:
    check: str
    what: str
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def show(self) -> str:
        lines = [f"[{self.check}] {self.what}"]
        lines += [f"    {e}" for e in self.evidence[:20]]
        if len(self.evidence) > 20:
            lines.append(f"    ... {len(self.evidence) - 20} more")
        return "\n".join(lines)


@dataclass
class Run:
    """One mock process of a build step, as the stand-in logged it."""

    host: str
    pid: int
    build: int
    token: int
    mode: str
    start: float
    end: float  # inf: no end line
    exit: int | None
    signal: str | None

    def brief(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "build": self.build,
            "token": self.token,
            "mode": self.mode,
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "exit": self.exit,
        }


def _run(start: dict[str, Any], end: dict[str, Any] | None) -> Run:
    """A run from its start line and its end line (None: it never logged one)."""
    return Run(
        start["host"],
        start["pid"],
        int(start["build"]),
        int(start["token"]),
        start["mode"],
        start.get("forked", start["t"]),  # it runs from its fork, before its start line
        end["t"] if end else math.inf,
        end.get("exit") if end else None,
        end.get("signal") if end else None,
    )


def runs(mock_events: list[dict[str, Any]]) -> list[Run]:
    """Pair the stand-in's start and end lines (same host and pid) of build steps."""
    started: dict[tuple[str, int], dict[str, Any]] = {}
    out = []
    for e in sorted(mock_events, key=lambda e: e["t"]):
        if e.get("mode") not in BUILD_MODES or e.get("token") is None:
            continue
        key = (e["host"], e["pid"])
        if e["event"] == "start":
            started[key] = e
        elif key in started:
            out.append(_run(started.pop(key), e))
    out += [_run(s, None) for s in started.values()]
    return sorted(out, key=lambda r: r.start)


# -- 1. safety ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitRound:
    """A change of max_concurrent_builds on every host: grants with a token up to
    ``before`` came under ``old``, past ``after`` under ``new``, between them either."""

    before: int | None
    after: int | None
    old: int
    new: int


def limit_for(token: int, initial: int, rounds: list[LimitRound]) -> int:
    limit = initial
    for r in rounds:
        if r.before is not None and token <= r.before:
            break
        # inside the change, or a bound unknown (Redis was away): either limit
        limit = r.new if r.after is not None and token > r.after else max(r.old, r.new)
    return limit


def pauses(
    history: list[dict[str, Any]], kind: str = "pause"
) -> dict[str, list[tuple[float, float]]]:
    """Per host, the intervals it was paused (SIGSTOP of the daemon and its mock; with
    ``kind`` "stop_alone", of the daemon only)."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    began: dict[str, float] = {}
    for e in history:
        if e["kind"] != "fault" or e.get("fault") != kind:
            continue
        if e["phase"] == "start":
            began[e["target"]] = e["t"]
        elif e["phase"] == "end" and e["target"] in began:
            out[e["target"]].append((began.pop(e["target"]), e["t"]))
    return out


def fenced(
    all_runs: list[Run], paused: dict[str, list[tuple[float, float]]], lease: float
) -> set[tuple[str, int, float]]:
    """The runs (by key) that a pause longer than the lease cut: their slot was gone when
    they woke, so nothing they did counts as a result."""
    return {
        run_key(r)
        for r in all_runs
        for p0, p1 in paused.get(r.host, [])
        if p1 - p0 >= lease and p0 < r.end and p1 > r.start
    }


def run_key(r: Run) -> tuple[str, int, float]:
    return (r.host, r.pid, r.start)


def safety(
    all_runs: list[Run],
    initial_limit: int,
    rounds: list[LimitRound],
    paused: dict[str, list[tuple[float, float]]],
    lease: float,
) -> tuple[list[Violation], dict[str, Any]]:
    """Sweep the runs' starts and ends. A run on a paused host is not running while it
    is paused; after a pause longer than the lease its slot is gone, so it must be
    stopped (FENCE_BOUND): that remainder is checked on its own and not counted against
    the limit. (Its mock may still exit 0 in the moment before anyone can stop it, the
    host's guard frozen with it: nothing_lost checks that no success is taken from it.)"""
    violations: list[Violation] = []
    segments: list[tuple[float, float, Run]] = []
    fenced = []
    for r in all_runs:
        start = r.start
        cut = False
        for p0, p1 in sorted(paused.get(r.host, [])):
            if p1 <= start or p0 >= r.end:
                continue
            segments.append((start, p0, r))
            if p1 - p0 >= lease:
                cut = True
                fenced.append(r.end - p1)
                if r.end - p1 > FENCE_BOUND:
                    violations.append(
                        Violation(
                            "safety",
                            f"a mock woken after a {p1 - p0:.1f} s pause (lease {lease:g} s) "
                            f"ran {r.end - p1:.2f} s on (bound {FENCE_BOUND} s)",
                            [r.brief()],
                        )
                    )
                break
            start = p1
        if not cut:
            segments.append((start, r.end, r))
    events = sorted(
        [(s, 1, r) for s, e, r in segments if e > s]
        + [(e, -1, r) for s, e, r in segments if e > s],
        key=lambda x: (x[0], x[1]),
    )
    running: list[Run] = []
    peak = 0
    for _, delta, r in events:
        if delta < 0:
            if r in running:
                running.remove(r)
            continue
        running.append(r)
        peak = max(peak, len(running))
        # the newest grant among them saw all the others held: its limit is the one in
        # force (an older grant's second mock step may start after a newer grant's first)
        allowed = limit_for(max(x.token for x in running), initial_limit, rounds)
        if len(running) > allowed:
            violations.append(
                Violation(
                    "safety",
                    f"{len(running)} mock builds running at once, limit in force {allowed}",
                    [x.brief() for x in running],
                )
            )
        twins = [x for x in running if x.token == r.token and x.build != r.build]
        if twins:
            violations.append(
                Violation(
                    "safety",
                    "two builds running under one fencing token",
                    [x.brief() for x in [r, *twins]],
                )
            )
    return violations, {
        "peak_running": peak,
        "fenced_runs": len(fenced),
        "fenced_max_s": round(max(fenced, default=0.0), 3),
    }


# -- 2. nothing lost ----------------------------------------------------------------------


def nothing_lost(
    history: list[dict[str, Any]],
    final: dict[str, dict[int, dict[str, Any]]],
    all_runs: list[Run],
    cut: AbstractSet[tuple[str, int, float]] = frozenset(),
) -> list[Violation]:
    """``final``: per host, every build its store holds at the end, by id. ``cut``: the
    fenced runs (see fenced()): a success of theirs is none."""
    violations = []
    acked = [e for e in history if e["kind"] == "submit" and e["ok"]]
    seen: set[tuple[str, int]] = set()
    for e in acked:
        key = (e["host"], e["id"])
        if key in seen:
            violations.append(Violation("nothing lost", "one id acknowledged twice", [e]))
        seen.add(key)
        build = final.get(e["host"], {}).get(e["id"])
        if build is None:
            violations.append(Violation("nothing lost", "an acknowledged build is gone", [e]))
        elif build["state"] not in FINAL:
            violations.append(
                Violation(
                    "nothing lost",
                    f"an acknowledged build never ended ({build['state']})",
                    [e, build],
                )
            )
    for builds in final.values():
        for build in builds.values():
            if build["state"] not in FINAL:
                violations.append(
                    Violation("nothing lost", f"a build never ended ({build['state']})", [build])
                )
    # success at most once: a successful run may be followed by another only when its
    # daemon could not record the success: killed or stopped while it ran or after (a
    # stop in its last instant requeues it, mock's exit 0 notwithstanding), or stopped alone
    # when the run ended (it woke past the lease: the run held no slot when it looked)
    crashes: dict[str, list[float]] = defaultdict(list)
    for e in history:
        if e["kind"] == "fault" and e.get("fault") in CRASH_KINDS and e["phase"] == "start":
            crashes[e["target"]].append(e["t"])
    stopped = pauses(history, "stop_alone")

    def unrecorded(host: str, first: Run, later: Run) -> bool:
        # a kill or stop from the run's start on: one in its last instant can still win
        return any(first.start <= t <= later.start for t in crashes[host]) or any(
            a <= first.end <= b for a, b in stopped[host]
        )

    by_build: dict[tuple[str, int], list[Run]] = defaultdict(list)
    for r in all_runs:
        if r.mode == "rebuild":
            by_build[(r.host, r.build)].append(r)

    def succeeded(r: Run) -> bool:
        return r.exit == 0 and run_key(r) not in cut

    for (host, build_id), rs in by_build.items():
        for first, later in itertools.pairwise(rs):
            if succeeded(first) and not unrecorded(host, first, later):
                violations.append(
                    Violation(
                        "nothing lost",
                        "a build ran to success twice",
                        [first.brief(), later.brief()],
                    )
                )
        build = final.get(host, {}).get(build_id)
        if build is not None and build["state"] == "succeeded" and not any(map(succeeded, rs)):
            violations.append(
                Violation(
                    "nothing lost",
                    "a build succeeded without a successful mock run that held its slot",
                    [build, *(r.brief() for r in rs)],
                )
            )
    for host, builds in final.items():
        for build in builds.values():
            if build["state"] == "succeeded" and not by_build.get((host, build["id"])):
                violations.append(
                    Violation("nothing lost", "a build succeeded without any mock run", [build])
                )
    return violations


# -- 3. liveness ----------------------------------------------------------------------------


def drain_bound(backlog: int, limit: int, mock_seconds: float = 1.0) -> float:
    return DRAIN_BASE + (2 * mock_seconds + DRAIN_HAND_OVER) * backlog / max(1, limit)


# The one way a daemon may end on a full state_dir: it refuses to start, in one line (a
# running one waits for room); dying any other way while the disk is full is a crash.
FULL_DISK_REFUSAL = "cannot open the build queue"


def liveness(
    history: list[dict[str, Any]],
    drained_after: float | None,
    all_runs: list[Run],
    lease: float,
    bound: float,
) -> list[Violation]:
    violations = []
    if drained_after is None or drained_after > bound:
        violations.append(
            Violation(
                "liveness",
                f"the queue did not drain within {bound:g} s of the last fault",
                [{"drained_after": drained_after}],
            )
        )
    for e in history:
        if e["kind"] == "daemon_died":
            violations.append(Violation("liveness", "a daemon died with no fault on it", [e]))
        if e["kind"] == "daemon_exit_on_full_disk" and FULL_DISK_REFUSAL not in e.get("log", ""):
            violations.append(
                Violation("liveness", "a daemon died on the full disk, not refusing a start", [e])
            )
        if e["kind"] == "fault" and e.get("fault") == "hostile" and e.get("answered") is False:
            violations.append(
                Violation("liveness", "a daemon stopped answering after hostile clients", [e])
            )
        if e["kind"] == "harness_error":
            violations.append(Violation("liveness", "the harness could not carry out a fault", [e]))
    for r in all_runs:
        if r.end == math.inf:
            violations.append(Violation("liveness", "a mock never ended", [r.brief()]))
    # a slot of a dead or paused owner must be gone within a lease and SLOT_BOUND
    away: dict[str, float] = {}
    for e in sorted(history, key=lambda e: e["t"]):
        if e["kind"] == "fault" and e.get("fault") in (*CRASH_KINDS, "pause", "stop_alone"):
            if e["phase"] == "start":
                away[e["target"]] = e["t"]
            elif e["phase"] == "end":
                away.pop(e["target"], None)
        elif e["kind"] == "slots":
            for name in e["holders"]:
                m = re.fullmatch(r"build_(\d+)@(.+)", name)
                if m and m.group(2) in away and e["t"] - away[m.group(2)] > lease + SLOT_BOUND:
                    violations.append(
                        Violation(
                            "liveness",
                            f"slot {name} held {e['t'] - away[m.group(2)]:.1f} s after its "
                            f"owner went away (lease {lease:g} s)",
                            [e],
                        )
                    )
    return violations


# -- 4. consistency -------------------------------------------------------------------------


def consistency(
    stores: dict[str, dict[str, Any]],
    repos: dict[str, dict[str, Any]],
    logs: dict[str, str],
    max_retries: int,
) -> list[Violation]:
    """``stores``: per host {"integrity": str, "builds": [row, ...]}; ``repos``: per
    repository {"error": str|None, "listed": set, "present": set}."""
    violations = []
    for host, store in stores.items():
        if store["integrity"] != "ok":
            violations.append(
                Violation("consistency", f"{host}: integrity_check says {store['integrity']}")
            )
        for b in store["builds"]:
            problem = _row_problem(b, max_retries)
            if problem:
                violations.append(
                    Violation("consistency", f"{host}: build {b['id']} {problem}", [b])
                )
    for name, repo in repos.items():
        if repo["error"]:
            violations.append(Violation("consistency", f"repository {name}: {repo['error']}"))
        elif repo["listed"] != repo["present"]:
            violations.append(
                Violation(
                    "consistency",
                    f"repository {name}: metadata and files differ",
                    [
                        {
                            "listed_only": sorted(repo["listed"] - repo["present"]),
                            "present_only": sorted(repo["present"] - repo["listed"]),
                        }
                    ],
                )
            )
    for host, text in logs.items():
        for line in text.splitlines():
            if "Traceback" in line or "internal error" in line:
                violations.append(
                    Violation(
                        "consistency", f"{host}: the daemon logged an error", [{"line": line[:300]}]
                    )
                )
                break
    return violations


def _row_problem(b: dict[str, Any], max_retries: int) -> str | None:
    if b["state"] not in FINAL:
        return f"is {b['state']}, not final"
    if b["finished_at"] is None or b["finished_at"] < b["submitted_at"]:
        return "has no finish time after its submission"
    if b["state"] == "succeeded" and (b["exit_code"] != 0 or b["started_at"] is None):
        return "succeeded without exit 0 and a start"
    if b["state"] == "failed" and not b["error"]:
        return "failed without saying why"
    if b["retries"] > max_retries + 1:
        return f"was retried {b['retries']} times (max_build_retries {max_retries})"
    return None
