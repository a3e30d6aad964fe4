"""The publisher's schedule, in-process with a fake clock and the real createrepo_c: the
sync every repository_sync_interval_minutes (read live), retries with backoff, batching
of pending builds, and what it records on builds."""

from __future__ import annotations

import errno
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from reqpmd.builds.states import Publish, State
from reqpmd.builds.store import Store
from reqpmd.config.parse import validate
from reqpmd.config.schema import Settings
from reqpmd.repos.createrepo import run_tool
from reqpmd.repos.metadata import verify
from reqpmd.repos.publisher import RETRY_FIRST, Publisher
from reqpmd.repos.repository import Repository
from reqpmd.repos.retired import OLD_REVISION_GRACE, Retired
from tests import rpms
from tests.fakes import FakeClock

CHROOT = "fedora-42-x86_64"


@pytest.fixture(scope="module")
def greet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rpms.need_rpmbuild()
    out = tmp_path_factory.mktemp("greet")
    built = rpms.build(rpms.DATA / "greet" / "greet.spec", out)
    return next(p for p in built if ".src." not in p.name)


class World:
    def __init__(self, root: Path, **settings: Any) -> None:
        self.settings: Settings = validate(
            {"state_dir": str(root / "state"), "host_id": "h1", **settings}, environ={}
        )
        self.store = Store(self.settings.state_dir)
        self.clock = FakeClock()
        self.runs: list[list[str]] = []
        self.publisher = Publisher(
            self.store, lambda: self.settings, tool=self._tool, clock=self.clock
        )
        self.publisher.repo_dir.mkdir(parents=True)

    def _tool(self, argv: list[str], timeout: float) -> tuple[int, str]:
        self.runs.append(argv)
        return run_tool(argv, timeout)

    def succeeded_build(self, rpm: Path) -> int:
        """A build as the scheduler leaves one that succeeded: result files, pending."""
        inputs = self.store.stage({"greet.spec": b"Name: greet\n"})
        build_id = self.store.submit(
            chroot=CHROOT, kind="spec", source="greet.spec", inputs=inputs, priority=0, uid=0
        )
        for state in (State.WAITING, State.BUILDING):
            self.store.transition(build_id, state)
        result = self.store.files(build_id).result
        result.mkdir(parents=True)
        shutil.copy2(rpm, result / rpm.name)
        self.store.transition(build_id, State.SUCCEEDED, publish_state=Publish.PENDING)
        return build_id


def test_pending_builds_are_published_with_one_metadata_run(tmp_path: Path, greet: Path) -> None:
    w = World(tmp_path)
    ids = [w.succeeded_build(greet) for _ in range(5)]
    w.publisher._pass()
    assert [w.store.get(i).publish_state for i in ids] == [Publish.PUBLISHED] * 5
    assert len(w.runs) == 1
    assert w.publisher.health(CHROOT)["published_builds"] == 5
    assert all(w.store.get(i).published_at for i in ids)


def test_the_sync_runs_every_interval_read_live(tmp_path: Path, greet: Path) -> None:
    w = World(tmp_path, repository_sync_interval_minutes=30)
    w.succeeded_build(greet)
    w.publisher._pass()  # the first pass: sync (nothing yet), then the publish
    repo = w.publisher.repository(CHROOT)
    by_hand = repo.layout.root / "by-hand"
    by_hand.mkdir()
    shutil.copy2(greet, by_hand / "copy.rpm")
    runs = len(w.runs)

    w.clock.advance(29 * 60)
    w.publisher._pass()
    assert len(w.runs) == runs  # not due yet: the hand-added RPM is not listed
    assert len(repo.packages()) == 1

    w.clock.advance(60)
    w.publisher._pass()
    assert len(w.runs) == runs + 1
    assert len(repo.packages()) == 2
    assert w.publisher.health(CHROOT)["last_sync"] == "update: RPMs were added or removed"

    # the interval is re-read: a shorter one applies from the last sync on
    w.settings = w.settings.replace(repository_sync_interval_minutes=5)
    (by_hand / "copy.rpm").unlink()
    w.clock.advance(5 * 60)
    w.publisher._pass()
    assert len(repo.packages()) == 1
    w.clock.advance(5 * 60)
    w.publisher._pass()
    assert w.publisher.health(CHROOT)["last_sync"] == "none: metadata matches the packages"
    assert len(w.runs) == runs + 2  # an unchanged repository costs no metadata run


