"""Cluster-wide build-slot limiter on Redis: at most ``max_concurrent`` holders at once.

Why this shape (see scripts.py for the Redis side):

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
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis

from reqpmd.checks import int_in_range, is_int
from reqpmd.errors import (
    InvalidArgument,
    RedisUnavailable,
    SlotLost,
    SlotNameInUse,
    SlotTimeout,
)
from reqpmd.quoting import printable, shown
from reqpmd.slots import keys
from reqpmd.slots.connection import REDIS_ERRORS, follow_master, text, unavailable
from reqpmd.slots.grants import GrantListener, Pending
from reqpmd.slots.heartbeat import Heartbeat
from reqpmd.slots.scripts import (
    ACQUIRE,
    CLEAR,
    COUNTS,
    DEFAULT_GROUP,
    END_GRACE,
    GROUP_CHARS,
    GROUP_MAX,
    LIMIT_MAX,
    LIMIT_MIN,
    MAX_PRIORITY,
    RELEASE,
    RENEW,
    SET_LIMIT,
    SET_SHARE,
    SNAPSHOT,
    WEIGHT_MAX,
    Reply,
)
from reqpmd.slots.untrusted import WarnOnce, loads
from reqpmd.slots.waiter import Attempt, Waiter

__all__ = [
    "DEFAULT_GROUP",
    "BuildConcurrencyLimiter",
    "Counts",
    "Listing",
    "Share",
    "ShareChange",
    "Slot",
    "SlotInfo",
    "WaiterInfo",
    "check_group",
]

log = logging.getLogger(__name__)

Clock = Callable[[], float]
MaxConcurrent = int | Callable[[], int]


def grace_text(seconds: float) -> str:
    """The one explanation of a restart grace: what, until when, and why."""
    until = time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))
    return (
        f"grants are paused until {until} ({seconds:.0f}s more) for the restart grace: the "
        "Redis server is new or restarted, so slots held before may still re-register"
    )


_GROUP_RE = re.compile(f"[{GROUP_CHARS}]{{1,{GROUP_MAX}}}")


def check_group(group: str) -> str:
    if not isinstance(group, str) or not _GROUP_RE.fullmatch(group):
        raise InvalidArgument(
            f"group {group!r} is invalid: 1-{GROUP_MAX} characters from {GROUP_CHARS}"
        )
    return group


@dataclass(frozen=True)
class Share:
    """A group's share of the cluster's slots, the same for every host of the namespace."""

    max_concurrent: int | None = None  # None: no cap of its own
    weight: int = 1


@dataclass(frozen=True)
class ShareChange:
    """What to change of a group's share: a field left None stays as it is;
    ``max_concurrent=0`` removes the cap."""

    max_concurrent: int | None = None
    weight: int | None = None


DEFAULT_GRACE_HINT = (
    "if no process can still hold a slot of this namespace (a new Redis, or every holder "
    "is known dead), call declare_no_survivors() to end it now"
)


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
    group: str = DEFAULT_GROUP


@dataclass(frozen=True)
class WaiterInfo:
    """One queued acquirer, in queue order. ``position`` is its place in its group's
    queue (1: its group's next); which group is served next is the fair share's choice."""

    name: str
    host: str
    pid: int
    priority: int
    position: int
    enqueued_at: float
    lease_expires_at: float
    labels: dict[str, Any] = field(default_factory=dict)
    group: str = DEFAULT_GROUP


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


@dataclass(frozen=True)
class Counts:
    """The scalar state of the namespace, read in one cheap step (no listing)."""

    active: int
    waiting: int
    cluster_limit: int | None  # None: no valid cluster-wide limit was set
    grace_left: float  # seconds of a Redis-restart grace period still to run (0: none)
    # the cluster limit Redis holds when it is not a valid one (then ignored), cut short
    cluster_limit_invalid: str | None = None
    # the last repair of data in Redis the scripts did not write: what, and when
    repaired: str | None = None
    # the server's run_id: another one means a restart or a failover
    server: str | None = None


@dataclass(frozen=True)
class Listing:
    """What SNAPSHOT read: every holder, the first waiters in queue order, and counts."""

    holders: list[SlotInfo]
    waiters: list[WaiterInfo]
    waiting: int  # waiters in all, listed or not
    waiting_by_group: dict[str, int]  # waiters of each group that waits


@dataclass(frozen=True)
class _Record:
    """One holder or waiter as SNAPSHOT lists it, its caller's JSON checked field by field."""

    name: str
    expiry_ms: float
    owner: str
    token: int
    at_ms: int
    host: str = ""
    pid: int = 0
    priority: int = 0
    labels: dict[str, Any] = field(default_factory=dict)
    group: str = DEFAULT_GROUP


class _Malformed(ValueError):
    """A reply or record that is not what the scripts write."""


@contextmanager
def _reply_of(script: str) -> Iterator[None]:
    """Whatever a reply holds, reading it raises nothing but RedisUnavailable."""
    try:
        yield
    except (ValueError, TypeError, IndexError, KeyError, OverflowError) as exc:
        raise RedisUnavailable(f"unexpected reply from Redis to {script}: {exc}") from exc


def _int(value: Any) -> int:
    if isinstance(value, bytes | str):
        return int(value)
    if not is_int(value):
        raise _Malformed(f"{shown(value)} is not an integer")
    return int(value)


def _caller_info(raw: str) -> tuple[dict[str, Any], str | None]:
    """The fields of a record's JSON that are shown (host, pid, priority, labels), each
    checked, and what was wrong with it (None: nothing)."""
    try:
        info = loads(raw or "{}")
    except ValueError as exc:
        return {}, f"its JSON does not parse ({exc})"
    if not isinstance(info, dict):
        return {}, "its JSON is not an object"
    checks: dict[str, Callable[[Any], bool]] = {
        "host": lambda v: isinstance(v, str),
        "pid": lambda v: is_int(v) and 0 <= v < 2**63,
        "priority": lambda v: is_int(v) and abs(v) <= MAX_PRIORITY,
        "labels": lambda v: isinstance(v, dict),
        "group": lambda v: isinstance(v, str) and _GROUP_RE.fullmatch(v) is not None,
    }
    odd = [key for key, ok in checks.items() if key in info and not ok(info[key])]
    fields = {key: info[key] for key in checks if key in info and key not in odd}
    return fields, f"bad {', '.join(odd)} in its JSON" if odd else None


def _optional_limit(value: Any) -> int | None:
    limit = _int(value)
    return None if limit < 0 else limit


def _optional_text(value: Any) -> str | None:
    return None if value is None else text(value)


class BuildConcurrencyLimiter:
    """Caps concurrent builds across every process and host sharing one Redis namespace.

    ``max_concurrent`` may be an int or a callable read at each decision, so the limit
    can change at run time; lowering it never evicts holders, it only delays new grants.
    ``grace_hint`` tells a reader of the restart-grace warning how to end the grace in
    the caller's world (reqpmd names its reqpmctl command).
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
        grace_hint: str = DEFAULT_GRACE_HINT,
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
        self.grace_hint = grace_hint
        self._clock = clock
        self._keys = keys.slot_keys(namespace)
        self._key_list = self._keys.as_list()
        self._acquire = redis_client.register_script(ACQUIRE)
        self._release = redis_client.register_script(RELEASE)
        self._renew = redis_client.register_script(RENEW)
        self._clear = redis_client.register_script(CLEAR)
        self._snapshot = redis_client.register_script(SNAPSHOT)
        self._counts = redis_client.register_script(COUNTS)
        self._end_grace = redis_client.register_script(END_GRACE)
        self._set_limit = redis_client.register_script(SET_LIMIT)
        self._set_share = redis_client.register_script(SET_SHARE)
        self._held: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._heartbeat: Heartbeat[Slot] = Heartbeat(self.held, self._renew_due, clock)
        self._grants = GrantListener(redis_client, self._keys.grants)
        self._steps = _Steps(self)
        self._grace_warned_until = 0.0  # monotonic end of the grace period last warned of
        self._next_follow = 0.0  # monotonic: when to ask the Sentinels for the master again
        self._bad = WarnOnce(log)  # malformed data read from Redis, said once per key

    # -- configuration -------------------------------------------------------------

    def current_limit(self) -> int:
        value = self.max_concurrent() if callable(self.max_concurrent) else self.max_concurrent
        return int_in_range("max_concurrent", value, 1)

    def _run(self, script: Any, *args: Any) -> list[Any]:
        """Run a script; its reply as a list whose first element is a ``Reply``."""
        now = self._clock()
        if now >= self._next_follow:
            # under Sentinel, the master named now (see follow_master): holders, waiters
            # and checks all reach a new master within a third of a lease, its grace
            self._next_follow = now + self.lease_ttl / 3 * 0.9
            follow_master(self._redis)
        grace_ms = int(self.restart_grace * 1000)
        try:
            reply = script(keys=self._key_list, args=[grace_ms, *args])
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        if not isinstance(reply, list) or not reply:
            raise RedisUnavailable(f"unexpected reply from Redis: {shown(reply)}")
        return reply

    def _info_json(self, labels: dict[str, Any] | None, priority: int, group: str) -> str:
        return json.dumps(
            {
                "group": group,
                "host": self.host,
                "pid": os.getpid(),
                "priority": priority,
                "labels": labels or {},
            },
            separators=(",", ":"),
        )

    @staticmethod
    def _check_name(name: str) -> None:
        if not name or len(name) > 200 or any(c.isspace() for c in name):
            raise InvalidArgument(f"slot name {name!r} is invalid: 1-200 characters, no spaces")

    @staticmethod
    def _check_priority(priority: int) -> None:
        int_in_range("priority", priority, -MAX_PRIORITY, MAX_PRIORITY)

    # -- acquiring -----------------------------------------------------------------

    def _attempt(self, name: str, owner: str, priority: int, info: str, try_only: bool) -> Attempt:
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
        with _reply_of("ACQUIRE"):
            code = Reply(reply[0])
            if code == Reply.GRANTED:
                return Attempt(_int(reply[1]))
            if code == Reply.WAITING:
                grace_left = _int(reply[4]) / 1000
                wake = _int(reply[3])
            elif code == Reply.BUSY:
                wake = _int(reply[2])
            elif code != Reply.IN_USE:
                raise _Malformed(f"code {code.name}")
        if code == Reply.IN_USE:
            raise SlotNameInUse(f"slot {name!r} is already held or awaited by another owner")
        if code == Reply.WAITING:
            self._warn_grace(grace_left)
        return Attempt(None, wake / 1000 if wake >= 0 else None)

    def _warn_grace(self, left: float) -> None:
        """Once per grace period: a waiter that waits a whole lease with nothing in the
        log looks like a hang."""
        if left <= 0:
            return
        now = self._clock()
        with self._lock:
            if now < self._grace_warned_until:
                return
            self._grace_warned_until = now + left
        log.warning("namespace %s: %s; %s", self.namespace, grace_text(left), self.grace_hint)

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
        if self._clock() - sent_at > self.lease_ttl / 3:
            # heard late (this process was stopped, or starved, while the grant waited
            # in its socket): renewed before use, or known lost, rather than trusted
            self._renew_late_grant(slot)
        if self.auto_renew:
            self._heartbeat.watch(slot, self.lease_ttl / 3)
        return slot

    def _renew_late_grant(self, slot: Slot) -> None:
        try:
            with slot.lock:
                self._renew_locked(slot)
        except SlotLost as exc:
            log.error("slot %s lost before use: %s", slot.name, exc)
            self._mark_lost(slot)
            with contextlib.suppress(RedisUnavailable):  # else its lease frees it
                self._release_name(slot.name, slot.owner)
        except RedisUnavailable as exc:  # its deadline stands; the heartbeat retries
            log.warning("slot %s granted long ago, not renewed yet: %s", slot.name, exc)

    def try_acquire(
        self,
        name: str,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
        group: str = DEFAULT_GROUP,
    ) -> Slot | None:
        """Take a slot now if one is free and the fair share would grant it to this
        caller (no group is owed it first, nobody of the group waits ahead)."""
        self._check_name(name)
        self._check_priority(priority)
        owner = uuid.uuid4().hex
        info = self._info_json(labels, priority, check_group(group))
        sent_at = self._clock()
        attempt = self._attempt(name, owner, priority, info, try_only=True)
        if attempt.token is None:
            return None
        return self._granted(name, owner, attempt.token, info, sent_at, on_lost)

    def wait_for_slot(
        self,
        name: str,
        timeout: float | None = 300,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
        cancel: threading.Event | None = None,
        group: str = DEFAULT_GROUP,
    ) -> Slot:
        """Queue for a slot in ``group`` and block until granted; ``timeout=None`` waits
        forever. Slots are shared between groups by their shares (``set_share``).

        Raises SlotTimeout when the timeout passes (the caller is withdrawn from the
        queue first) and RedisUnavailable when Redis stayed unreachable that long.
        Setting ``cancel`` withdraws the caller and raises WaitCancelled.
        """
        self._check_name(name)
        self._check_priority(priority)
        if timeout is not None and timeout < 0:
            raise InvalidArgument(f"timeout {timeout!r} is out of range: >= 0 or None")
        owner = self._grants.owner()  # its grant comes on this limiter's channel
        info = self._info_json(labels, priority, check_group(group))
        deadline = None if timeout is None else self._clock() + timeout
        waiter = Waiter(
            self._steps, name, owner, priority, info, deadline, cancel, clock=self._clock
        )
        token, sent_at = waiter.run()
        return self._granted(name, owner, token, info, sent_at, on_lost)

    @contextmanager
    def acquire(
        self,
        name: str,
        timeout: float | None = 300,
        priority: int = 0,
        labels: dict[str, Any] | None = None,
        on_lost: Callable[[Slot], None] | None = None,
        group: str = DEFAULT_GROUP,
    ) -> Iterator[Slot]:
        """Hold a slot for the ``with`` block; it is released however the block ends."""
        slot = self.wait_for_slot(name, timeout, priority, labels, on_lost, group=group)
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

    def timeout_error(self, waited: float) -> SlotTimeout:
        """Why no slot came within ``waited`` seconds, pointing the operator the right way:
        a restart grace is not a full cluster."""
        limit = self.current_limit()
        head = f"Could not acquire build slot after {waited:g}s"
        try:
            counts = self.counts()
        except RedisUnavailable:
            return SlotTimeout(f"{head}: Redis unreachable (max_concurrent_builds={limit}).")
        limit = counts.cluster_limit or limit
        if counts.grace_left > 0:
            return SlotTimeout(
                f"{head}: {grace_text(counts.grace_left)} ({counts.active}/{limit} slots "
                f"busy). {self.grace_hint[:1].upper()}{self.grace_hint[1:]}."
            )
        return SlotTimeout(
            f"{head}: {counts.active}/{limit} slots busy "
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
            self.current_limit(),
        )
        with _reply_of("RENEW"):
            lost = Reply(reply[0]) == Reply.LOST
            reregistered = not lost and _int(reply[1]) == 1
        if lost:
            self._mark_lost(slot)
            raise SlotLost(f"slot {name!r} was taken away (lease expired or force-released)")
        if reregistered:
            log.warning("slot %s re-registered after a Redis restart", name)
        slot.lease_deadline = sent_at + self.lease_ttl
        return slot

    def _mark_lost(self, slot: Slot) -> None:
        slot.lost.set()
        with self._lock:
            if self._held.get(slot.name) is slot:
                del self._held[slot.name]

    def _release_name(self, name: str, owner: str) -> Reply:
        """RELEASE for ``owner`` ('' = whoever holds or awaits the name)."""
        reply = self._run(self._release, name, owner, self.current_limit())
        with _reply_of("RELEASE"):
            return Reply(reply[0])

    def release(self, name: str) -> bool:
        """Give back a slot this process holds; False if it held none by that name."""
        with self._lock:
            slot = self._held.pop(name, None)
        if slot is None:
            return False
        with slot.lock:  # waits for a renewal in flight
            return self._release_name(name, slot.owner) == Reply.FREED

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
        return self._release_name(name, "") == Reply.FREED

    def clear_all(self) -> int:
        """Free every slot of the namespace; returns how many were held."""
        reply = self._run(self._clear, self.current_limit())
        with _reply_of("CLEAR"):
            return _int(reply[1])

    # -- reading -------------------------------------------------------------------

    def snapshot(self) -> tuple[list[SlotInfo], list[WaiterInfo]]:
        """Holders and every waiter (in queue order) read in one atomic step."""
        listing = self.listing()
        return listing.holders, listing.waiters

    def listing(self, rows: int | None = None) -> Listing:
        """Holders, the first ``rows`` waiters in queue order (None: all), and how many
        wait in all and in each group, in one atomic step that does not read the waiters
        it does not list: a status of a queue of 10 000 costs what one of 50 does."""
        if rows is not None:
            int_in_range("rows", rows, 1)
        reply = self._run(self._snapshot, rows or 0)
        with _reply_of("SNAPSHOT"):
            holders, waiters = list(reply[3]), list(reply[4])
            self._notes(reply[6:8])
            total = _int(reply[8])
            flat = list(reply[9])
            by_group = {text(flat[i]): _int(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
        slots = [
            SlotInfo(
                r.name,
                r.host,
                r.pid,
                r.token,
                r.at_ms / 1000,
                r.expiry_ms / 1000,
                r.owner,
                r.labels,
                r.group,
            )
            for r in self._records("holder", holders)
        ]
        places: dict[str, int] = {}
        queue = []
        for r in self._records("waiter", waiters):
            places[r.group] = places.get(r.group, 0) + 1
            queue.append(
                WaiterInfo(
                    r.name,
                    r.host,
                    r.pid,
                    r.priority,
                    places[r.group],
                    r.at_ms / 1000,
                    r.expiry_ms / 1000,
                    r.labels,
                    r.group,
                )
            )
        return Listing(slots, queue, max(total, len(queue)), by_group)

    def _records(self, kind: str, flat: list[Any]) -> Iterator[_Record]:
        """The records of SNAPSHOT's flat name, expiry, record triples; one that does not
        parse is skipped, a caller's JSON that does not is replaced by defaults, each said
        once."""
        for i in range(0, len(flat) - 2, 3):
            name = text(flat[i])
            try:
                yield self._record(kind, name, flat[i + 1], text(flat[i + 2]))
            except (ValueError, TypeError, OverflowError) as exc:
                self._bad.warn(
                    (kind, name),
                    "namespace %s: skipping %s %s: its record in Redis is malformed (%s)",
                    self.namespace,
                    kind,
                    shown(name),
                    exc,
                )

    def _record(self, kind: str, name: str, expiry: Any, record: str) -> _Record:
        parts = record.split(" ", 4)
        if len(parts) != 5:
            raise _Malformed(f"{shown(record)} is not 'owner token at lease json'")
        owner, token, at, _, raw = parts
        expiry_ms = float(expiry)
        if not math.isfinite(expiry_ms):
            raise _Malformed(f"lease expiry {shown(expiry)}")
        fields, odd = _caller_info(raw)
        if odd:
            self._bad.warn(
                (kind, name, "info"),
                "namespace %s: %s %s in Redis: %s; shown without it",
                self.namespace,
                kind,
                shown(name),
                odd,
            )
        return _Record(name, expiry_ms, owner, int(token), int(at), **fields)

    def _notes(self, notes: list[Any]) -> tuple[str | None, str | None]:
        """What a reader is told besides its answer: an invalid cluster limit found in
        Redis, and the last repair of data the scripts did not write. Each said once."""
        bad_limit, note = (_optional_text(n) for n in [*notes, None, None][:2])
        if bad_limit is not None:
            self._bad.warn(
                ("limit", bad_limit),
                "namespace %s: the cluster limit in Redis, %s, is not an integer from %d "
                "to %d; it is ignored and each caller obeys its own max_concurrent until "
                "a valid one is set",
                self.namespace,
                shown(bad_limit),
                LIMIT_MIN,
                LIMIT_MAX,
            )
        repaired = None
        if note is not None:
            at, _, what = note.partition(" ")
            when = (
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(at) / 1000))
                if at.isdigit() and len(at) <= 16
                else "?"
            )
            repaired = f"{printable(what)} (at {when})"
            self._bad.warn(
                ("repaired", note),
                "namespace %s: Redis held data reqpm did not write; repaired: %s",
                self.namespace,
                repaired,
            )
        return bad_limit, repaired

    def counts(self) -> Counts:
        """Holders, waiters, the cluster limit and the grace left, without listing anyone."""
        reply = self._run(self._counts)
        with _reply_of("COUNTS"):
            _, now, grace_until, active, waiting, limit = reply[:6]
            bad_limit, repaired = self._notes(reply[6:8])
            server = reply[8] if len(reply) > 8 and reply[8] else None
            return Counts(
                _int(active),
                _int(waiting),
                _optional_limit(limit),
                max(0.0, (_int(grace_until) - _int(now)) / 1000),
                bad_limit,
                repaired,
                text(server)[:40] if server is not None else None,
            )

    def get_slots(self) -> list[SlotInfo]:
        return self.snapshot()[0]

    def get_active_builds(self) -> list[str]:
        return [s.name for s in self.get_slots()]

    def get_active_count(self) -> int:
        return self.counts().active

    def get_waiting(self) -> list[WaiterInfo]:
        return self.snapshot()[1]

    def declare_no_survivors(self) -> None:
        """End the restart grace period now.

        After Redis restarts (or on a brand-new, empty Redis, which looks the same) the
        limiter grants nothing for one grace period so holders it forgot can re-register.
        Call this only when no process holds a slot Redis does not record: a private
        server this process just started, before it granted anything.
        """
        self._run(self._end_grace, self.current_limit())

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
        return self.counts().grace_left

    # -- the cluster-wide limit ------------------------------------------------------

    def set_cluster_limit(self, limit: int | None) -> int | None:
        """Make ``limit`` (``LIMIT_MIN``..``LIMIT_MAX``, the range of the
        max_concurrent_builds setting) the limit of every caller in the namespace (None:
        drop it, and each caller's own ``max_concurrent`` applies again). Returns the
        previous one.

        Without it each grant uses the granting caller's limit, and callers that disagree
        get whichever acts. A raised limit is served at once; a lowered one evicts nobody.
        """
        if limit is not None:
            int_in_range("limit", limit, LIMIT_MIN, LIMIT_MAX)
        reply = self._run(self._set_limit, limit or 0)
        with _reply_of("SET_LIMIT"):
            return _optional_limit(reply[1])

    def get_cluster_limit(self) -> int | None:
        return self.counts().cluster_limit

    # -- shares between groups ----------------------------------------------------------

    def set_share(self, group: str, change: ShareChange) -> tuple[Share, Share]:
        """Change ``group``'s cap and weight for every caller of the namespace, in one
        step; returns the share before and after. It applies to the next grant: a raised
        cap is served at once, a lowered one evicts nobody."""
        check_group(group)
        if change.max_concurrent is not None and change.max_concurrent != 0:
            int_in_range("max_concurrent", change.max_concurrent, LIMIT_MIN, LIMIT_MAX)
        if change.weight is not None:
            int_in_range("weight", change.weight, 1, WEIGHT_MAX)
        reply = self._run(
            self._set_share,
            group,
            "" if change.max_concurrent is None else change.max_concurrent,
            "" if change.weight is None else change.weight,
            self.current_limit(),
        )
        with _reply_of("SET_SHARE"):
            old_cap, old_weight, cap, weight = (_int(v) for v in reply[1:5])
        return Share(old_cap or None, old_weight), Share(cap or None, weight)

    def shares(self) -> dict[str, Share]:
        """Every group whose share is not the default. A value the scripts did not write
        is left out here (and dropped by the next grant that meets it), said once."""
        try:
            raw = self._redis.hgetall(self._keys.shares)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        found: dict[str, Share] = {}
        for key, value in raw.items():
            group, spec = text(key), text(value)
            share = _parse_share(spec)
            if _GROUP_RE.fullmatch(group) and share is not None:
                found[group] = share
            else:
                self._bad.warn(
                    ("share", group, spec),
                    "namespace %s: ignoring the share %s of group %s in Redis: not "
                    "'<max_concurrent> <weight>' in range",
                    self.namespace,
                    shown(spec),
                    shown(group),
                )
        return found


_SHARE_RE = re.compile(r"(0|[1-9][0-9]{0,2}) ([1-9][0-9]{0,2})")  # as SET_SHARE writes it


def _parse_share(spec: str) -> Share | None:
    match = _SHARE_RE.fullmatch(spec)
    if match is None:
        return None
    c, w = int(match[1]), int(match[2])
    if c > LIMIT_MAX or not 1 <= w <= WEIGHT_MAX:
        return None
    return Share(c or None, w)


class _Steps:
    """The limiter as a waiter sees it (``waiter.WaitSteps``): the few steps of a wait."""

    def __init__(self, limiter: BuildConcurrencyLimiter) -> None:
        self._lim = limiter
        self.lease_ttl = limiter.lease_ttl

    def attempt(self, name: str, owner: str, priority: int, info: str) -> Attempt:
        return self._lim._attempt(name, owner, priority, info, try_only=False)

    def withdraw(self, name: str, owner: str) -> None:
        self._lim._release_name(name, owner)

    def listen(self, name: str, owner: str) -> Pending:
        return self._lim._grants.register(name, owner)

    def unlisten(self, pending: Pending) -> None:
        self._lim._grants.unregister(pending)

    def timed_out(self, waited: float) -> SlotTimeout:
        return self._lim.timeout_error(waited)
