"""reqpmctl top: the daemon's shared snapshot and its long poll, and the full-screen view
driven in a real terminal (tmux), as an operator sees it."""

from __future__ import annotations

import os
import pty
import select
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from reqpmctl import top
from reqpmd import live
from reqpmd.builds.store import Store
from reqpmd.errors import InvalidArgument
from tests.conftest import MakeDaemon
from tests.daemon_harness import Reqpmd
from tests.workers import wait_until

ROOT = Path(__file__).resolve().parent.parent

# -- the long poll (no daemon) ------------------------------------------------------------


class Farm:
    """A farm whose content the test sets, counting the snapshots taken of it."""

    def __init__(self) -> None:
        self.content: dict[str, Any] = {"slots": []}
        self.taken = 0
        self.fail: Exception | None = None

    def take(self) -> dict[str, Any]:
        self.taken += 1
        if self.fail is not None:
            raise self.fail
        return dict(self.content)


@pytest.fixture
def farm() -> Farm:
    return Farm()


@pytest.fixture
def clock() -> list[float]:
    return [100.0]


@pytest.fixture
def view(farm: Farm, clock: list[float]) -> live.Live:
    return live.Live(farm.take, clock=lambda: clock[0], wall=lambda: 5000.0)


def timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_a_new_version_is_answered_at_once_and_no_change_times_out_to_the_same(
    view: live.Live, farm: Farm, clock: list[float]
) -> None:
    first, took = timed(view.watch, None)
    assert took < 1 and first["version"] == 1
    assert first["snapshot"] == {"slots": [], "taken_at": 5000.0}

    # nothing changed: the poll waits its time out and answers the same version
    same, took = timed(view.watch, 1, 0.3)
    assert same["version"] == 1 and 0.25 <= took < 2

    # a second later the content is the same: a new snapshot, but no new version
    clock[0] += live.INTERVAL
    assert view.refresh() is False
    assert view.version == 1 and farm.taken == 2

    # a change while a viewer waits wakes it long before its time is up
    answers: list[tuple[dict[str, Any], float]] = []
    waiter = threading.Thread(target=lambda: answers.append(timed(view.watch, 1, 5.0)))
    waiter.start()
    clock[0] += live.INTERVAL
    farm.content = {"slots": [{"name": "build_1@h1"}]}
    assert view.refresh() is True
    waiter.join(timeout=10)
    (changed, took), *_ = answers
    assert changed["version"] == 2 and took < 2
    assert changed["snapshot"]["slots"] == [{"name": "build_1@h1"}]

    # an old version is answered at once
    again, took = timed(view.watch, 1)
    assert again["version"] == 2 and took < 1


def test_one_snapshot_a_second_however_many_watch_and_none_while_nobody_does(
    view: live.Live, farm: Farm, clock: list[float]
) -> None:
    assert view.refresh() is False and farm.taken == 0  # nobody watched yet
    for _ in range(50):
        view.watch(None)
    assert farm.taken == 1
    clock[0] += live.INTERVAL
    for _ in range(50):
        view.watch(None)
    assert farm.taken == 2
    clock[0] += live.WATCHED_FOR + live.INTERVAL  # the viewers went away
    farm.content = {"slots": [{"name": "x"}]}
    assert view.refresh() is False and farm.taken == 2


def test_a_failing_snapshot_is_shown_to_the_viewers_and_never_raises(
    view: live.Live, farm: Farm, clock: list[float]
) -> None:
    view.watch(None)
    farm.fail = RuntimeError("store gone")
    clock[0] += live.INTERVAL
    assert view.refresh() is True
    snapshot = view.watch(None)["snapshot"]
    assert snapshot["error"] == "RuntimeError: store gone"
    assert snapshot["slots"] == []  # the last good content stays


def test_the_last_finished_builds_and_the_hour_s_throughput_come_from_the_store(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path)
    now = [10_000.0]

    def ended(state: str, started: float, finished: float | None) -> None:
        with store.tx() as db:
            db.execute(
                "INSERT INTO builds (state, chroot, kind, source, submitted_by, submitted_at,"
                " started_at, finished_at) VALUES (?, 'c', 'srpm', 'x.src.rpm', 0, 0, ?, ?)",
                (state, started, finished),
            )

    try:
        ended("succeeded", 1000.0, 1100.0)  # more than an hour ago
        ended("succeeded", 9000.0, 9100.0)
        ended("failed", 9500.0, 9800.0)
        ended("building", 9900.0, None)
        farm = live.Farm(None, None, store, wall=lambda: now[0])  # type: ignore[arg-type]
        recent = farm._recent()
        assert [(r["id"], r["state"], r["duration"]) for r in recent] == [
            (3, "failed", 300.0),
            (2, "succeeded", 100.0),
            (1, "succeeded", 100.0),
        ]
        figures = farm._throughput()
        assert figures["finished"] == 2
        assert figures["by_state"] == {"succeeded": 1, "failed": 1}
        assert figures["mean_duration"] == 200.0
        plan = str(store.rows("EXPLAIN QUERY PLAN SELECT state FROM builds WHERE finished_at >= 0"))
        assert "builds_finished" in plan  # the last hour, not every build ever
    finally:
        store.close()


