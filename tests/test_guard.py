"""The lease guard: a real guard process stops real processes that look like a build's
mock (`--resultdir DIR` on their command line, each leading a process group) when their
build's deadline passes, not before; and goes on doing so after reqpmd is gone, for the
mocks started before, not for the same build started again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reqpmd.builds.guard import LeaseGuard
from tests.workers import wait_until

SLEEPER = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(120)"

Mock = Callable[[Path], "subprocess.Popen[bytes]"]


@pytest.fixture
def guard() -> Iterator[LeaseGuard]:
    g = LeaseGuard(lambda: 0.5)
    yield g
    g.close()


@pytest.fixture
def mock() -> Iterator[Mock]:
    made: list[subprocess.Popen[bytes]] = []

    def start(result_dir: Path) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", SLEEPER, "--resultdir", str(result_dir)]
        p = subprocess.Popen(argv, start_new_session=True)
        made.append(p)
        return p

    yield start
    for p in made:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def test_a_mock_is_stopped_once_its_deadline_passes_and_not_before(
    guard: LeaseGuard, mock: Mock, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 1.5
    # armed before mock starts; reqpmd (this process) talks, so "early" does not apply
    guard.watch(tmp_path / "a", lambda: deadline, 1.2)
    p, other = mock(tmp_path / "a"), mock(tmp_path / "b")
    time.sleep(1.0)  # the claim is "not before": it must still run here
    assert p.poll() is None
    code = wait_until(lambda: p.poll(), timeout=5, what="the guard stops the mock")
    assert code == -signal.SIGINT  # mock's ladder starts with SIGINT
    assert time.monotonic() >= deadline
    assert other.poll() is None  # another build's mock is left alone
    assert guard.fired(tmp_path / "a") and not guard.fired(tmp_path / "b")


def test_a_renewed_deadline_keeps_it_and_unwatch_disarms_it(
    guard: LeaseGuard, mock: Mock, tmp_path: Path
) -> None:
    guard.watch(tmp_path / "renewed", lambda: time.monotonic() + 0.6, 0.0)
    short = time.monotonic() + 0.6
    guard.watch(tmp_path / "left", lambda: short, 0.0)
    renewed, left = mock(tmp_path / "renewed"), mock(tmp_path / "left")
    guard.unwatch(tmp_path / "left")
    wait_until(lambda: time.monotonic() > short + 1.5, timeout=5)
    assert renewed.poll() is None  # its deadline kept moving on
    assert left.poll() is None  # disarmed before its deadline
    guard.unwatch(tmp_path / "renewed")
    guard.close()  # nothing armed: EOF stops nothing
    assert renewed.poll() is None and left.poll() is None


def test_when_reqpmd_goes_it_stops_its_mocks_at_their_time_not_the_next_ones(
    guard: LeaseGuard, mock: Mock, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    deadline = time.monotonic() + 2.0
    guard.watch(tmp_path / "a", lambda: deadline, 0.0)
    old = mock(tmp_path / "a")
    wait_until(lambda: guard.pid is not None, timeout=5)
    pid = guard.pid
    assert pid is not None
    guard._closed.set()  # reqpmd killed with -9: the pipe closes, nobody waits
    assert guard._proc is not None and guard._proc.stdin is not None
    guard._proc.stdin.close()
    said: list[str] = []
    wait_until(
        lambda: said.append(capfd.readouterr().err) or "reqpmd went away" in "".join(said),
        timeout=5,
        what="the guard saw reqpmd go",
    )
    again = mock(tmp_path / "a")  # the next reqpmd runs the same build again, same result dir
    assert wait_until(lambda: old.poll(), timeout=5) == -signal.SIGINT
    assert time.monotonic() >= deadline
    wait_until(lambda: guard._proc is not None and guard._proc.poll() is not None, timeout=5)
    assert again.poll() is None  # started after reqpmd went: not that reqpmd's mock


def test_a_dead_guard_is_started_again_and_rearmed(
    guard: LeaseGuard, mock: Mock, tmp_path: Path
) -> None:
    deadline = time.monotonic() + 2.0
    guard.watch(tmp_path / "a", lambda: deadline, 0.0)
    p = mock(tmp_path / "a")
    old = guard.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: guard.pid not in (None, old), timeout=5, what="a new guard")
    assert wait_until(lambda: p.poll(), timeout=6) == -signal.SIGINT
    assert time.monotonic() >= deadline


def test_a_silent_reqpmd_has_its_mock_stopped_early(mock: Mock, tmp_path: Path) -> None:
    """The guard process itself, driven by hand: while reqpmd says it is alive (its
    renewals may merely be failing: Redis down), the mock runs on inside the ``early``
    window; once reqpmd falls silent (stopped), it is stopped before the deadline."""
    guard = subprocess.Popen(
        [sys.executable, "-m", "reqpmd.builds.guard"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert guard.stdin is not None and guard.stdout is not None

    def say(message: dict[str, object]) -> None:
        assert guard.stdin is not None
        guard.stdin.write(json.dumps(message).encode() + b"\n")
        guard.stdin.flush()

    try:
        key = str(tmp_path / "a")
        deadline = time.monotonic() + 5.0
        say({"arm": key, "deadline": deadline, "grace": 0.5, "early": 4.0, "seq": 7})
        p = mock(tmp_path / "a")
        while time.monotonic() < deadline - 2.5:  # inside the early window, talking
            say({"alive": 1})
            time.sleep(0.1)
        assert p.poll() is None
        quiet = time.monotonic()  # from now on reqpmd says nothing
        assert wait_until(lambda: p.poll(), timeout=4) == -signal.SIGINT
        assert quiet + 0.9 <= time.monotonic() < deadline - 1
        assert json.loads(guard.stdout.readline()) == {"fired": key, "seq": 7}
    finally:
        guard.stdin.close()
        guard.wait(timeout=10)