def test_a_failing_repository_is_retried_with_backoff_and_reported(
    tmp_path: Path, greet: Path
) -> None:
    w = World(tmp_path)
    build_id = w.succeeded_build(greet)
    real_tool = w._tool
    broken = [True]

    def tool(argv: list[str], timeout: float) -> tuple[int, str]:
        if broken[0]:
            w.runs.append(argv)
            return 1, "C_CREATEREPOLIB: Critical: cannot write: No space left on device"
        return real_tool(argv, timeout)

    w.publisher.tool = tool
    w.publisher._pass()
    build = w.store.get(build_id)
    assert build.state == State.SUCCEEDED
    assert build.publish_state == Publish.PUBLISH_FAILED
    assert "No space left on device" in (build.publish_error or "")
    assert "No space left" in w.publisher.summary()["failing_repos"][CHROOT]["error"]
    assert "repository fedora-42-x86_64 failing" in (w.publisher.problem() or "")
    tries = len(w.runs)

    w.publisher._pass()  # within the backoff: no new try
    assert len(w.runs) == tries
    broken[0] = False
    w.clock.advance(RETRY_FIRST)
    w.publisher._pass()
    assert w.store.get(build_id).publish_state == Publish.PUBLISHED
    assert w.publisher.summary()["failing_repos"] == {}
    assert w.publisher.problem() is None


