"""Running one build: mock's steps in the build's unique root, then the scrub.

A BuildRun is owned by the thread that runs it; other threads only call ``stop()``,
which records why and lets that thread stop mock (SIGINT, SIGTERM, SIGKILL).
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import IO

from reqpmd import mock
from reqpmd.mock import Process, Runner, Stopper
from reqpmd.settings import Settings
from reqpmd.states import State
from reqpmd.store import Build

log = logging.getLogger(__name__)

SCRUB_TIMEOUT = 600.0


class StopReason(StrEnum):
    CANCEL = "cancel"  # a user asked: cancelled
    TIMEOUT = "timeout"  # over build_timeout_minutes: timed_out
    REQUEUE = "requeue"  # daemon stopping, or slot lost: run it again later


_STATE_FOR = {
    StopReason.CANCEL: State.CANCELLED,
    StopReason.TIMEOUT: State.TIMED_OUT,
    StopReason.REQUEUE: State.QUEUED,
}


@dataclass(frozen=True)
class Outcome:
    state: State  # a final state, or QUEUED to run again
    exit_code: int | None = None
    error: str | None = None


class BuildRun:
    def __init__(
        self,
        build: Build,
        build_dir: Path,
        settings: Settings,
        runner: Runner,
        on_started: Callable[[int, float | None], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.build = build
        self.build_dir = build_dir
        self.settings = settings
        self.runner = runner
        self.on_started = on_started
        self.clock = clock
        self.stopper = Stopper(grace=float(settings.cancel_grace_seconds))
        self._stop_reason: StopReason | None = None
        self._stop_note = ""
        self._stop_event = threading.Event()

    def stop(self, reason: StopReason, note: str = "") -> None:
        """Ask the owning thread to stop mock; a user's cancel wins over other reasons."""
        if self._stop_reason is None or reason == StopReason.CANCEL:
            self._stop_reason, self._stop_note = reason, note
        self._stop_event.set()

    @property
    def mock_command(self) -> Path:
        return Path(self.settings.mock_command)

    def run(self) -> Outcome:
        problem = mock.check_executable(self.mock_command)
        if problem:
            return Outcome(State.FAILED, error=problem)
        result_dir = self.build_dir / "result"
        result_dir.mkdir(parents=True, exist_ok=True)
        timeout_min = float(self.settings.build_timeout_minutes)
        deadline = self.clock() + timeout_min * 60 if timeout_min else None
        with open(self.build_dir / "build.log", "ab", buffering=0) as logf:
            outcome = self._steps(logf, result_dir, deadline)
            keep = outcome.state == State.FAILED and self.settings.keep_failed_roots
            if keep:
                _note(logf, "keeping the failed build's mock root (keep_failed_roots)")
            else:
                self._scrub(logf)
        return outcome

    def _steps(self, logf: IO[bytes], result_dir: Path, deadline: float | None) -> Outcome:
        b, inputs = self.build, self.build_dir / "input"
        if b.kind == "spec":
            argv = mock.buildsrpm_argv(
                self.mock_command, b.chroot, b.id, result_dir, inputs / b.source, inputs / "sources"
            )
            outcome = self._run_step("buildsrpm", argv, logf, deadline)
            if outcome is not None:
                return outcome
            srpms = sorted(result_dir.glob("*.src.rpm"), key=lambda p: p.stat().st_mtime)
            if not srpms:
                return Outcome(State.FAILED, 0, "mock --buildsrpm produced no .src.rpm")
            srpm = srpms[-1]
        else:
            srpm = inputs / b.source
        argv = mock.rebuild_argv(self.mock_command, b.chroot, b.id, result_dir, srpm)
        outcome = self._run_step("rebuild", argv, logf, deadline)
        return outcome or Outcome(State.SUCCEEDED, 0)

    def _run_step(
        self, step: str, argv: list[str], logf: IO[bytes], deadline: float | None
    ) -> Outcome | None:
        """None when the step succeeded; otherwise how the build ends."""
        if self._stop_reason is not None:
            return self._stopped(None)
        _note(logf, "running: " + " ".join(argv))
        proc = self.runner(argv, logf, self.build_dir)
        try:
            self.on_started(proc.pid, mock.start_time(proc.pid))
            code = self._wait(proc, deadline)
        except BaseException:
            # never leave mock running unsupervised: its slot is about to be released
            self.stopper.stop(proc)
            raise
        if self._stop_reason is not None:
            _note(logf, f"stopped ({self._stop_reason}): mock exited with {code}")
            return self._stopped(code)
        if code == 0:
            return None
        if code == mock.BUILD_ROOT_LOCKED:
            return Outcome(
                State.QUEUED,
                code,
                "mock: build root is locked by another process "
                "(exit 60); the build will be retried",
            )
        return Outcome(State.FAILED, code, f"mock --{step} exited with {code}; see build.log")

    def _wait(self, proc: Process, deadline: float | None) -> int:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and self.clock() >= deadline:
                self.stop(
                    StopReason.TIMEOUT,
                    f"build ran over build_timeout_minutes={self.settings.build_timeout_minutes}",
                )
            if self._stop_event.is_set():
                return self.stopper.stop(proc)

    def _stopped(self, code: int | None) -> Outcome:
        reason = self._stop_reason or StopReason.CANCEL
        note = (
            self._stop_note
            or {
                StopReason.CANCEL: "cancelled",
                StopReason.TIMEOUT: "timed out",
                StopReason.REQUEUE: "interrupted; will run again",
            }[reason]
        )
        return Outcome(_STATE_FOR[reason], code, note)

    def _scrub(self, logf: IO[bytes]) -> None:
        scrub(self.build, self.build_dir, self.settings, self.runner, logf, self.on_started)


def scrub(
    build: Build,
    build_dir: Path,
    settings: Settings,
    runner: Runner,
    logf: IO[bytes],
    on_started: Callable[[int, float | None], None] | None = None,
) -> None:
    """Delete the build's unique roots (never the shared caches: see reqpmd.mock).
    ``on_started`` records its pid, so crash recovery can stop a scrub cut off by a crash."""
    command = Path(settings.mock_command)
    if mock.check_executable(command):
        return
    private_cache = build_dir / "scrub-cache"
    private_cache.mkdir(parents=True, exist_ok=True)
    argv = mock.scrub_argv(command, build.chroot, build.id, private_cache)
    _note(logf, "scrubbing: " + " ".join(argv))
    try:
        proc = runner(argv, logf, build_dir)
    except OSError as exc:
        log.warning(
            "build %d: scrub could not start: %s", build.id, exc, extra={"build_id": build.id}
        )
        shutil.rmtree(private_cache, ignore_errors=True)
        return
    try:
        if on_started is not None:
            on_started(proc.pid, mock.start_time(proc.pid))
        code = proc.wait(timeout=SCRUB_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = Stopper(grace=float(settings.cancel_grace_seconds)).stop(proc)
    finally:
        shutil.rmtree(private_cache, ignore_errors=True)
    if code != 0:
        log.warning(
            "build %d: scrub of its mock root exited with %s",
            build.id,
            code,
            extra={"build_id": build.id},
        )


def _note(logf: IO[bytes], text: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    logf.write(f"=== reqpm {stamp}: {text}\n".encode())
