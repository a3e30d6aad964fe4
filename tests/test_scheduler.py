"""The scheduler in-process: a real Store (SQLite in tmp_path), a fake mock runner, a fake
slot limiter and a fake clock. Nothing here runs mock or talks to Redis.

The fake mock processes have pids above the kernel's PID_MAX_LIMIT (2**22), so the real
stop ladder's ``killpg`` hits no process group; ``signal_group`` is wrapped so that the
signal also reaches the fake, which records it and (by default) exits 130 on SIGINT.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import pytest

from reqpmd.builds import process
from reqpmd.builds.autoscale import AutoScaler
from reqpmd.builds.gates import Gates
from reqpmd.builds.process import Stopper
from reqpmd.builds.scheduler import MAX_WAITING, InFlight, Scheduler, slot_name
from reqpmd.builds.states import State
from reqpmd.builds.store import Build, Store
from reqpmd.config.parse import validate
from reqpmd.config.schema import Settings
from reqpmd.errors import Busy, InvalidArgument, RedisUnavailable, SlotTimeout, WaitCancelled
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.fakes import FakeClock

HOST = "testhost"
CHROOT = "fedora-40-x86_64"
SRPM = "hello-1.0-1.src.rpm"
PID_BASE = 5_000_000  # > PID_MAX_LIMIT (4194304): never a live process group
STEP_FLAGS = {"--rebuild": "rebuild", "--buildsrpm": "buildsrpm", "--scrub=chroot": "scrub"}
GIVE_UP = 10.0  # a fake that is never told what to do gives up, so no test hangs


def wait_until(
    pred: Callable[[], Any], timeout: float = 5.0, what: str | Callable[[], str] = ""
) -> Any:
    """Poll ``pred`` every 10 ms until it is truthy; fail saying ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            said = what() if callable(what) else what
            pytest.fail(f"timed out after {timeout}s waiting for {said or pred}")
        time.sleep(0.01)


# -- fake mock ----------------------------------------------------------------------------


class FakeProcess:
    """A mock process that exits when the test says so (or on a signal)."""

    def __init__(self, pid: int, step: str, argv: list[str], exit_on_sigint: bool) -> None:
        self.pid = pid
        self.step = step
        self.argv = argv
        self.exit_on_sigint = exit_on_sigint
        self.signals: list[signal.Signals] = []
        self._code: int | None = None
        self._cond = threading.Condition()

    def finish(self, code: int) -> None:
        with self._cond:
            if self._code is None:
                self._code = code
            self._cond.notify_all()

    def deliver(self, sig: signal.Signals) -> None:
        with self._cond:
            self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGINT and self.exit_on_sigint):
            self.finish(128 + sig)

    def poll(self) -> int | None:
        with self._cond:
            return self._code

    def wait(self, timeout: float | None = None) -> int:
        limit = GIVE_UP if timeout is None else timeout
        with self._cond:
            if not self._cond.wait_for(lambda: self._code is not None, limit):
                if timeout is None:
                    raise RuntimeError(f"fake mock {self.step} was never finished")
                raise subprocess.TimeoutExpired(self.argv, timeout)
            assert self._code is not None
            return self._code


@dataclass
class Call:
    step: str
    argv: list[str]
    cwd: Path
    proc: FakeProcess
    env: dict[str, str]


class FakeRunner:
    """The Runner: records every mock command line. ``codes[step]`` is the exit code a step
    ends with at once, or None to keep it running until the test finishes it. A successful
    buildsrpm leaves a .src.rpm in its --resultdir, as mock does."""

    def __init__(self) -> None:
        self.codes: dict[str, int | None] = {"buildsrpm": 0, "rebuild": 0, "scrub": 0}
        self.srpm_name = SRPM
        self.exit_on_sigint = True
        self.errors: dict[str, OSError] = {}  # a step that cannot even start
        self.calls: list[Call] = []
        self.events: list[str] | None = None  # shared with the limiter: order of things
        self._pids = itertools.count(PID_BASE)
        self._lock = threading.Lock()

    def __call__(
        self, argv: list[str], log: IO[bytes], cwd: Path, env: Mapping[str, str] | None = None
    ) -> FakeProcess:
        step = next((s for flag, s in STEP_FLAGS.items() if flag in argv), "unknown")
        if step in self.errors:
            raise self.errors[step]
        proc = FakeProcess(next(self._pids), step, list(argv), self.exit_on_sigint)
        log.write(f"fake mock: {step}\n".encode())
        code = self.codes.get(step)
        if step == "buildsrpm" and code == 0 and self.srpm_name:
            result = Path(argv[argv.index("--resultdir") + 1])
            (result / self.srpm_name).write_bytes(b"srpm")
        with self._lock:
            self.calls.append(Call(step, list(argv), cwd, proc, dict(env or {})))
            if self.events is not None:
                self.events.append(f"{step} {argv[argv.index('--uniqueext') + 1]}")
        if code is not None:
            proc.finish(code)
        return proc

    def of(self, step: str, build_id: int | None = None) -> list[Call]:
        with self._lock:
            calls = [c for c in self.calls if c.step == step]
        if build_id is None:
            return calls
        return [c for c in calls if c.argv[c.argv.index("--uniqueext") + 1] == f"build{build_id}"]

    def started(self, step: str, build_id: int) -> FakeProcess:
        """The process of ``step`` for ``build_id``, once it was started."""
        calls = wait_until(lambda: self.of(step, build_id), what=f"mock {step} of {build_id}")
        return cast(FakeProcess, calls[-1].proc)


