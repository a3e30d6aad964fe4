"""The repository lock and batched metadata runs.

Two metadata runs on one repository must never interleave, also between two daemons
sharing an NFS ``repo_dir``: the lock is an flock on a file in the repository's work
directory (on NFS, Linux maps flock to POSIX locks, which the server arbitrates), plus
a thread lock, because POSIX locks do not exclude the threads of one process.

Batching follows Copr's BatchedCreaterepo: whoever wants a run leaves a request file in
``pending/`` (listing the build directories it wants out of the metadata) and then waits
for the lock. The holder takes every request present when it starts, retires what they
list, and removes them when its run succeeded; a waiter whose request is gone when it
gets the lock was served by that run and has nothing to do. A request is left only
after the build's files are in place, and the holder lists requests before createrepo_c
walks the directory, so a served request's files are always in the metadata.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from reqpmd.fsutil import atomic_write
from reqpmd.repos.layout import RepoLayout

LOCK_TIMEOUT = 2 * 3600.0  # seconds to wait for another run (a huge repository's full run)
POLL = 0.05

T = TypeVar("T")


class LockTimeout(Exception):
    """Another process held the repository's lock for longer than LOCK_TIMEOUT."""


class RepoLocks:
    def __init__(self, host: str, timeout: float = LOCK_TIMEOUT) -> None:
        self.host = host
        self.timeout = timeout
        self._guard = threading.Lock()
        self._threads: dict[Path, threading.Lock] = {}

    @contextlib.contextmanager
    def held(self, repo: RepoLayout) -> Iterator[None]:
        """Hold the repository's lock (thread, then file); LockTimeout past the timeout."""
        with self._guard:
            thread_lock = self._threads.setdefault(repo.work, threading.Lock())
        deadline = time.monotonic() + self.timeout
        if not thread_lock.acquire(timeout=self.timeout):
            raise LockTimeout(f"{repo.chroot}: repository busy in this daemon too long")
        try:
            repo.work.mkdir(parents=True, exist_ok=True)
            fd = os.open(repo.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                _flock(fd, deadline, repo)
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            thread_lock.release()

    def batched(
        self, repo: RepoLayout, run: Callable[[list[str]], T], retire: list[str]
    ) -> T | None:
        """Have a metadata run cover what is in the repository now, and take the build
        directories in ``retire`` out of it: ``run`` under the lock, given every waiting
        request's directories to retire, unless another holder's run took this request
        (then None: that run retired ours too)."""
        repo.pending.mkdir(parents=True, exist_ok=True)
        mine = repo.pending / f"{self.host}-{os.getpid()}-{uuid.uuid4().hex}"
        atomic_write(mine, json.dumps(sorted(retire)).encode())
        try:
            with self.held(repo):
                if not mine.exists():
                    return None  # served by a run that started after we asked
                # not the temp files of requests still being written (atomic_write)
                taken = [t for t in repo.pending.iterdir() if not t.name.startswith(".")]
                result = run(sorted(set().union(*(_retire_list(t) for t in taken))))
                for request in taken:
                    with contextlib.suppress(FileNotFoundError):
                        request.unlink()
                return result
        finally:
            with contextlib.suppress(FileNotFoundError):
                mine.unlink()  # a failed run leaves it: the caller retries with a new one


def _retire_list(request: Path) -> set[str]:
    """The directories a request asks to retire (none if it cannot be read)."""
    try:
        value = json.loads(request.read_bytes())
    except (OSError, ValueError):
        return set()
    if not isinstance(value, list):
        return set()
    return {v for v in value if isinstance(v, str) and "/" not in v and not v.startswith(".")}


def _flock(fd: int, deadline: float, repo: RepoLayout) -> None:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{repo.chroot}: another process has held {repo.lock} for too long")
        time.sleep(POLL)
