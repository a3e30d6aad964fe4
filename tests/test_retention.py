"""Retention and orphaned mock roots, in-process with the real store, real createrepo_c,
the mock stand-in and a real Redis; time is a wall clock the test sets, not days of
waiting."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.builds.process import popen_runner
from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.states import Publish, State
from reqpmd.builds.store import Store
from reqpmd.config.parse import validate
from reqpmd.config.schema import Settings
from reqpmd.maintenance.job import Maintenance
from reqpmd.maintenance.orphans import Orphans
from reqpmd.maintenance.retention import DAY, RECORD_DAYS, Retention
from reqpmd.repos.metadata import verify
from reqpmd.repos.publisher import Publisher
from tests import rpms
from tests.conftest import MakeLimiter
from tests.daemon_harness import FAKEMOCK
from tests.mounts import tmpfs

ROOT = Path(__file__).resolve().parent.parent
C1, C2 = "fedora-42-x86_64", "epel-9-x86_64"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories holding the real RPMs of tests/data/hello and greet."""
    made = rpms.build_data(tmp_path_factory.mktemp("rpms"), "hello", "greet")
    return {name: files[0].parent for name, files in made.items()}


class World:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.settings: Settings = validate(
            {
                "state_dir": str(root / "state"),
                "host_id": "h1",
                "mock_root_dir": str(root / "mock"),
                "mock_command": str(FAKEMOCK),
                **settings,
            },
            environ={},
        )
        self.settings.mock_root_dir.mkdir(parents=True)
        self.store = Store(self.settings.state_dir)
        self.publisher = Publisher(self.store, lambda: self.settings)
        self.now = time.time()
        self.retention = Retention(
            self.store, self.publisher, lambda: self.settings, wall=lambda: self.now
        )

    def build(
        self,
        package: str | None,
        state: State,
        age_days: float | None,
        chroot: str = C1,
        rpms_from: Path | None = None,
        project: str | None = None,
    ) -> int:
        inputs = self.store.stage({"x.spec": b"Name: x\n"})
        build_id = self.store.submit(
            chroot=chroot,
            kind="spec",
            source="x.spec",
            inputs=inputs,
            priority=0,
            uid=0,
            project=project,
        )
        result = self.store.files(build_id).result
        result.mkdir(parents=True)
        (self.store.files(build_id).log).write_bytes(b"log\n" * 1000)
        if rpms_from is not None:
            for rpm in rpms_from.iterdir():
                shutil.copy2(rpm, result / rpm.name)
        if age_days is None:  # still running
            self.store.transition(build_id, State.WAITING)
            self.store.transition(build_id, State.BUILDING)
            return build_id
        if state != State.CANCELLED:
            self.store.transition(build_id, State.WAITING)
            self.store.transition(build_id, State.BUILDING)
        extra = {"publish_state": Publish.PENDING} if state == State.SUCCEEDED else {}
        self.store.transition(
            build_id,
            state,
            finished_at=self.now - age_days * DAY,
            package=package,
            **extra,
        )
        return build_id

    def scheduler(self) -> Scheduler:
        return Scheduler(self.store, None, lambda: self.settings, popen_runner)  # type: ignore[arg-type]

    def tree(self) -> dict[str, tuple[int, int]]:
        """Every file under state_dir and repo_dir (but the database), with size and mtime."""
        out = {}
        for top in (self.settings.state_dir,):
            for path in top.rglob("*"):
                if path.is_file() and not path.name.startswith("reqpm.db"):
                    st = path.stat()
                    out[str(path)] = (st.st_size, st.st_mtime_ns)
        return out


def served(w: World, chroot: str = C1) -> set[int]:
    repo = w.publisher.repository(chroot)
    verify(repo.layout)
    hrefs = {p.href for p in repo.packages()}
    assert all((repo.layout.root / h).is_file() for h in hrefs)  # never a deleted file
    return {int(h.split("/")[0].split("-")[1]) for h in hrefs}


