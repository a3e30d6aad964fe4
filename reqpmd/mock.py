"""mock command lines, and starting and stopping mock processes.

Every build runs in a root of its own, ``--uniqueext build<id>``: mock names it
``<chroot>-build<id>`` (and ``<chroot>-bootstrap-build<id>``), so two reqpm builds never
share a root lock. argv lists only, never a shell.

Scrubbing: ``--scrub=chroot`` deletes this build's root. ``--scrub=bootstrap`` deletes
this build's bootstrap root *and* rmtree's the bootstrap cache under ``cache_topdir``,
which every uniqueext of the config shares (mock backend.py, Commands.scrub); ``all``
wipes the package cache too. So the scrub run points ``cache_topdir`` at a private,
empty directory: mock deletes the unique roots and an empty throwaway cache, and the
shared caches stay untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import psutil

BUILD_ROOT_LOCKED = 60  # mock's BuildRootLocked exit code


def uniqueext(build_id: int) -> str:
    return f"build{build_id}"


def _base(mock: Path, chroot: str, build_id: int) -> list[str]:
    return [str(mock), "-r", chroot, "--uniqueext", uniqueext(build_id)]


def buildsrpm_argv(
    mock: Path, chroot: str, build_id: int, result_dir: Path, spec: Path, sources: Path
) -> list[str]:
    return [
        *_base(mock, chroot, build_id),
        "--resultdir",
        str(result_dir),
        "--buildsrpm",
        "--spec",
        str(spec),
        "--sources",
        str(sources),
    ]


def rebuild_argv(mock: Path, chroot: str, build_id: int, result_dir: Path, srpm: Path) -> list[str]:
    return [*_base(mock, chroot, build_id), "--resultdir", str(result_dir), "--rebuild", str(srpm)]


def scrub_argv(mock: Path, chroot: str, build_id: int, private_cache: Path) -> list[str]:
    return [
        *_base(mock, chroot, build_id),
        "--config-opts",
        f"cache_topdir={private_cache}",
        "--scrub=chroot",
        "--scrub=bootstrap",
    ]


def check_executable(mock: Path) -> str | None:
    """Why mock cannot be run, or None if it can."""
    if not mock.exists():
        return f"mock_command {mock} does not exist (is mock installed?)"
    if not mock.is_file() or not os.access(mock, os.X_OK):
        return f"mock_command {mock} is not an executable file"
    return None


class Process(Protocol):
    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...


class Runner(Protocol):
    """Starts a command in a process group of its own, output to ``log``."""

    def __call__(self, argv: list[str], log: IO[bytes], cwd: Path) -> Process: ...


def popen_runner(argv: list[str], log: IO[bytes], cwd: Path) -> Process:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )


def start_time(pid: int) -> float | None:
    """The process's start time (to tell it from a later process with a reused pid)."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: signal.Signals) -> None:
    # PermissionError: only processes of another user are left in the group (root mock
    # under consolehelper); group_alive() keeps reporting them, so callers wait them out.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


@dataclass
class Stopper:
    """SIGINT, then SIGTERM, then SIGKILL to a process group, ``grace`` seconds apart,
    as Koji and Copr stop mock: mock cleans its chroot up on the first two."""

    grace: float
    sleep: Callable[[float], None] = time.sleep

    def stop(self, proc: Process) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            signal_group(proc.pid, sig)
            try:
                code = proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                continue
            # mock may leave children behind in its group; they get the rest
            if sig != signal.SIGKILL and group_alive(proc.pid):
                self._finish_group(proc.pid)
            return code
        return proc.wait()

    def _finish_group(self, pgid: int) -> None:
        deadline = time.monotonic() + self.grace
        while group_alive(pgid) and time.monotonic() < deadline:
            self.sleep(0.05)
        signal_group(pgid, signal.SIGKILL)

    def kill_orphan(self, pgid: int, started: float | None) -> None:
        """Stop a process group left behind by an earlier daemon (crash recovery).

        The group is only touched if its leader is gone or still is the very process
        we started (same start time): a reused pid belongs to somebody else.
        """
        current = start_time(pgid)
        if current is not None and current != started:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if not group_alive(pgid):
                return
            signal_group(pgid, sig)
            deadline = time.monotonic() + self.grace
            while group_alive(pgid) and time.monotonic() < deadline:
                self.sleep(0.05)
