"""Take the next queued build -> gates -> slot -> mock -> release.

Concurrency model: threads with clear ownership. The daemon's main thread calls
``tick()``; each build this host has in flight (waiting for a slot, then building) is
owned by one thread, which alone moves that build from waiting onward. Other threads
(control socket, signal handling) only ask a flight to stop. ``_lock`` guards the set
of flights and the hand-over of queued builds, so a cancel and a start cannot race.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from reqpmd.backoff import Backoff
from reqpmd.builds import gates as gates_mod
from reqpmd.builds.autoscale import AutoScaler
from reqpmd.builds.events import build_event
from reqpmd.builds.gates import Gate, Gates
from reqpmd.builds.guard import Fence, LeaseGuard, early_for
from reqpmd.builds.lifecycle import (
    Outcome,
    StopReason,
    StopRequest,
    counts_as_retry,
    publish_fields,
    settle,
)
from reqpmd.builds.mock import mock_env
from reqpmd.builds.process import Runner, Stopper
from reqpmd.builds.results import source_package
from reqpmd.builds.run import BuildRun, scrub_after_crash
from reqpmd.builds.states import State
from reqpmd.builds.store import Build, Store
from reqpmd.config.schema import Settings
from reqpmd.errors import (
    Busy,
    InvalidArgument,
    RedisUnavailable,
    SlotNameInUse,
    SlotTimeout,
    WaitCancelled,
    disk_full,
)
from reqpmd.slots.limiter import BuildConcurrencyLimiter, Slot, check_group

log = logging.getLogger(__name__)

MAX_WAITING = 32  # builds of this host queued for a cluster slot at once


def slot_name(build_id: int, host_id: str) -> str:
    """Build ids come from each host's own database, so the host makes the name unique."""
    return f"build_{build_id}@{host_id}"


USER_GROUP_PREFIX = "~"  # project names cannot start with it


def share_group(build: Build) -> str:
    """The group whose share of the cluster's slots a build uses: its project, else one
    group per submitting user, so one user's burst of scratch builds cannot hold back
    another user's (Copr is fair per owner for the same reason). One shared default
    group would make everyone's ad-hoc builds queue behind the biggest burst."""
    if build.project:
        return build.project
    user = build.submitted_name.split(" ", 1)[0]  # "alice (uid 1000)"
    try:
        return check_group(f"{USER_GROUP_PREFIX}{user}"[:64] if user else "")
    except InvalidArgument:
        return f"{USER_GROUP_PREFIX}uid{build.submitted_by}"


@dataclass
class Flight:
    build_id: int
    stop: StopRequest = field(default_factory=StopRequest)
    building: bool = False
    thread: threading.Thread | None = None
    ended: bool = False  # the build got its end state from this flight

    @property
    def alive(self) -> bool:
        return self.thread is None or self.thread.is_alive()


@dataclass(frozen=True)
class InFlight:
    building: int
    waiting: int