# -- fake limiter -------------------------------------------------------------------------


@dataclass
class FakeSlot:
    name: str
    token: int


@dataclass
class WaitCall:
    name: str
    timeout: float | None
    priority: int
    labels: dict[str, Any] | None
    on_lost: Callable[[Any], None] | None
    cancel: threading.Event | None
    group: str = "@default"
    granted: threading.Event = field(default_factory=threading.Event)
    slot: FakeSlot | None = None
    outcome: str = ""  # "granted", "cancelled", or the exception raised

    def grant(self) -> None:
        self.granted.set()

    def lose(self) -> None:
        """What the heartbeat does when the slot's lease is gone."""
        assert self.on_lost is not None and self.slot is not None
        self.on_lost(self.slot)


class FakeLimiter:
    """wait_for_slot grants at once (``block = False``) or waits until the test grants
    the call or the caller's cancel event is set (WaitCancelled). An exception put in
    ``errors`` is raised by the next wait instead."""

    def __init__(self) -> None:
        self.block = False
        self.errors: list[Exception] = []
        self.calls: list[WaitCall] = []
        self.released: list[str] = []
        self.force_released: list[str] = []
        self.force_release_error: Exception | None = None
        self.on_grant: Callable[[WaitCall], None] | None = None
        self.events: list[str] | None = None
        self._tokens = itertools.count(1000)
        self._lock = threading.Lock()

    def _event(self, text: str) -> None:
        if self.events is not None:
            self.events.append(text)

    def wait_for_slot(
        self,
        name: str,
        timeout: float | None = 300,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Any], None] | None = None,
        cancel: threading.Event | None = None,
        group: str = "@default",
    ) -> FakeSlot:
        call = WaitCall(name, timeout, priority, labels, on_lost, cancel, group)
        with self._lock:
            self.calls.append(call)
            error = self.errors.pop(0) if self.errors else None
            block = self.block
            self._event(f"wait {name}")
        if error is not None:
            call.outcome = repr(error)
            raise error
        if block:
            deadline = time.monotonic() + GIVE_UP
            while not call.granted.is_set():
                if cancel is not None and cancel.is_set():
                    call.outcome = "cancelled"
                    raise WaitCancelled(f"{name}: wait cancelled")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"fake limiter: {name} was never granted")
                call.granted.wait(0.01)
        call.slot = FakeSlot(name, next(self._tokens))
        if self.on_grant is not None:
            self.on_grant(call)
        call.outcome = "granted"
        return call.slot

    def release(self, name: str) -> bool:
        with self._lock:
            self.released.append(name)
            self._event(f"release {name}")
        return True

    def force_release(self, name: str) -> bool:
        with self._lock:
            self.force_released.append(name)
        if self.force_release_error is not None:
            raise self.force_release_error
        return True

    def call_for(self, build_id: int) -> WaitCall:
        """The latest wait for ``build_id``'s slot, once it was made."""
        name = slot_name(build_id, HOST)

        def find() -> WaitCall | None:
            with self._lock:
                mine = [c for c in self.calls if c.name == name]
            return mine[-1] if mine else None

        return cast(WaitCall, wait_until(find, what=f"a wait for slot {name}"))

    def names(self) -> list[str]:
        with self._lock:
            return [c.name for c in self.calls]


