"""Starting and stopping mock's processes, each in a process group of its own.

Stopping is one ladder, as Koji and Copr stop mock: SIGINT, then SIGTERM, then SIGKILL
to the whole group, ``grace`` seconds apart; mock cleans its chroot up on the first two.
The same ladder stops a build we started and one an earlier daemon left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import psutil

from reqpmd.lifeline import die_with_parent

LADDER = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)


class Process(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class Runner(Protocol):
    """Starts a command in a process group of its own, output to ``log``, with ``env``
    added to reqpmd's environment."""

    def __call__(
        self, argv: list[str], log: IO[bytes], cwd: Path, env: Mapping[str, str] | None = None
    ) -> Process: ...


def popen_runner(
    argv: list[str], log: IO[bytes], cwd: Path, env: Mapping[str, str] | None = None
) -> Process:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **env} if env else None,
        start_new_session=True,
        close_fds=True,
        preexec_fn=die_with_parent,  # no mock outlives a reqpmd killed with -9
    )


def start_time(pid: int) -> float | None:
    """The process's start time (to tell it from a later process with a reused pid)."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs. Zombies do not count: a group whose
    parent died (a daemon killed with -9) stays zombies until init reaps them, and on a
    host whose init is slow to reap, waiting for them would add a grace per signal."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's processes (root mock): look closer
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def signal_group(pgid: int, sig: signal.Signals) -> None:
    # PermissionError: only processes of another user are left in the group (root mock
    # under consolehelper); group_alive() keeps reporting them, so callers wait them out.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Stopper:
    grace: float
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic

    def _escalate(self, pgid: int, gone: Callable[[float], bool]) -> signal.Signals | None:
        """Climb the ladder until ``gone(grace)`` says the target went; the signal that
        ended it, or None if even SIGKILL's grace passed."""
        for sig in LADDER:
            signal_group(pgid, sig)
            if gone(self.grace):
                return sig
        return None

    def _group_gone(self, pgid: int, within: float) -> bool:
        deadline = self.clock() + within
        while group_alive(pgid):
            if self.clock() >= deadline:
                return False
            self.sleep(0.05)
        return True

    def stop(self, proc: Process) -> int:
        """Stop a process we started (and its group); its exit code."""
        codes: list[int] = []

        def leader_gone(grace: float) -> bool:
            try:
                codes.append(proc.wait(timeout=grace))
            except subprocess.TimeoutExpired:
                return False
            return True

        ended_by = self._escalate(proc.pid, leader_gone)
        if ended_by is None:
            return proc.wait()
        # mock may leave children behind in its group; they get the rest
        if ended_by != signal.SIGKILL and not self._group_gone(proc.pid, self.grace):
            signal_group(proc.pid, signal.SIGKILL)
        return codes[0]

    def kill_orphan(self, pgid: int, started: float | None) -> None:
        """Stop a process group left behind by an earlier daemon (crash recovery).

        The group is only touched if its leader is gone or still is the very process
        we started (same start time): a reused pid belongs to somebody else.
        """
        current = start_time(pgid)
        if current is not None and current != started:
            return
        if group_alive(pgid):
            self._escalate(pgid, lambda grace: self._group_gone(pgid, grace))
