"""Tests for the mock stand-in tests/fakemock/mock (run as real subprocesses)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

FAKEMOCK = Path(__file__).parent / "fakemock" / "mock"
CFG = "fedora-40-x86_64"


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FAKEMOCK_ROOT_DIR": str(tmp_path / "lib"),
        "FAKEMOCK_LOG": str(tmp_path / "fakemock.jsonl"),
        "FAKEMOCK_SLEEP": "0",
        "FAKEMOCK_RPMBUILD": "0",  # the quick, faked build; real_env() below builds for real
    }


@pytest.fixture
def real_env(env: dict[str, str]) -> dict[str, str]:
    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild is not on PATH (Debian: apt-get install rpm; ./dev test does)")
    return {**env, "FAKEMOCK_RPMBUILD": "1"}


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def srpm(tmp_path: Path) -> Path:
    path = tmp_path / "hello-2.0-3.fc40.src.rpm"
    path.write_bytes(b"not really an rpm")
    return path


def run(args: list[str], env: dict[str, str], **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FAKEMOCK), *args], env={**env, **extra}, capture_output=True, text=True, timeout=30
    )


def start(
    args: list[str], env: dict[str, str], procs: list[subprocess.Popen[str]], **extra: str
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(FAKEMOCK), *args],
        env={**env, **extra},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.append(proc)
    return proc


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def lock_is_free(lockfile: Path) -> bool:
    fd = os.open(lockfile, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def log_records(env: dict[str, str]) -> list[dict]:
    return [json.loads(line) for line in Path(env["FAKEMOCK_LOG"]).read_text().splitlines()]


def test_unknown_option_is_rejected(env: dict[str, str], srpm: Path) -> None:
    res = run(["-r", CFG, "--bogus", "--rebuild", str(srpm)], env)
    assert res.returncode == 5
    assert "ERROR:" in res.stderr and "--bogus" in res.stderr


def test_bad_scrub_value_is_an_argparse_error(env: dict[str, str]) -> None:
    res = run(["-r", CFG, "--scrub=everything"], env)
    assert res.returncode == 2
    assert "invalid choice" in res.stderr


def test_missing_root_option_is_a_config_error(env: dict[str, str], srpm: Path) -> None:
    res = run(["--rebuild", str(srpm)], env)
    assert res.returncode == 3
    assert "Non-existing Mock config 'default'" in res.stderr


def test_buildsrpm_writes_srpm_and_logs(env: dict[str, str], tmp_path: Path) -> None:
    spec = tmp_path / "whatever.spec"
    spec.write_text("Summary: x\nName:    hello\nVersion: 2.0\n")
    (tmp_path / "src").mkdir()
    out = tmp_path / "out"
    res = run(
        [
            "-r",
            CFG,
            "--uniqueext",
            "s1",
            "--resultdir",
            str(out),
            "--buildsrpm",
            "--spec",
            str(spec),
            "--sources",
            str(tmp_path / "src"),
        ],
        env,
    )
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "build.log",
        "hello-1.0-1.src.rpm",
        "root.log",
        "state.log",
    ]
    lib = tmp_path / "lib"
    assert not (lib / f"{CFG}-s1").exists()  # cleanup_on_success with a separate --resultdir
    assert (lib / f"{CFG}-bootstrap-s1" / "buildroot.lock").exists()
    assert (lib / "cache" / CFG).is_dir()
    assert "INFO: Done(" in res.stderr


def test_rebuild_writes_rpm(env: dict[str, str], srpm: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = run(
        ["-r", CFG, "--uniqueext=r1", "--resultdir=" + str(out), "-N", "--rebuild", str(srpm)], env
    )
    assert res.returncode == 0, res.stderr
    assert (out / "hello-1.0-1.x86_64.rpm").is_file()
    assert (out / "hello-1.0-1.src.rpm").is_file()
    assert (tmp_path / "lib" / f"{CFG}-r1" / "root").is_dir()  # -N keeps the root
    [rec] = log_records(env)
    assert rec["argv"][-1] == str(srpm) and rec["exit"] == 0 and rec["root"] == f"{CFG}-r1"


@pytest.mark.parametrize(
    ("name", "extra", "code"),
    [
        ("hello-1-1.src.rpm", {"FAKEMOCK_FAIL": "1"}, 30),
        ("willfail-1-1.src.rpm", {}, 30),
        ("hello-1-1.src.rpm", {"FAKEMOCK_EXIT": "1"}, 1),
    ],
)
def test_injected_failures(
    env: dict[str, str], tmp_path: Path, name: str, extra: dict[str, str], code: int
) -> None:
    (tmp_path / name).write_bytes(b"x")
    out = tmp_path / "out"
    res = run(["-r", CFG, "--resultdir", str(out), str(tmp_path / name)], env, **extra)
    assert res.returncode == code
    assert "ERROR:" in res.stderr
    assert (out / "build.log").exists() and not list(out.glob("*.rpm"))


def test_lock_collision_exits_60(
    env: dict[str, str], srpm: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    args = ["-r", CFG, "--uniqueext", "u1", "--rebuild", str(srpm)]
    first = start([*args, "--resultdir", str(tmp_path / "a")], env, procs, FAKEMOCK_SLEEP="30")
    wait_for((tmp_path / "lib" / f"{CFG}-u1" / "root" / ".initialized").exists)
    res = run([*args, "--resultdir", str(tmp_path / "b")], env)
    assert res.returncode == 60
    assert "ERROR: Build root is locked by another process." in res.stderr
    assert first.poll() is None


def test_sigterm_exits_143_and_releases_lock(
    env: dict[str, str], srpm: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    root = tmp_path / "lib" / f"{CFG}-t1"
    proc = start(
        [
            "-r",
            CFG,
            "--uniqueext",
            "t1",
            "--resultdir",
            str(tmp_path / "out"),
            "--rebuild",
            str(srpm),
        ],
        env,
        procs,
        FAKEMOCK_SLEEP="30",
    )
    wait_for((root / "root" / ".initialized").exists)
    assert not lock_is_free(root / "buildroot.lock")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 143
    assert "Received signal SIGTERM" in proc.stderr.read()
    assert lock_is_free(root / "buildroot.lock")
    assert root.is_dir()  # signals skip cleanup_on_failure, as in mock
    [rec] = log_records(env)
    assert rec["signal"] == "SIGTERM" and rec["exit"] == 143


def test_sigint_exits_7(
    env: dict[str, str], srpm: Path, tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    proc = start(
        ["-r", CFG, "--uniqueext", "i1", "--rebuild", str(srpm)], env, procs, FAKEMOCK_SLEEP="30"
    )
    wait_for((tmp_path / "lib" / f"{CFG}-i1" / "root" / ".initialized").exists)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=5) == 7
    assert "Exiting on user interrupt" in proc.stderr.read()


def init_roots(env: dict[str, str], *exts: str) -> Path:
    for ext in exts:
        assert run(["-r", CFG, "--uniqueext", ext, "--init"], env).returncode == 0
    return Path(env["FAKEMOCK_ROOT_DIR"])


def test_scrub_chroot_removes_only_that_root(env: dict[str, str]) -> None:
    lib = init_roots(env, "a", "b")
    res = run(["-r", CFG, "--uniqueext", "a", "--scrub=chroot"], env)
    assert res.returncode == 0, res.stderr
    assert not (lib / f"{CFG}-a").exists()
    for kept in (f"{CFG}-bootstrap-a", f"{CFG}-b", f"{CFG}-bootstrap-b", f"cache/{CFG}"):
        assert (lib / kept).is_dir(), kept


def test_scrub_all_also_removes_shared_cache(env: dict[str, str]) -> None:
    lib = init_roots(env, "a", "b")
    res = run(["-r", CFG, "--uniqueext", "a", "--scrub", "all"], env)
    assert res.returncode == 0, res.stderr
    for gone in (f"{CFG}-a", f"{CFG}-bootstrap-a", f"cache/{CFG}", f"cache/{CFG}-bootstrap"):
        assert not (lib / gone).exists(), gone
    assert (lib / f"{CFG}-b").is_dir() and (lib / f"{CFG}-bootstrap-b").is_dir()


def test_scrub_of_busy_root_exits_60(
    env: dict[str, str], procs: list[subprocess.Popen[str]]
) -> None:
    lib = Path(env["FAKEMOCK_ROOT_DIR"])
    start(["-r", CFG, "--uniqueext", "c", "--init"], env, procs, FAKEMOCK_SLEEP="30")
    wait_for((lib / f"{CFG}-c" / "root" / ".initialized").exists)
    res = run(["-r", CFG, "--uniqueext", "c", "--scrub=chroot"], env)
    assert res.returncode == 60
    assert (lib / f"{CFG}-c").is_dir()


DATA = Path(__file__).parent / "data"


def rpm_query(path: Path) -> str:
    r = subprocess.run(
        ["rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout


def test_buildsrpm_then_rebuild_make_real_packages(
    real_env: dict[str, str], tmp_path: Path
) -> None:
    srpms, rpms = tmp_path / "srpm", tmp_path / "rpm"
    res = run(
        [
            "-r",
            CFG,
            "--uniqueext",
            "r1",
            "--resultdir",
            str(srpms),
            "--buildsrpm",
            "--spec",
            str(DATA / "greet" / "greet.spec"),
            "--sources",
            str(DATA / "greet"),
        ],
        real_env,
    )
    assert res.returncode == 0, res.stderr
    [srpm_file] = srpms.glob("*.src.rpm")
    assert rpm_query(srpm_file) == "greet 2.1 3 noarch"
    res = run(
        ["-r", CFG, "--uniqueext", "r1", "--resultdir", str(rpms), "--rebuild", str(srpm_file)],
        real_env,
    )
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in rpms.iterdir())
    assert names == [
        "build.log",
        "greet-2.1-3.noarch.rpm",
        "greet-2.1-3.src.rpm",
        "root.log",
        "state.log",
    ]
    assert rpm_query(rpms / "greet-2.1-3.noarch.rpm") == "greet 2.1 3 noarch"
    files = subprocess.run(
        ["rpm", "-qlp", str(rpms / "greet-2.1-3.noarch.rpm")], capture_output=True, text=True
    ).stdout
    assert "/usr/bin/greet" in files
    assert "Wrote: " in (rpms / "build.log").read_text()


def test_a_spec_whose_build_fails_fails_with_exit_30_and_a_real_log(
    real_env: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = run(
        [
            "-r",
            CFG,
            "--uniqueext",
            "f1",
            "--resultdir",
            str(out),
            "--buildsrpm",
            "--spec",
            str(DATA / "broken" / "broken.spec"),
            "--sources",
            str(DATA / "broken"),
        ],
        real_env,
    )
    assert res.returncode == 0, res.stderr  # the source package builds
    [srpm_file] = out.glob("*.src.rpm")
    res = run(
        ["-r", CFG, "--uniqueext", "f1", "--resultdir", str(out), "--rebuild", str(srpm_file)],
        real_env,
    )
    assert res.returncode == 30
    log = (out / "build.log").read_text()
    assert "this package is meant to fail" in log and "(%build)" in log
    assert not list(out.glob("*.noarch.rpm")) and not list(out.glob("*.x86_64.rpm"))


def test_a_rebuild_of_a_file_that_is_not_an_rpm_is_faked_even_with_rpmbuild(
    real_env: dict[str, str], srpm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    res = run(["-r", CFG, "--resultdir", str(out), "--rebuild", str(srpm)], real_env)
    assert res.returncode == 0, res.stderr
    assert any(p.name.endswith(".x86_64.rpm") for p in out.iterdir())


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_events_record_start_and_end_with_the_build_and_its_token(
    env: dict[str, str], srpm: Path, tmp_path: Path
) -> None:
    path = tmp_path / "events.jsonl"
    extra = {"FAKEMOCK_EVENTS": str(path), "REQPM_BUILD_ID": "7", "REQPM_SLOT_TOKEN": "42"}
    res = run(["-r", CFG, "--uniqueext", "build7", "--rebuild", str(srpm)], env, **extra)
    assert res.returncode == 0
    start, end = events(path)
    assert (start["event"], end["event"]) == ("start", "end")
    assert start["pid"] == end["pid"] and start["t"] <= end["t"]
    assert (start["build"], start["token"], start["mode"]) == ("7", "42", "rebuild")
    assert start["root"] == f"{CFG}-build7"
    assert (end["exit"], end["signal"]) == (0, None)


def test_a_hanging_build_ignores_sigint_and_ends_at_sigterm(
    env: dict[str, str], tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    path, item = tmp_path / "events.jsonl", tmp_path / "hang-1-1.src.rpm"
    item.write_bytes(b"x")
    out = tmp_path / "out"
    argv = ["-r", CFG, "--resultdir", str(out), "--rebuild", str(item)]
    proc = start(argv, env, procs, FAKEMOCK_EVENTS=str(path))
    wait_for((out / "build.log").exists)  # written as its build step begins
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=5) == 143
    assert events(path)[-1]["signal"] == "SIGTERM"


def test_exit60_and_crash_by_name(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for name, code in (("exit60-1-1.src.rpm", 60), ("crash-1-1.src.rpm", -signal.SIGABRT)):
        (tmp_path / name).write_bytes(b"x")
        res = run(["-r", CFG, "--rebuild", str(tmp_path / name)], env, FAKEMOCK_EVENTS=str(path))
        assert res.returncode == code, res.stderr
        assert events(path)[-1]["exit"] == code


@pytest.mark.parametrize("first", [signal.SIGTERM, signal.SIGINT])
def test_a_storm_of_signals_still_leaves_one_end_line(
    env: dict[str, str], tmp_path: Path, procs: list[subprocess.Popen[str]], first: int
) -> None:
    """The chaos suite reads a run without an end line as a mock that never ended: a second
    signal that lands while the first one's exit is under way (the kernel's parent-death
    SIGTERM, then the guard's or the next reqpmd's ladder) must not cost the line."""
    for attempt in range(10):
        path, out = tmp_path / f"events{attempt}.jsonl", tmp_path / f"out{attempt}"
        item = tmp_path / "ok-1-1.src.rpm"
        item.write_bytes(b"x")
        argv = ["-r", CFG, "--resultdir", str(out), "--rebuild", str(item)]
        proc = start(argv, env, procs, FAKEMOCK_EVENTS=str(path), FAKEMOCK_SLEEP="30")
        wait_for((out / "build.log").exists)
        storm = [first, signal.SIGTERM, signal.SIGHUP, signal.SIGINT]
        sent = 0
        while proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, storm[sent % len(storm)])
            sent += 1
        proc.wait()
        ends = [e for e in events(path) if e["event"] == "end"]
        assert len(ends) == 1, (attempt, sent, proc.returncode, events(path))
        assert ends[0]["exit"] == proc.returncode