# -- the rig -----------------------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.mock = tmp_path / "mock"
        self.mock.write_text("#!/bin/sh\nexit 99\n")  # never run: the runner is fake
        self.mock.chmod(0o755)
        (tmp_path / "mockroot").mkdir()
        self.overrides: dict[str, Any] = {}
        self.store = Store(tmp_path / "state")
        self.runner = FakeRunner()
        self.limiter = FakeLimiter()
        self.events: list[str] = []
        self.runner.events = self.limiter.events = self.events
        self.clock = FakeClock()
        self.free_bytes = 500 * 1000**3
        self.disk_asked: list[Path] = []
        self.gates = Gates(disk_free=self._disk_free, load=lambda: 0.0)
        self._scheduler: Scheduler | None = None
        self.autoscaler: AutoScaler | None = None  # set before the first use of scheduler

    def _disk_free(self, path: Path) -> int:
        """free_bytes under mock's root dir; state_dir has room (its gate has own tests)."""
        if path == self.tmp / "state":
            return 500 * 1000**3
        self.disk_asked.append(path)
        return self.free_bytes

    def settings(self) -> Settings:
        raw: dict[str, Any] = {
            "host_id": HOST,
            "state_dir": str(self.tmp / "state"),
            "mock_command": str(self.mock),
            "mock_root_dir": str(self.tmp / "mockroot"),
            "min_free_disk_gb": 0,
            "cancel_grace_seconds": 1,
            "max_load_per_cpu": 0,
            **self.overrides,
        }
        return validate(raw, environ={})

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            self._scheduler = Scheduler(
                self.store,
                cast(BuildConcurrencyLimiter, self.limiter),
                self.settings,
                self.runner,
                gates=self.gates,
                clock=self.clock,
                autoscaler=self.autoscaler,
            )
        return self._scheduler

    def submit_srpm(
        self, priority: int = 0, user: str = "alice (uid 1000)", project: str | None = None
    ) -> int:
        return self.store.submit(
            chroot=CHROOT,
            kind="srpm",
            source=SRPM,
            inputs=self.store.stage({SRPM: b"an srpm"}),
            priority=priority,
            uid=1000,
            user=user,
            project=project,
        )

    def submit_spec(self) -> int:
        files = {"hello.spec": b"Name: hello\n", "sources/hello-1.0.tar.gz": b"tarball"}
        return self.store.submit(
            chroot=CHROOT,
            kind="spec",
            source="hello.spec",
            inputs=self.store.stage(files),
            priority=0,
            uid=1000,
            user="alice",
        )

    def get(self, build_id: int) -> Build:
        return self.store.get(build_id)

    def tick(self) -> None:
        self.scheduler.tick(redis_ok=True)

    def reach(self, build_id: int, state: State, timeout: float = 5.0) -> Build:
        wait_until(
            lambda: self.get(build_id).state == state,
            timeout,
            what=lambda: f"build {build_id} to be {state} (it is {self.get(build_id).state})",
        )
        return self.get(build_id)

    def idle(self) -> None:
        """Every flight's thread has finished (slot released, flight forgotten)."""
        wait_until(
            lambda: self.scheduler.in_flight() == InFlight(0, 0), what="no flight in the air"
        )

    def run_one(self, build_id: int, state: State) -> Build:
        """One tick, then wait for the flight to end ``build_id`` in ``state``."""
        self.tick()
        build = self.reach(build_id, state)
        self.idle()
        return build


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max < PID_BASE, "the fake mock pids could be real process groups"
    r = Rig(tmp_path)
    real_signal_group = process.signal_group

    def signal_group(pgid: int, sig: signal.Signals) -> None:
        real_signal_group(pgid, sig)  # ESRCH: no such group, suppressed
        with r.runner._lock:
            procs = [c.proc for c in r.runner.calls if c.proc.pid == pgid]
        for proc in procs:
            proc.deliver(sig)

    monkeypatch.setattr(process, "signal_group", signal_group)
    yield r
    if r._scheduler is not None:
        r._scheduler.shutdown(timeout=5)
    r.store.close()


def base_argv(rig: Rig, build_id: int) -> list[str]:
    return [str(rig.mock), "-r", CHROOT, "--uniqueext", f"build{build_id}"]


# -- 1, 2: builds that succeed -------------------------------------------------------------


def test_srpm_build_goes_queued_waiting_building_succeeded(rig: Rig) -> None:
    rig.limiter.block = True
    rig.runner.codes["rebuild"] = None
    bid = rig.submit_srpm(priority=3)
    files = rig.store.files(bid)
    assert rig.get(bid).state == State.QUEUED

    rig.tick()
    call = rig.limiter.call_for(bid)
    assert rig.get(bid).state == State.WAITING
    assert call.name == f"build_{bid}@{HOST}"
    assert call.timeout == 300
    assert call.priority == 3
    assert call.labels == {"build_id": bid, "host_id": HOST}
    assert call.cancel is not None and not call.cancel.is_set()
    assert rig.scheduler.in_flight() == InFlight(building=0, waiting=1)

    call.grant()
    proc = rig.runner.started("rebuild", bid)
    building = rig.reach(bid, State.BUILDING)
    assert building.runs == 1
    assert call.slot is not None and building.slot_token == call.slot.token
    wait_until(lambda: rig.get(bid).pid == proc.pid, what="mock's pid recorded")
    assert rig.scheduler.in_flight() == InFlight(building=1, waiting=0)

    proc.finish(0)
    done = rig.reach(bid, State.SUCCEEDED)
    wait_until(lambda: rig.limiter.released, what="the slot released")
    rig.idle()
    assert (done.runs, done.retries, done.exit_code, done.error) == (1, 0, 0, None)
    assert done.waiting_at and done.started_at and done.finished_at
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]
    rebuild, scrub = rig.runner.calls
    assert rebuild.argv == [
        *base_argv(rig, bid),
        "--resultdir",
        str(files.result),
        "--rebuild",
        str(files.submitted(SRPM)),
    ]
    assert scrub.argv == [
        *base_argv(rig, bid),
        "--config-opts",
        f"cache_topdir={files.scrub_cache}",
        "--scrub=chroot",
        "--scrub=bootstrap",
    ]
    assert rebuild.cwd == scrub.cwd == files.root
    # mock's environment names the build and its slot's fencing token; a scrub runs unfenced
    assert rebuild.env == {"REQPM_BUILD_ID": str(bid), "REQPM_SLOT_TOKEN": str(call.slot.token)}
    assert scrub.env == {}
    assert not files.scrub_cache.exists()  # the throwaway cache is gone
    name = slot_name(bid, HOST)
    # the slot is given back only after the root is scrubbed
    assert rig.events == [
        f"wait {name}",
        f"rebuild build{bid}",
        f"scrub build{bid}",
        f"release {name}",
    ]
    assert rig.limiter.released == [name]
    assert "running: " + " ".join(rebuild.argv) in files.log.read_text()