def test_old_builds_go_and_the_newest_served_build_of_each_package_stays(
    tmp_path: Path, built: dict[str, Path]
) -> None:
    w = World(tmp_path, cleanup_builds_after_days=30)
    old_greet = w.build("greet", State.SUCCEEDED, 40, rpms_from=built["greet"], project="a")
    newest_greet = w.build("greet", State.SUCCEEDED, 35, rpms_from=built["greet"], project="a")
    old_hello = w.build("hello", State.SUCCEEDED, 50, rpms_from=built["hello"], project="b")
    young_hello = w.build("hello", State.SUCCEEDED, 2, rpms_from=built["hello"], project="b")
    failed = w.build("broken", State.FAILED, 40)
    cancelled = w.build(None, State.CANCELLED, 100)
    running = w.build(None, State.BUILDING, None)
    w.publisher._pass()
    assert served(w) == {old_greet, newest_greet, old_hello, young_hello}

    plan = w.retention.plan()
    assert sorted(d.build.id for d in plan.delete) == [old_greet, old_hello, failed, cancelled]
    assert plan.keep == [(newest_greet, f"the newest build of greet that repository {C1} serves")]
    report = w.retention.run()
    assert sorted(report["cleaned"]) == [old_greet, old_hello, failed, cancelled]
    assert report["bytes"] > 0
    assert served(w) == {newest_greet, young_hello}
    for gone in (old_greet, old_hello, failed, cancelled):
        b = w.store.get(gone)  # the history record stays
        assert b.cleaned_at is not None and not w.store.files(gone).root.exists()
        assert b.published_at is None
    for kept in (newest_greet, young_hello, running):
        assert w.store.files(kept).log.exists() and w.store.get(kept).cleaned_at is None
    assert w.store.get(running).state == State.BUILDING
    # the next run has nothing left to do
    assert w.retention.run()["cleaned"] == []


def test_a_dry_run_changes_nothing(tmp_path: Path, built: dict[str, Path]) -> None:
    w = World(tmp_path)
    w.build("greet", State.SUCCEEDED, 40, rpms_from=built["greet"])
    w.build("greet", State.SUCCEEDED, 31, rpms_from=built["greet"])
    w.build("x", State.FAILED, 90)
    w.publisher._pass()
    before = w.tree()
    job = Maintenance(
        w.retention,
        Orphans(w.scheduler(), None, lambda: w.settings, popen_runner),  # type: ignore[arg-type]
        lambda: w.settings,
        lambda: None,
    )  # type: ignore[arg-type]
    plan = job.plan()
    assert len(plan["builds"]["delete"]) == 2 and plan["builds"]["bytes"] > 0
    assert plan["builds"]["files"] >= 4  # each: its spec and its log at least
    assert w.tree() == before


def test_history_records_are_kept_a_year(tmp_path: Path) -> None:
    w = World(tmp_path)
    build_id = w.build("x", State.FAILED, 40)
    w.retention.run()
    assert w.store.get(build_id).cleaned_at is not None
    w.now += (RECORD_DAYS - 40) * DAY - 60
    assert w.retention.run()["records_forgotten"] == 0
    w.now += 120
    assert w.retention.run()["records_forgotten"] == 1


_CHILD = """
import sys, time
from pathlib import Path
from reqpmd.builds.store import Store
from reqpmd.config.parse import validate
from reqpmd.maintenance.retention import Retention
from reqpmd.repos.publisher import Publisher
s = validate({"state_dir": sys.argv[1], "host_id": "h1"}, environ={})
store = Store(s.state_dir)
print("ready", flush=True)
Retention(store, Publisher(store, lambda: s), lambda: s).run()
print("done", flush=True)
"""


