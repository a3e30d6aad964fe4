"""Take the next queued build -> gates -> slot -> mock -> release.

Concurrency model: threads with clear ownership. The daemon's main thread calls
``tick()``; each build this host has in flight (waiting for a slot, then building) is
owned by one thread, which alone moves that build from waiting onward. Other threads
(control socket, signal handling) only ask a flight to stop. ``_lock`` guards the set
of flights and the hand-over of queued builds, so a cancel and a start cannot race.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reqpmd import gates as gates_mod
from reqpmd.builder import BuildRun, Outcome, StopReason, scrub
from reqpmd.concurrency import BuildConcurrencyLimiter, Slot
from reqpmd.errors import (
    InvalidArgument,
    RedisUnavailable,
    SlotNameInUse,
    SlotTimeout,
    WaitCancelled,
)
from reqpmd.gates import Gate, Gates
from reqpmd.mock import Runner, Stopper
from reqpmd.settings import Settings
from reqpmd.states import State
from reqpmd.store import Build, Store

log = logging.getLogger(__name__)

MAX_WAITING = 32  # builds of this host queued for a cluster slot at once


def slot_name(build_id: int, host_id: str) -> str:
    """Build ids come from each host's own database, so the host makes the name unique."""
    return f"build_{build_id}@{host_id}"


@dataclass
class Flight:
    build_id: int
    wait_cancel: threading.Event = field(default_factory=threading.Event)
    reason: StopReason | None = None
    note: str = ""
    run: BuildRun | None = None
    thread: threading.Thread | None = None
    ended: bool = False  # the build got its end state from this flight
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def building(self) -> bool:
        return self.run is not None

    def stop(self, reason: StopReason, note: str = "") -> None:
        with self.lock:
            if self.reason is None or reason == StopReason.CANCEL:
                self.reason, self.note = reason, note
            self.wait_cancel.set()
            if self.run is not None:
                self.run.stop(reason, note)