def test_spec_build_runs_buildsrpm_then_rebuilds_the_srpm_it_made(rig: Rig) -> None:
    bid = rig.submit_spec()
    files = rig.store.files(bid)
    done = rig.run_one(bid, State.SUCCEEDED)
    assert done.runs == 1
    assert [c.step for c in rig.runner.calls] == ["buildsrpm", "rebuild", "scrub"]
    buildsrpm, rebuild, _ = rig.runner.calls
    assert buildsrpm.argv == [
        *base_argv(rig, bid),
        "--resultdir",
        str(files.result),
        "--buildsrpm",
        "--spec",
        str(files.submitted("hello.spec")),
        "--sources",
        str(files.sources),
    ]
    assert rebuild.argv == [
        *base_argv(rig, bid),
        "--resultdir",
        str(files.result),
        "--rebuild",
        str(files.result / SRPM),
    ]
    assert rig.limiter.released == [slot_name(bid, HOST)]


def test_spec_build_whose_buildsrpm_makes_no_srpm_fails(rig: Rig) -> None:
    rig.runner.srpm_name = ""
    bid = rig.submit_spec()
    done = rig.run_one(bid, State.FAILED)
    assert done.error == "mock --buildsrpm produced no .src.rpm"
    assert [c.step for c in rig.runner.calls] == ["buildsrpm", "scrub"]


# -- 3, 4: mock's exit codes ----------------------------------------------------------------


def test_exit_60_requeues_then_gives_up_past_max_build_retries(rig: Rig) -> None:
    rig.overrides["max_build_retries"] = 1
    rig.runner.codes["rebuild"] = 60
    bid = rig.submit_srpm()

    first = rig.run_one(bid, State.QUEUED)
    assert first.retries == 1
    assert first.runs == 1
    assert first.exit_code is None
    assert first.error is not None and "locked" in first.error and "exit 60" in first.error
    assert len(rig.runner.of("scrub", bid)) == 1

    second = rig.run_one(bid, State.FAILED)
    assert second.runs == 2
    assert second.retries == 2
    assert second.exit_code == 60
    assert second.error is not None
    assert second.error.startswith("gave up after 1 retries: mock: build root is locked")
    assert len(rig.runner.of("rebuild", bid)) == 2
    assert rig.limiter.released == [slot_name(bid, HOST)] * 2


def test_nonzero_exit_fails_with_its_exit_code_and_scrubs(rig: Rig) -> None:
    rig.runner.codes["rebuild"] = 1
    bid = rig.submit_srpm()
    done = rig.run_one(bid, State.FAILED)
    assert done.exit_code == 1
    assert done.error == "mock --rebuild exited with 1; see build.log"
    assert done.retries == 0
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]
    assert rig.limiter.released == [slot_name(bid, HOST)]


def test_keep_failed_roots_skips_the_scrub(rig: Rig) -> None:
    rig.overrides["keep_failed_roots"] = True
    rig.runner.codes["rebuild"] = 2
    bid = rig.submit_srpm()
    done = rig.run_one(bid, State.FAILED)  # idle: the slot is released, after any scrub
    assert done.exit_code == 2
    assert rig.limiter.released == [slot_name(bid, HOST)]
    assert [c.step for c in rig.runner.calls] == ["rebuild"]
    assert "keeping the failed build's mock root" in rig.store.files(bid).log.read_text()


def test_keep_failed_roots_still_scrubs_a_build_that_succeeded(rig: Rig) -> None:
    rig.overrides["keep_failed_roots"] = True
    bid = rig.submit_srpm()
    rig.run_one(bid, State.SUCCEEDED)
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]


# -- 5, 6: cancel ----------------------------------------------------------------------


def test_cancel_while_waiting_for_a_slot(rig: Rig) -> None:
    rig.limiter.block = True
    bid = rig.submit_srpm()
    rig.tick()
    call = rig.limiter.call_for(bid)
    assert rig.get(bid).state == State.WAITING

    returned = rig.scheduler.cancel(bid)
    assert returned.id == bid
    done = rig.reach(bid, State.CANCELLED)
    rig.idle()
    assert call.cancel is not None and call.cancel.is_set()
    assert call.outcome == "cancelled"
    assert done.error == "cancelled"
    assert done.runs == 0 and done.retries == 0
    assert rig.runner.calls == []  # no mock, not even a scrub
    assert rig.limiter.released == []  # it never held the slot


def test_cancel_while_building_stops_mock(rig: Rig) -> None:
    rig.runner.codes["rebuild"] = None
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    rig.reach(bid, State.BUILDING)

    rig.scheduler.cancel(bid, note="cancelled by alice")
    done = rig.reach(bid, State.CANCELLED)
    rig.idle()
    assert proc.signals == [signal.SIGINT]  # the first rung of the ladder was enough
    assert done.exit_code == 130
    assert done.error == "cancelled by alice"
    assert done.retries == 0
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]
    assert rig.limiter.released == [slot_name(bid, HOST)]
    assert "stopped (cancel): mock exited with 130" in rig.store.files(bid).log.read_text()


def test_cancel_of_a_queued_build_needs_no_flight(rig: Rig) -> None:
    rig.limiter.block = True
    cancelled = rig.submit_srpm(priority=10)
    other = rig.submit_srpm()
    done = rig.scheduler.cancel(cancelled)
    assert done.state == State.CANCELLED
    assert done.error == "cancelled"
    rig.tick()
    rig.limiter.call_for(other)  # the tick did launch what was queued ...
    assert rig.limiter.names() == [slot_name(other, HOST)]  # ... and only that
    assert rig.get(cancelled).state == State.CANCELLED
    assert rig.get(cancelled).waiting_at is None


