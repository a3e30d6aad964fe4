"""Publishing through a real reqpmd, read back by real clients: dnf, and the repository
listing reqpmctl shows. The mock stand-in builds real RPMs with rpmbuild."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from reqpmctl.client import Client
from reqpmd.control import protocol
from reqpmd.repos.layout import RepoLayout
from reqpmd.repos.metadata import verify
from tests import rpms
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.mounts import tmpfs
from tests.test_reqpmctl import NOBODY, ctl

CHROOT = "fedora-42-x86_64"


@pytest.fixture(autouse=True)
def _tools() -> None:
    rpms.need_rpmbuild()


def submit_spec(d: Reqpmd, name: str, **kwargs: Any) -> int:
    with Client(d.socket, timeout=15) as c:
        return c.submit(spec=rpms.DATA / name / f"{name}.spec", sources=rpms.DATA / name, **kwargs)


def published(d: Reqpmd, build_id: int) -> dict[str, Any]:
    return wait_for(
        lambda: (b := d.build(build_id))["publish_state"] not in (None, "pending") and b,
        timeout=60,
    )


def dnf_packages(
    repo: Path | None, cache: Path, reposdir: Path | None = None
) -> set[tuple[str, ...]]:
    """What dnf itself finds in the repository: given by path, or by the .repo files of
    ``reposdir`` (as /etc/yum.repos.d/ would hold them)."""
    if shutil.which("dnf") is None:
        pytest.skip("dnf is not installed (Debian: apt-get install dnf; ./dev test does)")
    where = (
        [f"--setopt=reposdir={reposdir}"]
        if reposdir is not None
        else ["--setopt=reposdir=/dev/null", f"--repofrompath=reqpm,file://{repo}", "--repo=reqpm"]
    )
    done = subprocess.run(
        [
            "dnf",
            "-q",
            "--releasever=1",
            f"--setopt=cachedir={cache}",
            *where,
            "repoquery",
            "--qf",
            "%{name} %{version} %{release} %{arch}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {tuple(line.split()) for line in done.stdout.splitlines() if line.strip()}


def test_succeeded_builds_are_in_a_repository_dnf_reads(
    daemons: Callable[..., Reqpmd], tmp_path: Path
) -> None:
    d = daemons(mock_sleep=0.05, settings={"max_concurrent_builds": 4, "socket_group": "nogroup"})
    for path in (d.root.parent, d.root):
        os.chmod(path, 0o755)  # a user (nobody, in the socket's group) must reach the socket
    d.start()
    shout_srpm = next(
        p for p in rpms.build(rpms.DATA / "shout" / "shout.spec", tmp_path) if ".src." in p.name
    )
    ids = {
        "hello": submit_spec(d, "hello"),
        "greet": submit_spec(d, "greet"),
        "broken": submit_spec(d, "broken"),
    }
    with Client(d.socket, timeout=15) as c:
        ids["shout"] = c.submit(srpm=shout_srpm)
    ends = {name: d.wait_state(i, FINAL, timeout=90) for name, i in ids.items()}
    assert ends["broken"]["state"] == "failed"
    assert ends["broken"]["publish_state"] is None
    for name in ("hello", "greet", "shout"):
        assert ends[name]["state"] == "succeeded", d.log()
        assert published(d, ids[name])["publish_state"] == "published"
    repo = Path(d.call("repos.dnf_config", {"chroot": CHROOT})["baseurl"].removeprefix("file://"))
    found = dnf_packages(repo, tmp_path / "dnf-cache")
    assert {(n, v, r) for n, v, r, _ in found} == {
        ("hello", "1.0", "1"),
        ("greet", "2.1", "3"),
        ("shout", "0.3", "1"),
    }
    shown = d.call("repos.show", {"chroot": CHROOT})
    owners = {p["name"]: p["build"] for p in shown["package_list"]}
    assert owners == {"hello": ids["hello"], "greet": ids["greet"], "shout": ids["shout"]}
    # the source RPMs are published beside the binaries, outside the binary metadata
    assert sorted(p.name for p in repo.rglob("*.src.rpm")) == [
        "greet-2.1-3.src.rpm",
        "hello-1.0-1.src.rpm",
        "shout-0.3-1.src.rpm",
    ]
    status = d.call("status")
    assert status["publish"]["published"] == 3 and status["publish"]["failing_repos"] == {}

    # the operator's side, through reqpmctl: the stanza it prints is what dnf then uses
    stanza = ctl(d, "repos", "dnf-config", CHROOT)
    assert stanza.returncode == 0, stanza.stderr
    reposdir = tmp_path / "yum.repos.d"
    reposdir.mkdir()
    (reposdir / "reqpm.repo").write_text(stanza.stdout)
    assert dnf_packages(None, tmp_path / "dnf-cache-2", reposdir) == found
    listing = ctl(d, "--json", "repos", "list")
    (row,) = json.loads(listing.stdout)
    assert row["chroot"] == CHROOT and row["packages"] == 3 and row["last_error"] is None
    shown_text = ctl(d, "repos", "show", CHROOT).stdout
    assert f"{ids['greet']}" in shown_text and "2.1-3" in shown_text
    synced = ctl(d, "repos", "sync", CHROOT, "--wait")
    assert synced.returncode == 0 and "none: metadata matches" in synced.stdout
    assert ctl(d, "repos", "show", "no-such-chroot").returncode == protocol.EXIT_NOT_FOUND
    nobody = ctl(d, "repos", "sync", as_user=NOBODY)
    assert nobody.returncode == protocol.EXIT_PERMISSION, nobody.stderr
    # a member of the socket group who cannot read state_dir fetches a build's packages
    dest = d.root / "fetched-by-nobody"
    dest.mkdir()
    os.chmod(dest, 0o777)
    fetched = ctl(
        d, "builds", "fetch", str(ids["greet"]), "--dest", str(dest), "--rpms-only", as_user=NOBODY
    )
    assert fetched.returncode == 0, fetched.stderr
    assert sorted(p.name for p in dest.iterdir()) == [
        "greet-2.1-3.noarch.rpm",
        "greet-2.1-3.src.rpm",
    ]
    assert all(p.stat().st_uid == NOBODY[0] for p in dest.iterdir())


class ForeignRun:
    """Holds a repository's lock as another daemon's metadata run would."""

    def __init__(self, lock: Path) -> None:
        lock.parent.mkdir(parents=True, exist_ok=True)
        self.fd: int | None = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def end(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def test_ten_builds_of_two_daemons_sharing_repo_dir_need_fewer_runs_than_builds(
    daemons: Callable[..., Reqpmd], short_tmp: Path
) -> None:
    """Two daemons (two hosts sharing an NFS repo_dir, say) each finish five builds while
    another run holds the repository: all ten are published, with fewer runs than builds,
    and no two runs interleave (the flock; the metadata is whole at the end)."""
    repo_dir = short_tmp / "shared-repos"
    hosts = [
        daemons(
            f"d{n}",
            host_id=f"h{n}",
            mock_sleep=0.05,
            settings={"max_concurrent_builds": 5, "repo_dir": str(repo_dir)},
        )
        for n in (1, 2)
    ]
    foreign = ForeignRun(repo_dir / ".reqpm" / CHROOT / "lock")
    try:
        for d in hosts:
            d.start()
        ids = {d: [submit_spec(d, "greet") for _ in range(5)] for d in hosts}
        for d, mine in ids.items():
            for i in mine:
                assert d.wait_state(i, FINAL, timeout=120)["state"] == "succeeded"
                # nothing is published while the other run holds the repository
                assert d.build(i)["publish_state"] == "pending"
    finally:
        foreign.end()
    for d, mine in ids.items():
        for i in mine:
            wait_for(lambda d=d, i=i: d.build(i)["publish_state"] == "published", timeout=60)
    shown = [d.call("repos.show", {"chroot": CHROOT}) for d in hosts]
    listed = sorted((p["host"], p["build"]) for p in shown[0]["package_list"])
    expected = [(h, i) for d, h in zip(hosts, ("h1", "h2"), strict=True) for i in ids[d]]
    assert listed == sorted(expected)
    runs = sum(s["metadata_runs"] for s in shown)
    assert 1 <= runs <= 4, runs  # each daemon: at most one run before it waited, one after
    assert sum(s["published_builds"] for s in shown) == 10
    verify(RepoLayout(repo_dir, CHROOT))  # every file repomd.xml names matches its checksum


@pytest.fixture
def read_only_dir(short_tmp: Path) -> Iterator[Path]:
    """A file system that refuses writes (even root's) until remounted read-write."""
    with tmpfs(short_tmp / "ro-repos", "ro,size=16m") as mount:
        yield mount


def test_a_publish_failure_never_fails_the_build_and_is_retried_after_a_crash(
    daemons: Callable[..., Reqpmd], read_only_dir: Path
) -> None:
    d = daemons(mock_sleep=0.05, settings={"repo_dir": str(read_only_dir)}).start()
    kept_out = submit_spec(d, "hello", publish=False)
    build_id = submit_spec(d, "greet")
    for i in (kept_out, build_id):
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded"
    failed = published(d, build_id)
    assert failed["publish_state"] == "publish_failed"
    assert "Read-only file system" in failed["publish_error"]
    assert failed["state"] == "succeeded"
    assert d.build(kept_out)["publish_state"] == "not_published"
    assert "--no-publish" in d.build(kept_out)["publish_error"]
    status = d.call("status")
    assert "Read-only" in status["publish"]["failing_repos"][CHROOT]["error"]
    assert f"repository {CHROOT} failing" in status["summary"]
    wait_for(lambda: "repository fedora-42-x86_64: cannot put its packages" in d.log())

    d.kill9()  # a crash while the publish is owed: the next start owes it still
    subprocess.run(["mount", "-o", "remount,rw", str(read_only_dir)], check=True)
    d.start()
    wait_for(lambda: d.build(build_id)["publish_state"] == "published", timeout=60)
    shown = d.call("repos.show", {"chroot": CHROOT})
    assert [(p["name"], p["build"]) for p in shown["package_list"]] == [("greet", build_id)]
    assert shown["last_error"] is None
    assert d.call("status")["publish"]["failing_repos"] == {}


def test_cleanup_through_reqpmctl_on_a_real_daemon(daemons: Callable[..., Reqpmd]) -> None:
    d = daemons(mock_sleep=0.05, settings={"socket_group": "nogroup"})
    for path in (d.root.parent, d.root):
        os.chmod(path, 0o755)
    d.start()
    old, new = submit_spec(d, "greet"), submit_spec(d, "greet")
    for i in (old, new):
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded"
        wait_for(lambda i=i: d.build(i)["publish_state"] == "published", timeout=60)
    assert d.stop() == 0
    # the first build ended 40 days ago, as far as the database knows
    db = sqlite3.connect(d.root / "state" / "reqpm.db")
    with db:
        db.execute(
            "UPDATE builds SET finished_at = ? WHERE id = ?", (time.time() - 40 * 86400, old)
        )
    db.close()
    d.start()  # the maintenance job runs at start
    wait_for(lambda: d.build(old)["cleaned_at"] is not None, timeout=30)
    shown = ctl(d, "builds", "show", str(old)).stdout
    assert "cleaned up" in shown and "history record" in shown
    assert ctl(d, "builds", "retry", str(old)).returncode == protocol.EXIT_USAGE
    repo = d.call("repos.show", {"chroot": CHROOT})
    assert [p["build"] for p in repo["package_list"]] == [new]
    status = ctl(d, "status").stdout
    assert "cleanup:" in status and "1 build(s)" in status
    dry = json.loads(ctl(d, "--json", "cleanup", "--dry-run").stdout)
    assert dry["builds"]["delete"] == []
    assert ctl(d, "cleanup", "--now", as_user=NOBODY).returncode == protocol.EXIT_PERMISSION
    now = ctl(d, "cleanup", "--now")
    assert now.returncode == 0 and "cleaned 0 build(s)" in now.stdout
