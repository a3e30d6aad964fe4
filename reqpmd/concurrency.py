"""Cluster-wide build-slot limiter on Redis: at most ``max_concurrent`` holders at once.

Why this shape (see slot_scripts.py for the Redis side):

* Each holder has its own lease, renewed by a heartbeat thread while held, so a holder
  that dies frees its slot within one lease instead of pinning it until a set expires.
* Waiters queue in one sorted set (priority first, then arrival), also under leases, so
  a dead waiter never blocks the line. A release grants the next slot inside the same
  script and publishes the grant; the waiter only has to read it: hand-over costs one
  pub/sub delivery. A waiter polls only when the state can change silently (a lease
  running out, a restart grace ending) or as a slow safety net.
* Leases run on the Redis clock, so hosts need not agree on the time; local deadlines
  use the injected monotonic clock.
* Every grant carries a fencing token that only grows, also across Redis restarts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from reqpmd import keys
from reqpmd.errors import (
    InvalidArgument,
    RedisUnavailable,
    SlotLost,
    SlotNameInUse,
    SlotTimeout,
    WaitCancelled,
)
from reqpmd.grants import GrantListener, Pending
from reqpmd.heartbeat import Heartbeat
from reqpmd.slot_scripts import (
    ACQUIRE,
    CLEAR,
    END_GRACE,
    MAX_PRIORITY,
    RELEASE,
    RENEW,
    SET_LIMIT,
    SNAPSHOT,
    Reply,
)

__all__ = [
    "BuildConcurrencyLimiter",
    "RedisUnavailable",
    "Slot",
    "SlotInfo",
    "SlotLost",
    "SlotNameInUse",
    "SlotTimeout",
    "WaitCancelled",
    "WaiterInfo",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
MaxConcurrent = int | Callable[[], int]

# Every Redis failure, not only lost connections: an error reply (OOM, READONLY after a
# failover, BUSY, NOPERM) must not escape as an unexpected exception and kill a thread.
_REDIS_ERRORS = (redis.RedisError,)
# Cap on how long a waiter trusts notifications alone before it asks Redis again.
_SAFETY_POLL = 5.0
_FIRST_BACKOFF = 0.05


@dataclass(frozen=True)
class SlotInfo:
    """One holder as Redis records it (times are Unix seconds on the Redis clock)."""

    name: str
    host: str
    pid: int
    token: int
    acquired_at: float
    lease_expires_at: float
    owner: str
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WaiterInfo:
    """One queued acquirer, in queue order (position 1 is served next)."""

    name: str
    host: str
    pid: int
    priority: int
    position: int
    enqueued_at: float
    lease_expires_at: float
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slot:
    """A granted slot, held by this process until released or lost."""

    name: str
    token: int
    owner: str
    acquired_at: float  # Unix seconds (local clock; Redis keeps its own)
    info: str
    lease_deadline: float  # monotonic: past it, the lease may have run out in Redis
    lost: threading.Event = field(default_factory=threading.Event)
    on_lost: Callable[[Slot], None] | None = None
    next_renewal: float = 0.0  # monotonic, kept by the heartbeat
    renew_failing: bool = False  # Redis unreachable at the last renewal
    # held while a renewal or the release is in flight, so they never overlap
    lock: threading.Lock = field(default_factory=threading.Lock)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _records(flat: list[Any]) -> Iterator[tuple[str, int, str, int, int, dict[str, Any]]]:
    """(name, lease expiry ms, owner, token, granted/queued at ms, caller's JSON) from the
    SNAPSHOT script's flat name, expiry, record triples."""
    for i in range(0, len(flat), 3):
        owner, token, at, _, info = _text(flat[i + 2]).split(" ", 4)
        yield (
            _text(flat[i]),
            int(flat[i + 1]),
            owner,
            int(token),
            int(at),
            json.loads(info or "{}"),
        )


class BuildConcurrencyLimiter:
    """Caps concurrent builds across every process and host sharing one Redis namespace.

    ``max_concurrent`` may be an int or a callable read at each decision, so the limit
    can change at run time; lowering it never evicts holders, it only delays new grants.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        max_concurrent: MaxConcurrent = 4,
        namespace: str = "reqpm",
        lease_ttl: float = 60,
        host: str | None = None,
        *,
        restart_grace: float | None = None,
        auto_renew: bool = True,
        clock: Clock = time.monotonic,
    ) -> None:
        if lease_ttl < 1:
            raise InvalidArgument(f"lease_ttl {lease_ttl!r} is out of range: at least 1 second")
        self._redis = redis_client
        self.max_concurrent = max_concurrent
        self.namespace = keys.validate_namespace(namespace)
        self.lease_ttl = float(lease_ttl)
        self.restart_grace = self.lease_ttl if restart_grace is None else float(restart_grace)
        self.host = host or socket.gethostname()
        self.auto_renew = auto_renew
        self._clock = clock
        self._keys = keys.slot_keys(namespace)
        self._key_list = self._keys.as_list()
        self._acquire = redis_client.register_script(ACQUIRE)
        self._release = redis_client.register_script(RELEASE)
        self._renew = redis_client.register_script(RENEW)
        self._clear = redis_client.register_script(CLEAR)
        self._snapshot = redis_client.register_script(SNAPSHOT)
        self._end_grace = redis_client.register_script(END_GRACE)
        self._set_limit = redis_client.register_script(SET_LIMIT)
        self._held: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._heartbeat = Heartbeat(self.held, self._renew_due, clock)  # type: ignore[arg-type]
        self._grants = GrantListener(redis_client, self._keys.grants)

    # -- configuration -------------------------------------------------------------

    def current_limit(self) -> int:
        value = self.max_concurrent() if callable(self.max_concurrent) else self.max_concurrent
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgument(f"max_concurrent {value!r} is out of range: an integer >= 1")
        return value

    def _run(self, script: Any, *args: Any) -> Any:
        grace_ms = int(self.restart_grace * 1000)
        try:
            return script(keys=self._key_list, args=[grace_ms, *args])
        except _REDIS_ERRORS as exc:
            raise RedisUnavailable(f"Redis is unreachable or refused: {exc}") from exc

    def _info_json(self, labels: dict[str, Any] | None, priority: int) -> str:
        return json.dumps(
            {"host": self.host, "pid": os.getpid(), "priority": priority, "labels": labels or {}},
            separators=(",", ":"),
        )

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name) > 200 or any(c.isspace() for c in name):
            raise InvalidArgument(f"slot name {name!r} is invalid: 1-200 characters, no spaces")

    @staticmethod
    def _check_priority(priority: int) -> None:
        if not isinstance(priority, int) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority {priority!r} is out of range: an integer from "
                f"{-MAX_PRIORITY} to {MAX_PRIORITY}"
            )

    # -- acquiring -----------------------------------------------------------------

    def _attempt(
        self, name: str, owner: str, priority: int, info: str, try_only: bool
    ) -> list[Any]:
        reply = self._run(
            self._acquire,
            name,
            owner,
            priority,
            self.current_limit(),
            int(self.lease_ttl * 1000),
            info,
            1 if try_only else 0,
        )
        if reply[0] == Reply.IN_USE:
            raise SlotNameInUse(f"slot {name!r} is already held or awaited by another owner")
        return list(reply)

    def _granted(
        self,
        name: str,
        owner: str,
        token: int,
        info: str,
        sent_at: float,
        on_lost: Callable[[Slot], None] | None,
    ) -> Slot:
        slot = Slot(
            name=name,
            token=int(token),
            owner=owner,
            acquired_at=time.time(),
            info=info,
            lease_deadline=sent_at + self.lease_ttl,
            on_lost=on_lost,
        )
        with self._lock:
            self._held[name] = slot
        if self.auto_renew:
            self._heartbeat.watch(slot, self.lease_ttl / 3)
        return slot

    def try_acquire(
        self,
        name: str,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
    ) -> Slot | None:
        """Take a slot now if one is free and nobody of equal or higher priority waits."""
        self._check_name(name)
        self._check_priority(priority)
        owner = uuid.uuid4().hex
        info = self._info_json(labels, priority)
        sent_at = self._clock()
        reply = self._attempt(name, owner, priority, info, try_only=True)
        if reply[0] == Reply.GRANTED:
            return self._granted(name, owner, reply[1], info, sent_at, on_lost)
        return None

    def wait_for_slot(
        self,
        name: str,
        timeout: float | None = 300,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> Slot:
        """Queue for a slot and block until granted; ``timeout=None`` waits forever.

        Raises SlotTimeout when the timeout passes (the caller is withdrawn from the
        queue first) and RedisUnavailable when Redis stayed unreachable that long.
        Setting ``cancel`` withdraws the caller and raises WaitCancelled.
        """
        self._check_name(name)
        self._check_priority(priority)
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout {timeout!r} is out of range: >= 0 or None")
        owner = uuid.uuid4().hex
        info = self._info_json(labels, priority)
        started = self._clock()
        deadline = None if timeout is None else started + timeout
        waiter = _Waiter(self, name, owner, priority, info, deadline, cancel)
        try:
            token, sent_at = waiter.run()
        except BaseException:
            waiter.withdraw()
            raise
        return self._granted(name, owner, token, info, sent_at, on_lost)

    @contextmanager
    def acquire(
        self,
        name: str,
        timeout: float | None = 300,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
    ) -> Iterator[Slot]:
        """Hold a slot for the ``with`` block; it is released however the block ends."""
        slot = self.wait_for_slot(name, timeout, priority, labels, on_lost)
        try:
            yield slot
        finally:
            try:
                self.release(name)
            except RedisUnavailable:
                log.warning(
                    "could not release slot %s: Redis unreachable; its lease will "
                    "free it within %gs",
                    name,
                    self.lease_ttl,
                )

    def timeout_error(self, timeout: float) -> SlotTimeout:
        limit = self.current_limit()
        try:
            active, shared = self.get_active_count(), self.get_cluster_limit()
            limit = shared or limit
            busy = f"{active}/{limit} slots busy"
        except RedisUnavailable:
            busy = "Redis unreachable"
        return SlotTimeout(
            f"Could not acquire build slot after {timeout:g}s: {busy} "
            f"(max_concurrent_builds={limit}). Raise max_concurrent_builds or free stuck "
            f"slots with 'reqpmctl slots release'."
        )

    # -- holding -------------------------------------------------------------------

    def _sweep_expired(self) -> None:
        """Declare lost every slot whose local lease deadline has passed, without any I/O:
        a renewal of another slot that blocked on an unreachable Redis must not delay it."""
        now = self._clock()
        for other in self.held():
            if now >= other.lease_deadline and other.lock.acquire(blocking=False):
                try:
                    with self._lock:
                        still_held = self._held.get(other.name) is other
                    if still_held:
                        self._mark_lost(other)
                finally:
                    other.lock.release()
                if still_held:
                    log.error(
                        "slot %s lost: lease of %gs ran out while Redis was unreachable",
                        other.name,
                        self.lease_ttl,
                    )
                    if other.on_lost is not None:
                        other.on_lost(other)

    def _renew_due(self, slot: Slot) -> float | None:
        """The heartbeat's renewal: seconds until the next one, None once the slot is gone."""
        interval = self.lease_ttl / 3
        self._sweep_expired()
        with slot.lock:
            with self._lock:
                if self._held.get(slot.name) is not slot:
                    return None  # released meanwhile
            try:
                self._renew_locked(slot)
                if slot.renew_failing:
                    slot.renew_failing = False
                    log.info("slot %s renewed again", slot.name)
                return interval
            except RedisUnavailable as exc:
                left = slot.lease_deadline - self._clock()
                if not slot.renew_failing:  # once per outage, not once per retry
                    slot.renew_failing = True
                    log.warning(
                        "cannot renew slot %s (%.1fs of lease left), retrying: %s",
                        slot.name,
                        left,
                        exc,
                    )
                # retry sooner as the deadline nears, and wake at the deadline itself
                return max(0.05, min(interval, left / 4, 1.0, left))
            except SlotLost as exc:
                log.error("slot %s lost: %s", slot.name, exc)
        if slot.on_lost is not None:
            slot.on_lost(slot)
        return None

    def renew(self, name: str) -> Slot:
        """Extend this process's lease on ``name``; raises SlotLost if it is gone."""
        with self._lock:
            slot = self._held.get(name)
        if slot is None or slot.lost.is_set():
            raise SlotLost(f"slot {name!r} is not held by this process")
        with slot.lock:
            return self._renew_locked(slot)

    def _renew_locked(self, slot: Slot) -> Slot:
        name = slot.name
        sent_at = self._clock()
        if sent_at >= slot.lease_deadline:
            self._mark_lost(slot)
            raise SlotLost(
                f"slot {name!r}: lease of {self.lease_ttl:g}s ran out before it could be renewed"
            )
        acquired_ms = int(slot.acquired_at * 1000)
        reply = self._run(
            self._renew,
            name,
            slot.owner,
            slot.token,
            int(self.lease_ttl * 1000),
            slot.info,
            acquired_ms,
        )
        if reply[0] == Reply.LOST:
            self._mark_lost(slot)
            raise SlotLost(f"slot {name!r} was taken away (lease expired or force-released)")
        if reply[1] == 1:
            log.warning("slot %s re-registered after a Redis restart", name)
        slot.lease_deadline = sent_at + self.lease_ttl
        return slot

    def _mark_lost(self, slot: Slot) -> None:
        slot.lost.set()
        with self._lock:
            if self._held.get(slot.name) is slot:
                del self._held[slot.name]

    def release(self, name: str) -> bool:
        """Give back a slot this process holds; False if it held none by that name."""
        with self._lock:
            slot = self._held.pop(name, None)
        if slot is None:
            return False
        with slot.lock:  # waits for a renewal in flight
            return bool(self._run(self._release, name, slot.owner, self.current_limit()) == 1)

    def close(self) -> None:
        """Release every slot this limiter holds (best effort), stop its threads."""
        for slot in self.held():
            with contextlib.suppress(RedisUnavailable):
                self.release(slot.name)
        self._heartbeat.close()
        self._grants.close()

    def held(self) -> list[Slot]:
        with self._lock:
            return list(self._held.values())

    # -- operators -----------------------------------------------------------------

    def force_release(self, name: str) -> bool:
        """Free ``name`` whoever holds it; its holder learns at its next renewal."""
        return bool(self._run(self._release, name, "", self.current_limit()) == 1)

    def clear_all(self) -> int:
        """Free every slot of the namespace; returns how many were held."""
        return int(self._run(self._clear, self.current_limit()))

    # -- reading -------------------------------------------------------------------

    def snapshot(self) -> tuple[list[SlotInfo], list[WaiterInfo]]:
        """Holders and waiters (in queue order) read in one atomic step."""
        _, _, holders, waiters, _ = self._run(self._snapshot)
        slots = [
            SlotInfo(
                name,
                info.get("host", ""),
                int(info.get("pid", 0)),
                token,
                at / 1000,
                expiry / 1000,
                owner,
                info.get("labels", {}),
            )
            for name, expiry, owner, token, at, info in _records(holders)
        ]
        queue = [
            WaiterInfo(
                name,
                info.get("host", ""),
                int(info.get("pid", 0)),
                int(info.get("priority", 0)),
                position,
                at / 1000,
                expiry / 1000,
                info.get("labels", {}),
            )
            for position, (name, expiry, _, _, at, info) in enumerate(_records(waiters), 1)
        ]
        return slots, queue

    def get_slots(self) -> list[SlotInfo]:
        return self.snapshot()[0]

    def get_active_builds(self) -> list[str]:
        return [s.name for s in self.get_slots()]

    def get_active_count(self) -> int:
        return len(self.get_slots())

    def get_waiting(self) -> list[WaiterInfo]:
        return self.snapshot()[1]

    def declare_no_survivors(self) -> None:
        """End the restart grace period now.

        After Redis restarts (or on a brand-new, empty Redis, which looks the same) the
        limiter grants nothing for one grace period so holders it forgot can re-register.
        Call this only when no process holds a slot Redis does not record: a private
        server this process just started, before it granted anything.
        """
        self._run(self._end_grace)

    def recover_private_server(self) -> None:
        """After restarting a private Redis that only this process uses: re-register every
        slot held here (a slot whose lease ran out meanwhile is lost, and its owner told),
        then end the restart grace, since no other holder can be missing."""
        for slot in self.held():
            try:
                self.renew(slot.name)
            except SlotLost as exc:
                log.error("slot %s lost: %s", slot.name, exc)
                if slot.on_lost is not None:
                    slot.on_lost(slot)
        self.declare_no_survivors()

    def in_restart_grace(self) -> float:
        """Seconds left of a Redis-restart grace period (0 when none)."""
        now, grace_until, _, _, _ = self._run(self._snapshot)
        return max(0.0, (int(grace_until) - int(now)) / 1000)

    # -- the cluster-wide limit ------------------------------------------------------

    def set_cluster_limit(self, limit: int | None) -> int | None:
        """Make ``limit`` the limit of every caller in the namespace (None: drop it, and
        each caller's own ``max_concurrent`` applies again). Returns the previous one.

        Without it each grant uses the granting caller's limit, and callers that disagree
        get whichever acts. A raised limit is served at once; a lowered one evicts nobody.
        """
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidArgument(f"limit {limit!r} is out of range: an integer >= 1 or None")
        previous = int(self._run(self._set_limit, limit or 0))
        return None if previous < 0 else previous

    def get_cluster_limit(self) -> int | None:
        shared = int(self._run(self._snapshot)[4])
        return None if shared < 0 else shared


class _Waiter:
    """One blocking acquisition: queue, listen for the grant, poll only when useful."""

    def __init__(
        self,
        limiter: BuildConcurrencyLimiter,
        name: str,
        owner: str,
        priority: int,
        info: str,
        deadline: float | None,
        cancel: threading.Event | None,
    ) -> None:
        self.lim = limiter
        self.name = name
        self.owner = owner
        self.priority = priority
        self.info = info
        self.deadline = deadline
        self.cancel = cancel
        self.clock = limiter._clock
        self.started = self.clock()

    def _left(self) -> float | None:
        return None if self.deadline is None else self.deadline - self.clock()

    def _attempt(self) -> tuple[list[Any], float]:
        sent_at = self.clock()
        return self.lim._attempt(self.name, self.owner, self.priority, self.info, False), sent_at

    def run(self) -> tuple[int, float]:
        """Returns (token, monotonic time the granting request was sent)."""
        backoff = _FIRST_BACKOFF
        while True:
            try:
                token, sent_at = self._listen()
                if backoff != _FIRST_BACKOFF:
                    log.info("waiting for slot %s: Redis reachable again", self.name)
                return token, sent_at
            except RedisUnavailable as exc:
                left = self._left()
                if left is not None and left <= 0:
                    raise RedisUnavailable(
                        f"gave up waiting for slot {self.name!r}: {exc}"
                    ) from exc
                if backoff == _FIRST_BACKOFF:  # once per outage, not once per retry
                    log.warning("waiting for slot %s: %s; retrying with backoff", self.name, exc)
                if self._sleep(backoff if left is None else min(backoff, left)):
                    raise WaitCancelled(f"stopped waiting for slot {self.name!r}") from exc
                backoff = min(backoff * 2, 2.0)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless cancelled; True if cancelled."""
        if self.cancel is not None:
            return self.cancel.wait(seconds)
        time.sleep(seconds)
        return False

    def _timeout(self) -> SlotTimeout:
        return self.lim.timeout_error(self.clock() - self.started)

    def _listen(self) -> tuple[int, float]:
        # Listen before queueing, so the grant cannot be published unheard.
        pending = self.lim._grants.register(self.name, self.owner)
        try:
            while True:
                reply, sent_at = self._attempt()
                if reply[0] == Reply.GRANTED:
                    return int(reply[1]), sent_at
                hint = reply[3] / 1000 if reply[3] >= 0 else None
                token = self._wait_for_grant(pending, hint)
                if token is not None:
                    return token, sent_at
        finally:
            self.lim._grants.unregister(pending)

    def _wait_for_grant(self, pending: Pending, hint: float | None) -> int | None:
        """Our token once the grant arrives, or None when it is time to ask Redis again."""
        wait = min(_SAFETY_POLL, self.lim.lease_ttl / 3)
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
                raise self._timeout()
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
        """Leave the queue (or give back a grant that raced with our giving up)."""
        # If Redis is unreachable, the waiter lease frees the place.
        with contextlib.suppress(RedisUnavailable):
            self.lim._run(self.lim._release, self.name, self.owner, self.lim.current_limit())
