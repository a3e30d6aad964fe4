"""Running one build: mock's steps in the build's unique root, then the scrub.

A BuildRun is owned by the thread that runs it; other threads only ask it to stop
through the build's ``StopRequest``, and this thread stops mock (SIGINT, SIGTERM,
SIGKILL). What each ending means is ``lifecycle``'s business, not this module's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO

from reqpmd.builds import mock
from reqpmd.builds.events import build_event
from reqpmd.builds.guard import Fence
from reqpmd.builds.layout import BuildLayout
from reqpmd.builds.lifecycle import Outcome, StopReason, StopRequest, step_outcome
from reqpmd.builds.process import Process, Runner, Stopper, start_time
from reqpmd.builds.states import State
from reqpmd.builds.store import Build
from reqpmd.config.schema import Settings

SCRUB_TIMEOUT = 600.0
WHY_LINES, WHY_BYTES = 40, 16384  # of result/build.log copied into a failed build's log

OnStarted = Callable[[int, float | None], None]


class BuildRun:
    def __init__(
        self,
        build: Build,
        layout: BuildLayout,
        settings: Settings,
        runner: Runner,
        on_started: OnStarted,
        stop: StopRequest,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
        fence: Fence | None = None,
    ) -> None:
        self.build = build
        self.env = env  # for mock's steps, not its scrub
        self.fence = fence  # the slot's lease, watched by the lease guard too
        self.layout = layout
        self.settings = settings
        self.runner = runner
        self.on_started = on_started
        self.stop = stop
        self.clock = clock
        self.stopper = Stopper(grace=settings.cancel_grace_seconds)
        self.mock_started = False  # whether this run started mock at all

    def run(self) -> Outcome:
        problem = mock.check_executable(self.settings.mock_command)
        if problem:
            return Outcome(State.FAILED, error=problem)
        self.layout.result.mkdir(parents=True, exist_ok=True)
        timeout_min = self.settings.build_timeout_minutes
        deadline = self.clock() + timeout_min * 60 if timeout_min else None
        with open(self.layout.log, "ab", buffering=0) as logf:
            outcome = self._steps(logf, deadline)
            if not self.mock_started:
                pass  # stopped before mock ran: no root to scrub
            elif outcome.state == State.FAILED and self.settings.keep_failed_roots:
                note(logf, "keeping the failed build's mock root (keep_failed_roots)")
            else:
                scrub(self.build, self.layout, self.settings, self.runner, logf, self.on_started)
        return outcome

    def _steps(self, logf: IO[bytes], deadline: float | None) -> Outcome:
        b, lay, command = self.build, self.layout, self.settings.mock_command
        if b.kind == "spec":
            lay.sources.mkdir(parents=True, exist_ok=True)  # a spec may have no sources
            argv = mock.buildsrpm_argv(
                command, b.chroot, b.id, lay.result, lay.submitted(b.source), lay.sources
            )
            outcome = self._run_step("buildsrpm", argv, logf, deadline)
            if outcome is not None:
                return outcome
            srpms = sorted(lay.result.glob("*.src.rpm"), key=lambda p: p.stat().st_mtime)
            if not srpms:
                return Outcome(State.FAILED, 0, "mock --buildsrpm produced no .src.rpm")
            srpm = srpms[-1]
        else:
            srpm = lay.submitted(b.source)
        argv = mock.rebuild_argv(command, b.chroot, b.id, lay.result, srpm)
        outcome = self._run_step("rebuild", argv, logf, deadline)
        return outcome or Outcome(State.SUCCEEDED, 0)

    def _run_step(
        self, step: str, argv: list[str], logf: IO[bytes], deadline: float | None
    ) -> Outcome | None:
        """None when the step succeeded; otherwise how the build ends."""
        if self.fence is not None and self.fence.lapsed():
            # granted, then this daemon stalled past the lease: the slot may be another's
            self._requeue_lapsed()
        if self.stop.requested:
            return self.stop.outcome()
        note(logf, "running: " + " ".join(argv))
        fence, result = self.fence, self.layout.result
        if fence is not None:
            fence.watch(result)  # before mock exists: no moment unwatched
        try:
            proc = self.runner(argv, logf, self.layout.root, self.env)
            self.mock_started = True
            try:
                self.on_started(proc.pid, start_time(proc.pid))
                code = self._wait(proc, deadline)
            except BaseException:
                # never leave mock running unsupervised: its slot is about to be released
                self.stopper.stop(proc)
                raise
            fenced = fence is not None and fence.expired(result)
        finally:
            if fence is not None:
                fence.unwatch(result)
        if fenced and not self.stop.requested:
            # mock ended with no live lease (the guard stopped it while this daemon could
            # not act, or it ran out): whatever mock said, it held no slot
            self._requeue_lapsed()
        if self.stop.requested:
            note(logf, f"stopped ({self.stop.reason}): mock exited with {code}")
            return self.stop.outcome(code)
        outcome = step_outcome(step, code)
        if outcome is not None:
            self._show_why(logf)
        return outcome

    def _show_why(self, logf: IO[bytes]) -> None:
        """mock writes rpmbuild's output to result/build.log, not to its own stderr: the
        end of it goes into the build's log too, so `builds log` shows why it failed."""
        tail = _tail(self.layout.result / "build.log", WHY_LINES, WHY_BYTES)
        if tail:
            note(logf, "the last lines of result/build.log (mock's rpmbuild output):")
            with contextlib.suppress(OSError):
                logf.write(tail if tail.endswith(b"\n") else tail + b"\n")

    def _requeue_lapsed(self) -> None:
        self.stop.request(StopReason.REQUEUE, "its slot's lease ran out; will run again")

    def _wait(self, proc: Process, deadline: float | None) -> int:
        while True:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if deadline is not None and self.clock() >= deadline:
                self.stop.request(
                    StopReason.TIMEOUT,
                    f"build ran over build_timeout_minutes={self.settings.build_timeout_minutes}",
                )
            if self.stop.requested:
                return self.stopper.stop(proc)