def test_a_build_without_packages_is_not_published_and_says_why(tmp_path: Path) -> None:
    w = World(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("not a package")
    build_id = w.succeeded_build(empty)
    w.publisher._pass()
    build = w.store.get(build_id)
    assert build.publish_state == Publish.NOT_PUBLISHED
    assert "produced no RPM" in (build.publish_error or "")
    assert w.runs == []


def _rerun(w: World, build_id: int, rpm: Path, end: State = State.SUCCEEDED) -> None:
    """A retry of the build, as mock does it: result files rewritten in place."""
    for state in (State.QUEUED, State.WAITING, State.BUILDING):
        w.store.transition(build_id, state)
    result = w.store.files(build_id).result
    for old in result.glob("*.rpm"):
        with open(old, "r+b") as f:  # the same inode, new bytes (mock's shutil.copy2)
            f.write(b"rewritten by the retry")
    (result / rpm.name).write_bytes(rpm.read_bytes())
    extra = {"publish_state": Publish.PENDING} if end == State.SUCCEEDED else {}
    w.store.transition(build_id, end, **extra)


def test_a_retried_build_is_published_anew_without_touching_what_is_served(
    tmp_path: Path, greet: Path
) -> None:
    w = World(tmp_path)
    build_id = w.succeeded_build(greet)
    w.publisher._pass()
    repo = w.publisher.repository(CHROOT)
    assert {p.href.split("/")[0] for p in repo.packages()} == {f"h1-{build_id}-1"}
    _rerun(w, build_id, greet)
    verify(repo.layout)  # the served package was copied: the retry's rewrite did not reach it
    w.publisher._pass()
    assert w.store.get(build_id).publish_state == Publish.PUBLISHED
    # the new attempt is served; the first left the metadata and waits out the grace
    assert {p.href.split("/")[0] for p in repo.packages()} == {f"h1-{build_id}-2"}
    assert (repo.layout.root / f"h1-{build_id}-1").is_dir()
    gone = Retired(repo.layout).prune(time.time() + OLD_REVISION_GRACE)
    assert f"h1-{build_id}-1" in gone  # with the metadata files of the revisions before
    assert all(g.startswith("repodata/") for g in gone if g != f"h1-{build_id}-1")
    assert not (repo.layout.root / f"h1-{build_id}-1").exists()


def test_a_published_build_that_is_retried_and_fails_leaves_the_repository(
    tmp_path: Path, greet: Path
) -> None:
    w = World(tmp_path)
    build_id = w.succeeded_build(greet)
    w.publisher._pass()
    _rerun(w, build_id, greet, end=State.FAILED)
    w.publisher._pass()
    repo = w.publisher.repository(CHROOT)
    assert repo.packages() == []
    assert w.store.get(build_id).published_at is None
    assert w.store.to_unpublish() == []


def test_a_run_retried_during_a_publish_is_not_taken_for_published(
    tmp_path: Path, greet: Path
) -> None:
    w = World(tmp_path)
    build_id = w.succeeded_build(greet)
    taken = w.store.to_publish()
    _rerun(w, build_id, greet)  # the new run ends while the pass works on the old one
    w.store.set_publish(taken, Publish.PUBLISHED)
    assert w.store.get(build_id).publish_state == Publish.PENDING


def test_a_failing_copy_backs_off_and_a_good_sync_does_not_hide_it(
    tmp_path: Path, greet: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = World(tmp_path)
    w.succeeded_build(greet)
    w.publisher._pass()  # the repository exists and is healthy
    second = w.succeeded_build(greet)

    def no_space(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Repository, "place", no_space)
    caplog.set_level(logging.INFO, logger="reqpmd.repos.publisher")
    delays = []
    for _ in range(4):
        w.publisher._pass()
        delays.append(w.publisher._health[CHROOT].retry_at - w.clock.now)
        w.clock.advance(delays[-1])
    assert delays == [RETRY_FIRST * 2**i for i in range(4)]
    assert w.store.get(second).publish_state == Publish.PUBLISH_FAILED
    assert sum("No space left" in r.message for r in caplog.records) == 1
    assert not any("working again" in r.message for r in caplog.records)
    monkeypatch.undo()
    w.publisher._pass()
    assert w.store.get(second).publish_state == Publish.PUBLISHED
    assert sum("working again" in r.message for r in caplog.records) == 1


def test_dnf_repo_ids_are_what_dnf_accepts(tmp_path: Path) -> None:
    from reqpmd.control.repositories import repo_id

    assert repo_id("h1", "centos-stream+epel-9-x86_64") == "reqpm-h1-centos-stream_epel-9-x86_64"


def test_repos_show_pages_and_names_that_are_not_repositories_are_refused(
    tmp_path: Path, greet: Path
) -> None:
    from reqpmd.control.repositories import RepositoryOps
    from reqpmd.errors import InvalidArgument, NotFound

    w = World(tmp_path)
    ids = [w.succeeded_build(greet) for _ in range(3)]
    w.publisher._pass()
    ops = RepositoryOps(w.publisher)
    first = ops.show({"chroot": CHROOT, "limit": 2})
    assert first["packages"] == 3 and len(first["package_list"]) == 2 and first["next"] == 2
    rest = ops.show({"chroot": CHROOT, "offset": 2, "limit": 2})
    assert rest["next"] is None
    assert sorted(p["build"] for p in first["package_list"] + rest["package_list"]) == ids
    for name in ("..", ".", ".reqpm", "-rf", "a/b"):
        with pytest.raises(InvalidArgument):
            ops.show({"chroot": name})
    with pytest.raises(NotFound):
        ops.show({"chroot": "epel-9-x86_64"})


def test_first_pass_syncs_with_the_real_clock(tmp_path: Path) -> None:
    """With time.monotonic (every read later than the last), the first pass still syncs
    every repository and the thread then rests until the next sync is due."""
    settings = validate({"state_dir": str(tmp_path / "state"), "host_id": "h1"}, environ={})
    publisher = Publisher(Store(settings.state_dir), lambda: settings, clock=time.monotonic)
    publisher._pass()
    assert publisher._last_sync is not None
    assert publisher._idle() > 1.0
