"""Repositories on disk with the real createrepo_c: placing builds, incremental and
batched metadata runs, readers during updates, syncs that repair, crashes and faults."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reqpmd.repos import createrepo, retired
from reqpmd.repos.createrepo import run_tool
from reqpmd.repos.layout import RepoLayout, build_of
from reqpmd.repos.lock import RepoLocks
from reqpmd.repos.metadata import MetadataError, data_files, verify
from reqpmd.repos.repository import NoPackages, Repository
from tests import rpms
from tests.mounts import tmpfs
from tests.workers import wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Real RPMs of tests/data/hello and greet (binary and source)."""
    return rpms.build_data(tmp_path_factory.mktemp("rpms"), "hello", "greet")


def result_dir(tmp: Path, *files: Path) -> Path:
    """A build's result directory as mock leaves it: RPMs and logs."""
    d = tmp / f"result-{len(list(tmp.glob('result-*')))}"
    d.mkdir()
    for f in files:
        (d / f.name).write_bytes(f.read_bytes())
    (d / "build.log").write_text("mock's log\n")
    return d


def repository(repo_dir: Path, chroot: str = "fedora-40-x86_64", host: str = "h1") -> Repository:
    return Repository(RepoLayout(repo_dir, chroot), RepoLocks(host), run_tool)


def listed(repo: Repository) -> dict[str, str]:
    return {p.href: p.nvr for p in repo.packages()}


