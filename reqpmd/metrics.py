"""Prometheus metrics: ``reqpmctl metrics`` and, with ``metrics_listen``, ``/metrics``.

Counters and histograms are this daemon's own, counted as builds end and publishes
fail: they start from zero at each start (a reset Prometheus handles) and never go
down while the daemon runs. Gauges are read at each scrape from the services.

Which gauges are cluster-wide and which per host: ``reqpm_slots_busy``,
``reqpm_slots_limit``, ``reqpm_slot_waiters`` and the ``reqpm_project_*`` gauges describe
the one cluster (every host exports the same value, without a host label: aggregate them
with max()); the others carry ``host`` and describe that host alone.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reqpmd.builds.store import Build
from reqpmd.config.schema import LISTEN_RE
from reqpmd.errors import RedisUnavailable

log = logging.getLogger(__name__)

# builds take seconds (a failed dependency) to many hours (a compiler, a kernel)
DURATION_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800, 86400)
WAIT_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class Metrics:
    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        hosts: Callable[[], list[dict[str, Any]]],
        build_timeout: Callable[[], float],
        host: str,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.host = host
        self.builds = Counter(
            "reqpm_builds",
            "Builds that ended on this host, by end state and chroot",
            ["state", "chroot"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "reqpm_build_duration_seconds",
            "Time from mock's start to the build's end, of builds that ran",
            ["chroot"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.wait = Histogram(
            "reqpm_slot_wait_seconds",
            "Time builds of this host waited for a cluster slot",
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "reqpm_publish_failures",
            "Publishes of succeeded builds into a repository that failed (retried)",
            ["chroot"],
            registry=self.registry,
        )
        self.registry.register(_Gauges(status, hosts, build_timeout, host))
        self.listening: str | None = None  # where /metrics is served, if it is
        self.listen_error: str | None = None

    def build_ended(self, build: Build) -> None:
        self.builds.labels(str(build.state), build.chroot).inc()
        if build.started_at is not None and build.finished_at is not None:
            self.duration.labels(build.chroot).observe(
                max(0.0, build.finished_at - build.started_at)
            )
            if build.waiting_at is not None:
                self.wait.observe(max(0.0, build.started_at - build.waiting_at))

    def publish_failed(self, chroot: str) -> None:
        self.publish_failures.labels(chroot).inc()

    def text(self) -> str:
        return generate_latest(self.registry).decode()

    def serve(self, listen: str) -> None:
        """Serve /metrics on ``listen`` (host:port). A port that cannot be bound is logged
        and shown in status; the daemon goes on without it."""
        match = LISTEN_RE.fullmatch(listen)
        if match is None or match["port"] is None:  # the setting's check refuses these
            self.listen_error = f"metrics_listen {listen!r} is not host:port"
            return
        host = match["host"].strip("[]")
        try:
            server = _make_server(host, int(match["port"]), make_wsgi_app(self.registry))
        except OSError as exc:
            self.listen_error = f"cannot serve metrics on {listen}: {exc.strerror or exc}"
            log.error("%s; reqpmd runs on without its /metrics endpoint", self.listen_error)
            return
        # serve_forever's poll_interval only paces its checks for shutdown(), which the
        # daemon never calls: the default 0.5 s would wake the thread twice a second
        threading.Thread(
            target=server.serve_forever, args=(3600.0,), name="metrics-http", daemon=True
        ).start()
        self.listening = listen
        bound = server.server_address
        log.info("serving Prometheus metrics at http://%s/metrics (bound to %s)", listen, bound)


class _Gauges(Collector):
    """Read at each scrape: what status and the heartbeats say now."""

    def __init__(
        self,
        status: Callable[[], dict[str, Any]],
        hosts: Callable[[], list[dict[str, Any]]],
        build_timeout: Callable[[], float],
        host: str,
    ) -> None:
        self.status = status
        self.hosts = hosts
        self.build_timeout = build_timeout
        self.host = host

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # unchecked: the families depend on what status holds

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.status()
        yield _gauge(
            "reqpm_slots_limit", "The cluster's limit of builds at once", st["max_concurrent"]
        )
        if st.get("active_count") is not None:
            yield _gauge("reqpm_slots_busy", "Slots held in the cluster", st["active_count"])
            yield _gauge(
                "reqpm_slot_waiters",
                "Builds waiting for a slot in the cluster",
                st["waiting_total"],
            )
            yield from _project_gauges(st.get("groups") or [])
            ages = [a["age"] for a in st["active_builds"]]
            yield _gauge(
                "reqpm_slot_oldest_age_seconds",
                "Age of the longest-held slot in the cluster (0 when none is held)",
                max(ages, default=0.0),
            )
        per_host = [
            (
                "reqpm_redis_up",
                "1 while Redis answers this host",
                1.0 if st["redis"]["ok"] else 0.0,
            ),
            ("reqpm_queue_length", "Builds queued on this host", st["queued"]),
            ("reqpm_builds_running", "Builds running on this host", st["building_here"]),
            (
                "reqpm_publish_pending",
                "Succeeded builds of this host not yet in their repository",
                st["publish"]["pending"] + st["publish"]["failed"],
            ),
            (
                "reqpm_build_timeout_seconds",
                "build_timeout_minutes of this host (0: none)",
                self.build_timeout(),
            ),
        ]
        for name, doc, value in per_host:
            family = GaugeMetricFamily(name, doc, labels=["host"])
            family.add_metric([self.host], value)
            yield family
        gates = GaugeMetricFamily(
            "reqpm_gate_open", "1 while the gate lets builds start", labels=["host", "gate"]
        )
        for g in st["gates"]:
            gates.add_metric([self.host, g["name"]], 1.0 if g["open"] else 0.0)
        yield gates
        seen = GaugeMetricFamily(
            "reqpm_host_last_seen_timestamp_seconds",
            "When each host sharing the Redis namespace last sent its heartbeat",
            labels=["peer"],
        )
        try:
            hosts = self.hosts()
        except RedisUnavailable:
            hosts = []  # reqpm_redis_up says why
        latest: dict[str, float] = {}
        for h in hosts:  # one series per peer, whatever Redis holds
            peer = str(h["host_id"])
            latest[peer] = max(latest.get(peer, 0.0), float(h["last_seen"]))
        for peer, when in sorted(latest.items()):
            seen.add_metric([peer], when)
        yield seen


def _project_gauges(groups: list[dict[str, Any]]) -> Iterator[GaugeMetricFamily]:
    """Cluster-wide, per project (or ~user): one series per group that holds, waits or has
    a share of its own, so the number of series follows the farm's projects."""
    held = GaugeMetricFamily(
        "reqpm_project_slots_busy", "Slots held in the cluster by a project", labels=["project"]
    )
    waiting = GaugeMetricFamily(
        "reqpm_project_slot_waiters",
        "Builds of a project waiting for a slot in the cluster",
        labels=["project"],
    )
    cap = GaugeMetricFamily(
        "reqpm_project_max_concurrent",
        "A project's cap of slots (only projects with one)",
        labels=["project"],
    )
    for g in groups:
        held.add_metric([g["group"]], g["holders"])
        waiting.add_metric([g["group"]], g["waiting"])
        if g["max_concurrent"] is not None:
            cap.add_metric([g["group"]], g["max_concurrent"])
    yield from (held, waiting, cap)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


# the endpoint has no authentication: bounded, so a scanner cannot pile up threads
MAX_CONNECTIONS = 16
CONNECTION_TIMEOUT = 10.0  # seconds a scraper may take to send its request


class _Handler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news for the journal


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: int) -> None:
        self.address_family = family
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # over the cap: closed at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def _make_server(host: str, port: int, app: Any) -> _Server:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = _Server((host, port), family)
    server.set_app(app)
    return server
