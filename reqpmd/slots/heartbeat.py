"""One thread per limiter that renews every held slot when its renewal is due.

A thread per slot would cost a thread start on every grant and a join on every
release, on the hand-over's critical path. Here a grant only registers the slot and
a release takes the slot's lock (so no renewal is in flight when RELEASE is sent: a
late renewal in a restart grace period would re-register a released slot).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)


class Renewable(Protocol):
    next_renewal: float


R = TypeVar("R", bound=Renewable)


class Heartbeat(Generic[R]):
    def __init__(
        self,
        held: Callable[[], list[R]],
        renew: Callable[[R], float | None],
        clock: Callable[[], float],
        name: str = "slot-heartbeat",
    ) -> None:
        """``renew(slot)`` renews one slot and returns seconds until its next renewal,
        or None once the slot is gone (released or lost)."""
        self._held = held
        self._renew = renew
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, slot: R, first_in: float) -> None:
        with self._cond:
            slot.next_renewal = self._clock() + first_in
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    slots = self._held()
                    if not slots or self._closed:
                        # let go under the lock: a watch() from now on starts a new thread
                        self._thread = None
                        return
                    now = self._clock()
                    due = [s for s in slots if s.next_renewal <= now]
                    if not due:
                        self._cond.wait(min(s.next_renewal for s in slots) - now)
                        continue
                for slot in due:
                    try:
                        delay = self._renew(slot)
                    except Exception:  # never let one slot's surprise stop every renewal
                        log.exception("renewing a slot failed unexpectedly; retrying")
                        delay = 1.0
                    if delay is not None:
                        slot.next_renewal = self._clock() + delay
        finally:
            with self._cond:
                if self._thread is threading.current_thread():  # ended by an exception
                    self._thread = None