def test_kill_9_in_the_middle_of_a_cleanup_leaves_repositories_consistent(
    tmp_path: Path, built: dict[str, Path]
) -> None:
    w = World(tmp_path)
    rng = random.Random(7)
    for round_ in range(3):
        ids = [
            w.build("greet", State.SUCCEEDED, 40, chroot=(C1, C2)[i % 2], rpms_from=built["greet"])
            for i in range(6)
        ]
        w.build("greet", State.SUCCEEDED, 1, chroot=C1, rpms_from=built["greet"])
        w.build("greet", State.SUCCEEDED, 1, chroot=C2, rpms_from=built["greet"])
        w.publisher._pass()
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(w.settings.state_dir)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.3))  # a different moment of the run each round
        child.send_signal(signal.SIGKILL)
        child.wait()
        for chroot in (C1, C2):
            served(w, chroot)  # whatever moment it died at: no listed file is missing
        w.retention.run()  # the next run finishes the job
        assert all(w.store.get(i).cleaned_at is not None for i in ids), round_
        for chroot in (C1, C2):
            assert not set(ids) & served(w, chroot)


def _root(w: World, name: str) -> Path:
    path = w.settings.mock_root_dir / name
    (path / "root" / "usr").mkdir(parents=True)
    return path


def test_orphaned_roots_are_scrubbed_through_mock_unless_in_use(
    tmp_path: Path,
    redis_server: Any,
    rclient: redis.Redis,
    make_limiter: MakeLimiter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = World(tmp_path)
    monkeypatch.setenv("FAKEMOCK_ROOT_DIR", str(w.settings.mock_root_dir))
    monkeypatch.setenv("FAKEMOCK_LOG", str(tmp_path / "mock.jsonl"))
    limiter = make_limiter(rclient, max_concurrent=lambda: 4, namespace="orphans", host="h2")
    limiter.declare_no_survivors()
    ended = w.build(None, State.CANCELLED, 1)
    running = w.build(None, State.BUILDING, None)
    held = w.build("x", State.SUCCEEDED, 1)  # a build of that number holds a slot somewhere
    assert limiter.try_acquire(f"build_{held}@h2", labels={"build_id": held, "host_id": "h2"})
    in_use = w.build(None, State.CANCELLED, 1, chroot=C2)
    kept = w.build(None, State.FAILED, 1)
    w.settings = w.settings.replace(keep_failed_roots=True)
    orphan, orphan_boot = _root(w, f"{C1}-build{ended}"), _root(w, f"{C1}-bootstrap-build{ended}")
    mine = _root(w, f"{C1}-build{running}")
    elsewhere = _root(w, f"{C1}-build{held}")
    mounted = _root(w, f"{C2}-build{in_use}")
    kept_root = _root(w, f"{C1}-build{kept}")
    not_ours = [
        _root(w, f"{C1}-build999"),  # no such build here: another host's, maybe
        _root(w, f"{C2}-build{ended}"),  # build {ended} is not a {C2} build
        _root(w, "rhel-9-build2"),  # the default root of a config named like one
        _root(w, f"{C1}-build0{ended}"),  # mock never writes a leading zero
        _root(w, C1),
    ]
    scheduler = Scheduler(w.store, limiter, lambda: w.settings, popen_runner)
    with tmpfs(mounted / "root" / "proc", "size=1m"):
        orphans = Orphans(scheduler, limiter, lambda: w.settings, popen_runner)
        plan = {r.path.name: r for r in orphans.plan()}
        assert plan[orphan.name].skip is None and plan[orphan_boot.name].skip is None
        assert "is building here" in (plan[mine.name].skip or "")
        assert "holds a slot" in (plan[elsewhere.name].skip or "")
        assert "mounted" in (plan[mounted.name].skip or "")
        assert "keep_failed_roots" in (plan[kept_root.name].skip or "")
        assert not set(plan) & {p.name for p in not_ours}
        report = orphans.run()
        assert sorted(report["scrubbed"]) == sorted([str(orphan), str(orphan_boot)])
        for path in (mine, elsewhere, mounted, kept_root, *not_ours):
            assert path.is_dir()
        assert not orphan.exists() and not orphan_boot.exists()
        log = (tmp_path / "mock.jsonl").read_text()
        assert "--scrub=chroot" in log and "--scrub=all" not in log
    # Redis gone: nothing can be ruled out, so nothing is touched
    redis_server.kill()
    later = w.build(None, State.CANCELLED, 1)
    leftover = _root(w, f"{C1}-build{later}")
    (plan_down,) = [r for r in orphans.plan() if r.path == leftover]
    assert "Redis is unreachable" in (plan_down.skip or "")


def test_a_closed_disk_gate_runs_cleanup_at_once_and_says_which_setting_frees_more(
    tmp_path: Path,
) -> None:
    w = World(tmp_path, cleanup_builds_after_days=30)
    w.build("x", State.FAILED, 31)
    short: list[str | None] = [None]
    orphans = Orphans(w.scheduler(), None, lambda: w.settings, popen_runner)  # type: ignore[arg-type]
    clock = [0.0]
    job = Maintenance(
        w.retention, orphans, lambda: w.settings, lambda: short[0], clock=lambda: clock[0]
    )
    job._pass()  # the start's run
    assert job.last is not None and len(job.last["cleaned"]) == 1
    young = w.build("x", State.FAILED, 29)
    clock[0] += 60
    job._pass()
    assert job.last["why"] == "hourly"  # not due yet: the last run stays
    short[0] = "disk gate closed (1.0 GB free < 10 GB)"
    job._pass()  # the gate closed: a run at once
    assert job.last["why"] == "disk gate closed" and job.last["cleaned"] == []
    assert w.store.get(young).cleaned_at is None  # never younger than the setting
    assert "lower it to free more" in (job.shortage or "")
    assert "cleanup_builds_after_days=30" in (job.shortage or "")
    short[0] = None
    job._pass()
    assert job.shortage is None


def test_what_retention_must_not_lose(tmp_path: Path, built: dict[str, Path]) -> None:
    w = World(tmp_path, cleanup_builds_after_days=30)
    # a build retried between the plan and the run keeps its files
    retried = w.build("x", State.FAILED, 40)
    plan = w.retention.plan()
    w.scheduler().retry(retried)
    report = w.retention.run(plan)
    assert retried not in report["cleaned"]
    assert w.store.files(retried).submitted("x.spec").exists()
    assert w.store.get(retried).cleaned_at is None

    # the newest *succeeded* build is kept, not a newer one that failed on a retry
    good = w.build("greet", State.SUCCEEDED, 50, rpms_from=built["greet"])
    later = w.build("greet", State.SUCCEEDED, 45, rpms_from=built["greet"])
    w.publisher._pass()
    for state in (State.QUEUED, State.WAITING, State.BUILDING):
        w.store.transition(later, state)
    w.store.transition(later, State.FAILED, finished_at=w.now - 44 * DAY)
    w.retention.run()
    assert w.store.get(good).cleaned_at is None
    w.publisher._pass()  # the failed retry leaves the repository
    assert served(w) == {good}

    # a repository whose metadata cannot be read loses none of its builds
    repo = w.publisher.repository(C1)
    older = w.build("hello", State.SUCCEEDED, 60, rpms_from=built["hello"])
    w.publisher._pass()
    primary = next(p for p in repo.layout.repodata.iterdir() if "primary" in p.name)
    primary.write_bytes(b"broken")
    plan = w.retention.plan()
    assert {older, good} <= {i for i, _ in plan.keep}
    assert not {older, good} & {d.build.id for d in plan.delete}

    # a publish that kept failing is given up when the build is cleaned up
    owed = w.build("y", State.SUCCEEDED, 40)
    w.store.set_publish([w.store.get(owed)], Publish.PUBLISH_FAILED, "no space")
    w.retention.run()
    gone = w.store.get(owed)
    assert gone.cleaned_at is not None and gone.publish_state == Publish.NOT_PUBLISHED
    assert owed not in {b.id for b in w.store.to_publish()}
