"""reqpmd: wiring, signals and the main loop; the work is done by the services.

The main thread owns the loop: signals only set flags and wake it; each pass it checks
Redis (the cluster), drives the scheduler, publishes this host's heartbeat, keeps the
systemd STATUS= line current and pets the watchdog only while it is itself healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import redis

from reqpmd import __version__
from reqpmd.builds.autoscale import AutoScaler
from reqpmd.builds.gates import Gates, disk_shortage
from reqpmd.builds.guard import LeaseGuard
from reqpmd.builds.layout import StateLayout
from reqpmd.builds.process import Runner, Stopper, popen_runner
from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.store import Build, Store
from reqpmd.cluster import Cluster
from reqpmd.config.parse import load
from reqpmd.config.schema import DEFAULT_CONFIG, Settings, SettingsInvalid
from reqpmd.config.transaction import Change, SettingsService
from reqpmd.control.operations import Operations
from reqpmd.control.projects import ProjectOps
from reqpmd.control.repositories import RepositoryOps
from reqpmd.control.server import ControlServer, bind_socket
from reqpmd.control.stats import StatsOps
from reqpmd.errors import RedisUnavailable
from reqpmd.live import Farm, Live
from reqpmd.maintenance.job import Maintenance
from reqpmd.maintenance.orphans import Orphans
from reqpmd.maintenance.retention import Retention
from reqpmd.metrics import Metrics
from reqpmd.projects.registry import Projects
from reqpmd.projects.syncer import ProjectSyncer
from reqpmd.repos.publisher import Publisher
from reqpmd.slots.connection import credentials, open_redis
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from reqpmd.status import Status
from reqpmd.systemd import Notifier, listen_fds, setup_logging

log = logging.getLogger("reqpmd")

TICK = 0.5  # seconds between main-loop passes while builds are queued, waiting or running
# at most this long between passes while there is nothing to schedule: the next Redis
# check or heartbeat decides (a submission, a settings change or a signal wakes the loop)
IDLE_TICK = 5.0
# seconds a metadata run in progress gets to finish at stop; one cut off leaves the old
# revision served, and the next start publishes what was left pending
PUBLISHER_STOP = 30.0
GRACE_HINT = (
    "if no reqpmd can still be running a build it started before (a new Redis, or every "
    "host restarted), end it now with 'reqpmctl slots end-grace --yes'"
)


class Daemon:
    def __init__(
        self,
        config_path: Path,
        initial: Settings,
        runner: Runner = popen_runner,
        gates: Gates | None = None,
    ) -> None:
        self.config_path = config_path
        self.initial = initial
        self.runner = runner
        self.gates = gates or Gates()
        self.notifier = Notifier()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False

    def wake(self) -> None:
        self._wake.set()

    # -- wiring ------------------------------------------------------------------------

    def _redis(self, s: Settings) -> tuple[redis.Redis, RedisServer | None]:
        if s.redis_url == "embedded":
            server = RedisServer(StateLayout(s.state_dir).redis, persist=True)
            server.start()
            return server.client(), server
        return open_redis(s.redis_url, credentials(s)), None

    def run(self) -> int:
        s = self.initial
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        s.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.store = Store(s.state_dir)
        except sqlite3.Error as exc:  # said in one line; systemd starts it again
            raise RuntimeError(
                f"cannot open the build queue in {s.state_dir}: {exc} (is it full or read-only?)"
            ) from exc
        self.settings = SettingsService(self.config_path, s, audit=self.store)
        exposed = self.settings.exposure()
        if exposed:
            log.warning("%s", exposed)
        current = self.settings.current
        client, self.redis_server = self._redis(s)
        self.limiter = BuildConcurrencyLimiter(
            client,
            max_concurrent=lambda: current().max_concurrent_builds,
            namespace=s.namespace,
            lease_ttl=s.slot_lease_seconds,
            host=s.host_id,
            grace_hint=GRACE_HINT,
        )
        if self.redis_server is not None:
            # Our private server: nobody else can hold a slot it forgot.
            try:
                self.limiter.declare_no_survivors()
            except RedisUnavailable as exc:  # the grace then ends by itself, in one lease
                log.warning("could not end the restart grace of the embedded Redis: %s", exc)
        self.cluster = Cluster(client, self.limiter, current, self.store, self.redis_server)
        self.metrics = Metrics(
            lambda: self.status.status(),
            lambda: self.cluster.hosts(),
            lambda: current().build_timeout_minutes * 60,
            s.host_id,
        )
        self.publisher = Publisher(self.store, current, on_failure=self.metrics.publish_failed)
        self.guard = LeaseGuard(lambda: current().cancel_grace_seconds)
        self.scheduler = Scheduler(
            self.store,
            self.limiter,
            current,
            self.runner,
            self.gates,
            on_succeeded=self.publisher.wake,
            on_end=self._build_ended,
            autoscaler=AutoScaler(current),
            ceiling=lambda: self.cluster.limit(),
            guard=self.guard,
        )
        self.projects = Projects(self.store)
        self.syncer = ProjectSyncer(
            self.store, self.projects, self.scheduler, current, wake_scheduler=self.wake
        )
        self.maintenance = Maintenance(
            Retention(self.store, self.publisher, current),
            Orphans(self.scheduler, self.limiter, current, self.runner),
            current,
            disk_short=lambda: disk_shortage(self.scheduler.last_gates),
        )
        self.status = Status(
            current,
            self.cluster,
            self.scheduler,
            self.store,
            self.limiter,
            self.publisher,
            self.syncer,
            self.maintenance,
        )
        self.settings.subscribe(self.cluster.on_settings_change)
        self.settings.subscribe(self._on_settings_change)
        self.settings.subscribe(lambda settings, change: self.publisher.wake())
        self.settings.subscribe(lambda settings, change: self.syncer.wake())
        inherited = listen_fds()
        sock = inherited[0] if inherited else bind_socket(s.socket_path, s.socket_group)
        # reqpmctl top's view: built here in the main loop, once a second while watched
        self.live = Live(Farm(self.status, self.cluster, self.store).snapshot, wake=self.wake)
        if s.metrics_listen not in ("", "off"):
            self.metrics.serve(s.metrics_listen)
        self.status.metrics_problem = lambda: self.metrics.listen_error
        # Know the state of Redis before the first client (maybe the one whose connection
        # started us through socket activation) asks for it.
        self.cluster.check(force=True)
        operations = Operations(
            self.settings,
            self.status,
            self.scheduler,
            self.store,
            self.limiter,
            self.cluster,
            RepositoryOps(self.publisher),
            ProjectOps(self.projects, self.syncer, current, self.limiter),
            self.maintenance,
            StatsOps(self.store, self.cluster, current, self.metrics.text),
            self.live,
            self.wake,
        )
        self.server = ControlServer(sock, operations, lambda: current().admin_group)
        self.server.start()
        log.info(
            "reqpmd %s ready: host %s, socket %s%s, Redis %s, limit %d",
            __version__,
            s.host_id,
            s.socket_path,
            " (socket activation)" if inherited else "",
            self.cluster.label,
            s.max_concurrent_builds,
        )
        self.notifier.ready()
        self.publisher.start()  # its first pass checks every repository (a crash mid-run)
        self.syncer.start()
        # builds left waiting or building by an earlier instance are recovered below, not
        # by the orphan scrub: it leaves the roots of builds in those states alone
        self.maintenance.start()
        # after READY: scrubs of what an earlier instance left may take minutes each
        leftover = self.scheduler.start_recovery(Stopper(s.cancel_grace_seconds))
        if leftover:
            log.warning("recovering %d build(s) an earlier instance left running", leftover)
        try:
            self._loop()
        finally:
            self._shutdown(bool(inherited))
        return 0

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        next_watchdog = 0.0
        last_failure = ""
        while not self._stop:
            try:
                self._pass()
                last_failure = ""
            except Exception as exc:  # the loop outlives any one failure (a full disk, ...)
                if str(exc) != last_failure:  # once per distinct failure, not every pass
                    log.exception("main loop pass failed; going on")
                    last_failure = str(exc)
            else:  # only a healthy loop pets the watchdog
                now = time.monotonic()
                if self.notifier.watchdog_interval and now >= next_watchdog:
                    self.notifier.watchdog()
                    next_watchdog = now + self.notifier.watchdog_interval
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def _next_wait(self) -> float:
        """TICK while the scheduler has work or someone watches ``top``; otherwise until
        the cluster's next check or heartbeat (and never past the watchdog)."""
        if not self.scheduler.idle or self.live.watched() or not self.cluster.ok:
            return TICK
        wait = min(IDLE_TICK, self.cluster.next_due() - time.monotonic())
        if self.notifier.watchdog_interval:
            wait = min(wait, self.notifier.watchdog_interval)
        return max(TICK, wait)

    def _pass(self) -> None:
        if self._reload:
            self._reload = False
            self._reload_settings()
        self.cluster.check()
        self.scheduler.tick(self.cluster.ok)
        self.cluster.heartbeat(self.status.host_record, self.status.aggregates)
        self.notifier.status(self.status.line())
        self.live.refresh()

    def _build_ended(self, build: Build) -> None:
        self.metrics.build_ended(build)
        self.status.build_ended()

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wake.set()

    def _on_settings_change(self, settings: Settings, change: Change) -> None:
        self.wake()

    def _reload_settings(self) -> None:
        self.notifier.reloading()
        try:
            change = self.settings.reload()
        except SettingsInvalid as exc:
            log.error(
                "reload of %s failed; keeping the running settings: %s",
                self.config_path,
                "; ".join(str(e) for e in exc.errors),
            )
        else:
            log.info("reloaded %s: %d change(s)", self.config_path, len(change.diff))
        finally:  # whatever happened, systemd must not be left "reloading"
            self.notifier.ready()

    def _shutdown(self, socket_activated: bool) -> None:
        self.notifier.stopping()
        log.info("stopping: cancelling running builds so they run again at the next start")
        self.server.close()
        s = self.settings.current()
        if not socket_activated:
            with contextlib.suppress(OSError):
                s.socket_path.unlink()
        self.scheduler.shutdown(timeout=4 * s.cancel_grace_seconds + 60)
        self.guard.close()
        self.maintenance.stop(timeout=PUBLISHER_STOP)
        self.syncer.stop(timeout=PUBLISHER_STOP)  # a fetch in progress has its timeout
        self.publisher.stop(timeout=PUBLISHER_STOP)
        self.limiter.close()
        self.store.close()
        if self.redis_server is not None:
            self.redis_server.stop()
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="reqpmd", description="reqpm build daemon (runs in the foreground; logs to stderr)"
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("REQPM_CONFIG", DEFAULT_CONFIG)),
        help="config file (default $REQPM_CONFIG or %(default)s)",
    )
    ap.add_argument(
        "--check-config",
        type=Path,
        metavar="PATH",
        help="validate a config file and exit: 0 if valid, 1 listing every problem",
    )
    ap.add_argument("--version", action="version", version=f"reqpmd {__version__}")
    args = ap.parse_args(argv)
    if args.check_config is not None:
        try:
            credentials(load(args.check_config))  # the secrets' files too
        except SettingsInvalid as exc:
            for error in exc.errors:
                print(f"{exc.source or args.check_config}: {error}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0
    setup_logging()
    try:
        initial = load(args.config)
        credentials(initial)  # said now, naming the setting, not as "Redis unreachable"
    except SettingsInvalid as exc:
        for error in exc.errors:
            log.error("%s: %s", exc.source or args.config, error)
        return 1
    try:
        return Daemon(args.config, initial).run()
    except (RuntimeError, OSError) as exc:
        log.critical("reqpmd cannot run: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