@pytest.mark.parametrize(
    "args",
    [{"version": "1"}, {"version": -1}, {"version": True}, {"wait": 6}, {"wait": True}],
)
def test_watch_arguments_are_checked(view: live.Live, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        view.request(args)


def test_the_screen_fits_its_terminal_and_says_how_many_rows_it_left_out() -> None:
    now = 1000.0
    snap = {
        "host_id": "h1",
        "limit": 4,
        "active_count": 4,
        "slots_total": 4,
        "slots": [
            {"name": f"build_{i}@h1", "host": "h1", "build": i, "acquired_at": now - i}
            for i in range(4)
        ],
        "waiting_total": 300,
        "waiting": [{"position": i, "name": f"build_{i}@h2"} for i in range(200)],
        "hosts": [{"host_id": "h1", "last_seen": now}, {"host_id": "h2", "last_seen": now}],
        "recent": [{"id": i, "state": "succeeded", "finished_at": now - i} for i in range(20)],
    }
    for width, height in [(80, 24), (120, 40), (60, 15)]:
        console = Console(width=width, height=height, record=True, color_system=None)
        console.print(top.screen(snap, now, top.View(), width, height, None))
        lines = console.export_text().splitlines()
        assert len(lines) == height, (width, height, lines)
        assert all(len(line) <= width for line in lines)
        assert lines[-1].startswith("q quit")
        assert any("more" in line for line in lines)  # 300 waiters do not fit anywhere


def test_keys_sort_the_tables_and_pause_and_each_problem_is_said_once() -> None:
    view = top.View()
    slots = [{"name": "a", "acquired_at": 10.0}, {"name": "b", "acquired_at": 5.0}]
    assert [r["name"] for r in view.sorted("slots", slots)] == ["b", "a"]  # oldest first
    assert view.label("slots") == "by age ↓"
    assert view.key("S") and [r["name"] for r in view.sorted("slots", slots)] == ["a", "b"]
    assert view.key("s") and view.label("slots") == "by lease left ↑"
    assert view.key("p") and view.paused
    assert view.key("p") and not view.paused
    assert not view.key("q")

    down = {
        "host_id": "h1",
        "summary": "waiting for Redis at r: refused; 1 building here, 0 queued",
        "redis": {"ok": False, "detail": "refused"},
    }
    assert top.problems(down, None) == ["Redis DOWN: refused"]
    graced = {
        "host_id": "h1",
        "summary": "restart grace: 40s left; 1/2 slots busy cluster-wide, 1 building here, 0 "
        "queued; disk gate closed: 1 GB free",
        "redis": {"ok": True},
        "gates": [{"name": "disk", "open": False, "detail": "1 GB free"}],
        "hosts": [{"host_id": "h2", "closed": ["load: load per CPU 9 > 4"]}],
    }
    assert top.problems(graced, "hung up") == [
        "hung up",
        "gate disk closed: 1 GB free",
        "h2: gate load: load per CPU 9 > 4",
        "restart grace: 40s left",
    ]


# -- the real thing: a daemon, and reqpmctl top in a terminal -------------------------------


class Tmux:
    """A tmux server of the test's own (its own socket), holding one pane."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-S", str(self.socket), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout

    def screen(self) -> list[str]:
        return self("capture-pane", "-p", "-t", "top").splitlines()

    def size(self) -> tuple[int, int]:
        width, height = self("display", "-p", "-t", "top", "#{pane_width} #{pane_height}").split()
        return int(width), int(height)


@pytest.fixture
def tmux(short_tmp: Path) -> Iterator[Tmux]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed: the full-screen view is tested in a tmux pane")
    t = Tmux(short_tmp / "tmux.sock")
    yield t
    subprocess.run(["tmux", "-S", str(t.socket), "kill-server"], capture_output=True, check=False)


def start_top(tmux: Tmux, d: Reqpmd, exit_file: Path, width: int, height: int) -> None:
    """reqpmctl top in a pane; a wrapper shell writes its exit status when it ends."""
    argv = [sys.executable, "-m", "reqpmctl.cli", "--socket", str(d.socket), "top"]
    command = f"{shlex.join(argv)}; echo $? > {shlex.quote(str(exit_file))}"
    tmux(
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        str(width),
        "-y",
        str(height),
        "-e",
        f"PYTHONPATH={ROOT}",
        "-e",
        "TERM=xterm-256color",
        "-c",
        "/",
        command,
    )


def slot_lines(screen: list[str], name: str) -> list[str]:
    return [line for line in screen if line.startswith(name)]


def test_top_shows_a_build_while_it_runs_redraws_on_resize_and_quits_with_q(
    daemons: MakeDaemon, tmux: Tmux, short_tmp: Path
) -> None:
    d = daemons(mock_sleep=3).start()
    exit_file = short_tmp / "top.exit"
    start_top(tmux, d, exit_file, 120, 30)
    wait_until(
        lambda: any(line.startswith("h1 ") and " | slots " in line for line in tmux.screen()),
        timeout=10,
        interval=0.1,
        what="top drew its screen",
    )
    screen = tmux.screen()
    assert screen[-1].startswith("q quit"), screen  # the footer on the pane's last line
    assert len(screen) == 30

    # resized: the footer moves to the new last line, and a narrow screen drops the
    # columns only a wide one has
    tmux("resize-window", "-t", "top", "-x", "80", "-y", "24")
    assert tmux.size() == (80, 24)
    build_id = d.submit("top.src.rpm")
    name = f"build_{build_id}@h1"

    def redrawn_with_the_slot() -> list[str] | None:
        screen = tmux.screen()
        ok = len(screen) == 24 and screen[-1].startswith("q quit") and slot_lines(screen, name)
        return screen if ok else None

    screen = wait_until(redrawn_with_the_slot, timeout=10, interval=0.1, what="slot shown")
    assert all(len(line) <= 80 for line in screen)
    header = next(line for line in screen if line.startswith("SLOT "))
    assert "SOURCE" not in header and "CHROOT" in header
    assert "fedora-42-x86_64" in slot_lines(screen, name)[0]  # looked up in the store

    tmux("resize-window", "-t", "top", "-x", "130", "-y", "35")
    wide = wait_until(
        lambda: (s := tmux.screen()) and len(s) == 35 and s[-1].startswith("q quit") and s,
        timeout=5,
        interval=0.1,
        what="redrawn at 130x35",
    )
    assert "SOURCE" in next(line for line in wide if line.startswith("SLOT "))
    # its group's share: a build without a project waits and holds as its submitter's
    assert any(line.startswith("PROJECTS") for line in wide)
    assert "~root" in next(line for line in wide if line.startswith(f"{name} ")), wide
    assert any(line.split()[:2] == ["~root", "1"] for line in wide), wide

    # the build ends: its slot leaves the screen, the build shows as finished
    wait_until(
        lambda: not slot_lines(tmux.screen(), name),
        timeout=20,
        interval=0.1,
        what="the slot left the screen",
    )
    assert d.build(build_id)["state"] == "succeeded"

    tmux("send-keys", "-t", "top", "q")
    wait_until(exit_file.exists, timeout=10, interval=0.05, what="top exited after q")
    assert exit_file.read_text().strip() == "0"


def test_once_and_a_pipe_print_plain_text_and_no_daemon_is_exit_5(
    daemons: MakeDaemon, short_tmp: Path
) -> None:
    d = daemons().start()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "reqpmctl.cli", "--socket", str(d.socket), "top"]

    piped = subprocess.run(base, capture_output=True, env=env, timeout=30, check=False, cwd="/")
    assert piped.returncode == 0, piped.stderr
    assert b"\x1b" not in piped.stdout
    text = piped.stdout.decode()
    assert text.startswith("h1 ") and " | slots 0/" in text.splitlines()[0]
    for title in ("SLOTS  0/", "WAITING FOR A SLOT", "HOSTS  1", "LAST FINISHED HERE"):
        assert title in text

    # --once on a terminal: still plain text
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [*base, "--once"], stdout=follower, stderr=follower, env=env, cwd="/"
        )
        os.close(follower)
        out = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            assert ready, "top --once printed nothing within 30s"
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == 0, out
    finally:
        os.close(leader)
    assert b"\x1b" not in out
    assert out.startswith(b"h1 ") and b"HOSTS  1" in out

    gone = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", "--socket", str(short_tmp / "none.sock"), "top"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert gone.returncode == 5
    assert "is reqpmd running?" in gone.stderr
