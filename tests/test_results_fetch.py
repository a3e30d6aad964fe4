"""A build's results: listed with their checksums, and fetched as descriptors the daemon
passes (never as paths the client would need rights to), into files that appear whole or
not at all.

The end-to-end tests share two daemons started once for the module: a quick one whose
builds are finished (a real rpmbuild of tests/data/hello, and a fake SRPM whose result
directory gets hostile and extra files planted in it), and a slow one whose build is
still running. The descriptor plumbing is tested on an in-process ControlServer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reqpmctl.client import Client, ClientError
from reqpmd.builds import results
from reqpmd.control import protocol
from reqpmd.control.server import ControlServer, Request
from tests.daemon_harness import FINAL, Reqpmd, wait_for

ROOT = Path(__file__).resolve().parent.parent
EXTRA = 40  # planted files: more than one build.fetch reply carries
# names a build may leave that must reach a terminal escaped, and a disk byte for byte
ODD_NAMES = (os.fsdecode(b"caf\xe9.log"), "\x1b[31mred\nline.log")


@dataclass
class Builds:
    quick: Reqpmd
    slow: Reqpmd
    hello: int  # built by rpmbuild: real packages and mock's logs
    planted: int  # extra files, a symlink, a FIFO and a directory planted in its results
    running: int  # on the slow daemon, still building
    secret: Path  # what the planted symlink points at


def result_dir(d: Reqpmd, build_id: int) -> Path:
    return d.root / "state" / "builds" / str(build_id) / "result"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def regular_files(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def builds() -> Iterator[Builds]:
    top = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))  # short: socket paths
    quick = Reqpmd(top / "q", mock_sleep=0.05, settings={"max_concurrent_builds": 2})
    slow = Reqpmd(top / "s", mock_sleep=120)
    try:
        quick.start(wait=False)
        slow.start()
        wait_for(lambda: answers(quick))
        hello = quick.submit()
        planted = quick.submit("plain-1.0-1.src.rpm")
        running = slow.submit("slow-1.0-1.src.rpm")
        for build_id in (hello, planted):
            assert quick.wait_state(build_id, FINAL)["state"] == "succeeded", quick.log()
        slow.wait_state(running, "building")
        secret = top / "secret"
        secret.write_bytes(b"not for the build's eyes\n")
        _plant(result_dir(quick, planted), secret)
        yield Builds(quick, slow, hello, planted, running, secret)
    finally:
        quick.kill_all()
        slow.kill_all()
        shutil.rmtree(top, ignore_errors=True)


def answers(d: Reqpmd) -> bool:
    try:
        d.call("ping")
    except ClientError:
        return False
    return True


def _plant(directory: Path, secret: Path) -> None:
    for i in range(EXTRA):
        (directory / f"extra-{i:02d}.noarch.rpm").write_bytes(f"extra package {i}\n".encode())
    for name in ODD_NAMES:
        (directory / name).write_bytes(b"oddly named\n")
    (directory / "leak.rpm").symlink_to(secret)
    os.mkfifo(directory / "pipe.log")
    (directory / "subdir").mkdir()
    (directory / "subdir" / "nested.rpm").write_bytes(b"not directly in the result dir")


def ctl(d: Reqpmd, *args: str, cwd: Path | str = "/") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), REQPM_SOCKET=str(d.socket))
    return subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=cwd,
    )


def ok_json(d: Reqpmd, *args: str, cwd: Path | str = "/") -> Any:
    r = ctl(d, "--json", *args, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- listing -----------------------------------------------------------------------------


def test_results_lists_each_regular_file_with_its_size_and_sha256(builds: Builds) -> None:
    on_disk = regular_files(result_dir(builds.quick, builds.hello))
    listed = ok_json(builds.quick, "builds", "results", str(builds.hello))
    assert [f["name"] for f in listed] == sorted(on_disk)
    for f in listed:
        assert f["size"] == len(on_disk[f["name"]])
        assert f["sha256"] == sha256(on_disk[f["name"]])
        assert f["kind"] == results.kind_of(f["name"])
    kinds = {f["kind"] for f in listed}
    assert {"rpm", "srpm", "log"} <= kinds, listed
    human = ctl(builds.quick, "builds", "results", str(builds.hello))
    assert human.returncode == 0, human.stderr
    assert human.stdout.split()[:3] == ["NAME", "SIZE", "SHA256"]
    assert all(f["sha256"] in human.stdout for f in listed)


def test_results_never_follow_a_planted_symlink_nor_open_a_fifo(builds: Builds) -> None:
    listed = builds.quick.call("build.results", {"id": builds.planted})
    names = [f["name"] for f in listed["files"]]
    assert "leak.rpm" not in names and "pipe.log" not in names and "subdir" not in names
    assert sha256(builds.secret.read_bytes()) not in {f["sha256"] for f in listed["files"]}
    assert len([n for n in names if n.startswith("extra-")]) == EXTRA


def test_results_of_a_running_build_list_what_exists(builds: Builds) -> None:
    listed = wait_for(
        lambda: (r := builds.slow.call("build.results", {"id": builds.running}))["files"] and r
    )
    assert listed["state"] == "building"
    assert "build.log" in [f["name"] for f in listed["files"]]


def test_results_come_in_pages_behind_a_name_cursor(builds: Builds) -> None:
    every = [f["name"] for f in builds.quick.call("build.results", {"id": builds.planted})["files"]]
    after = every[EXTRA // 2]
    page = builds.quick.call("build.results", {"id": builds.planted, "after": after})
    assert [f["name"] for f in page["files"]] == every[EXTRA // 2 + 1 :]
    assert page["next"] is None


# -- fetching ----------------------------------------------------------------------------


def test_fetch_into_a_new_directory_gives_byte_identical_files(
    builds: Builds, tmp_path: Path
) -> None:
    dest = tmp_path / "new" / "dir"
    r = ctl(builds.quick, "builds", "fetch", str(builds.hello), "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    source = regular_files(result_dir(builds.quick, builds.hello))
    assert regular_files(dest) == source
    assert sorted(os.listdir(dest)) == sorted(source)  # no staging directory left behind
    assert r.stdout.splitlines() == [str(dest / name) for name in sorted(source)]


def test_fetch_rpms_only_into_the_current_directory(builds: Builds, tmp_path: Path) -> None:
    fetched = ok_json(
        builds.quick, "builds", "fetch", str(builds.hello), "--rpms-only", cwd=tmp_path
    )
    source = regular_files(result_dir(builds.quick, builds.hello))
    rpms = {n for n in source if n.endswith(".rpm")}
    assert {f["name"] for f in fetched} == rpms and any(n.endswith(".src.rpm") for n in rpms)
    assert {f["kind"] for f in fetched} <= {"rpm", "srpm"}
    assert regular_files(tmp_path) == {n: source[n] for n in rpms}
    for f in fetched:
        assert f["path"] == f["name"]  # relative to the current directory
        assert f["sha256"] == sha256(source[f["name"]])


def test_fetch_refuses_to_overwrite_unless_forced(builds: Builds, tmp_path: Path) -> None:
    (tmp_path / "build.log").write_text("my own notes\n")
    r = ctl(builds.quick, "builds", "fetch", str(builds.hello), "--dest", str(tmp_path))
    assert r.returncode == protocol.EXIT_FAILED
    assert f"{tmp_path / 'build.log'} already exists" in r.stderr and "--force" in r.stderr
    assert "Traceback" not in r.stderr
    assert os.listdir(tmp_path) == ["build.log"]  # nothing else was written
    assert (tmp_path / "build.log").read_text() == "my own notes\n"
    r = ctl(builds.quick, "builds", "fetch", str(builds.hello), "--dest", str(tmp_path), "--force")
    assert r.returncode == 0, r.stderr
    assert regular_files(tmp_path) == regular_files(result_dir(builds.quick, builds.hello))


def test_fetch_of_no_such_build_exits_4_and_creates_nothing(builds: Builds, tmp_path: Path) -> None:
    dest = tmp_path / "never"
    for args in (("fetch", "999999", "--dest", str(dest)), ("results", "999999")):
        r = ctl(builds.quick, "builds", *args)
        assert r.returncode == protocol.EXIT_NOT_FOUND, r.stderr
        assert r.stderr.strip() == "reqpmctl: no build 999999"
    assert not dest.exists()


def test_fetch_of_an_unfinished_build_is_refused(builds: Builds, tmp_path: Path) -> None:
    r = ctl(builds.slow, "builds", "fetch", str(builds.running), "--dest", str(tmp_path))
    assert r.returncode == protocol.EXIT_USAGE
    assert "still building" in r.stderr
    assert os.listdir(tmp_path) == []


def test_fetch_skips_a_planted_symlink_and_pages_past_32_files(
    builds: Builds, tmp_path: Path
) -> None:
    with builds.quick.client() as client:
        page, fds = client.fetch_page(builds.planted)
        protocol.close_all(fds)
    assert len(page["files"]) == len(fds) == protocol.MAX_FDS // 2
    assert page["next"] == page["files"][-1]["name"]
    fetched = ok_json(builds.quick, "builds", "fetch", str(builds.planted), "--dest", str(tmp_path))
    assert len(fetched) > EXTRA
    assert sorted(os.listdir(tmp_path)) == sorted(f["name"] for f in fetched)
    assert regular_files(tmp_path) == regular_files(result_dir(builds.quick, builds.planted))
    assert not (tmp_path / "leak.rpm").exists() and not (tmp_path / "pipe.log").exists()


def test_odd_names_are_escaped_on_the_terminal_and_kept_on_disk(
    builds: Builds, tmp_path: Path
) -> None:
    listing = ctl(builds.quick, "builds", "results", str(builds.planted))
    fetch = ctl(builds.quick, "builds", "fetch", str(builds.planted), "--dest", str(tmp_path))
    for r in (listing, fetch):
        assert r.returncode == 0, r.stderr
        assert "\x1b" not in r.stdout and "\\x1b[31mred\\nline.log" in r.stdout
        assert "caf\\udce9.log" in r.stdout
    assert len(fetch.stdout.splitlines()) == len(os.listdir(tmp_path))
    for name in ODD_NAMES:
        assert (tmp_path / name).read_bytes() == b"oddly named\n"


def test_fetch_arguments_are_checked(builds: Builds) -> None:
    for args in (
        {"id": builds.hello, "rpms_only": "yes"},
        {"id": builds.hello, "after": 5},
        {"id": builds.hello, "after": "x" * 5000},
        {"id": 0},
    ):
        with pytest.raises(ClientError) as info:
            builds.quick.call("build.fetch", args)
        assert info.value.code == "invalid", args


# -- the result directory, in process ------------------------------------------------------


def test_result_kinds_and_plain_names() -> None:
    assert results.kind_of("a-1-1.src.rpm") == "srpm"
    assert results.kind_of("a-1-1.nosrc.rpm") == "srpm"
    assert results.kind_of("a-1-1.x86_64.rpm") == "rpm"
    assert results.kind_of("root.log") == "log"
    assert results.kind_of("hw_info.txt") == "other"
    for bad in ("", ".", "..", "a/b", "/etc", "a\0b", None, 3):
        assert not results.is_plain_name(bad)
    assert results.is_plain_name("..hidden") and results.is_plain_name("a b\nc")


def test_open_result_opens_only_regular_files(tmp_path: Path) -> None:
    (tmp_path / "real.rpm").write_bytes(b"package")
    (tmp_path / "link.rpm").symlink_to(tmp_path / "real.rpm")
    os.mkfifo(tmp_path / "fifo.log")  # opening it for reading would block without O_NONBLOCK
    (tmp_path / "dir").mkdir()
    assert results.list_names(tmp_path) == ["real.rpm"]
    for name in ("link.rpm", "fifo.log", "dir", "missing", "../real.rpm"):
        assert results.open_result(tmp_path, name) is None, name
    fd = results.open_result(tmp_path, "real.rpm")
    assert fd is not None
    try:
        assert results.describe(fd, "real.rpm") == results.ResultFile(
            "real.rpm", 7, sha256(b"package"), "rpm"
        )
        assert os.read(fd, 100) == b"package"  # describing left the offset at 0
    finally:
        os.close(fd)
    assert results.list_names(tmp_path / "missing") == []
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(tmp_path)
    assert results.list_names(linked_dir) == []  # the result directory itself: no symlink


def test_page_after() -> None:
    names = [f"n{i:02d}" for i in range(5)]
    assert results.page_after(names, None, 2) == (["n00", "n01"], "n01")
    assert results.page_after(names, "n01", 2) == (["n02", "n03"], "n03")
    assert results.page_after(names, "n03", 2) == (["n04"], None)
    assert results.page_after(names, "n04", 2) == ([], None)
    assert results.page_after(names, None, 5) == (names, None)


# -- descriptors in replies, on an in-process server -----------------------------------------


def fds_open_to(path: Path) -> int:
    """How many of this process's descriptors point at ``path``."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
        except OSError:
            continue
    return count


