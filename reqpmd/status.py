"""What is shown: the status reply, the STATUS= line, this host's heartbeat record, and
the JSON shapes of builds and slots. It reads the services; it changes nothing."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from reqpmd import __version__
from reqpmd.builds.analytics import aggregates
from reqpmd.builds.gates import describe_closed, load_per_cpu
from reqpmd.builds.scheduler import InFlight, Scheduler
from reqpmd.builds.states import State
from reqpmd.builds.store import Build, Store
from reqpmd.cluster import Cluster
from reqpmd.config.schema import Settings
from reqpmd.errors import RedisUnavailable
from reqpmd.maintenance.job import Maintenance
from reqpmd.projects.syncer import ProjectSyncer
from reqpmd.quoting import printable
from reqpmd.repos.publisher import Publisher
from reqpmd.slots.limiter import BuildConcurrencyLimiter, Share, SlotInfo, grace_text
from reqpmd.slots.scripts import LIMIT_MAX, LIMIT_MIN

_INTERNAL = ("pid", "pid_started")  # where mock runs is the daemon's business
AGGREGATES_EVERY = 60.0  # seconds between recomputations of this host's stats


def build_json(b: Build, store: Store) -> dict[str, Any]:
    files = store.files(b.id)
    out = {k: v for k, v in b.as_dict().items() if k not in _INTERNAL}
    out["state"] = str(b.state)
    out["result_dir"] = str(files.result)
    out["log_path"] = str(files.log)
    return out


ROWS = 50  # waiters a status or slot listing shows unless asked for all


def group_rows(
    holders: list[SlotInfo], waiting: dict[str, int], shares: dict[str, Share]
) -> list[dict[str, Any]]:
    """Each group (project, or ~user) that holds, waits or has a share of its own: its
    holders, waiters, cap (None: none) and weight. Busiest first."""
    held = Counter(s.group for s in holders)
    rows = [
        {
            "group": g,
            "holders": held[g],
            "waiting": waiting.get(g, 0),
            "max_concurrent": shares.get(g, Share()).max_concurrent,
            "weight": shares.get(g, Share()).weight,
        }
        for g in set(held) | set(waiting) | set(shares)
    ]
    return sorted(rows, key=lambda r: (-r["holders"], -r["waiting"], r["group"]))


def slot_listing(
    lim: BuildConcurrencyLimiter, max_concurrent: int, rows: int | None = ROWS
) -> dict[str, Any]:
    """Holders, the first ``rows`` waiters (None: all), and every group, as the control
    socket shows them (ages in seconds); ``waiting_total`` counts every waiter."""
    listing = lim.listing(rows)
    holders, waiters = listing.holders, listing.waiters
    shares = lim.shares()
    now = time.time()
    return {
        "max_concurrent": max_concurrent,
        "waiting_total": listing.waiting,
        "groups": group_rows(holders, listing.waiting_by_group, shares),
        "holders": [
            {
                "name": s.name,
                "group": s.group,
                "host": s.host,
                "pid": s.pid,
                "token": s.token,
                "build": s.labels.get("build_id"),
                "acquired_at": s.acquired_at,
                "age": max(0.0, now - s.acquired_at),
                "lease_expires_at": s.lease_expires_at,
                "lease_left": max(0.0, s.lease_expires_at - now),
            }
            for s in holders
        ],
        "waiting": [
            {
                "name": w.name,
                "group": w.group,
                "host": w.host,
                "priority": w.priority,
                "position": w.position,
                "enqueued_at": w.enqueued_at,
                "build": w.labels.get("build_id"),
            }
            for w in waiters
        ],
    }


def invalid_limit_text(value: str) -> str:
    """Why the limit in Redis is not obeyed, and how to set a valid one."""
    return (
        f"the cluster limit in Redis, {printable(repr(value), 80)}, is not an integer from "
        f"{LIMIT_MIN} to {LIMIT_MAX} and is ignored: each host obeys its own "
        "max_concurrent_builds until 'reqpmctl settings set max_concurrent_builds=N' sets one"
    )


class Status:
    def __init__(
        self,
        settings: Callable[[], Settings],
        cluster: Cluster,
        scheduler: Scheduler,
        store: Store,
        limiter: BuildConcurrencyLimiter,
        publisher: Publisher,
        syncer: ProjectSyncer,
        maintenance: Maintenance,
    ) -> None:
        self._maintenance = maintenance
        self._agg: tuple[float, dict[str, Any]] | None = None
        self._agg_lock = threading.Lock()
        self._agg_dirty = False
        self._agg_running = False
        # set by the daemon: why /metrics is not served, if it is not
        self.metrics_problem: Callable[[], str | None] = lambda: None
        self._settings = settings
        self._publisher = publisher
        self._syncer = syncer
        self._cluster = cluster
        self._scheduler = scheduler
        self._store = store
        self._limiter = limiter

    def line(
        self,
        flight: InFlight | None = None,
        queued: int | None = None,
        grace_left: float | None = None,
    ) -> str:
        """The one-line summary (STATUS=); ``status()`` passes what it has already read."""
        flight = flight or self._scheduler.in_flight()
        queued = self._store.count(State.QUEUED) if queued is None else queued
        grace_left = self._cluster.grace_left if grace_left is None else grace_left
        here = f"{flight.building} building here, {queued} queued"
        c = self._cluster
        if not c.ok:
            return f"waiting for Redis at {c.label}: {c.detail}; {here}"
        parts = [f"{c.active}/{c.limit()} slots busy cluster-wide, {here}"]
        if c.cluster_limit_invalid is not None:
            parts.insert(0, invalid_limit_text(c.cluster_limit_invalid))
        if grace_left > 0:
            parts.insert(0, grace_text(grace_left))
        failing = self._publisher.problem()
        if failing:
            parts.append(failing)
        metrics = self.metrics_problem()
        if metrics:
            parts.append(metrics)
        projects = self._syncer.failing()
        if projects:
            name = min(projects)
            more = f" (and {len(projects) - 1} more)" if len(projects) > 1 else ""
            parts.append(f"project {name} sync failing: {projects[name]}{more}")
        shut = describe_closed(self._scheduler.last_gates)
        if shut:
            parts.insert(0, self._maintenance.shortage or shut)
        if self._scheduler.write_error:
            parts.insert(0, self._scheduler.write_error)
        recovering = len(self._scheduler.recovering)
        if recovering:
            parts.insert(0, f"recovering {recovering} build(s) an earlier instance left running")
        return "; ".join(parts)

    def status(self, rows: int | None = ROWS) -> dict[str, Any]:
        """``rows``: waiters listed (None: all); every one is counted."""
        s, c = self._settings(), self._cluster
        flight = self._scheduler.in_flight()
        queued = self._store.count(State.QUEUED)
        grace_left = 0.0
        if c.ok:
            # read now, not at the last check: an admin may have just ended the grace
            with contextlib.suppress(RedisUnavailable):
                grace_left = self._limiter.counts().grace_left
        result: dict[str, Any] = {
            "host_id": s.host_id,
            "version": __version__,
            "max_concurrent": c.limit(),
            "configured_limit": s.max_concurrent_builds,
            "active_count": None,
            "active_builds": [],
            "waiting": [],
            "waiting_total": None,
            "groups": [],
            "queued": queued,
            "building_here": flight.building,
            "waiting_here": flight.waiting,
            "scheduler_ticks": self._scheduler.ticks,
            "recovering": sorted(self._scheduler.recovering),
            "write_error": self._scheduler.write_error,
            "gates": [g.__dict__ for g in self._scheduler.last_gates],
            "redis": {
                "url": c.label,
                "ok": c.ok,
                "detail": c.detail,
                "repaired": c.repaired,
                "master": c.master,  # under Sentinel: the master's address now
                "server": c.server,  # the run_id of the server answering
                "server_changes": c.server_changes,  # failovers or restarts seen
                "server_changed_at": c.server_changed_at,
            },
            # what Redis holds as the cluster limit when it is not a valid one (ignored)
            "cluster_limit_invalid": c.cluster_limit_invalid,
            "restart_grace_left": grace_left,
            "restart_grace": (
                f"{grace_text(grace_left)}; {self._limiter.grace_hint}" if grace_left else None
            ),
            "summary": self.line(flight, queued, grace_left),
            "publish": self._publisher.summary(),
            "projects": self._syncer.summary(),
            "cleanup": self._cleanup(),
            "metrics_problem": self.metrics_problem(),
            "auto_scale": self._auto_scale(),
        }
        if c.ok:
            try:
                listing = slot_listing(self._limiter, c.limit(), rows)
                result["active_builds"] = listing["holders"]
                result["waiting"] = listing["waiting"]
                result["waiting_total"] = listing["waiting_total"]
                result["groups"] = listing["groups"]
                result["active_count"] = len(listing["holders"])
            except RedisUnavailable as exc:
                result["redis"] = {**result["redis"], "ok": False, "detail": str(exc)}
        return result

    def _cleanup(self) -> dict[str, Any]:
        last = self._maintenance.last
        return {
            "last_at": last["at"] if last else None,
            "last_cleaned": len(last["cleaned"]) if last else None,
            "last_bytes": last["bytes"] if last else None,
            "last_roots_scrubbed": len(last["orphaned_roots"]["scrubbed"]) if last else None,
            "shortage": self._maintenance.shortage,
        }

    def _auto_scale(self) -> dict[str, Any] | None:
        """This host's auto-scaled cap and why it last moved, while auto_scale is on."""
        scaler = self._scheduler.autoscaler
        if not self._settings().auto_scale or scaler is None:
            return None
        return {"cap": scaler.current, "why": scaler.why}

    def aggregates(self) -> dict[str, Any]:
        """This host's stats for the standard windows, as last computed: the heartbeat
        writes them to Redis when they changed (for `reqpmctl stats --cluster` on any
        host), so they are recomputed in a thread of their own once a minute, or 10 s
        after a build ended, and the main loop never waits for the query."""
        now = time.monotonic()
        with self._agg_lock:
            cached = self._agg
            age = None if cached is None else now - cached[0]
            due = age is None or age >= AGGREGATES_EVERY or (self._agg_dirty and age >= 10.0)
            start = due and not self._agg_running
            if start:
                self._agg_running = True
                self._agg_dirty = False
        if start:
            threading.Thread(target=self._recompute, name="aggregates", daemon=True).start()
        return cached[1] if cached is not None else {}

    def _recompute(self) -> None:
        try:
            result = aggregates(self._store, time.time())
            with self._agg_lock:
                self._agg = (time.monotonic(), result)
        except Exception:  # a figure that cannot be read now is tried again later
            logging.getLogger(__name__).exception("this host's stats could not be computed")
        finally:
            with self._agg_lock:
                self._agg_running = False

    def build_ended(self) -> None:
        """A build ended: the next heartbeat carries fresh figures (10 s apart at most)."""
        self._agg_dirty = True

    def host_record(self) -> dict[str, Any]:
        """What this host tells the others with its heartbeat (``reqpmctl hosts``)."""
        s, flight = self._settings(), self._scheduler.in_flight()
        return {
            "host_id": s.host_id,
            "version": __version__,
            "building": flight.building,
            "waiting": flight.waiting,
            "queued": self._store.count(State.QUEUED),
            "max_concurrent_builds": s.max_concurrent_builds,
            "host_max_builds": s.host_max_builds,
            "gates": [g.__dict__ for g in self._scheduler.last_gates],
            "load": load_per_cpu(),
            "auto_scale": self._auto_scale(),
            # which Redis server this host talks to, and when it last saw it change
            "redis": {
                "master": self._cluster.master,
                "server": (self._cluster.server or "")[:12] or None,
                "changed_at": self._cluster.server_changed_at,
            },
        }