def scrub(
    build: Build,
    layout: BuildLayout,
    settings: Settings,
    runner: Runner,
    logf: IO[bytes],
    on_started: OnStarted | None = None,
) -> None:
    """Delete the build's unique roots (never the shared caches: see builds.mock).
    ``on_started`` records its pid, so crash recovery can stop a scrub cut off by a crash."""
    command = settings.mock_command
    if mock.check_executable(command):
        return
    private_cache = layout.scrub_cache
    private_cache.mkdir(parents=True, exist_ok=True)
    argv = mock.scrub_argv(command, build.chroot, build.id, private_cache)
    note(logf, "scrubbing: " + " ".join(argv))
    try:
        proc = runner(argv, logf, layout.root)
    except OSError as exc:
        build_event(build.id, f"scrub could not start: {exc}", logging.WARNING)
        shutil.rmtree(private_cache, ignore_errors=True)
        return
    try:
        if on_started is not None:
            on_started(proc.pid, start_time(proc.pid))
        code = proc.wait(timeout=SCRUB_TIMEOUT)
    except subprocess.TimeoutExpired:
        code = Stopper(grace=settings.cancel_grace_seconds).stop(proc)
    finally:
        shutil.rmtree(private_cache, ignore_errors=True)
    if code != 0:
        build_event(build.id, f"scrub of its mock root exited with {code}", logging.WARNING)


def note(logf: IO[bytes], text: str) -> None:
    """A line of reqpm's own in the build log, told apart from mock's output. Best
    effort: a full disk must not stop a build, nor the scrub that frees its root."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError):
        logf.write(f"=== reqpm {stamp}: {text}\n".encode())


def scrub_after_crash(
    build: Build,
    layout: BuildLayout,
    settings: Settings,
    runner: Runner,
    on_started: OnStarted | None = None,
) -> None:
    """Crash recovery's scrub, logging into the build's own log (or nowhere, when even
    that cannot be opened: recovery must work on a full disk)."""
    try:
        logf = open(layout.log, "ab")  # noqa: SIM115 - closed below, whichever it is
    except OSError:
        logf = open(os.devnull, "ab")  # noqa: SIM115
    with logf:
        scrub(build, layout, settings, runner, logf, on_started)


def _tail(path: Path, lines: int, limit: int) -> bytes:
    """The last ``lines`` lines of a file, at most ``limit`` bytes; empty if unreadable."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            data = f.read(limit)
    except OSError:
        return b""
    return b"\n".join(data.split(b"\n")[-lines - 1 :]).lstrip(b"\n")