Serve = Callable[[Callable[[Request], Any]], Path]


@pytest.fixture(scope="module")
def server_path() -> Iterator[tuple[Path, list[Callable[[Request], Any]]]]:
    """One ControlServer on a real socket for the module (closing one takes a poll of
    its accept loop), answering with whichever handler the test put in."""
    top = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    handlers: list[Callable[[Request], Any]] = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(top / "s.sock"))
    sock.listen(8)
    server = ControlServer(sock, lambda req: handlers[-1](req), lambda: "reqpm-no-such-group")
    server.start()
    yield top / "s.sock", handlers
    server.close()
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def serve(server_path: tuple[Path, list[Callable[[Request], Any]]]) -> Iterator[Serve]:
    """Answer with the handler a test gives; the server's socket path."""
    path, handlers = server_path

    def use(handler: Callable[[Request], Any]) -> Path:
        handlers.append(handler)
        return path

    yield use
    handlers.clear()


def test_reply_descriptors_reach_the_client_and_the_server_closes_its_copies(
    serve: Serve, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"passed along")
    closes: list[int] = []

    def handler(req: Request) -> Any:
        return protocol.WithFds({"n": 1}, [os.open(data, os.O_RDONLY)], lambda: closes.append(1))

    path = serve(handler)
    with Client(path, timeout=10) as client:
        result, fds = client.call_with_fds("anything")
        assert result == {"n": 1} and len(fds) == 1
        wait_for(lambda: len(closes) == 1, timeout=10)
        assert fds_open_to(data) == 1  # the client's copy only
        assert os.pread(fds[0], 100, 0) == b"passed along"
        protocol.close_all(fds)
        assert client.call("anything") == {"n": 1}  # call() closes what it does not use
        wait_for(lambda: len(closes) == 2, timeout=10)
        assert fds_open_to(data) == 0