class Scheduler:
    def __init__(
        self,
        store: Store,
        limiter: BuildConcurrencyLimiter,
        settings: Callable[[], Settings],
        runner: Runner,
        gates: Gates | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_succeeded: Callable[[int], None] = lambda build_id: None,
        on_end: Callable[[Build], None] = lambda build: None,
        autoscaler: AutoScaler | None = None,
        ceiling: Callable[[], int] = lambda: 1,
        guard: LeaseGuard | None = None,
    ) -> None:
        self.guard = guard  # watches each build's mock against its slot's lease
        self.autoscaler = autoscaler  # used while auto_scale is on
        self.ceiling = ceiling  # the cluster limit in force (auto_scale never goes above)
        self.store = store
        self.on_succeeded = on_succeeded  # the publisher's wake-up
        self.on_end = on_end  # every end state a run records (metrics)
        self.limiter = limiter
        self.settings = settings
        self.runner = runner
        self.gates = gates or Gates()
        self.clock = clock  # for build deadlines (build_timeout_minutes)
        self.last_gates: list[Gate] = []
        self.stopping = False
        self.ticks = 0  # passes of tick(): a reader can tell the scheduler looked again
        # builds an earlier instance left running, still being recovered
        self.recovering: set[int] = set()
        # True until the mock processes an earlier instance left are stopped: nothing new
        # may start before, or the host could run more builds than it holds slots for
        self._orphans_alive = False
        self._recovery: threading.Thread | None = None
        self.write_error: str | None = None  # why the queue cannot be written, if it cannot
        self._flights: dict[int, Flight] = {}
        self._held: set[int] = set()  # builds that must not start now (root being scrubbed)
        self._lock = threading.RLock()
        # the last tick found nothing queued and nothing in flight (the main loop may
        # sleep longer; a submission wakes it)
        self.idle = False

    # -- the main thread's part -----------------------------------------------------

    def tick(self, redis_ok: bool) -> None:
        """Start what may start now; withdraw waiters while a gate is closed."""
        with self._lock:
            self.ticks += 1
            self.idle = False
            self._flights = {i: f for i, f in self._flights.items() if f.alive}
            if self.stopping:
                return
            s = self.settings()
            building = sum(1 for f in self._flights.values() if f.building)
            self.last_gates = self.gates.check(s, building)
            shut = gates_mod.closed(self.last_gates)
            if shut:
                for f in self._flights.values():
                    if not f.building and not f.stop.requested:
                        build_event(
                            f.build_id,
                            f"leaving the slot queue: {gates_mod.describe_closed(shut)}",
                        )
                        f.stop.request(StopReason.REQUEUE, "gate closed")
                return
            if not redis_ok or self._orphans_alive:
                return
            # With a host cap, never wait for more slots than this host may use; without
            # one, every queued build may wait (bounded: each waiter is a thread).
            cap = s.host_max_builds or building + MAX_WAITING
            if s.auto_scale and self.autoscaler is not None:
                cap = self.autoscaler.cap(s.host_max_builds or self.ceiling())
                self._withdraw_above(cap)
            try:
                while len(self._flights) < cap:
                    build = self.store.next_queued(exclude=set(self._flights) | self._held)
                    if build is None:
                        self.idle = not self._flights and not self._held
                        break
                    self._launch(build)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                if self.write_error is None:
                    log.error("cannot start queued builds, state_dir is full: %s", exc)
                self.write_error = f"state_dir is full: {exc}"
                return
            self.write_error = None

    def _withdraw_above(self, cap: int) -> None:
        """After the auto-scaled cap went down, this host's waiters above it leave the
        cluster queue (newest first), so other hosts get those slots; running builds go on."""
        waiting = [f for f in self._flights.values() if not f.building and not f.stop.requested]
        excess = len(self._flights) - cap
        for f in sorted(waiting, key=lambda f: f.build_id, reverse=True)[: max(0, excess)]:
            build_event(f.build_id, f"leaving the slot queue: auto_scale cap is {cap}")
            f.stop.request(StopReason.REQUEUE, "auto_scale lowered this host's cap")

    def _launch(self, build: Build) -> None:
        flight = Flight(build.id)
        self.store.transition(build.id, State.WAITING, error=None)
        flight.thread = threading.Thread(
            target=self._fly, args=(flight, build), name=f"build-{build.id}", daemon=True
        )
        self._flights[build.id] = flight
        flight.thread.start()

    def in_flight(self) -> InFlight:
        with self._lock:
            flights = [f for f in self._flights.values() if f.alive]
        building = sum(1 for f in flights if f.building)
        return InFlight(building=building, waiting=len(flights) - building)

    # -- any thread -----------------------------------------------------------------------

    def cancel(self, build_id: int, note: str = "cancelled") -> Build:
        """Cancel a queued, waiting or running build. InvalidArgument if it has ended."""
        with self._lock:  # _end() takes it too: a flight cannot end half-way through this
            build = self.store.get(build_id)
            if build.state.final:
                raise InvalidArgument(f"build {build_id} has already ended ({build.state})")
            if build_id in self.recovering:
                # its old mock may still run and its root is being scrubbed: ending it now
                # would let a retry start it again under the recovery's feet
                raise Busy(
                    f"build {build_id} is being recovered after a crash (its old mock is "
                    "stopped and its root scrubbed); try again in a moment"
                )
            flight = self._flights.get(build_id)
            if build.state != State.QUEUED and flight is not None and not flight.ended:
                flight.stop.request(StopReason.CANCEL, note)  # its thread ends it cancelled
                return build
            return self._ended(self.store.transition(build_id, State.CANCELLED, error=note))

    @contextlib.contextmanager
    def holding(self, build_id: int) -> Iterator[bool]:
        """Keep the build from starting while its mock root is scrubbed by someone else
        (the orphan scrub); False, and nothing held, if it is in flight already."""
        with self._lock:
            if build_id in self._flights:
                held = False
            else:
                held = True
                self._held.add(build_id)
        try:
            yield held
        finally:
            if held:
                with self._lock:
                    self._held.discard(build_id)

    def cancel_if_queued(self, build_id: int, note: str) -> bool:
        """Cancel the build only if it has not started (superseding); True if it was."""
        with self._lock:
            build = self.store.get(build_id)
            if build.state != State.QUEUED or build_id in self._flights:
                return False
            self._ended(self.store.transition(build_id, State.CANCELLED, error=note))
            return True

    def _ended(self, build: Build) -> Build:
        """Every end a build reaches outside a flight is told too (metrics, stats)."""
        self.on_end(build)
        return build

    def retry(self, build_id: int) -> Build:
        with self._lock:
            build = self.store.get(build_id)
            if not build.state.final:
                raise InvalidArgument(
                    f"build {build_id} is {build.state}; only an ended build can be retried"
                )
            if build.cleaned_at is not None:
                raise InvalidArgument(
                    f"build {build_id}'s files were cleaned up (cleanup_builds_after_days); "
                    "submit it again instead"
                )
            return self.store.transition(build_id, State.QUEUED, error=None, retries=0)

    def shutdown(self, timeout: float) -> None:
        """Stop taking slots, stop running builds cleanly, mark them to run again."""
        with self._lock:
            self.stopping = True
            flights = list(self._flights.values())
        if self._recovery is not None:  # it stops after the scrub in progress
            self._recovery.join(timeout)
        for f in flights:
            f.stop.request(
                StopReason.REQUEUE, "daemon stopping; the build will run again at next start"
            )
        for f in flights:
            if f.thread is not None:
                f.thread.join(timeout)

    # -- one flight's thread ----------------------------------------------------------

    def _fly(self, flight: Flight, build: Build) -> None:
        try:
            self._fly_inner(flight, build)
        except Exception as exc:
            if flight.ended:  # one end state per run, whatever failed after it
                log.exception("build %d: internal error after it ended", build.id)
                return
            if disk_full(exc):
                outcome = Outcome(
                    State.FAILED, None, f"state_dir is full: the build could not write ({exc})"
                )
                count = False
            else:
                log.exception("build %d: internal error", build.id, extra={"build_id": build.id})
                outcome = Outcome(State.QUEUED, None, "internal error; will retry")
                count = counts_as_retry(
                    mock_ran=flight.building, daemon_stopping=self.stopping, internal_error=True
                )
            self._end(build.id, outcome, count_retry=count, flight=flight)

    def _fly_inner(self, flight: Flight, build: Build) -> None:
        s = self.settings()
        name = slot_name(build.id, s.host_id)
        try:
            slot = self.limiter.wait_for_slot(
                name,
                timeout=s.slot_wait_timeout or None,
                priority=build.priority,
                labels={"build_id": build.id, "host_id": s.host_id},
                group=share_group(build),
                on_lost=lambda lost: flight.stop.request(
                    StopReason.REQUEUE, "lost its build slot; will run again"
                ),
                cancel=flight.stop.event,
            )
        except SlotTimeout as exc:
            self._end(build.id, Outcome(State.TIMED_OUT, None, str(exc)), flight=flight)
            return
        except WaitCancelled:
            self._end(build.id, flight.stop.outcome(), flight=flight)
            return
        except (RedisUnavailable, SlotNameInUse) as exc:
            build_event(build.id, f"no slot: {exc}", logging.WARNING)
            self._end(build.id, Outcome(State.QUEUED, None, str(exc)), flight=flight)
            return
        try:
            self._build(flight, build, slot, s)
        finally:
            try:
                self.limiter.release(name)
            except RedisUnavailable:
                build_event(
                    build.id,
                    f"could not release slot {name}: Redis unreachable; its lease frees it",
                    logging.WARNING,
                )

    def _build(self, flight: Flight, build: Build, slot: Slot, s: Settings) -> None:
        with self._lock:  # from now on a closed gate leaves this flight alone
            flight.building = True
        running = self.store.transition(build.id, State.BUILDING, slot_token=slot.token)
        build_event(
            build.id,
            f"building {build.source} in {build.chroot}-build{build.id} "
            f"(slot {slot.name}, token {slot.token})",
        )
        run = BuildRun(
            running,
            self.store.files(build.id),
            s,
            self.runner,
            on_started=lambda pid, started: self._started(build, pid, started),
            stop=flight.stop,
            clock=self.clock,
            env=mock_env(build.id, slot.token),
            fence=None
            if self.guard is None
            else Fence(
                self.guard,
                lambda: slot.lease_deadline,
                slot.lost.is_set,
                early_for(s.cancel_grace_seconds, s.slot_lease_seconds),
            ),
        )
        outcome = run.run()
        # a gate that closed just after the grant, or a stop before mock ran, costs nothing
        count = counts_as_retry(mock_ran=run.mock_started, daemon_stopping=self.stopping)
        self._end(build.id, outcome, count_retry=count, flight=flight)

    def _started(self, build: Build, pid: int, started: float | None) -> None:
        """mock (or its scrub) started: record its pid for crash recovery; the first mock
        process of this run is one more run of the build."""
        current = self.store.get(build.id)
        first = current.pid is None
        self.store.update(
            build.id, pid=pid, pid_started=started, **({"runs": build.runs + 1} if first else {})
        )

    def _end(
        self,
        build_id: int,
        outcome: Outcome,
        count_retry: bool = False,
        flight: Flight | None = None,
    ) -> None:
        """Record how this run of the build ended: exactly once. On a full disk it tries
        again until there is room (status says why), or until the daemon stops, which
        leaves the build to the next start's recovery."""
        backoff = Backoff(first=0.5, cap=5.0)
        while True:
            try:
                state, changes = self._record_end(build_id, outcome, count_retry, flight)
                break
            except OSError as exc:
                if not disk_full(exc):
                    raise
                if not backoff.failing:
                    build_event(
                        build_id,
                        f"cannot record its end, state_dir is full ({exc}); trying again",
                        logging.ERROR,
                    )
                self.write_error = f"state_dir is full: {exc}"
                if self.stopping:
                    return
                time.sleep(backoff.failed())
        if backoff.failing:
            self.write_error = None
        level = logging.INFO if state in (State.SUCCEEDED, State.QUEUED) else logging.WARNING
        error = f" ({changes['error']})" if changes.get("error") else ""
        build_event(build_id, f"{state}{error}", level)
        if state == State.SUCCEEDED:
            self.on_succeeded(build_id)

    def _record_end(
        self, build_id: int, outcome: Outcome, count_retry: bool, flight: Flight | None
    ) -> tuple[State, dict[str, Any]]:
        with self._lock:  # serialised with cancel()
            build = self.store.get(build_id)
            s = self.settings()
            state, changes = settle(
                outcome,
                stop=flight.stop if flight is not None else None,
                retries=build.retries,
                max_retries=s.max_build_retries,
                count_retry=count_retry,
            )
            if state == State.SUCCEEDED:
                changes.update(publish_fields(requested=build.publish, enabled=s.publish))
            if state.final:  # for the history record, which outlives the files
                files = self.store.files(build_id)
                changes["package"] = source_package(files.result, files.submitted(build.source))
            ended = self.store.transition(build_id, state, **changes)
            if flight is not None:
                flight.ended = True
        if state.final:
            self.on_end(ended)
        return state, changes

    # -- start-up ---------------------------------------------------------------------

    def start_recovery(self, stopper: Stopper) -> int:
        """Recover in the background what an earlier instance left running, so the socket
        and READY need not wait for scrubs (each may take minutes). Nothing new starts
        until the old mock processes are stopped. Returns how many builds it recovers."""
        leftover = self.store.in_states(State.WAITING, State.BUILDING)
        if not leftover:
            return 0
        with self._lock:
            self._orphans_alive = True
            self.recovering = {b.id for b in leftover}
        self._recovery = threading.Thread(
            target=self._recover_logged, args=(leftover, stopper), name="recovery", daemon=True
        )
        self._recovery.start()
        return len(leftover)

    def _recover_logged(self, leftover: list[Build], stopper: Stopper) -> None:
        try:
            self._recover(leftover, stopper)
        except Exception:
            log.exception("recovery of builds left by an earlier instance failed")

    def recover(self, stopper: Stopper) -> list[int]:
        """Builds an earlier instance left waiting or building: stop their mock, scrub their
        roots, free their slots, queue them again (or fail them past the retry limit)."""
        leftover = self.store.in_states(State.WAITING, State.BUILDING)
        with self._lock:
            self._orphans_alive = True
            self.recovering = {b.id for b in leftover}
        return self._recover(leftover, stopper)

    def _recover_one(self, build: Build, s: Settings) -> None:
        if build.state == State.BUILDING:
            scrub_after_crash(
                build,
                self.store.files(build.id),
                s,
                self.runner,
                on_started=functools.partial(self._scrub_started, build.id),
            )
        with contextlib.suppress(RedisUnavailable):  # else its lease frees the slot
            self.limiter.force_release(slot_name(build.id, s.host_id))
        self._end(
            build.id,
            Outcome(State.QUEUED, None, "interrupted by a daemon crash; re-queued"),
            count_retry=counts_as_retry(
                mock_ran=build.state == State.BUILDING, daemon_stopping=False
            ),
        )
        build_event(build.id, "left running by an earlier instance; re-queued", logging.WARNING)

    def _scrub_started(self, build_id: int, pid: int, started: float | None) -> None:
        """Best effort: a recovery scrub goes on when a full disk cannot record its pid."""
        try:
            self.store.update(build_id, pid=pid, pid_started=started)
        except OSError as exc:
            if not disk_full(exc):
                raise

    def _recover(self, leftover: list[Build], stopper: Stopper) -> list[int]:
        try:
            for build in leftover:
                if build.pid:
                    stopper.kill_orphan(build.pid, build.pid_started)
        finally:
            with self._lock:
                self._orphans_alive = False
        s = self.settings()
        recovered = []
        for build in leftover:
            if self.stopping:
                break  # the rest stays waiting/building: the next start recovers it
            try:
                self._recover_one(build, s)
            except Exception:  # one build's surprise must not strand the others
                log.exception("build %d: recovery failed; the next start tries again", build.id)
                continue
            recovered.append(build.id)
            with self._lock:
                self.recovering.discard(build.id)
        return recovered
