"""The ``stats`` and ``metrics`` operations (any member of the socket group)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from reqpmd.builds.analytics import (
    BY,
    WINDOWS,
    aggregates,
    merged,
    valid_aggregate,
    window_stats,
)
from reqpmd.builds.store import Store
from reqpmd.cluster import Cluster
from reqpmd.config.schema import Settings
from reqpmd.errors import InvalidArgument, RedisUnavailable
from reqpmd.quoting import shown

WINDOW_SLACK = 0.05  # --cluster: a --since within 5% of 1h, 24h or 7d names that window


class StatsOps:
    def __init__(
        self,
        store: Store,
        cluster: Cluster,
        settings: Callable[[], Settings],
        metrics_text: Callable[[], str],
    ) -> None:
        self.store = store
        self.cluster = cluster
        self.settings = settings
        self.metrics_text = metrics_text

    def metrics(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"text": self.metrics_text()}

    def stats(self, args: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        since = args.get("since", now - 86400)
        if (
            not isinstance(since, int | float)
            or isinstance(since, bool)
            or not (math.isfinite(since) and 0 <= since < now)
        ):
            raise InvalidArgument(f"since must be a time in the past (seconds), not {shown(since)}")
        by = args.get("by")
        if by is not None and by not in BY:
            raise InvalidArgument(f"by {shown(by)} is not one of {', '.join(BY)}")
        host = self.settings().host_id
        capacity = self.cluster.limit()
        if args.get("cluster") is not True:
            return window_stats(self.store, float(since), now, capacity, by, host)
        return self._cluster(now - float(since), by, host, capacity, now)

    def _cluster(
        self, span: float, by: str | None, host: str, capacity: int, now: float
    ) -> dict[str, Any]:
        window = next((w for w, s in WINDOWS.items() if abs(span - s) <= WINDOW_SLACK * s), None)
        if window is None:
            raise InvalidArgument("--cluster works with --since 1h, 24h or 7d")
        if by not in (None, "host"):
            raise InvalidArgument("--cluster groups by host only (the others' rows stay theirs)")
        parts = {host: valid_aggregate(aggregates(self.store, now), window)}  # fresh: ours
        stale: list[str] = []
        try:
            figures = self.cluster.host_stats()
            for h in self.cluster.hosts():
                peer = str(h["host_id"])
                if peer != host:  # a stale host's last figures are still its history
                    # an older release sent its figures inside the heartbeat
                    parts[peer] = valid_aggregate(figures.get(peer, h.get("stats")), window)
                    if h.get("stale"):
                        stale.append(peer)
        except RedisUnavailable:
            pass  # this host's own figures, and hosts says why the others are missing
        good = {name: p for name, p in parts.items() if p is not None}
        out: dict[str, Any] = {
            "since": now - WINDOWS[window],
            "until": now,
            "capacity": capacity,
            "by": by,
            "hosts": sorted(good),
            "hosts_without_figures": sorted(set(parts) - set(good)),
            "stale_hosts": sorted(stale),  # figures as of their last heartbeat
            "all": merged(list(good.values()), window, now, capacity),
        }
        if by == "host":
            out["groups"] = {n: merged([p], window, now, capacity) for n, p in sorted(good.items())}
        return out