def test_cancel_of_an_ended_build_is_refused(rig: Rig) -> None:
    bid = rig.submit_srpm()
    rig.run_one(bid, State.SUCCEEDED)
    with pytest.raises(InvalidArgument, match="already ended"):
        rig.scheduler.cancel(bid)
    other = rig.submit_srpm()
    rig.scheduler.cancel(other)
    with pytest.raises(InvalidArgument, match="already ended"):
        rig.scheduler.cancel(other)
    assert rig.get(bid).state == State.SUCCEEDED


@pytest.mark.parametrize("requeue_by", ["lost slot", "shutdown"])
def test_cancel_wins_over_a_requeue_stop_in_progress(rig: Rig, requeue_by: str) -> None:
    rig.runner.codes["rebuild"] = None
    rig.runner.exit_on_sigint = False  # mock takes its time to clean up
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    rig.reach(bid, State.BUILDING)

    stopping: threading.Thread | None = None
    if requeue_by == "lost slot":
        rig.limiter.call_for(bid).lose()
    else:
        stopping = threading.Thread(target=rig.scheduler.shutdown, args=(10,))
        stopping.start()
    wait_until(lambda: proc.signals, what="mock asked to stop (re-queue)")
    rig.scheduler.cancel(bid)  # while mock is being stopped
    proc.finish(130)

    done = rig.reach(bid, State.CANCELLED)
    if stopping is not None:
        stopping.join(5)
    rig.idle()
    assert done.error == "cancelled"
    assert done.retries == 0
    assert rig.limiter.released == [slot_name(bid, HOST)]


@pytest.mark.parametrize("requeue_by", ["lost slot", "shutdown", "exit 60"])
def test_cancel_during_the_scrub_wins_over_a_requeue(rig: Rig, requeue_by: str) -> None:
    """mock has ended and the outcome "run it again" is known; the cancel comes while the
    root is being scrubbed, before the build gets its end state."""
    rig.runner.codes["rebuild"] = 60 if requeue_by == "exit 60" else None
    rig.runner.codes["scrub"] = None
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    stopping: threading.Thread | None = None
    if requeue_by == "lost slot":
        rig.limiter.call_for(bid).lose()
    elif requeue_by == "shutdown":
        wait_until(lambda: rig.scheduler.in_flight().building, what="the flight building")
        stopping = threading.Thread(target=rig.scheduler.shutdown, args=(10,))
        stopping.start()
    scrub = rig.runner.started("scrub", bid)
    assert proc.poll() is not None
    assert rig.get(bid).state == State.BUILDING

    rig.scheduler.cancel(bid)
    scrub.finish(0)
    done = rig.reach(bid, State.CANCELLED)
    if stopping is not None:
        stopping.join(5)
    rig.idle()
    assert done.error == "cancelled"
    assert done.retries == 0
    assert rig.limiter.released == [slot_name(bid, HOST)]


# -- 7, 8, 9: a lost slot, timeouts, Redis -------------------------------------------------


def test_lost_slot_while_building_requeues_and_counts_a_retry(rig: Rig) -> None:
    rig.runner.codes["rebuild"] = None
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    rig.reach(bid, State.BUILDING)

    rig.limiter.call_for(bid).lose()
    done = rig.reach(bid, State.QUEUED)
    rig.idle()
    assert proc.signals == [signal.SIGINT]
    assert done.retries == 1
    assert done.runs == 1
    assert done.error == "lost its build slot; will run again"
    assert (done.exit_code, done.pid, done.slot_token, done.started_at) == (None,) * 4
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]

    rig.runner.codes["rebuild"] = 0
    rig.run_one(bid, State.SUCCEEDED)  # and it runs again
    assert rig.get(bid).runs == 2


def test_build_timeout_uses_the_clock(rig: Rig) -> None:
    rig.overrides["build_timeout_minutes"] = 1
    rig.runner.codes["rebuild"] = None
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    rig.reach(bid, State.BUILDING)

    rig.clock.advance(59)
    rig.clock.polled()  # the wait loop saw 59 s pass: not over the deadline yet
    assert proc.signals == []
    assert rig.get(bid).state == State.BUILDING

    rig.clock.advance(2)
    done = rig.reach(bid, State.TIMED_OUT)
    rig.idle()
    assert proc.signals == [signal.SIGINT]
    assert done.exit_code == 130
    assert done.error == "build ran over build_timeout_minutes=1.0"
    assert done.retries == 0
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]
    assert rig.limiter.released == [slot_name(bid, HOST)]


def test_slot_timeout_ends_timed_out_with_the_limiters_message(rig: Rig) -> None:
    rig.overrides["slot_wait_timeout"] = 42
    message = "no slot for build_1@testhost within 42 s (2/2 busy)"
    rig.limiter.errors.append(SlotTimeout(message))
    bid = rig.submit_srpm()
    done = rig.run_one(bid, State.TIMED_OUT)
    assert rig.limiter.calls[0].timeout == 42
    assert done.error == message
    assert done.exit_code is None
    assert done.runs == 0
    assert rig.runner.calls == []
    assert rig.limiter.released == []


def test_slot_wait_timeout_zero_waits_forever(rig: Rig) -> None:
    rig.overrides["slot_wait_timeout"] = 0
    bid = rig.submit_srpm()
    rig.run_one(bid, State.SUCCEEDED)
    assert rig.limiter.calls[0].timeout is None


