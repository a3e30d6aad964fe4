"""The chaos suite (tests/chaos/): each check catches its violation on a history made by
hand, and a short seeded run of real daemons under random faults violates nothing."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from tests.chaos import checks
from tests.chaos.checks import LimitRound, Run
from tests.chaos.plan import default_kinds, plan, resources

LEASE = 5.0


def run(host: str, build: int, token: int, start: float, end: float, exit: int = 0) -> Run:
    return Run(host, 1000 + build, build, token, "rebuild", start, end, exit, None)


def fault(t: float, kind: str, target: str, phase: str) -> dict[str, Any]:
    return {"t": t, "kind": "fault", "fault": kind, "target": target, "phase": phase}


def test_plan_is_reproducible_from_its_seed_and_never_overlaps_a_target() -> None:
    assert plan(7, 300) == plan(7, 300)
    assert plan(7, 300) != plan(8, 300)
    faults = plan(7, 600)
    assert {f.kind for f in faults} >= {"kill9", "pause", "redis_wipe", "limit", "disk_full"}
    for a in faults:
        for b in faults:
            if a is not b and a.at <= b.at < a.at + a.hold:
                assert not resources(a.kind, a.target) & resources(b.kind, b.target), (a, b)
    assert all(f.hold >= LEASE for f in faults if f.kind == "pause")


def test_a_sentinel_plan_fails_the_master_over_instead_of_restarting_one_redis() -> None:
    single = {f.kind for f in plan(7, 600)}
    assert not single & {"failover", "switchover"}
    faults = plan(7, 600, default_kinds(sentinel=True))
    kinds = {f.kind for f in faults}
    assert kinds >= {"failover", "switchover", "kill9", "pause", "limit"}
    assert not kinds & {"redis_keep", "redis_wipe"}
    assert {f.target for f in faults if f.kind in ("failover", "switchover")} == {"redis"}


def test_safety_counts_running_mocks_against_the_limit() -> None:
    ok = [run("h1", 1, 1, 0, 10), run("h2", 2, 2, 1, 5), run("h3", 3, 3, 5, 8)]
    assert checks.safety(ok, 2, [], {}, LEASE)[0] == []
    over = [*ok, run("h3", 4, 4, 2, 3)]
    [v] = checks.safety(over, 2, [], {}, LEASE)[0]
    assert v.check == "safety" and "3 mock builds running at once, limit in force 2" in v.what
    assert {e["build"] for e in v.evidence} == {1, 2, 4}


def test_safety_applies_a_lower_limit_only_to_grants_after_it() -> None:
    # limit 3 -> 1; three runs granted before (tokens 1-3) may go on; one granted after may
    # not start while one of them still runs
    rounds = [LimitRound(before=3, after=3, old=3, new=1)]
    before = [run("h1", 1, 1, 0, 10), run("h2", 2, 2, 0, 10), run("h3", 3, 3, 1, 10)]
    assert checks.safety(before, 3, rounds, {}, LEASE)[0] == []
    [v] = checks.safety([*before[:1], run("h2", 4, 4, 5, 6)], 3, rounds, {}, LEASE)[0]
    assert "limit in force 1" in v.what
    # a grant between the two reads of the token counter may have come under either limit
    wide = [LimitRound(before=3, after=9, old=3, new=1)]
    late = run("h1", 5, 5, 2, 3)
    assert checks.safety([*before[:2], late], 3, wide, {}, LEASE)[0] == []
    [v] = checks.safety([*before, late], 3, wide, {}, LEASE)[0]  # 4: more than either
    assert "limit in force 3" in v.what


def test_safety_judges_an_instant_by_its_newest_grant() -> None:
    # limit 1 -> 2: build 1 (token 1, under 1) is between its two mock steps when build 2
    # (token 2, under 2) starts; build 1's second step then starts: 2 running, limit 2
    rounds = [LimitRound(before=1, after=2, old=1, new=2)]
    runs = [run("h1", 1, 1, 0, 1), run("h2", 2, 2, 1.5, 4), run("h1", 1, 1, 2, 3)]
    assert checks.safety(runs, 1, [LimitRound(1, 1, 1, 2)], {}, LEASE)[0] == []
    assert checks.safety(runs, 1, rounds, {}, LEASE)[0] == []  # token 2 either way
    [v] = checks.safety(runs, 1, [], {}, LEASE)[0]  # no raise: over the limit
    assert "limit in force 1" in v.what


def test_a_paused_mock_does_not_count_but_must_be_fenced_when_it_wakes() -> None:
    paused = {"h1": [(2.0, 9.0)]}  # longer than the lease
    others = [run("h2", 2, 2, 3, 12), run("h3", 3, 3, 3, 12)]
    stopped = run("h1", 1, 1, 0, 9.5, exit=130)
    found, figures = checks.safety([stopped, *others], 2, [], paused, LEASE)
    assert found == [] and figures["fenced_runs"] == 1
    ran_on = run("h1", 1, 1, 0, 12.0, exit=130)
    [v] = checks.safety([ran_on, *others], 2, [], paused, LEASE)[0]
    assert "ran 3.00 s on" in v.what
    # one that exits 0 the moment it wakes (nobody can stop it first): no result
    finished = run("h1", 1, 1, 0, 9.5, exit=0)
    assert checks.safety([finished, *others], 2, [], paused, LEASE)[0] == []
    cut = checks.fenced([finished, *others], paused, LEASE)
    assert cut == {checks.run_key(finished)}
    final = {"h1": {1: {"id": 1, "state": "succeeded"}}}
    [v] = checks.nothing_lost([submitted("h1", 1)], final, [finished], cut)
    assert v.what == "a build succeeded without a successful mock run that held its slot"
    again = run("h1", 1, 2, 10, 11)  # run again: that success counts, once
    assert checks.nothing_lost([submitted("h1", 1)], final, [finished, again], cut) == []


def test_two_builds_under_one_token_are_caught() -> None:
    [v] = checks.safety([run("h1", 1, 7, 0, 2), run("h2", 2, 7, 1, 3)], 2, [], {}, LEASE)[0]
    assert "one fencing token" in v.what


def submitted(host: str, build_id: int) -> dict[str, Any]:
    return {"t": 0.0, "kind": "submit", "host": host, "id": build_id, "ok": True}


def test_nothing_lost_catches_a_dropped_an_unended_and_a_twice_run_build() -> None:
    history = [submitted("h1", 1), submitted("h1", 2), submitted("h2", 1)]
    final = {"h1": {1: {"id": 1, "state": "succeeded"}, 2: {"id": 2, "state": "queued"}}}
    runs = [run("h1", 1, 1, 0, 1), run("h1", 1, 2, 2, 3)]
    found = {v.what for v in checks.nothing_lost(history, final, runs)}
    assert found == {
        "an acknowledged build is gone",
        "an acknowledged build never ended (queued)",
        "a build never ended (queued)",
        "a build ran to success twice",
    }
    # run again after a kill -9 that came before its success was recorded: allowed
    killed = [*history, fault(1.5, "kill9", "h1", "start")]
    found = {v.what for v in checks.nothing_lost(killed, final, runs)}
    assert "a build ran to success twice" not in found
    # a SIGTERM in the run's last instant requeues it although mock exits 0: allowed
    stopped = [*history, fault(0.99, "term", "h1", "start")]
    found = {v.what for v in checks.nothing_lost(stopped, final, runs)}
    assert "a build ran to success twice" not in found
    # or when it ended while its daemon was stopped alone (woken past the lease): allowed
    alone = [*history, fault(0.5, "stop_alone", "h1", "start")]
    assert "a build ran to success twice" in {
        v.what for v in checks.nothing_lost(alone, final, runs)
    }
    alone.append(fault(1.2, "stop_alone", "h1", "end"))
    found = {v.what for v in checks.nothing_lost(alone, final, runs)}
    assert "a build ran to success twice" not in found


def test_a_success_without_a_successful_mock_run_is_caught() -> None:
    final = {"h1": {1: {"id": 1, "state": "succeeded"}}}
    [v] = checks.nothing_lost([submitted("h1", 1)], final, [run("h1", 1, 1, 0, 1, exit=30)])
    assert v.what == "a build succeeded without a successful mock run that held its slot"


def test_liveness_catches_a_stalled_queue_a_dead_owners_slot_and_a_crash() -> None:
    history = [
        fault(10.0, "kill9", "h2", "start"),
        {"t": 12.0, "kind": "slots", "holders": ["build_3@h2"]},
        {"t": 21.0, "kind": "slots", "holders": ["build_3@h2", "build_4@h1"]},
        {"t": 22.0, "kind": "daemon_died", "host": "h3"},
    ]
    found = checks.liveness(history, None, [run("h1", 5, 5, 0, math.inf)], LEASE, 90.0)
    whats = [v.what for v in found]
    assert any("did not drain" in w for w in whats)
    assert any("slot build_3@h2 held 11.0 s" in w for w in whats)
    assert "a daemon died with no fault on it" in whats
    assert "a mock never ended" in whats
    assert len(found) == 4  # the sample at 12 s is within the lease
    assert checks.liveness([], 100.0, [], LEASE, checks.drain_bound(20, 2)) == []
    [v] = checks.liveness([], 100.0, [], LEASE, checks.drain_bound(2, 2))
    assert v.what == "the queue did not drain within 93 s of the last fault"


def test_a_daemon_may_end_on_the_full_disk_only_by_refusing_to_start() -> None:
    refused = "<6>stopped\n<2>reqpmd cannot run: cannot open the build queue in /s: disk I/O error"
    crashed = "<6>build 3: building\nTraceback (most recent call last):\nsqlite3.OperationalError"
    exits = [
        {"t": 1.0, "kind": "daemon_exit_on_full_disk", "host": "h3", "log": refused},
        {"t": 2.0, "kind": "daemon_exit_on_full_disk", "host": "h3", "log": crashed},
    ]
    [v] = checks.liveness(exits, 1.0, [], LEASE, 90.0)
    assert v.what == "a daemon died on the full disk, not refusing a start"
    assert v.evidence == [exits[1]]


def test_consistency_catches_a_broken_store_a_bad_row_and_a_repository_that_lies() -> None:
    good = {
        "id": 1,
        "state": "succeeded",
        "submitted_at": 1.0,
        "finished_at": 2.0,
        "started_at": 1.5,
        "exit_code": 0,
        "error": None,
        "retries": 0,
    }
    bad = {**good, "id": 2, "exit_code": None}
    stores = {
        "h1": {"integrity": "ok", "builds": [good, bad]},
        "h2": {"integrity": "*** in database main ***", "builds": []},
    }
    repos = {"f42": {"error": None, "listed": {"a.rpm", "gone.rpm"}, "present": {"a.rpm"}}}
    found = checks.consistency(stores, repos, {"h3": "Traceback (most recent call last):"}, 3)
    whats = [v.what for v in found]
    assert "h1: build 2 succeeded without exit 0 and a start" in whats
    assert any(w.startswith("h2: integrity_check says") for w in whats)
    assert "repository f42: metadata and files differ" in whats
    assert "h3: the daemon logged an error" in whats
    assert len(found) == 4


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [20261129])
def test_a_short_chaos_run_violates_nothing(seed: int, short_tmp: Path) -> None:
    from tests.chaos.run import run_chaos

    report = run_chaos(seed, 35, short_tmp / "chaos", backlog=5)  # a short drain
    print(report.text(schedule=True))
    assert report.figures["mock_build_runs"] > 10, report.text()
    assert report.violations == [], report.text()
