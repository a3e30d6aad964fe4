"""The lease guard: a small process beside reqpmd that stops a build's mock once the
build's slot lease has run out and reqpmd did not stop it itself.

reqpmd fences its own builds: when a slot's lease runs out unrenewed, it stops the mock
(``on_lost``). A reqpmd that cannot act, though (stopped alone with ``kill -STOP``, or
wedged), renews nothing and stops nothing, while its mock builds on; the slot's lease
runs out in Redis and another host is granted it: one build over the limit, for as long
as that mock runs. The guard is another process, so it goes on when reqpmd does not.

Before each mock step, reqpmd tells the guard, over a pipe, the build's result directory
and the monotonic time its lease runs out (CLOCK_MONOTONIC is one clock for every
process of the host); a renewal moves the time on; the step's end disarms it. Armed
before mock starts, there is no moment when a mock runs unwatched (a reqpmd stopped
between starting mock and saying its pid would leave one). reqpmd also says it is alive
every TICK. When the time passes, or ``early`` seconds before it once reqpmd has been
silent for SILENT (stopped: so that even a mock that ignores SIGINT is gone before
another host can be granted the slot), the guard tells reqpmd it fired, finds the mock
by its argv (``--resultdir DIR``: unique to the build and the daemon) and stops its
process group with mock's ladder (SIGINT, SIGTERM, SIGKILL), as reqpmd would. A reqpmd
that only lost Redis is not silent: its builds run to the lease's end, as before.

When the pipe closes, reqpmd is gone: the guard still stops each armed mock at its time
(a setuid mock does not keep PR_SET_PDEATHSIG, which stops the others at once), but only
one started before reqpmd went, never the same build started again by the next reqpmd;
then it exits.

Lines, JSON. To the guard: ``{"arm": DIR, "deadline": T, "grace": S, "early": E, "seq": N}``
(N: which watch of DIR), ``{"disarm": DIR}``, ``{"alive": 1}``. From it:
``{"fired": DIR, "seq": N}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from reqpmd.builds import mock
from reqpmd.builds.process import Stopper

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between reqpmd's updates of the deadlines it sent, and "alive"
SILENT = 1.0  # seconds without a word from reqpmd after which the guard fires early


# -- in reqpmd ----------------------------------------------------------------------------


class LeaseGuard:
    """reqpmd's end of the pipe: started at the first armed build, started again if it
    died (everything re-armed), closed at shutdown."""

    def __init__(self, grace: Callable[[], float], argv: list[str] | None = None) -> None:
        self._grace = grace
        self._argv = argv or [sys.executable, "-m", "reqpmd.builds.guard"]
        self._lock = threading.Lock()
        # result dir -> (deadline, early, this watch's number: a "fired" names it, so a
        # late word about an earlier step of the build is not taken for this one)
        self._watched: dict[str, tuple[Callable[[], float], float, int]] = {}
        self._sent: dict[str, bytes] = {}
        self._fired: set[tuple[str, int]] = set()
        self._seq = 0
        self._replies = b""
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    def watch(self, result_dir: Path, deadline: Callable[[], float], early: float) -> None:
        with self._lock:
            self._seq += 1
            self._watched[str(result_dir)] = (deadline, early, self._seq)
            self._send_due()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-guard", daemon=True)
                self._thread.start()

    def unwatch(self, result_dir: Path) -> None:
        key = str(result_dir)
        with self._lock:
            self._fired = {f for f in self._fired if f[0] != key}  # no later step's concern
            if self._watched.pop(key, None) is not None:
                self._sent.pop(key, None)
                self._write(_line({"disarm": key}))

    def fired(self, result_dir: Path) -> bool:
        """Whether the guard stopped (is stopping) this build's mock. It says so before
        it sends the first signal, so once mock has ended, the word is here."""
        key = str(result_dir)
        with self._lock:
            self._read_replies()
            watched = self._watched.get(key)
            return watched is not None and (key, watched[2]) in self._fired

    def _read_replies(self) -> None:
        """Under the lock."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        with contextlib.suppress(OSError):  # nothing more to read now, or it died
            while chunk := os.read(proc.stdout.fileno(), 65536):
                self._replies += chunk
        *lines, self._replies = self._replies.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                m = json.loads(line)
                self._fired.add((str(m["fired"]), int(m["seq"])))

    def close(self) -> None:
        """At shutdown, once the builds are stopped: the guard exits at once."""
        self._closed.set()
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()  # EOF: it exits after what is still armed
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None else None

    def _run(self) -> None:
        while not self._closed.wait(TICK):
            with self._lock:
                self._send_due()
                if self._proc is not None:
                    self._write(_line({"alive": 1}))
                self._read_replies()

    def _send_due(self) -> None:
        """Under the lock: every deadline that moved since it was last sent (all of them
        to a guard started again)."""
        if self._proc is not None and self._proc.poll() is not None:
            log.warning("the lease guard exited (%s); starting it again", self._proc.returncode)
            self._proc = None
        if self._proc is None:
            self._sent.clear()
            self._replies = b""
        grace = self._grace()
        for key, (deadline, early, seq) in list(self._watched.items()):
            message = {
                "arm": key,
                "deadline": deadline(),
                "grace": grace,
                "early": early,
                "seq": seq,
            }
            line = _line(message)
            if self._sent.get(key) != line and self._write(line):
                self._sent[key] = line

    def _write(self, line: bytes) -> bool:
        """Under the lock. False when the guard cannot be reached (the next tick starts
        it again)."""
        if self._closed.is_set():
            return False
        if self._proc is None:
            if not self._watched:
                return True  # a disarm with no guard running: nothing to tell
            try:
                self._proc = _start(self._argv)
            except OSError as exc:
                log.error("cannot start the lease guard (%s): reqpmd alone fences builds", exc)
                return False
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            # shorter than PIPE_BUF: written whole or not at all, and never waited for
            # (a guard that stops reading must not hang a build's thread)
            os.write(stdin.fileno(), line)
            return True
        except OSError:  # died (the next tick starts another) or its pipe is full
            return False