def test_published_builds_are_listed_and_sources_are_kept_beside(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo = repository(tmp_path / "repos")
    umask = os.umask(0o027)  # the unit's: what dnf users read must not depend on it
    try:
        repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
        repo.place("h1", 2, result_dir(tmp_path, *built["greet"]))
        run = repo.update()
    finally:
        os.umask(umask)
    assert run is not None and run.skipped == []
    pkgs = repo.packages()
    assert sorted(p.nvr for p in pkgs) == ["greet-2.1-3", "hello-1.0-1"]
    assert {build_of(p.href) for p in pkgs} == {("h1", 1), ("h1", 2)}
    assert all(not p.href.endswith(".src.rpm") for p in pkgs)
    # the source RPMs sit beside the binaries, out of the binary metadata (as mock does)
    assert sorted(p.name for p in (repo.layout.root / "h1-1-1").iterdir()) == sorted(
        f.name for f in built["hello"]
    )
    verify(repo.layout)
    lay = repo.layout
    for d in (lay.repo_dir, lay.root, lay.repodata, lay.root / "h1-1-1"):
        assert d.stat().st_mode & 0o777 == 0o755, d
    for f in [*lay.repodata.iterdir(), *(lay.root / "h1-1-1").iterdir()]:
        assert f.stat().st_mode & 0o777 == 0o644, f


def test_one_new_build_reads_only_its_own_packages(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    """createrepo_c matches old metadata by file name: distinct packages are reused (a
    rebuild of one name-version-release in another build is read again, documented)."""
    repo = repository(tmp_path / "repos")
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    first = repo.update()
    assert first is not None and len(first.read) == 1
    repo.place("h1", 2, result_dir(tmp_path, *built["greet"]))
    second = repo.update()
    assert second is not None
    assert second.read == [f"h1-2-1/{f.name}" for f in built["greet"] if ".src." not in f.name]
    assert len(repo.packages()) == 2


def test_a_build_without_rpms_is_refused(tmp_path: Path) -> None:
    repo = repository(tmp_path / "repos")
    with pytest.raises(NoPackages, match="produced no RPM"):
        repo.place("h1", 1, result_dir(tmp_path))
    assert not (repo.layout.root / "h1-1-1").exists()


def test_a_corrupt_rpm_dropped_in_by_hand_is_skipped_and_named(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo = repository(tmp_path / "repos")
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    (repo.layout.root / "by-hand").mkdir()
    (repo.layout.root / "by-hand" / "broken-1-1.noarch.rpm").write_bytes(b"not an rpm" * 50)
    run = repo.update()
    assert run is not None
    assert len(run.skipped) == 1 and run.skipped[0].startswith("by-hand/broken-1-1.noarch.rpm: ")
    assert list(listed(repo).values()) == ["hello-1.0-1"]
    assert repo.sync().action == "none"  # not tried again at every sync while unchanged
    greet = next(f for f in built["greet"] if ".src." not in f.name)
    (repo.layout.root / "by-hand" / "broken-1-1.noarch.rpm").write_bytes(greet.read_bytes())
    assert repo.sync().action == "update"  # replaced by a good one: picked up
    assert sorted(listed(repo).values()) == ["greet-2.1-3", "hello-1.0-1"]


def test_sync_picks_up_hand_changes_repairs_broken_metadata_and_else_does_nothing(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo = repository(tmp_path / "repos")
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    repo.update()
    assert repo.sync().action == "none"
    revision = repo.layout.repomd.read_bytes()
    assert repo.sync().action == "none" and repo.layout.repomd.read_bytes() == revision

    # an RPM copied in by hand, then one removed by hand
    extra = repo.layout.root / "extra"
    extra.mkdir()
    greet = next(f for f in built["greet"] if ".src." not in f.name)
    (extra / greet.name).write_bytes(greet.read_bytes())
    assert repo.sync().action == "update"
    assert sorted(listed(repo).values()) == ["greet-2.1-3", "hello-1.0-1"]
    for f in (repo.layout.root / "h1-1-1").iterdir():
        f.unlink()
    assert repo.sync().action == "update"
    assert list(listed(repo).values()) == ["greet-2.1-3"]

    # primary metadata damaged on disk: its checksum no longer matches repomd.xml
    primary = next(d for d in data_files(repo.layout.repomd) if d.kind == "primary")
    (repo.layout.root / primary.href).write_bytes(b"garbage")
    with pytest.raises(MetadataError, match="does not match the checksum"):
        verify(repo.layout)
    result = repo.sync()
    assert result.action == "regenerate" and "checksum" in result.reason
    verify(repo.layout)
    assert list(listed(repo).values()) == ["greet-2.1-3"]

    # repodata gone entirely
    for f in repo.layout.repodata.iterdir():
        f.unlink()
    assert repo.sync().action == "regenerate"
    assert list(listed(repo).values()) == ["greet-2.1-3"]


def _read_revision(repo: RepoLayout) -> None:
    """Read as a client does: repomd.xml, then every file it names, checking checksums."""
    for data in data_files(repo.repomd):
        digest = hashlib.sha256((repo.root / data.href).read_bytes()).hexdigest()
        assert digest == data.checksum, f"{data.href}: a mix of two revisions"


def test_readers_during_updates_see_one_whole_revision(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo = repository(tmp_path / "repos")
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    repo.update()
    stop = threading.Event()
    reads: list[int] = []
    errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                _read_revision(repo.layout)
                reads.append(1)
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(2, 10):
            repo.place("h1", i, result_dir(tmp_path, *built["greet" if i % 2 else "hello"]))
            repo.update()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert len(reads) > 20
    assert len(repo.packages()) == 9


_CHILD = """
import sys, time
from pathlib import Path
from reqpmd.repos.createrepo import run_tool
from reqpmd.repos.layout import RepoLayout
from reqpmd.repos.lock import RepoLocks
from reqpmd.repos.repository import Repository
repo = Repository(RepoLayout(Path(sys.argv[1]), "c"), RepoLocks(sys.argv[2]), run_tool)
results = Path(sys.argv[3])
start = int(sys.argv[4])
for i in range(start, start + int(sys.argv[5])):
    repo.place(sys.argv[2], i, results)
    repo.update()
    print(i, flush=True)
"""


def _child(
    repo_dir: Path, host: str, results: Path, start: int, count: int
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(repo_dir), host, str(results), str(start), str(count)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_kill_9_in_the_middle_of_metadata_runs_leaves_a_consistent_repository(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo_dir = tmp_path / "repos"
    results = result_dir(tmp_path, *built["hello"])
    repo = Repository(RepoLayout(repo_dir, "c"), RepoLocks("h0"), run_tool)
    repo.place("h0", 1, results)
    repo.update()
    for round_ in range(4):
        child = _child(repo_dir, "h1", results, 100 * (round_ + 1), 50)
        assert child.stdout is not None
        child.stdout.readline()  # at least one whole run done, the next under way
        threading.Event().wait(0.03 * round_)  # a different moment of the next run each time
        child.send_signal(signal.SIGKILL)
        child.wait()
        verify(repo.layout)  # whatever moment it died at: one whole revision is served
        _read_revision(repo.layout)
    result = repo.sync()  # the next start: packages placed but not in metadata get in
    verify(repo.layout)
    on_disk = {
        p.parent.name for p in repo.layout.root.rglob("*.rpm") if not p.name.endswith(".src.rpm")
    }
    assert {p.href.split("/")[0] for p in repo.packages()} == on_disk
    assert result.action in ("update", "none")
    assert not list(repo.layout.work.glob("staging-*"))  # no half-written revision left


def test_two_daemons_publishing_into_one_repo_dir_serialise_and_lose_nothing(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo_dir = tmp_path / "repos"
    results = result_dir(tmp_path, *built["greet"])
    children = [_child(repo_dir, f"host{n}", results, 1, 6) for n in (1, 2)]
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        assert out.split() == [str(i) for i in range(1, 7)]
    repo = repository(repo_dir, "c")
    verify(repo.layout)
    owners = {build_of(p.href) for p in repo.packages()}
    assert owners == {(f"host{n}", i) for n in (1, 2) for i in range(1, 7)}


def test_batched_requests_are_served_by_one_run(tmp_path: Path) -> None:
    """Requests that arrive while a run is going are merged into the next one."""
    locks = RepoLocks("h1")
    lay = RepoLayout(tmp_path / "repos", "c")
    runs: list[list[str]] = []
    gate = threading.Event()

    def slow_run(retire: list[str]) -> int:
        runs.append(retire)
        gate.wait(10)
        return len(runs)

    first = threading.Thread(target=locks.batched, args=(lay, slow_run, []))
    first.start()
    wait_until(lambda: runs == [[]], timeout=10)
    waiters = [
        threading.Thread(target=locks.batched, args=(lay, slow_run, [f"h1-{i}-1"]))
        for i in range(5)
    ]
    for t in waiters:
        t.start()
    wait_until(lambda: len([p for p in lay.pending.iterdir() if p.name[0] != "."]) == 6, timeout=10)
    gate.set()
    for t in [first, *waiters]:
        t.join(10)
    assert len(runs) == 2  # the running one, then one for all five waiters
    assert runs[1] == [f"h1-{i}-1" for i in range(5)]  # retiring what each asked for
    assert list(lay.pending.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "size=1m") as mount:
        yield mount


def test_disk_full_during_a_metadata_run_keeps_the_served_revision(
    small_disk: Path, tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    repo = repository(small_disk)
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    repo.update()
    served = repo.layout.repomd.read_bytes()
    repo.place("h1", 2, result_dir(tmp_path, *built["greet"]))
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    with pytest.raises((MetadataError, OSError)):
        repo.update()
    assert repo.layout.repomd.read_bytes() == served
    verify(repo.layout)
    assert not list(repo.layout.work.glob("staging-*"))
    filler.unlink()
    assert repo.update() is not None
    assert sorted(listed(repo).values()) == ["greet-2.1-3", "hello-1.0-1"]


def test_repo_dir_not_writable_is_an_error_not_a_crash(
    tmp_path: Path, built: dict[str, list[Path]]
) -> None:
    blocker = tmp_path / "repos"
    blocker.write_text("a file where the repositories should be")
    repo = repository(blocker)
    with pytest.raises(OSError):
        repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))


def test_metadata_argv_is_incremental_and_excludes_sources(tmp_path: Path) -> None:
    lay = RepoLayout(tmp_path, "c")
    argv = createrepo.metadata_argv("createrepo_c", lay, tmp_path / "s", update=True)
    assert "--update" in argv and argv[argv.index("--excludes") + 1] == "*.src.rpm"
    assert argv[-1] == str(lay.root)
    assert os.path.basename(createrepo.command()).startswith("createrepo_c")


def test_what_left_the_metadata_is_deleted_by_a_sync_once_its_grace_is_over(
    tmp_path: Path, built: dict[str, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = repository(tmp_path / "repos")
    repo.place("h1", 1, result_dir(tmp_path, *built["hello"]))
    repo.update()
    repo.update(["h1-1-1"])  # unpublished: out of the metadata, still on disk
    assert repo.packages() == [] and (repo.layout.root / "h1-1-1").is_dir()
    assert repo.sync().action == "none"
    assert (repo.layout.root / "h1-1-1").is_dir()  # within the grace
    later = time.time() + retired.OLD_REVISION_GRACE + 1
    monkeypatch.setattr(retired.time, "time", lambda: later)
    repo.sync()  # a quiet repository: no metadata run, the sync deletes it
    assert not (repo.layout.root / "h1-1-1").exists()