def test_redis_unavailable_puts_the_build_back_in_the_queue(rig: Rig) -> None:
    rig.limiter.errors.append(RedisUnavailable("Redis at unix:///x is unreachable"))
    bid = rig.submit_srpm()
    done = rig.run_one(bid, State.QUEUED)
    assert done.error == "Redis at unix:///x is unreachable"
    assert done.retries == 0
    assert done.runs == 0
    assert rig.runner.calls == []

    rig.scheduler.tick(redis_ok=False)  # Redis still down: nothing launches
    assert rig.get(bid).state == State.QUEUED
    assert len(rig.limiter.calls) == 1

    rig.run_one(bid, State.SUCCEEDED)


def test_internal_error_requeues_and_counts_a_retry(rig: Rig) -> None:
    rig.runner.errors["rebuild"] = OSError(8, "Exec format error")
    bid = rig.submit_srpm()
    done = rig.run_one(bid, State.QUEUED)
    assert done.error == "internal error; will retry"
    assert done.retries == 1
    assert rig.limiter.released == [slot_name(bid, HOST)]


# -- 10, 11: gates, the host cap, priority --------------------------------------------


def test_closed_disk_gate_launches_nothing_and_withdraws_waiters(rig: Rig) -> None:
    rig.overrides["min_free_disk_gb"] = 1
    rig.free_bytes = 10**8  # 0.1 GB
    bid = rig.submit_srpm()
    rig.tick()  # launching happens inside tick(): nothing can start after it returns
    assert rig.disk_asked == [rig.tmp / "mockroot"]
    assert [(g.name, g.open) for g in rig.scheduler.last_gates] == [
        ("disk", False),
        ("state_disk", True),
    ]
    assert rig.get(bid).state == State.QUEUED
    assert rig.limiter.calls == []
    assert rig.scheduler.in_flight() == InFlight(0, 0)

    rig.free_bytes = 2 * 1000**3
    rig.limiter.block = True
    rig.tick()
    call = rig.limiter.call_for(bid)
    assert rig.get(bid).state == State.WAITING

    rig.free_bytes = 10**8
    rig.tick()
    done = rig.reach(bid, State.QUEUED)
    rig.idle()
    assert call.cancel is not None and call.cancel.is_set()
    assert call.outcome == "cancelled"
    assert done.error == "gate closed"
    assert done.retries == 0
    assert rig.runner.calls == []

    rig.free_bytes = 2 * 1000**3
    rig.limiter.block = False
    rig.run_one(bid, State.SUCCEEDED)
    assert len(rig.limiter.calls) == 2


def test_closed_gate_does_not_touch_a_running_build(rig: Rig) -> None:
    rig.overrides["min_free_disk_gb"] = 1
    rig.runner.codes["rebuild"] = None
    bid = rig.submit_srpm()
    rig.tick()
    proc = rig.runner.started("rebuild", bid)
    wait_until(lambda: rig.scheduler.in_flight().building == 1, what="the flight building")
    rig.free_bytes = 0
    rig.tick()
    assert not rig.scheduler.last_gates[0].open
    rig.clock.polled()  # the build's wait loop went round after the gate closed
    assert proc.signals == []
    proc.finish(0)
    rig.reach(bid, State.SUCCEEDED)
    assert proc.signals == []


def test_gate_closing_just_after_the_grant_costs_no_retry(rig: Rig) -> None:
    """The main thread's tick() may run after wait_for_slot() returned but before the flight
    is marked building. The build has not run mock: it must go back to the queue as any
    withdrawn waiter does, without using up its retries (here: none, so it fails)."""
    rig.overrides["min_free_disk_gb"] = 1
    rig.overrides["max_build_retries"] = 0
    bid = rig.submit_srpm()

    def close_the_gate_now(call: WaitCall) -> None:
        rig.free_bytes = 0
        tick = threading.Thread(target=rig.tick)  # the daemon's main thread
        tick.start()
        tick.join(5)

    rig.limiter.on_grant = close_the_gate_now
    rig.tick()
    wait_until(lambda: rig.get(bid).state.final or rig.get(bid).state == State.QUEUED)
    rig.idle()
    done = rig.get(bid)
    assert rig.runner.of("rebuild") == []  # mock never ran
    assert (done.state, done.retries) == (State.QUEUED, 0), done.error


def test_host_max_builds_caps_the_flights(rig: Rig) -> None:
    rig.overrides["host_max_builds"] = 2
    rig.runner.codes["rebuild"] = None
    ids = [rig.submit_srpm() for _ in range(3)]
    rig.tick()
    first = [rig.runner.started("rebuild", i) for i in ids[:2]]
    wait_until(lambda: rig.scheduler.in_flight() == InFlight(2, 0), what="two builds running")
    assert rig.get(ids[2]).state == State.QUEUED
    assert sorted(rig.limiter.names()) == sorted(slot_name(i, HOST) for i in ids[:2])

    rig.tick()  # at the cap: the host_max_builds gate is shut
    gates = {g.name: g.open for g in rig.scheduler.last_gates}
    assert gates == {"host_max_builds": False, "disk": True, "state_disk": True}
    assert rig.get(ids[2]).state == State.QUEUED

    first[0].finish(0)
    rig.reach(ids[0], State.SUCCEEDED)
    wait_until(lambda: rig.scheduler.in_flight() == InFlight(1, 0), what="one flight left")
    rig.tick()
    third = rig.runner.started("rebuild", ids[2])
    first[1].finish(0)
    third.finish(0)
    rig.reach(ids[1], State.SUCCEEDED)
    rig.reach(ids[2], State.SUCCEEDED)