class Scheduler:
    def __init__(
        self,
        store: Store,
        limiter: BuildConcurrencyLimiter,
        settings: Callable[[], Settings],
        runner: Runner,
        gates: Gates | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.settings = settings
        self.runner = runner
        self.gates = gates or Gates()
        self.last_gates: list[Gate] = []
        self.stopping = False
        self._flights: dict[int, Flight] = {}
        self._lock = threading.RLock()

    @property
    def host_id(self) -> str:
        return str(self.settings().host_id)

    # -- the main thread's part -----------------------------------------------------

    def tick(self, redis_ok: bool) -> None:
        """Start what may start now; withdraw waiters while a gate is closed."""
        with self._lock:
            self._flights = {
                i: f for i, f in self._flights.items() if f.thread is None or f.thread.is_alive()
            }
            if self.stopping:
                return
            s = self.settings()
            building = sum(1 for f in self._flights.values() if f.building)
            self.last_gates = self.gates.check(s, building)
            shut = gates_mod.closed(self.last_gates)
            if shut:
                for f in self._flights.values():
                    if not f.building and not f.wait_cancel.is_set():
                        log.info(
                            "build %d: leaving the slot queue: %s",
                            f.build_id,
                            gates_mod.describe_closed(shut),
                            extra={"build_id": f.build_id},
                        )
                        f.stop(StopReason.REQUEUE, "gate closed")
                return
            if not redis_ok:
                return
            # With a host cap, never wait for more slots than this host may use; without
            # one, every queued build may wait (bounded: each waiter is a thread).
            cap = int(s.host_max_builds) or building + MAX_WAITING
            while len(self._flights) < cap:
                build = self.store.next_queued(exclude=set(self._flights))
                if build is None:
                    break
                self._launch(build)

    def _launch(self, build: Build) -> None:
        flight = Flight(build.id)
        self.store.transition(build.id, State.WAITING, error=None)
        flight.thread = threading.Thread(
            target=self._fly, args=(flight, build), name=f"build-{build.id}", daemon=True
        )
        self._flights[build.id] = flight
        flight.thread.start()

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            flights = [f for f in self._flights.values() if f.thread is None or f.thread.is_alive()]
        building = sum(1 for f in flights if f.building)
        return {"building": building, "waiting": len(flights) - building}

    # -- any thread -----------------------------------------------------------------------

    def cancel(self, build_id: int, note: str = "cancelled") -> Build:
        """Cancel a queued, waiting or running build. InvalidArgument if it has ended."""
        with self._lock:  # _end() takes it too: a flight cannot end half-way through this
            build = self.store.get(build_id)
            if build.state.final:
                raise InvalidArgument(f"build {build_id} has already ended ({build.state})")
            flight = self._flights.get(build_id)
            if build.state != State.QUEUED and flight is not None and not flight.ended:
                flight.stop(StopReason.CANCEL, note)  # its thread ends it as cancelled
                return build
            return self.store.transition(build_id, State.CANCELLED, error=note)

    def retry(self, build_id: int) -> Build:
        with self._lock:
            build = self.store.get(build_id)
            if not build.state.final:
                raise InvalidArgument(
                    f"build {build_id} is {build.state}; only an ended build can be retried"
                )
            return self.store.transition(build_id, State.QUEUED, error=None, retries=0)

    def shutdown(self, timeout: float) -> None:
        """Stop taking slots, stop running builds cleanly, mark them to run again."""
        with self._lock:
            self.stopping = True
            flights = list(self._flights.values())
        for f in flights:
            f.stop(StopReason.REQUEUE, "daemon stopping; the build will run again at next start")
        for f in flights:
            if f.thread is not None:
                f.thread.join(timeout)

    # -- one flight's thread ----------------------------------------------------------

    def _fly(self, flight: Flight, build: Build) -> None:
        try:
            self._fly_inner(flight, build)
        except Exception:
            log.exception("build %d: internal error", build.id, extra={"build_id": build.id})
            if not flight.ended:  # one end state per run, whatever failed after it
                outcome = Outcome(State.QUEUED, None, "internal error; will retry")
                self._end(build.id, outcome, count_retry=True, flight=flight)

    def _fly_inner(self, flight: Flight, build: Build) -> None:
        s = self.settings()
        name = slot_name(build.id, s.host_id)
        try:
            slot = self.limiter.wait_for_slot(
                name,
                timeout=int(s.slot_wait_timeout) or None,
                priority=build.priority,
                labels={"build_id": build.id, "host_id": s.host_id},
                on_lost=lambda lost: flight.stop(
                    StopReason.REQUEUE, "lost its build slot; will run again"
                ),
                cancel=flight.wait_cancel,
            )
        except SlotTimeout as exc:
            self._end(build.id, Outcome(State.TIMED_OUT, None, str(exc)), flight=flight)
            return
        except WaitCancelled:
            if flight.reason == StopReason.CANCEL:
                self._end(
                    build.id,
                    Outcome(State.CANCELLED, None, flight.note or "cancelled"),
                    flight=flight,
                )
            else:
                self._end(build.id, Outcome(State.QUEUED, None, flight.note or None), flight=flight)
            return
        except (RedisUnavailable, SlotNameInUse) as exc:
            log.warning("build %d: no slot: %s", build.id, exc, extra={"build_id": build.id})
            self._end(build.id, Outcome(State.QUEUED, None, str(exc)), flight=flight)
            return
        try:
            self._build(flight, build, slot, s)
        finally:
            try:
                self.limiter.release(name)
            except RedisUnavailable:
                log.warning(
                    "build %d: could not release slot %s: Redis unreachable; its lease frees it",
                    build.id,
                    name,
                    extra={"build_id": build.id},
                )

    def _build(self, flight: Flight, build: Build, slot: Slot, s: Settings) -> None:
        running = self.store.transition(
            build.id, State.BUILDING, slot_token=slot.token, runs=build.runs + 1
        )
        log.info(
            "build %d: building %s in %s-%s (slot %s, token %d)",
            build.id,
            build.source,
            build.chroot,
            f"build{build.id}",
            slot.name,
            slot.token,
            extra={"build_id": build.id},
        )
        run = BuildRun(
            running,
            self.store.build_dir(build.id),
            s,
            self.runner,
            on_started=lambda pid, started: self.store.update(
                build.id, pid=pid, pid_started=started
            ),
        )
        with flight.lock:
            flight.run = run
            if flight.reason is not None:
                run.stop(flight.reason, flight.note)
        outcome = run.run()
        self._end(build.id, outcome, count_retry=not self.stopping, flight=flight)

    def _end(
        self,
        build_id: int,
        outcome: Outcome,
        count_retry: bool = False,
        flight: Flight | None = None,
    ) -> None:
        with self._lock:  # serialised with cancel()
            state = outcome.state
            changes: dict[str, Any] = {"exit_code": outcome.exit_code, "error": outcome.error}
            if flight is not None and flight.reason == StopReason.CANCEL and state == State.QUEUED:
                state, changes["error"] = State.CANCELLED, flight.note or "cancelled"
            build = self.store.get(build_id)
            if state == State.QUEUED and count_retry:
                changes["retries"] = build.retries + 1
                if build.retries + 1 > int(self.settings().max_build_retries):
                    state = State.FAILED
                    changes["error"] = f"gave up after {build.retries} retries: {outcome.error}"
            if state == State.QUEUED:
                changes.pop("exit_code")
            self.store.transition(build_id, state, **changes)
            if flight is not None:
                flight.ended = True
        level = logging.INFO if state in (State.SUCCEEDED, State.QUEUED) else logging.WARNING
        error = f" ({changes['error']})" if changes.get("error") else ""
        log.log(level, "build %d: %s%s", build_id, state, error, extra={"build_id": build_id})

    # -- start-up ---------------------------------------------------------------------

    def recover(self, stopper: Stopper) -> list[int]:
        """Builds an earlier instance left waiting or building: stop their mock, scrub their
        roots, free their slots, queue them again (or fail them past the retry limit)."""
        s = self.settings()
        recovered = []
        for build in self.store.in_states(State.WAITING, State.BUILDING):
            if build.pid:
                stopper.kill_orphan(build.pid, build.pid_started)
            if build.state == State.BUILDING:
                bdir = self.store.build_dir(build.id)
                with open(bdir / "build.log", "ab") as logf:
                    scrub(build, bdir, s, self.runner, logf)
            with contextlib.suppress(RedisUnavailable):  # else its lease frees the slot
                self.limiter.force_release(slot_name(build.id, s.host_id))
            self._end(
                build.id,
                Outcome(State.QUEUED, None, "interrupted by a daemon crash; re-queued"),
                count_retry=build.state == State.BUILDING,
            )
            recovered.append(build.id)
        return recovered