def test_the_server_closes_reply_descriptors_when_the_send_fails(
    serve: Serve, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.write_bytes(b"never delivered")
    hung_up, closed = threading.Event(), threading.Event()

    def handler(req: Request) -> Any:
        fd = os.open(data, os.O_RDONLY)
        hung_up.wait(10)
        return protocol.WithFds({}, [fd], closed.set)

    path = serve(handler)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(protocol.encode({"v": protocol.VERSION, "op": "x", "args": {}}))
        wait_for(lambda: fds_open_to(data) == 1, timeout=10)  # the handler holds it
    hung_up.set()
    wait_for(closed.is_set, timeout=10)
    assert fds_open_to(data) == 0


def _fake_fetch(tmp_path: Path, name: str, listed_sha: str | None = None) -> Callable[..., Any]:
    """A daemon stand-in answering build.fetch with one file under ``name``."""
    data = tmp_path / "served"
    data.write_bytes(b"served bytes")

    def handler(req: Request) -> Any:
        entry = {"name": name, "size": 12, "sha256": listed_sha or sha256(b"served bytes")}
        reply = {"id": 1, "state": "succeeded", "files": [entry], "next": None}
        return protocol.WithFds(reply, [os.open(data, os.O_RDONLY)])

    return handler


@pytest.mark.parametrize("name", ["../escape.rpm", "a/b.rpm", "..", ".", "", "nul\0.rpm"])
def test_the_client_refuses_names_that_are_not_plain(
    serve: Serve, tmp_path: Path, name: str
) -> None:
    path = serve(_fake_fetch(tmp_path, name))
    dest = tmp_path / "dest" / "inner"
    with Client(path, timeout=10) as client, pytest.raises(ClientError) as info:
        client.fetch(1, dest)
    assert info.value.code == "failed" and "not under a plain file name" in info.value.message
    assert os.listdir(dest) == [] and not (tmp_path / "dest" / "escape.rpm").exists()
    wait_for(lambda: fds_open_to(tmp_path / "served") == 0, timeout=10)  # ours and its


def test_the_client_refuses_a_file_that_does_not_match_its_checksum(
    serve: Serve, tmp_path: Path
) -> None:
    path = serve(_fake_fetch(tmp_path, "ok.rpm", listed_sha="0" * 64))
    dest = tmp_path / "dest"
    with Client(path, timeout=10) as client, pytest.raises(ClientError) as info:
        client.fetch(1, dest)
    assert "not the 12 bytes with sha256 " + "0" * 64 in info.value.message
    assert os.listdir(dest) == []  # no half or bad file under the real name