def test_host_cap_also_counts_builds_waiting_for_a_slot(rig: Rig) -> None:
    rig.overrides["host_max_builds"] = 1
    rig.limiter.block = True
    a, b = rig.submit_srpm(), rig.submit_srpm()
    rig.tick()
    rig.limiter.call_for(a)
    rig.tick()
    assert rig.get(b).state == State.QUEUED
    assert rig.limiter.names() == [slot_name(a, HOST)]


def test_without_a_host_cap_at_most_max_waiting_wait(rig: Rig) -> None:
    rig.limiter.block = True
    ids = [rig.submit_srpm() for _ in range(MAX_WAITING + 1)]
    rig.tick()
    wait_until(lambda: len(rig.limiter.calls) == MAX_WAITING, what="the waiters")
    assert rig.get(ids[-1]).state == State.QUEUED
    assert rig.scheduler.in_flight() == InFlight(0, MAX_WAITING)


def test_launch_order_is_priority_then_submission(rig: Rig) -> None:
    rig.overrides["host_max_builds"] = 1
    low = rig.submit_srpm(priority=0)
    mid_a = rig.submit_srpm(priority=5)
    high = rig.submit_srpm(priority=10)
    mid_b = rig.submit_srpm(priority=5)
    for expected in (high, mid_a, mid_b, low):
        rig.run_one(expected, State.SUCCEEDED)
    assert rig.limiter.names() == [slot_name(i, HOST) for i in (high, mid_a, mid_b, low)]
    assert [c.priority for c in rig.limiter.calls] == [10, 5, 5, 0]


def test_a_build_waits_in_its_projects_group_else_its_submitters(rig: Rig) -> None:
    rig.overrides["host_max_builds"] = 1
    builds = [
        rig.submit_srpm(project="greet"),
        rig.submit_srpm(),
        rig.submit_srpm(user="project greet, asked by bob (uid 1001)", project="greet"),
        rig.submit_srpm(user="x\ty (uid 7)"),  # a name no group may have: the uid's group
    ]
    for build_id in builds:
        rig.run_one(build_id, State.SUCCEEDED)
    assert [c.group for c in rig.limiter.calls] == ["greet", "~alice", "greet", "~uid1000"]


# -- 12, 13: shutdown and recovery -----------------------------------------------------


def test_shutdown_requeues_running_builds_without_counting_a_retry(rig: Rig) -> None:
    rig.limiter.block = True
    rig.runner.codes["rebuild"] = None
    building, waiting = rig.submit_srpm(priority=1), rig.submit_srpm()
    rig.tick()
    rig.limiter.call_for(building).grant()
    proc = rig.runner.started("rebuild", building)
    wait_call = rig.limiter.call_for(waiting)
    wait_until(
        lambda: rig.scheduler.in_flight() == InFlight(1, 1), what="one building, one waiting"
    )

    rig.scheduler.shutdown(timeout=5)
    assert rig.scheduler.in_flight() == InFlight(0, 0)
    b, w = rig.get(building), rig.get(waiting)
    assert (b.state, b.retries, b.runs) == (State.QUEUED, 0, 1)
    assert (w.state, w.retries, w.runs) == (State.QUEUED, 0, 0)
    assert b.error == w.error == "daemon stopping; the build will run again at next start"
    assert proc.signals == [signal.SIGINT]
    assert wait_call.cancel is not None and wait_call.cancel.is_set()
    assert [c.step for c in rig.runner.calls] == ["rebuild", "scrub"]
    assert rig.limiter.released == [slot_name(building, HOST)]

    rig.tick()  # a stopping scheduler takes no new slot
    assert len(rig.limiter.calls) == 2
    assert rig.get(building).state == State.QUEUED


class RecordingStopper(Stopper):
    def __init__(self) -> None:
        super().__init__(grace=1)
        self.orphans: list[tuple[int, float | None]] = []

    def kill_orphan(self, pgid: int, started: float | None) -> None:
        self.orphans.append((pgid, started))
        super().kill_orphan(pgid, started)  # no such group: touches nothing


def _leave_running(rig: Rig, state: State, pid: int | None = None, retries: int = 0) -> int:
    """A build an earlier daemon left ``state`` when it died."""
    bid = rig.submit_srpm()
    rig.store.transition(bid, State.WAITING)
    if state == State.BUILDING:
        rig.store.transition(bid, State.BUILDING, runs=1, slot_token=7, retries=retries)
        rig.store.update(bid, pid=pid, pid_started=12345.0)
    return bid


