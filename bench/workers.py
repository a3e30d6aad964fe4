"""Worker processes for the benchmarks: started with 'spawn', stopped whatever happens
(they also die with the parent), talking to the parent over a pipe in tuples whose first
element names the message."""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as MPEvent
from types import FrameType
from typing import Any

_PR_SET_PDEATHSIG = 1


def child_init(parent_pid: int) -> None:
    """Leave Ctrl-C to the parent (it stops us) and die if the parent dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def report_error(conn: Connection, exc: BaseException) -> None:
    with contextlib.suppress(Exception):
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP end the run through KeyboardInterrupt, even when we were
    started with SIGINT ignored (a background job), so the workers and Redis are stopped."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)


class Workers:
    """Every process we start, so that all of them are stopped whatever happens."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[BaseProcess] = []

    def spawn(self, target: Callable[..., None], *args: Any) -> tuple[Connection, BaseProcess]:
        """Start ``target(*args, parent_pid, conn)``; our end of the pipe and the process."""
        here, there = self.ctx.Pipe()
        proc = self.ctx.Process(target=target, args=(*args, os.getpid(), there), daemon=True)
        self.procs.append(proc)
        proc.start()
        there.close()
        return here, proc

    def event(self) -> MPEvent:
        return self.ctx.Event()

    def finish(self, proc: BaseProcess, timeout: float = 5) -> None:
        proc.join(timeout)
        self.stop(proc)

    @staticmethod
    def stop(proc: BaseProcess) -> None:
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
        if proc.is_alive():
            proc.kill()
            proc.join(2)

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                self.stop(proc)
        self.procs.clear()


def expect(conn: Connection, what: str, timeout: float) -> tuple[Any, ...]:
    """The worker's next message, which must be ``what``."""
    if not conn.poll(timeout):
        raise RuntimeError(f"worker sent no {what!r} within {timeout:g}s")
    try:
        msg: tuple[Any, ...] = conn.recv()
    except EOFError:
        raise RuntimeError(f"worker exited before sending {what!r}") from None
    if msg[0] == "error":
        raise RuntimeError(f"worker failed: {msg[1]}")
    if msg[0] != what:
        raise RuntimeError(f"worker sent {msg!r}, expected {what!r}")
    return msg


def ask_all(conns: list[Connection], msg: tuple[Any, ...], what: str, timeout: float) -> list[Any]:
    """Send ``msg`` to every worker, then wait for each one's ``what``."""
    for c in conns:
        c.send(msg)
    return [expect(c, what, timeout) for c in conns]