def _line(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _start(argv: list[str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,  # reqpmd's own: the journal
        close_fds=True,
        start_new_session=True,  # a terminal's ^C is for reqpmd; the guard ends at EOF
    )
    assert proc.stdin is not None and proc.stdout is not None
    os.set_blocking(proc.stdin.fileno(), False)
    os.set_blocking(proc.stdout.fileno(), False)
    return proc


@dataclass
class Fence:
    """One build's slot, as its mock steps see it: the guard watches each step against
    the lease, and a step that ended after the lease ran out is no result."""

    guard: LeaseGuard
    deadline: Callable[[], float]  # monotonic: the slot's lease runs out
    lost: Callable[[], bool]
    early: float  # seconds before it the guard may fire when reqpmd is silent

    def watch(self, result_dir: Path) -> None:
        self.guard.watch(result_dir, self.deadline, self.early)

    def unwatch(self, result_dir: Path) -> None:
        self.guard.unwatch(result_dir)

    def lapsed(self) -> bool:
        """The slot is lost or its lease ran out."""
        return self.lost() or time.monotonic() >= self.deadline()

    def expired(self, result_dir: Path) -> bool:
        """The step's mock no longer ran under a live lease: whatever it said, it is no
        result (lost, run out, or stopped by the guard). Asked before unwatch()."""
        return self.lapsed() or self.guard.fired(result_dir)


def early_for(grace: float, lease: float) -> float:
    """How early the guard may stop a silent reqpmd's mock: time for the whole ladder
    (SIGKILL comes two graces after SIGINT), but at most a third of a lease, which a live
    reqpmd's renewals always keep ahead of."""
    return min(2 * grace + 0.5, lease / 3)


# -- the guard process --------------------------------------------------------------------


@dataclass
class _Armed:
    deadline: float
    grace: float
    early: float
    seq: int


def serve(pipe: IO[bytes], out: IO[bytes], clock: Callable[[], float] = time.monotonic) -> None:
    """Until reqpmd closes the pipe and every deadline armed then has passed."""
    armed: dict[str, _Armed] = {}
    stopping: list[threading.Thread] = []
    fd: int | None = pipe.fileno()
    gone_at: float | None = None  # when reqpmd went: mocks started later are another's
    heard = clock()
    pending = b""
    while True:
        now = clock()
        silent = now - heard >= SILENT
        for key in [k for k, a in armed.items() if _due(a, now, silent)]:
            a = armed.pop(key)
            with contextlib.suppress(OSError):  # reqpmd gone: nobody to tell
                out.write(_line({"fired": key, "seq": a.seq}))
                out.flush()
            for pid, started in _mocks_of(key, before=gone_at):
                _say(f"stopping mock {pid} ({key}): its slot's lease ran out unrenewed")
                t = threading.Thread(target=Stopper(grace=a.grace).kill_orphan, args=(pid, started))
                t.start()
                stopping.append(t)
        if fd is None and not armed:
            break
        timeout = min([TICK, *(a.deadline - now for a in armed.values())]) if armed else None
        timeout = None if timeout is None else max(0.0, timeout)
        if fd is None:  # reqpmd is gone; its leases still run to their end
            time.sleep(timeout or 0.0)
            continue
        readable, _, _ = select.select([fd], [], [], timeout)
        if not readable:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            fd, gone_at = None, _now_as_create_time()
            if armed:
                _say(f"reqpmd went away: its {len(armed)} build(s) stopped at their lease's end")
            continue
        heard = clock()
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            _apply(armed, line)
    for t in stopping:
        t.join()


def _due(a: _Armed, now: float, silent: bool) -> bool:
    return now >= a.deadline or (silent and now >= a.deadline - a.early)


def _apply(armed: dict[str, _Armed], line: bytes) -> None:
    try:
        m = json.loads(line)
        if "arm" in m:
            armed[str(m["arm"])] = _Armed(
                float(m["deadline"]), float(m["grace"]), float(m["early"]), int(m["seq"])
            )
        elif "disarm" in m:
            armed.pop(str(m["disarm"]), None)
    except (ValueError, TypeError, KeyError) as exc:
        _say(f"ignored a line it cannot read ({exc}): {line[:200]!r}")


def _mocks_of(result_dir: str, before: float | None) -> list[tuple[int, float]]:
    """The mock processes of a build (pid, start time): each leads its process group."""
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        with contextlib.suppress(psutil.Error, OSError):
            argv, started = p.info["cmdline"] or [], p.info["create_time"]
            if before is not None and started >= before:
                continue
            if mock.result_dir_of(argv) == result_dir and os.getpgid(p.pid) == p.pid:
                found.append((p.pid, started))
    return found


def _now_as_create_time() -> float:
    """Now, on the clock of psutil's create_time (boot time, whole seconds, plus the time
    since boot): time.time() may differ from it by up to a second."""
    # less two clock ticks: create_time counts whole ticks, so a process started just
    # after reqpmd went can show a time a tick before it
    ticks = 2 / os.sysconf("SC_CLK_TCK")
    return float(psutil.boot_time()) + time.clock_gettime(time.CLOCK_BOOTTIME) - ticks


def _say(text: str) -> None:
    print(f"<4>reqpmd lease guard: {text}", file=sys.stderr, flush=True)


def main() -> int:
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