def test_recover_requeues_builds_left_waiting_or_building(rig: Rig) -> None:
    left_building = _leave_running(rig, State.BUILDING, pid=PID_BASE + 999)
    left_waiting = _leave_running(rig, State.WAITING)
    queued = rig.submit_srpm()
    finished = rig.submit_srpm()
    for s in (State.WAITING, State.BUILDING, State.SUCCEEDED):
        rig.store.transition(finished, s)
    stopper = RecordingStopper()

    recovered = rig.scheduler.recover(stopper)

    assert recovered == [left_building, left_waiting]
    b, w = rig.get(left_building), rig.get(left_waiting)
    assert (b.state, b.retries) == (State.QUEUED, 1)  # it was running: counts
    assert (w.state, w.retries) == (State.QUEUED, 0)
    assert b.error == w.error == "interrupted by a daemon crash; re-queued"
    assert (b.pid, b.slot_token) == (None, None)
    assert stopper.orphans == [(PID_BASE + 999, 12345.0)]
    assert sorted(rig.limiter.force_released) == sorted(
        slot_name(i, HOST) for i in (left_building, left_waiting)
    )
    scrubs = rig.runner.of("scrub")
    assert len(scrubs) == 1
    assert scrubs[0].argv[: len(base_argv(rig, left_building))] == base_argv(rig, left_building)
    assert "--scrub=chroot" in scrubs[0].argv
    assert "scrubbing:" in rig.store.files(left_building).log.read_text()
    assert rig.get(queued).state == State.QUEUED
    assert rig.get(finished).state == State.SUCCEEDED
    assert rig.limiter.calls == []  # recovery takes no slot

    rig.run_one(left_building, State.SUCCEEDED)


def test_recover_fails_a_build_past_its_retries_and_survives_redis_down(rig: Rig) -> None:
    rig.overrides["max_build_retries"] = 2
    rig.limiter.force_release_error = RedisUnavailable("down")
    bid = _leave_running(rig, State.BUILDING, pid=PID_BASE + 998, retries=2)
    assert rig.scheduler.recover(RecordingStopper()) == [bid]
    done = rig.get(bid)
    assert done.state == State.FAILED
    assert done.error == "gave up after 2 retries: interrupted by a daemon crash; re-queued"
    assert rig.limiter.force_released == [slot_name(bid, HOST)]


# -- 14: retry -----------------------------------------------------------------------------


def test_retry_of_an_ended_build_requeues_it_with_retries_reset(rig: Rig) -> None:
    rig.overrides["max_build_retries"] = 0
    rig.runner.codes["rebuild"] = 60
    bid = rig.submit_srpm()
    failed = rig.run_one(bid, State.FAILED)
    assert failed.retries == 1 and failed.exit_code == 60

    again = rig.scheduler.retry(bid)
    assert again.state == State.QUEUED
    assert (again.retries, again.error, again.exit_code, again.finished_at) == (0, None, None, None)

    rig.runner.codes["rebuild"] = 0
    done = rig.run_one(bid, State.SUCCEEDED)
    assert done.runs == 2


def test_retry_of_a_build_not_ended_is_refused(rig: Rig) -> None:
    rig.runner.codes["rebuild"] = None
    queued = rig.submit_srpm()
    with pytest.raises(InvalidArgument, match="only an ended build can be retried"):
        rig.scheduler.retry(queued)
    rig.tick()
    proc = rig.runner.started("rebuild", queued)
    rig.reach(queued, State.BUILDING)
    with pytest.raises(InvalidArgument, match="is building"):
        rig.scheduler.retry(queued)
    proc.finish(0)
    rig.reach(queued, State.SUCCEEDED)


def test_a_build_being_recovered_cannot_be_cancelled_or_retried_meanwhile(rig: Rig) -> None:
    """While recovery stops its old mock and scrubs its root, a cancel (and the retry it
    would allow) used to start the build again under the scrub, with the recovery then
    freeing the new run's slot."""
    left = _leave_running(rig, State.BUILDING, pid=PID_BASE + 998)
    rig.runner.codes["scrub"] = None  # the scrub runs until the test ends it
    assert rig.scheduler.start_recovery(RecordingStopper()) == 1
    scrub = rig.runner.started("scrub", left)
    with pytest.raises(Busy, match="being recovered after a crash"):
        rig.scheduler.cancel(left)
    assert rig.get(left).state == State.BUILDING
    rig.tick()
    assert rig.limiter.calls == []  # nothing launched
    scrub.finish(0)
    assert rig.reach(left, State.QUEUED).retries == 1
    wait_until(lambda: rig.scheduler.recovering == set(), what="recovery done")
    rig.scheduler.cancel(left)  # now it may be
    assert rig.get(left).state == State.CANCELLED


def test_auto_scale_caps_this_host_and_withdraws_its_extra_waiters(rig: Rig) -> None:
    from reqpmd.builds.autoscale import Sample

    rig.overrides.update({"auto_scale": True, "host_max_builds": 4})
    load = [Sample(0.1, 64000, None, None)]
    rig.autoscaler = AutoScaler(rig.settings, source=lambda: load[0], clock=rig.clock)
    rig.autoscaler.current = 3
    rig.runner.codes["rebuild"] = None
    rig.limiter.block = True  # slots are granted by the test: the others wait
    ids = [rig.submit_srpm() for _ in range(4)]
    rig.tick()
    rig.limiter.call_for(ids[0]).granted.set()
    rig.runner.started("rebuild", ids[0])
    wait_until(lambda: rig.scheduler.in_flight() == InFlight(1, 2), what="1 building, 2 waiting")
    assert rig.get(ids[3]).state == State.QUEUED  # the cap is 3
    load[0] = Sample(5.0, 64000, None, None)  # the host is overloaded: the cap halves to 1
    rig.tick()
    wait_until(lambda: rig.scheduler.in_flight() == InFlight(1, 0), what="the waiters withdrawn")
    assert [rig.get(i).state for i in ids[:3]] == [State.BUILDING, State.QUEUED, State.QUEUED]
    assert "auto_scale lowered" in (rig.get(ids[2]).error or "")
