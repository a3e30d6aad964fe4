"""Per-project caps through real daemons: two hosts share one Redis, a cap set with
`reqpmctl projects edit` on one host holds for the builds of both, and a build of a third
group starts at once while the capped projects' backlogs wait."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reqpmd.slots.server import RedisServer
from tests.conftest import MakeLimiter, fresh_start
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.gitrepos import Upstream, spec
from tests.test_reqpmctl import ctl
from tests.test_shares import queue_in

MOCK_SLEEP = 1.5  # each mock step: a project build holds its slot for two of them


def ok(d: Reqpmd, *args: str) -> str:
    r = ctl(d, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def groups(d: Reqpmd) -> dict[str, dict[str, Any]]:
    return {g["group"]: g for g in d.call("slots.list")["groups"]}


def project_runs(hosts: list[Reqpmd]) -> dict[str, list[dict[str, Any]]]:
    """Per group, one (start, end) interval per build: from its first mock step to its
    last, on whichever host it ran."""
    out: dict[str, list[dict[str, Any]]] = {}
    for d in hosts:
        project = {b["id"]: b["project"] or "~root" for b in d.call("build.list", {"limit": 100})}
        spans: dict[int, dict[str, Any]] = {}
        for run in d.mock_runs():
            ext = run["argv"][run["argv"].index("--uniqueext") + 1]
            build_id = int(ext.removeprefix("build"))
            span = spans.setdefault(build_id, {"start": run["start"], "end": run["end"]})
            span["start"], span["end"] = (
                min(span["start"], run["start"]),
                max(span["end"], run["end"]),
            )
        for build_id, span in spans.items():
            out.setdefault(project[build_id], []).append({**span, "mode": "rebuild"})
    return out


def test_project_caps_hold_across_hosts_and_a_third_group_is_not_held_back(
    daemons: Callable[..., Reqpmd], redis_server: RedisServer, tmp_path: Path
) -> None:
    from tests.daemon_harness import max_overlap

    fresh_start(redis_server)
    up = Upstream(tmp_path / "git")
    up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"})
    settings = {"max_concurrent_builds": 3, "publish": False, "auto_sync_projects": False}
    d1, d2 = (
        daemons(
            f"d{i}",
            host_id=f"h{i}",
            redis_url=redis_server.url,
            mock_sleep=MOCK_SLEEP,
            settings=settings,
            env={"FAKEMOCK_RPMBUILD": "0"},
        ).start()
        for i in (1, 2)
    )
    for name in ("alpha", "beta"):
        ok(d1, "projects", "add", name, "--git", up.url)  # its first build, alone
        out = ok(d1, "projects", "edit", name, "--max-concurrent", "1")
        assert "at most 1 slot(s), weight 1" in out and "sync is under way" not in out
    for name in ("alpha", "beta"):
        ok(d2, "projects", "add", name, "--git", up.url)  # the cap set on h1 holds here
        ok(d1, "projects", "build", name)
    # both capped projects hold their one slot, with a backlog, and just started
    wait_for(
        lambda: all(
            (g := groups(d1).get(name)) and g["holders"] == 1 and g["waiting"] >= 1
            for name in ("alpha", "beta")
        ),
        timeout=60,
    )

    def fresh_holders() -> dict[str, str] | None:
        listing = d1.call("slots.list")
        young = {h["group"]: h["name"] for h in listing["holders"] if h["age"] < 1.0}
        return young if set(young) == {"alpha", "beta"} else None

    before = wait_for(fresh_holders, timeout=60)
    third = d2.submit()  # no project: the group of its submitter, ~root
    d2.wait_state(third, {"building"}, timeout=MOCK_SLEEP)
    listing = d1.call("slots.list")
    held = {h["group"]: h["name"] for h in listing["holders"]}
    assert held == {**before, "~root": held.get("~root")}, "a capped project's slot was freed first"
    table = ok(d2, "slots", "list")
    assert "PROJECT" in table and "~root" in table
    status = d2.call("status")
    alpha = next(g for g in status["groups"] if g["group"] == "alpha")
    assert alpha["max_concurrent"] == 1 and alpha["holders"] == 1

    every = [(d, b["id"]) for d in (d1, d2) for b in d.call("build.list", {"limit": 100})]
    for d, build_id in every:
        assert d.wait_state(build_id, FINAL, timeout=120)["state"] == "succeeded", d.log()
    runs = project_runs([d1, d2])
    assert len(runs["alpha"]) == 3 and len(runs["beta"]) == 3
    assert max_overlap(runs["alpha"]) == 1 and max_overlap(runs["beta"]) == 1
    assert max_overlap([r for rs in runs.values() for r in rs]) <= 3


def test_a_share_outlives_a_restart_of_the_daemon_and_its_embedded_redis(
    daemons: Callable[..., Reqpmd], tmp_path: Path
) -> None:
    up = Upstream(tmp_path / "git")
    up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"})
    d = daemons(settings={"auto_sync_projects": False}, env={"FAKEMOCK_RPMBUILD": "0"}).start()
    ok(d, "projects", "add", "greet", "--git", up.url)
    ok(d, "projects", "edit", "greet", "--max-concurrent", "2", "--weight", "3")
    assert d.stop() == 0  # the embedded redis-server saves its snapshot as it stops
    d.start()
    assert "share:       at most 2 slot(s), weight 3" in ok(d, "projects", "show", "greet")


def test_status_and_slots_list_show_the_first_waiters_and_count_the_rest(
    daemons: Callable[..., Reqpmd], redis_server: RedisServer, make_limiter: MakeLimiter
) -> None:
    fresh_start(redis_server)
    d = daemons(redis_url=redis_server.url, settings={"max_concurrent_builds": 1}).start()
    other = make_limiter(redis_server.client(), max_concurrent=1, host="elsewhere")
    for i in range(301):  # one holds the one slot; 300 wait, 100 in each of 3 projects
        queue_in(other, f"w{i}", f"p{i % 3}")
    st = json.loads(ok(d, "--json", "status"))
    assert (len(st["waiting"]), st["waiting_total"]) == (50, 300)
    assert {g["group"]: g["waiting"] for g in st["groups"]} == {"p0": 100, "p1": 100, "p2": 100}
    text = ok(d, "slots", "list")
    assert "... and 250 more waiting (--all lists every one)" in text
    assert len(json.loads(ok(d, "--json", "slots", "list", "--all"))["waiting"]) == 300
    assert len(json.loads(ok(d, "--json", "status", "--all"))["waiting"]) == 300
