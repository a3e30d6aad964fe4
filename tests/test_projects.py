"""Projects from git, in-process with real git repositories, the real store and a fake
clock: syncs, builds per commit, superseding, failures with backoff, clone cleanup."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.states import State
from reqpmd.builds.store import Store
from reqpmd.config.parse import validate
from reqpmd.config.schema import Settings
from reqpmd.projects import git as gitmod
from reqpmd.projects.registry import Project, Projects
from reqpmd.projects.syncer import START_SPREAD, ProjectSyncer
from tests.fakes import FakeClock
from tests.gitrepos import Upstream, spec

C1, C2 = "fedora-42-x86_64", "epel-9-x86_64"


class World:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.settings: Settings = validate(
            {"state_dir": str(root / "state"), "host_id": "h1", **settings}, environ={}
        )
        self.store = Store(self.settings.state_dir)
        self.projects = Projects(self.store)
        self.scheduler = Scheduler(self.store, None, lambda: self.settings, runner=None)  # type: ignore[arg-type]
        self.clock = FakeClock()
        self.wall = [time.time()]
        self.syncer = ProjectSyncer(
            self.store,
            self.projects,
            self.scheduler,
            lambda: self.settings,
            clock=self.clock,
            wall=lambda: self.wall[0],
        )

    def add(self, name: str, url: str, **kwargs: Any) -> Project:
        values: dict[str, Any] = {
            "branch": None,
            "spec": None,
            "chroots": (C1,),
            "priority": 0,
            "enabled": True,
            "created_at": self.wall[0],
            "created_by": "root",
        }
        values.update(kwargs)
        project = Project(name=name, url=url, **values)
        self.projects.add(project)
        return project

    def builds(self, name: str) -> list[Any]:
        return [b for b in self.store.recent(limit=1000) if b.project == name][::-1]

    def advance_hours(self, hours: float) -> None:
        self.clock.advance(hours * 3600)
        self.wall[0] += hours * 3600


@pytest.fixture
def upstream(tmp_path: Path) -> Upstream:
    up = Upstream(tmp_path / "git")
    up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"}, "first")
    return up


def test_the_first_sync_builds_the_head_in_every_chroot_from_that_commit(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path)
    head = gitmod.Git().run(["rev-parse", "HEAD"], cwd=upstream.bare).strip()
    w.add("greet", upstream.url, chroots=(C1, C2), priority=3)
    result = w.syncer.sync("greet")
    assert result["ok"] and result["commit"] == head
    builds = w.builds("greet")
    assert [(b.chroot, b.commit_id, b.state, b.priority) for b in builds] == [
        (C1, head, State.QUEUED, 3),
        (C2, head, State.QUEUED, 3),
    ]
    files = w.store.files(builds[0].id)
    assert files.submitted("greet.spec").read_text() == spec()
    assert (files.sources / "greet.sh").read_text() == "echo hi\n"
    assert builds[0].kind == "spec" and builds[0].submitted_name == "project greet"
    p = w.projects.get("greet")
    assert p.last_commit == head and p.last_sync_ok and p.last_sync_at
    # nothing moved: nothing is built
    again = w.syncer.sync("greet")
    assert again["ok"] and again["builds"] == [] and "unchanged" in again["result"]
    assert len(w.builds("greet")) == 2


def test_a_push_is_built_at_the_next_periodic_sync_exactly_at_its_commit(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path, sync_interval_hours=6)
    w.add("greet", upstream.url)
    w.syncer._pass()  # never synced: due within START_SPREAD
    w.clock.advance(START_SPREAD)
    w.syncer._pass()
    (first,) = w.builds("greet")
    w.store.transition(first.id, State.CANCELLED)  # out of the way: not superseding here
    pushed = upstream.commit({"greet.spec": spec(release="2")}, "release 2")
    w.advance_hours(5.9)
    w.syncer._pass()
    assert len(w.builds("greet")) == 1  # not due yet
    w.advance_hours(0.1)
    w.syncer._pass()
    latest = w.builds("greet")[-1]
    assert latest.commit_id == pushed and latest.state == State.QUEUED
    assert "Release: 2" in w.store.files(latest.id).submitted("greet.spec").read_text()


def test_quick_pushes_leave_one_queued_build_of_the_newest_commit(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path)
    w.add("greet", upstream.url)
    w.syncer.sync("greet")
    upstream.commit({"greet.spec": spec(release="2")})
    w.syncer.sync("greet")
    newest = upstream.commit({"greet.spec": spec(release="3")})
    w.syncer.sync("greet")
    builds = w.builds("greet")
    queued = [b for b in builds if b.state == State.QUEUED]
    assert [b.commit_id for b in queued] == [newest]
    superseded = [b for b in builds if b.state == State.CANCELLED]
    assert len(superseded) == 2
    assert all("superseded by commit" in (b.error or "") for b in superseded)


def test_a_repository_gone_from_disk_fails_the_sync_with_backoff_said_once(
    tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    w = World(tmp_path)
    w.add("greet", upstream.url)
    w.syncer.sync("greet")
    import shutil

    shutil.rmtree(upstream.bare)
    caplog.set_level(logging.ERROR, logger="reqpmd.projects.syncer")
    for _ in range(3):
        w.clock.advance(7 * 3600)  # past the interval and any backoff
        w.syncer._pass()
    p = w.projects.get("greet")
    assert p.last_sync_ok is False and "git fetch failed" in (p.last_sync_result or "")
    health = w.syncer.health("greet")
    assert "git fetch failed" in health["error"]
    assert w.syncer.failing() == {"greet": health["error"]}
    assert sum("sync failed" in r.message for r in caplog.records) == 1  # once per change
    # backoff: the next try comes sooner than the interval, then later
    assert 0 < health["next_sync_in"] <= 4 * gitmod.FETCH_TIMEOUT


def test_bad_projects_are_clear_sync_errors_that_build_nothing(tmp_path: Path) -> None:
    up = Upstream(tmp_path / "git")
    up.commit({"a.spec": spec("a", source=False), "b.spec": spec("b", source=False)})
    w = World(tmp_path)
    w.add("two", up.url)
    result = w.syncer.sync("two")
    assert not result["ok"] and "2 spec files at the top level (a.spec, b.spec)" in result["error"]
    w.add("nobranch", up.url, branch="nope")
    assert "no branch 'nope'" in w.syncer.sync("nobranch")["error"]
    w.add("nospec", up.url, spec="pkg/c.spec")
    assert "pkg/c.spec does not exist at commit" in w.syncer.sync("nospec")["error"]
    w.add("chosen", up.url, spec="b.spec")
    assert w.syncer.sync("chosen")["ok"]
    assert [b.source for b in w.builds("chosen")] == ["b.spec"]
    assert all(w.builds(n) == [] for n in ("two", "nobranch", "nospec"))


def test_a_missing_source_fails_the_build_before_mock_naming_it(tmp_path: Path) -> None:
    up = Upstream(tmp_path / "git")
    up.commit({"pkg/greet.spec": spec()})  # Source0 greet.sh is not committed
    w = World(tmp_path)
    w.add("greet", up.url, spec="pkg/greet.spec")
    assert w.syncer.sync("greet")["ok"]
    (build,) = w.builds("greet")
    assert build.state == State.FAILED and build.started_at is None
    assert "greet.sh, named by pkg/greet.spec, not in pkg at commit" in (build.error or "")


def test_clones_unused_for_the_configured_days_are_deleted_and_come_back(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path, cleanup_repos_after_days=7, auto_sync_projects=False)
    w.add("greet", upstream.url)
    w.add("gone", upstream.url)
    w.syncer.sync("greet")
    w.syncer.sync("gone")
    w.projects.remove("gone")
    assert w.syncer.cleanup() == ["gone"]  # its project was removed
    w.wall[0] += 6 * 86400
    assert w.syncer.cleanup() == []
    w.wall[0] += 2 * 86400
    assert w.syncer.cleanup() == ["greet"]
    assert not w.syncer.clone_of("greet").exists()
    assert w.syncer.sync("greet")["ok"]  # the next need clones again
    assert w.syncer.clone_of("greet").is_dir()


def test_auto_sync_off_stops_periodic_syncs_and_a_shorter_interval_applies_at_once(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path, sync_interval_hours=24)
    w.add("greet", upstream.url)
    w.syncer.sync("greet")
    upstream.commit({"greet.spec": spec(release="2")})
    w.settings = w.settings.replace(auto_sync_projects=False)
    w.advance_hours(30)
    w.syncer._pass()
    assert len(w.builds("greet")) == 1  # off: nothing fetched
    assert w.syncer.request_sync("greet")  # an explicit sync still works
    w.syncer._pass()
    assert len(w.builds("greet")) == 2
    pushed = upstream.commit({"greet.spec": spec(release="3")})
    w.settings = w.settings.replace(auto_sync_projects=True, sync_interval_hours=1)
    w.advance_hours(1)
    w.syncer._pass()
    assert w.builds("greet")[-1].commit_id == pushed


def test_a_hundred_projects_due_at_start_are_spread_out(tmp_path: Path) -> None:
    w = World(tmp_path)
    for i in range(100):
        w.add(f"p{i}", "file:///nonexistent")
    dues = sorted(w.syncer._due(w.syncer._state(p)) for p in w.projects.all())
    assert dues[-1] - dues[0] > 0.8 * START_SPREAD
    per_second = max(sum(1 for d in dues if int(d) == int(x)) for x in dues)
    assert per_second <= 3


@pytest.mark.parametrize(
    "url",
    ["-oProxyCommand=evil", "ext::sh -c evil", "fd::3", "relative/path", "https://x\nmore"],
)
def test_urls_that_could_run_commands_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        gitmod.check_url(url)


def test_credentials_never_appear_in_errors(tmp_path: Path) -> None:
    w = World(tmp_path)
    url = "https://builder:s3cr3t-pw@127.0.0.1:9/repo.git"
    w.add("private", url)
    result = w.syncer.sync("private")
    assert not result["ok"]
    assert "s3cr3t" not in result["error"]
    assert "s3cr3t" not in (w.projects.get("private").last_sync_result or "")
    assert gitmod.shown_url(url) == "https://builder:***@127.0.0.1:9/repo.git"
    for branch in ("-x", "a..b", "x\ny"):
        with pytest.raises(ValueError):
            gitmod.check_branch(branch)


def _ops(w: World, client: redis.Redis) -> Any:
    from reqpmd.control.projects import ProjectOps
    from reqpmd.slots.limiter import BuildConcurrencyLimiter

    limiter = BuildConcurrencyLimiter(client, auto_renew=False)
    return ProjectOps(w.projects, w.syncer, lambda: w.settings, limiter)


def test_add_refuses_what_can_never_build_and_changes_nothing(
    tmp_path: Path, rclient: redis.Redis
) -> None:
    from reqpmd.errors import AlreadyExists, InvalidArgument

    up = Upstream(tmp_path / "git")
    up.commit({"a.spec": spec("a", source=False), "b.spec": spec("b", source=False)})
    w = World(tmp_path)
    ops = _ops(w, rclient)
    bad = [
        ({"url": up.url}, "2 spec files at the top level (a.spec, b.spec)"),
        ({"url": up.url, "branch": "nope"}, "no branch 'nope'"),
        ({"url": up.url, "spec": "pkg/c.spec"}, "pkg/c.spec does not exist at commit"),
    ]
    for args, why in bad:
        with pytest.raises(InvalidArgument, match=re.escape(why)):
            ops.add({"name": "p", **args}, "root")
        assert w.projects.all() == [] and not w.syncer.clone_of("p").exists()
    # unreachable: added, and its first sync says why it failed
    shown = ops.add({"name": "far", "url": "file:///nonexistent/repo.git"}, "root")
    assert shown["last_sync_ok"] is False and "first sync failed" in shown["last_sync_result"]
    ok = ops.add({"name": "p", "url": up.url, "spec": "b.spec"}, "root")
    assert ok["name"] == "p"
    with pytest.raises(AlreadyExists):
        ops.add({"name": "p", "url": up.url, "spec": "a.spec"}, "root")
    assert w.projects.get("p").spec == "b.spec"
    with pytest.raises(InvalidArgument, match="no branch"):
        ops.edit({"name": "p", "branch": "nope"})
    assert w.projects.get("p").branch is None  # unchanged


def test_a_projects_share_is_edited_checked_and_shown(
    tmp_path: Path, upstream: Upstream, rclient: redis.Redis
) -> None:
    from reqpmd.errors import InvalidArgument
    from reqpmd.slots.limiter import Share

    w = World(tmp_path)
    ops = _ops(w, rclient)
    ops.add({"name": "greet", "url": upstream.url}, "root")
    shown = ops.show({"name": "greet"})
    assert (shown["max_concurrent"], shown["weight"], shown["share_known"]) == (None, 1, True)
    bad = [
        ({"max_concurrent": 21}, "max_concurrent 21 is out of range: an integer from 0 to 20"),
        ({"max_concurrent": -1}, "max_concurrent -1 is out of range"),
        ({"max_concurrent": "2"}, "max_concurrent '2' is out of range"),
        ({"weight": 0}, "weight 0 is out of range: an integer from 1 to 100"),
        ({"weight": 101}, "weight 101 is out of range"),
        ({"weight": 2, "branch": "-x"}, "branch"),  # one bad field: nothing changes
    ]
    for args, why in bad:
        with pytest.raises(InvalidArgument, match=re.escape(why)):
            ops.edit({"name": "greet", **args})
        assert ops.limiter.shares() == {}
    shown = ops.edit({"name": "greet", "max_concurrent": 2, "weight": 3})
    assert (shown["max_concurrent"], shown["weight"]) == (2, 3)
    shown = ops.edit({"name": "greet", "weight": 1})  # the cap stays
    assert ops.limiter.shares() == {"greet": Share(2, 1)}
    shown = ops.edit({"name": "greet", "max_concurrent": 0})  # no cap: the default share
    assert (shown["max_concurrent"], shown["weight"]) == (None, 1)
    assert ops.limiter.shares() == {}
    assert [p["weight"] for p in ops.list({})] == [1]


def test_builds_someone_asked_for_neither_supersede_nor_are_superseded(
    tmp_path: Path, upstream: Upstream
) -> None:
    w = World(tmp_path)
    w.add("greet", upstream.url)
    first = upstream.commit({"greet.spec": spec(release="2")})
    w.syncer.sync("greet")  # a sync build of `first`
    head = upstream.commit({"greet.spec": spec(release="3")})
    old = gitmod.Git().run(["rev-list", "--max-parents=0", "HEAD"], cwd=upstream.bare).strip()
    asked = w.syncer.build_now("greet", old, None, "alice (uid 1000)")["builds"]
    w.syncer.sync("greet")  # a sync build of `head` supersedes the sync build of `first`
    by_commit = {b.commit_id: b for b in w.builds("greet")}
    assert by_commit[first].state == State.CANCELLED
    assert by_commit[head].state == State.QUEUED
    (mine,) = [w.store.get(i) for i in asked]
    assert mine.state == State.QUEUED and mine.commit_id == old
    assert mine.submitted_name == "project greet, asked by alice (uid 1000)"


def test_superseding_never_stops_a_build_that_started(tmp_path: Path, upstream: Upstream) -> None:
    w = World(tmp_path)
    w.add("greet", upstream.url)
    w.syncer.sync("greet")
    (started,) = w.builds("greet")
    w.store.transition(started.id, State.WAITING)  # the scheduler took it meanwhile
    assert not w.scheduler.cancel_if_queued(started.id, "superseded")
    upstream.commit({"greet.spec": spec(release="2")})
    w.syncer.sync("greet")
    assert w.store.get(started.id).state == State.WAITING


def test_a_remote_that_renames_its_default_branch_is_followed(
    tmp_path: Path, upstream: Upstream
) -> None:
    from tests.gitrepos import git

    w = World(tmp_path)
    w.add("greet", upstream.url)
    assert w.syncer.sync("greet")["ok"]
    git("checkout", "-q", "-b", "trunk", cwd=upstream.work)
    pushed = upstream.commit({"greet.spec": spec(release="9")})
    git("push", "-q", "origin", "trunk", cwd=upstream.work)
    git("symbolic-ref", "HEAD", "refs/heads/trunk", cwd=upstream.bare)
    git("branch", "-D", upstream.branch, cwd=upstream.bare)
    result = w.syncer.sync("greet")
    assert result["ok"] and result["commit"] == pushed


def test_a_project_removed_during_its_sync_leaves_nothing_queued(
    tmp_path: Path, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path)
    w.add("greet", upstream.url)
    real = w.syncer._queue

    def queue_then_remove(*args: Any, **kwargs: Any) -> list[int]:
        ids = real(*args, **kwargs)
        w.projects.remove("greet")
        return ids

    monkeypatch.setattr(w.syncer, "_queue", queue_then_remove)
    result = w.syncer.sync("greet")
    assert not result["ok"] and "removed" in result["error"]
    assert all(b.state == State.CANCELLED for b in w.builds("greet"))
