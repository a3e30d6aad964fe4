"""This host's view of the cluster: Redis health, the limit in force, host heartbeats.

The only place that decides "the limit in force". ``max_concurrent_builds`` is one value
for the whole cluster, kept in Redis; ``decide_limit`` is the policy (a pure function,
tested branch by branch) and ``Cluster`` carries it out against Redis and remembers what
this host last published in its own store, so a file edited while the daemon was
stopped is still recognised as this host's change at the next start.

The main loop calls ``check()`` (rate-limited, with backoff while Redis is down) and
``heartbeat()``; everything else only reads what they found, so a status request never
waits for Redis more than once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from reqpmd.backoff import Backoff
from reqpmd.checks import is_int
from reqpmd.config.schema import Settings, shown_setting
from reqpmd.config.transaction import Change
from reqpmd.errors import RedisUnavailable, disk_full
from reqpmd.quoting import shown
from reqpmd.slots import keys
from reqpmd.slots.connection import REDIS_ERRORS, serving, text, unavailable
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from reqpmd.slots.untrusted import WarnOnce, loads

log = logging.getLogger(__name__)

HEARTBEAT_EVERY = 5.0  # seconds between this host's heartbeats
# Seconds between Redis checks while it is healthy. The limit in force is enforced inside
# Redis (every script reads it), waiters and renewals find an outage on their own, so the
# check only refreshes what status shows and notices a failover: as often as the
# heartbeat, not more (at 1 000 hosts, checks every 2 s were 3/4 of Redis's load).
CHECK_EVERY = 5.0
PUBLISHED = "published_limit"  # the store key of the limit this host last published
NOT_CONNECTED = "not connected yet"


class Memory(Protocol):
    """Small facts this host keeps across restarts (the store's daemon_state)."""

    def get_state(self, key: str) -> str | None: ...
    def set_state(self, key: str, value: str) -> None: ...


@dataclass(frozen=True)
class LimitDecision:
    publish: bool  # write this host's value to Redis
    remember: bool  # record this host's value as the one it last published
    in_force: int
    warning: str | None = None


def decide_limit(
    mine: int,
    shared: int | None,
    last_published: str | None,
    changed_here: bool,
    in_force_before: int | None,
    namespace: str,
) -> LimitDecision:
    """Whose ``max_concurrent_builds`` applies.

    This host publishes its value when its admin changed it: through reqpmctl or a
    reload (``changed_here``), or an edited file found at start (it differs from what
    this host last published). Otherwise the cluster's value applies, and a differing
    file is reported once. A Redis without a value (new, or its data lost) gets ours.
    """
    if last_published is None and shared is not None and not changed_here:
        # this host's first start in a cluster that has a limit: join it; only a later
        # change of this host's file is published
        return LimitDecision(
            False, True, shared, _disagree(shared, mine, in_force_before, namespace)
        )
    publish = changed_here or shared is None or str(mine) != last_published
    if publish:
        warning = None
        if shared is not None and shared != mine:
            warning = (
                f"max_concurrent_builds is now {mine} on every host sharing namespace "
                f"{namespace} (was {shared})"
            )
        return LimitDecision(True, True, mine, warning)
    assert shared is not None
    return LimitDecision(False, False, shared, _disagree(shared, mine, in_force_before, namespace))


def _disagree(shared: int, mine: int, before: int | None, namespace: str) -> str | None:
    if shared in (mine, before):
        return None  # agreed, or already reported
    return (
        f"max_concurrent_builds is {shared} cluster-wide (set on a host sharing namespace "
        f"{namespace}); this host's config says {mine}; the cluster's value applies"
    )


class Cluster:
    def __init__(
        self,
        client: redis.Redis,
        limiter: BuildConcurrencyLimiter,
        settings: Callable[[], Settings],
        memory: Memory,
        embedded: RedisServer | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._limiter = limiter
        self._settings = settings
        self._memory = memory
        self._embedded = embedded
        self._clock = clock
        self._wall = wall
        self.ok = False
        self.detail = NOT_CONNECTED
        self.active: int | None = None  # slots held cluster-wide, at the last check
        self.grace_left = 0.0  # of a Redis restart grace, at the last check
        self.cluster_limit: int | None = None  # max_concurrent_builds as Redis has it
        # what Redis holds as the cluster limit when that is no valid limit (ignored then)
        self.cluster_limit_invalid: str | None = None
        self.repaired: str | None = None  # the last repair of malformed data in Redis
        # the server answering (its run_id) and, under Sentinel, its address; a change of
        # server seen while running (a failover, or a restart) and when
        self.server: str | None = None
        self.master: str | None = None
        self.server_changes = 0
        self.server_changed_at: float | None = None
        self._to_publish = False  # changed here while Redis was unreachable
        # the main loop's check and a settings change (a control thread) both sync the limit
        self._limit_lock = threading.Lock()
        self._next_check = 0.0
        self._next_heartbeat = 0.0
        # a check is one cheap script: at most 5 s between them keeps the time to notice a
        # Redis that is back short (builds wait for it) at no real cost to Redis
        self._backoff = Backoff(first=0.5, cap=5.0)
        self._namespace = settings().namespace  # restart-only
        self._hosts_key = keys.hosts_key(self._namespace)
        self._stats_key = keys.host_stats_key(self._namespace)
        self._stats_written: object = None  # the "at" of the figures last written
        self._bad = WarnOnce(log)  # malformed heartbeats and surprises, said once each

    @property
    def label(self) -> str:
        """Where Redis is, fit to show users (no password)."""
        if self._embedded is not None:
            return f"embedded ({self._embedded.url})"
        return shown_setting("redis_url", self._settings().redis_url)

    def limit(self) -> int:
        """The limit in force: the cluster's, or this host's until Redis has told us."""
        return self.cluster_limit or self._settings().max_concurrent_builds

    # -- the main loop's part ---------------------------------------------------------

    def check(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next_check:
            return
        embedded_down = self._embedded is not None and not self._embedded.alive()
        if embedded_down and not self._restart_embedded(now):
            return
        try:
            counts = self._limiter.counts()
            self.active, self.grace_left = counts.active, counts.grace_left
            self.cluster_limit_invalid = counts.cluster_limit_invalid
            self.repaired = counts.repaired
            self._note_server(counts.server, counts.grace_left)
            self._sync_limit(
                counts.cluster_limit,
                changed_here=self._to_publish,
                invalid=counts.cluster_limit_invalid is not None,
            )
        except RedisUnavailable as exc:
            self._down(str(exc), now)
            return
        except Exception as exc:  # the main loop's check must outlive any surprise
            self._bad.warn(("check", str(exc)), "checking Redis failed", level=logging.ERROR)
            self._down(f"unexpected error reading Redis: {exc}", now)
            return
        if not self.ok and self.detail != NOT_CONNECTED:
            log.info("Redis at %s reachable again; taking slots again", self.label)
        self.ok, self.detail = True, "ok"
        self._backoff.succeeded()
        self._next_check = now + CHECK_EVERY

    def _note_server(self, run_id: str | None, grace_left: float) -> None:
        """Say when another server answers than at the last check: a Sentinel failover
        (or a restart). The scripts saw it too and started the grace; this is for the
        operator, in the journal and in status."""
        if run_id is None:
            return
        master = serving(self._client, self._hosts_key)
        if self.server is not None and run_id != self.server and self._embedded is None:
            self.server_changes += 1
            self.server_changed_at = self._wall()
            log.warning(
                "Redis %sis another server now (run_id %s, was %s): a failover or a restart. "
                "Running builds keep their slots (they re-register); no new slot is granted "
                "for %.0f s, until every holder had its chance to",
                f"master {self.master} -> {master} " if master and master != self.master else "",
                run_id[:12],
                self.server[:12],
                grace_left,
            )
        self.server, self.master = run_id, master

    def _restart_embedded(self, now: float) -> bool:
        assert self._embedded is not None
        try:
            self._embedded.start()
        except (RuntimeError, OSError) as exc:
            self._down(f"embedded redis-server will not start: {exc}", now)
            return False
        try:
            # our private server: our own running builds are the only possible holders
            self._limiter.recover_private_server()
            log.warning(
                "embedded redis-server had stopped; restarted it and "
                "re-registered %d running build(s)",
                len(self._limiter.held()),
            )
        except RedisUnavailable as exc:
            log.warning(
                "embedded redis-server restarted, but re-registering builds "
                "failed (%s); no new slot for one lease",
                exc,
            )
        return True

    def _down(self, detail: str, now: float) -> None:
        if self.ok or self.detail == NOT_CONNECTED:
            log.warning(
                "Redis at %s unreachable (%s): running builds go on, submissions are "
                "queued, no new slot is taken until it is back",
                self.label,
                detail,
            )
        self.ok, self.detail = False, detail
        self.active = None
        self._next_check = now + self._backoff.failed()

    def _sync_limit(self, shared: int | None, changed_here: bool, invalid: bool = False) -> None:
        with self._limit_lock:
            self._sync_limit_locked(shared, changed_here or self._to_publish, invalid)

    def _sync_limit_locked(self, shared: int | None, changed_here: bool, invalid: bool) -> None:
        mine = self._settings().max_concurrent_builds
        if invalid and not changed_here:
            # Redis holds no valid limit, and the limiter ignores the one it holds: each
            # host obeys its own until an admin sets one. Not overwritten by itself, so
            # status can show what was found (the limiter logged it).
            self.cluster_limit = None
            return
        decision = decide_limit(
            mine,
            shared,
            self._memory.get_state(PUBLISHED),
            changed_here,
            self.cluster_limit,
            self._namespace,
        )
        if decision.publish:
            self._limiter.set_cluster_limit(mine)
        if decision.remember:
            try:
                self._memory.set_state(PUBLISHED, str(mine))
            except OSError as exc:
                if not disk_full(exc):
                    raise
                # only a memory across restarts: at worst the next start publishes again
                log.debug("could not remember the published limit: %s", exc)
        if decision.warning:
            log.warning("%s", decision.warning)
        self._to_publish = False
        self.cluster_limit = decision.in_force

    def on_settings_change(self, settings: Settings, change: Change) -> None:
        """A subscriber of the settings transaction: tell the other hosts now."""
        self._next_heartbeat = 0.0
        if "max_concurrent_builds" not in change.diff:
            return
        self._to_publish = True
        try:
            self._sync_limit(self._limiter.get_cluster_limit(), changed_here=True)
            self.cluster_limit_invalid = None
        except RedisUnavailable:
            log.warning("max_concurrent_builds will reach the other hosts when Redis is back")

    def next_due(self) -> float:
        """Monotonic time of the next check or heartbeat (the idle main loop sleeps
        until then)."""
        return min(self._next_check, self._next_heartbeat)

    # -- hosts ------------------------------------------------------------------------------

    def heartbeat(
        self,
        record: Callable[[], dict[str, Any]],
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """Publish this host's record (from ``record()``) when one is due, and its figures
        (``stats()``, with their "at") when they were recomputed since they were last
        written: once a minute at most, not with every heartbeat."""
        now = self._clock()
        if not self.ok or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_EVERY
        data = json.dumps({**record(), "last_seen": self._wall()})
        host_id = self._settings().host_id
        with contextlib.suppress(*REDIS_ERRORS):  # the next check reports Redis down
            self._hset(self._hosts_key, host_id, data, "host heartbeats")
            figures = stats() if stats is not None else {}
            if figures and figures.get("at") != self._stats_written:
                self._hset(self._stats_key, host_id, json.dumps(figures), "host figures")
                self._stats_written = figures.get("at")

    def _hset(self, key: str, field: str, data: str, what: str) -> None:
        try:
            self._client.hset(key, field, data)
        except redis.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            # not a hash (anyone can write anything): nothing in it could be read; start
            # it afresh, the other hosts' entries are back within their next write
            log.warning("%s is not a hash of %s; replaced it with a new one", key, what)
            self._client.delete(key)
            self._client.hset(key, field, data)

    def hosts(self) -> list[dict[str, Any]]:
        """Every daemon sharing the namespace, with how long ago it was heard of. A record
        that is not a heartbeat of reqpmd is skipped (and said once)."""
        try:
            raw = self._client.hgetall(self._hosts_key)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        now = self._wall()
        hosts = []
        for key, value in raw.items():
            try:
                h = _heartbeat(value)
            except ValueError as exc:
                field = text(key)
                self._bad.warn(
                    ("host", field),
                    "skipping host %s in %s: not a heartbeat of reqpmd (%s)",
                    shown(field),
                    self._hosts_key,
                    exc,
                )
                continue
            h["age"] = max(0.0, now - h["last_seen"])
            h["stale"] = h["age"] > 3 * HEARTBEAT_EVERY
            hosts.append(h)
        return sorted(hosts, key=lambda h: str(h["host_id"]))

    def host_stats(self) -> dict[str, dict[str, Any]]:
        """Each host's figures for the standard windows, as it last wrote them (checked
        by whoever merges them: ``analytics.valid_aggregate``). An entry that is no JSON
        object is skipped (and said once)."""
        try:
            raw = self._client.hgetall(self._stats_key)
        except REDIS_ERRORS as exc:
            raise unavailable(exc) from exc
        figures = {}
        for key, value in raw.items():
            field = text(key)
            try:
                if len(value) > MAX_HEARTBEAT_BYTES:
                    raise ValueError(f"{len(value)} bytes, over {MAX_HEARTBEAT_BYTES}")
                parsed = loads(value)
                if not isinstance(parsed, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                self._bad.warn(
                    ("stats", field),
                    "skipping the figures of host %s in %s: %s",
                    shown(field),
                    self._stats_key,
                    exc,
                )
                continue
            figures[field] = parsed
        return figures


def _finite(v: Any) -> bool:
    """A number a reader can do arithmetic with (a time): not bool, NaN, inf or 10**400."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    try:
        return math.isfinite(v) and abs(v) < 1e12
    except OverflowError:
        return False


# The fields of a heartbeat that reqpmctl reads, and the check of each value. A record
# without host_id or last_seen is no heartbeat; the others are checked when present.
# what a heartbeat may weigh: its reply to `reqpmctl hosts` and `top` must stay small
MAX_HEARTBEAT_BYTES = 16 * 1024
_HEARTBEAT_FIELDS: dict[str, Callable[[Any], bool]] = {
    "host_id": lambda v: isinstance(v, str),
    "last_seen": lambda v: _finite(v),
    "building": is_int,
    "waiting": is_int,
    "queued": is_int,
    "max_concurrent_builds": is_int,
    "host_max_builds": is_int,
    "redis": lambda v: (
        isinstance(v, dict)
        and all(
            v.get(k) is None or (isinstance(v.get(k), str) and len(v[k]) <= 64)
            for k in ("master", "server")
        )
        and (v.get("changed_at") is None or _finite(v.get("changed_at")))
    ),
    "gates": lambda v: (
        isinstance(v, list)
        and all(
            isinstance(g, dict)
            and isinstance(g.get("name"), str)
            and isinstance(g.get("open"), bool)
            for g in v
        )
    ),
}
_HEARTBEAT_REQUIRED = ("host_id", "last_seen")


def _heartbeat(value: Any) -> dict[str, Any]:
    """A heartbeat read from Redis, or ValueError saying what is wrong with it."""
    if len(value) > MAX_HEARTBEAT_BYTES:  # ours are a few KB: one this big is not ours
        raise ValueError(f"{len(value)} bytes, over {MAX_HEARTBEAT_BYTES}")
    h = loads(value)
    if not isinstance(h, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in _HEARTBEAT_REQUIRED if k not in h]
    bad = [k for k, ok in _HEARTBEAT_FIELDS.items() if k in h and not ok(h[k])]
    if missing or bad:
        raise ValueError(f"missing or malformed: {', '.join(missing + bad)}")
    return h
