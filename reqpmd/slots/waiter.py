"""One blocking acquisition: queue, listen for the grant, poll only when useful.

The waiter sees the limiter only through ``WaitSteps``, the few steps a wait is made of
(as redis-py's Lock is made of ``do_acquire``/``do_release``/``do_extend``): a test can
drive it with fake steps, and the limiter can change its internals freely.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from reqpmd.backoff import Backoff
from reqpmd.errors import RedisUnavailable, SlotTimeout, WaitCancelled
from reqpmd.slots.grants import Pending

log = logging.getLogger(__name__)

# Cap on how long a waiter trusts notifications alone before it asks Redis again (and
# refreshes its waiter lease: a third of the lease bounds it too). Every change Redis
# makes silently (a lease running out, a grace ending) already sets an earlier poll, and a
# dropped subscription makes every waiter ask at once: this is the net under a lost
# message. At 5 s, 10 000 waiters cost Redis 15% of a CPU (bench/hosts_bench.py).
SAFETY_POLL = 20.0


@dataclass(frozen=True)
class Attempt:
    """What one enqueue-or-grant step answered."""

    token: int | None  # the fencing token when granted
    wake_hint: float | None = None  # seconds until the state may change silently


class WaitSteps(Protocol):
    lease_ttl: float

    def attempt(self, name: str, owner: str, priority: int, info: str) -> Attempt:
        """Join the queue (or refresh our waiter lease) and take a slot if one is ours."""
        ...

    def withdraw(self, name: str, owner: str) -> None:
        """Leave the queue, or give back a grant that raced with our giving up."""
        ...

    def listen(self, name: str, owner: str) -> Pending:
        """Be told of our grant; returns once notifications are live."""
        ...

    def unlisten(self, pending: Pending) -> None: ...

    def timed_out(self, waited: float) -> SlotTimeout:
        """The error for a wait that ran out, saying why no slot came."""
        ...


class Waiter:
    def __init__(
        self,
        steps: WaitSteps,
        name: str,
        owner: str,
        priority: int,
        info: str,
        deadline: float | None,
        cancel: threading.Event | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.steps = steps
        self.name = name
        self.owner = owner
        self.priority = priority
        self.info = info
        self.deadline = deadline
        self.cancel = cancel
        self.clock = clock
        self._sleep_fn = sleep
        self.started = clock()

    def _left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def run(self) -> tuple[int, float]:
        """Returns (token, monotonic time the granting request was sent); withdraws from
        the queue before raising."""
        try:
            return self._run()
        except BaseException:
            self.withdraw()
            raise

    def _run(self) -> tuple[int, float]:
        backoff = Backoff(first=0.05, cap=2.0)
        while True:
            try:
                granted = self._listen()
                if backoff.succeeded():
                    log.info("waiting for slot %s: Redis reachable again", self.name)
                return granted
            except RedisUnavailable as exc:
                left = self._left()
                if left is not None and left <= 0:
                    raise RedisUnavailable(
                        f"gave up waiting for slot {self.name!r}: {exc}"
                    ) from exc
                if not backoff.failing:  # once per outage, not once per retry
                    log.warning("waiting for slot %s: %s; retrying with backoff", self.name, exc)
                delay = backoff.failed()
                if self._sleep(delay if left is None else min(delay, left)):
                    raise WaitCancelled(f"stopped waiting for slot {self.name!r}") from exc

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless cancelled; True if cancelled."""
        if self.cancel is not None:
            return self.cancel.wait(seconds)
        self._sleep_fn(seconds)
        return False

    def _listen(self) -> tuple[int, float]:
        # Listen before queueing, so the grant cannot be published unheard.
        pending = self.steps.listen(self.name, self.owner)
        try:
            while True:
                sent_at = self.clock()
                attempt = self.steps.attempt(self.name, self.owner, self.priority, self.info)
                if attempt.token is not None:
                    return attempt.token, sent_at
                if self._wait_for_grant(pending, attempt.wake_hint) is not None:
                    # A grant message is a reason to ask, not the answer: it may be old
                    # (this process stopped while it waited in the socket, the slot lost
                    # meanwhile, even the server replaced). Asked again, Redis grants it
                    # only if it still holds, and starts its lease from now.
                    pending.token = None
                    pending.event.clear()
        finally:
            self.steps.unlisten(pending)

    def _wait_for_grant(self, pending: Pending, hint: float | None) -> int | None:
        """Our token once the grant arrives, or None when it is time to ask Redis again."""
        wait = min(SAFETY_POLL, self.steps.lease_ttl / 3)
        if hint is not None:
            wait = min(wait, hint + 0.005)
        poll_at = self.clock() + max(wait, 0.005)
        while True:
            if pending.token is not None:
                return pending.token
            if pending.repoll:
                pending.repoll = False
                pending.event.clear()
                return None
            if self.cancel is not None and self.cancel.is_set():
                raise WaitCancelled(f"stopped waiting for slot {self.name!r}")
            left = self._left()
            if left is not None and left <= 0:
                raise self.steps.timed_out(self.clock() - self.started)
            now = self.clock()
            if now >= poll_at:
                return None
            step = poll_at - now
            if left is not None:
                step = min(step, left)
            if self.cancel is not None:
                step = min(step, 0.2)
            pending.event.wait(step)

    def withdraw(self) -> None:
        # If Redis is unreachable, the waiter lease frees the place.
        with contextlib.suppress(RedisUnavailable):
            self.steps.withdraw(self.name, self.owner)
