"""reqpmd: wiring, signals and the main loop.

The main thread owns the loop: signals only set flags and wake it; it supervises Redis
(embedded or shared), drives the scheduler, publishes this host's heartbeat, keeps the
systemd STATUS= line current and pets the watchdog only while it is itself healthy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import redis

from reqpmd import __version__, keys, settings, settings_file
from reqpmd.api import Api, slot_listing
from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.control import ControlServer, Peer, bind_socket
from reqpmd.errors import InvalidArgument, RedisUnavailable, ReqpmError
from reqpmd.gates import Gates, describe_closed
from reqpmd.mock import Runner, Stopper, popen_runner
from reqpmd.redis_server import RedisServer
from reqpmd.redisconn import connect
from reqpmd.scheduler import Scheduler
from reqpmd.settings import Settings, SettingsInvalid
from reqpmd.states import State
from reqpmd.store import Store
from reqpmd.systemd import Notifier, listen_fds, setup_logging

log = logging.getLogger("reqpmd")

TICK = 0.5  # seconds between main-loop passes when nothing wakes it
HEARTBEAT_EVERY = 5.0
REDIS_CHECK_EVERY = 2.0


class Daemon:
    def __init__(
        self,
        config_path: Path,
        initial: Settings,
        runner: Runner = popen_runner,
        gates: Gates | None = None,
    ) -> None:
        self.config_path = config_path
        self.settings = initial
        self.runner = runner
        self.gates = gates or Gates()
        self.log = log
        self.notifier = Notifier()
        self._wake = threading.Event()
        self._stop = False
        self._reload = False
        self._settings_lock = threading.Lock()
        self.redis_server: RedisServer | None = None
        self.redis_ok = False
        self.redis_detail = "not connected yet"
        self._redis_next_check = 0.0
        self._redis_backoff = 0.5
        self.cluster_active: int | None = None
        self.cluster_limit: int | None = None  # max_concurrent_builds as Redis has it
        self._limit_to_publish = False  # changed here while Redis was unreachable
        self._next_heartbeat = 0.0

    # -- helpers used by the API -----------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def log_event(self, build_id: int, message: str, level: int = logging.INFO) -> None:
        log.log(level, "build %d: %s", build_id, message, extra={"build_id": build_id})

    @property
    def redis_label(self) -> str:
        if self.redis_server is not None:
            return f"embedded ({self.redis_server.url})"
        return settings.redact_url(str(self.settings.redis_url))

    # -- start-up --------------------------------------------------------------------

    def _connect_redis(self) -> redis.Redis:
        s = self.settings
        if s.redis_url == "embedded":
            self.redis_server = RedisServer(Path(s.state_dir) / "redis", persist=True)
            self.redis_server.start()
            return self.redis_server.client()
        return connect(str(s.redis_url))

    def run(self) -> int:
        s = self.settings
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)
        Path(s.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(Path(s.state_dir))
        self.redis = self._connect_redis()
        self.limiter = BuildConcurrencyLimiter(
            self.redis,
            max_concurrent=lambda: int(self.settings.max_concurrent_builds),
            namespace=str(s.namespace),
            lease_ttl=int(s.slot_lease_seconds),
            host=str(s.host_id),
        )
        if self.redis_server is not None:
            # Our private server: nobody else can hold a slot it forgot.
            self.limiter.declare_no_survivors()
        self.scheduler = Scheduler(
            self.store, self.limiter, lambda: self.settings, self.runner, self.gates
        )
        recovered = self.scheduler.recover(Stopper(float(s.cancel_grace_seconds)))
        for build_id in recovered:
            self.log_event(
                build_id, "left running by an earlier instance; re-queued", logging.WARNING
            )
        inherited = listen_fds()
        sock = inherited[0] if inherited else bind_socket(Path(s.socket_path), str(s.socket_group))
        # Know the state of Redis before the first client (maybe the one whose connection
        # started us through socket activation) asks for it.
        self._check_redis(force=True)
        self.server = ControlServer(sock, Api(self), lambda: str(self.settings.admin_group))
        self.server.start()
        log.info(
            "reqpmd %s ready: host %s, socket %s%s, Redis %s, limit %d",
            __version__,
            s.host_id,
            s.socket_path,
            " (socket activation)" if inherited else "",
            self.redis_label,
            s.max_concurrent_builds,
        )
        self.notifier.ready()
        try:
            self._loop()
        finally:
            self._shutdown(bool(inherited))
        return 0

    # -- the loop -----------------------------------------------------------------------

    def _loop(self) -> None:
        next_watchdog = 0.0
        while not self._stop:
            if self._reload:
                self._reload = False
                self.reload()
            self._check_redis()
            self.scheduler.tick(self.redis_ok)
            self._heartbeat()
            self.notifier.status(self.status_line())
            now = time.monotonic()
            if self.notifier.watchdog_interval and now >= next_watchdog:
                self.notifier.watchdog()
                next_watchdog = now + self.notifier.watchdog_interval
            self._wake.wait(TICK)
            self._wake.clear()

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        self._wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wake.set()

    def _shutdown(self, socket_activated: bool) -> None:
        self.notifier.stopping()
        log.info("stopping: cancelling running builds so they run again at the next start")
        self.server.close()
        if not socket_activated:
            with contextlib.suppress(OSError):
                Path(self.settings.socket_path).unlink()
        grace = float(self.settings.cancel_grace_seconds)
        self.scheduler.shutdown(timeout=4 * grace + 60)
        self.limiter.close()
        self.store.close()
        if self.redis_server is not None:
            self.redis_server.stop()
        log.info("stopped")

    # -- Redis -------------------------------------------------------------------------

    def _check_redis(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._redis_next_check:
            return
        if self.redis_server is not None and not self.redis_server.alive():
            try:
                self.redis_server.start()
            except (RuntimeError, OSError) as exc:
                self._redis_down(f"embedded redis-server will not start: {exc}", now)
                return
            try:
                # our private server: our own running builds are the only possible holders
                self.limiter.recover_private_server()
                log.warning(
                    "embedded redis-server had stopped; restarted it and "
                    "re-registered %d running build(s)",
                    len(self.limiter.held()),
                )
            except RedisUnavailable as exc:
                log.warning(
                    "embedded redis-server restarted, but re-registering builds "
                    "failed (%s); no new slot for one lease",
                    exc,
                )
        try:
            self.cluster_active = self.limiter.get_active_count()
            self._sync_cluster_limit(publish=self._limit_to_publish)
        except RedisUnavailable as exc:
            self._redis_down(str(exc), now)
            return
        if not self.redis_ok and self.redis_detail != "not connected yet":
            log.info("Redis at %s reachable again; taking slots again", self.redis_label)
        self.redis_ok, self.redis_detail = True, "ok"
        self._redis_backoff = 0.5
        self._redis_next_check = now + REDIS_CHECK_EVERY

    def _sync_cluster_limit(self, publish: bool) -> None:
        """max_concurrent_builds is one value for the whole cluster, kept in Redis.

        This host publishes its value when its admin changed it: through reqpmctl, a
        reload, or an edited file found at start (it differs from what this host last
        published). Otherwise the cluster's value applies, and a differing file is
        reported. Redis without a value (new, or its data lost) gets this host's.
        """
        mine = int(self.settings.max_concurrent_builds)
        shared = self.limiter.get_cluster_limit()
        last = self.store.get_state("published_limit")
        if last is None and shared is not None:
            # this host's first start in a cluster that has a limit: join it; only a later
            # change of this host's file is published
            self.store.set_state("published_limit", str(mine))
        elif str(mine) != last:
            publish = True  # changed here since this host last published
        if publish or shared is None:
            self.limiter.set_cluster_limit(mine)
            self.store.set_state("published_limit", str(mine))
            if shared is not None and shared != mine:
                log.warning(
                    "max_concurrent_builds is now %d on every host sharing namespace %s (was %d)",
                    mine,
                    self.settings.namespace,
                    shared,
                )
            shared = mine
        elif shared != mine and shared != self.cluster_limit:
            log.warning(
                "max_concurrent_builds is %d cluster-wide (set on a host sharing "
                "namespace %s); this host's config says %d; the cluster's value applies",
                shared,
                self.settings.namespace,
                mine,
            )
        self._limit_to_publish = False
        self.cluster_limit = shared

    def _redis_down(self, detail: str, now: float) -> None:
        if self.redis_ok or self.redis_detail == "not connected yet":
            log.warning(
                "Redis at %s unreachable (%s): running builds go on, submissions are "
                "queued, no new slot is taken until it is back",
                self.redis_label,
                detail,
            )
        self.redis_ok, self.redis_detail = False, detail
        self.cluster_active = None
        self._redis_next_check = now + self._redis_backoff
        self._redis_backoff = min(self._redis_backoff * 2, 30.0)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if not self.redis_ok or now < self._next_heartbeat:
            return
        self._next_heartbeat = now + HEARTBEAT_EVERY
        s, flight = self.settings, self.scheduler.in_flight()
        record = {
            "host_id": s.host_id,
            "last_seen": time.time(),
            "version": __version__,
            "building": flight["building"],
            "waiting": flight["waiting"],
            "queued": self.store.count(State.QUEUED),
            "max_concurrent_builds": s.max_concurrent_builds,
            "host_max_builds": s.host_max_builds,
            "gates": [g.__dict__ for g in self.scheduler.last_gates],
        }
        # If Redis is gone, the next Redis check reports it.
        with contextlib.suppress(redis.RedisError):
            self.redis.hset(keys.hosts_key(str(s.namespace)), str(s.host_id), json.dumps(record))

    def hosts(self) -> list[dict[str, Any]]:
        try:
            raw = self.redis.hgetall(keys.hosts_key(str(self.settings.namespace)))
        except redis.RedisError as exc:
            raise RedisUnavailable(f"Redis is unreachable or refused: {exc}") from exc
        hosts = [json.loads(v) for v in raw.values()]
        for h in hosts:
            h["age"] = max(0.0, time.time() - float(h.get("last_seen", 0)))
            h["stale"] = h["age"] > 3 * HEARTBEAT_EVERY
        return sorted(hosts, key=lambda h: str(h.get("host_id")))

    # -- status ----------------------------------------------------------------------------

    def limit(self) -> int:
        """The limit in force: the cluster's, or this host's until Redis has told us."""
        return self.cluster_limit or int(self.settings.max_concurrent_builds)

    def status_line(self, flight: dict[str, int] | None = None, queued: int | None = None) -> str:
        """The one-line summary (STATUS=); status() passes what it has already read."""
        flight = flight or self.scheduler.in_flight()
        queued = self.store.count(State.QUEUED) if queued is None else queued
        if not self.redis_ok:
            return (
                f"waiting for Redis at {self.redis_label}: {self.redis_detail}; "
                f"{flight['building']} building here, {queued} queued"
            )
        shut = describe_closed(self.scheduler.last_gates)
        head = (
            f"{self.cluster_active}/{self.limit()} slots busy cluster-wide, "
            f"{flight['building']} building here, {queued} queued"
        )
        return f"{shut}; {head}" if shut else head

    def status(self) -> dict[str, Any]:
        s = self.settings
        flight = self.scheduler.in_flight()
        queued = self.store.count(State.QUEUED)
        result: dict[str, Any] = {
            "host_id": s.host_id,
            "version": __version__,
            "max_concurrent": self.limit(),
            "configured_limit": s.max_concurrent_builds,
            "active_count": None,
            "active_builds": [],
            "waiting": [],
            "queued": queued,
            "building_here": flight["building"],
            "waiting_here": flight["waiting"],
            "gates": [g.__dict__ for g in self.scheduler.last_gates],
            "redis": {"url": self.redis_label, "ok": self.redis_ok, "detail": self.redis_detail},
            "summary": self.status_line(flight, queued),
        }
        if self.redis_ok:
            try:
                listing = slot_listing(self.limiter, self.limit())
                result["active_builds"] = listing["holders"]
                result["waiting"] = listing["waiting"]
                result["active_count"] = len(listing["holders"])
                result["restart_grace_left"] = self.limiter.in_restart_grace()
            except RedisUnavailable as exc:
                result["redis"] = {"url": self.redis_label, "ok": False, "detail": str(exc)}
        return result

    # -- settings -----------------------------------------------------------------------------

    def _apply(self, new: Settings, who: str, uid: int | None) -> dict[str, Any]:
        """Swap in new settings; restart-only keys keep their running value."""
        old = self.settings
        diff = old.changed(new)
        pending = {k: v for k, v in diff.items() if settings.BY_NAME[k].restart}
        live = new.replace(**{k: old_v for k, (old_v, _) in pending.items()})
        self.settings = live
        self._next_heartbeat = 0.0  # tell the other hosts now
        if "max_concurrent_builds" in diff:
            self._limit_to_publish = True
            try:
                self._sync_cluster_limit(publish=True)
            except RedisUnavailable:
                log.warning("max_concurrent_builds will reach the other hosts when Redis is back")
        for key, (before, after) in diff.items():
            note = " (takes effect at the next restart)" if key in pending else ""
            log.warning("setting %s: %s -> %s by %s%s", key, before, after, who, note)
            # uid -1: the change came from a SIGHUP reload, not from a client
            self.store.audit_setting(-1 if uid is None else uid, who, key, before, after)
        self.wake()
        return {
            "changed": {k: [str(a), str(b)] for k, (a, b) in diff.items()},
            "restart_required": sorted(pending),
        }

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = settings.load(self.config_path)
        except SettingsInvalid as exc:
            log.error(
                "reload of %s failed; keeping the running settings: %s",
                self.config_path,
                "; ".join(str(e) for e in exc.errors),
            )
        else:
            with self._settings_lock:
                result = self._apply(new, "SIGHUP reload", None)
            log.info("reloaded %s: %d change(s)", self.config_path, len(result["changed"]))
        self.notifier.ready()

    def change_settings(self, changes: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """Validate all, write the file atomically, apply at once, audit: all or nothing."""
        with self._settings_lock:
            try:
                text = self.config_path.read_text() if self.config_path.exists() else ""
                raw, _ = settings.parse_text(text, str(self.config_path))
            except SettingsInvalid as exc:
                raise InvalidArgument(f"the config file is broken, fix it first: {exc}") from exc
            errors = [settings.unknown_key_error(k) for k in changes if k not in settings.BY_NAME]
            if errors:
                raise InvalidArgument("; ".join(str(e) for e in errors))
            try:
                values = settings.validate(
                    {**raw, **changes}, base_dir=self.config_path.parent.resolve()
                )
            except SettingsInvalid as exc:
                bad = [e for e in exc.errors if e.key in changes] or exc.errors
                raise InvalidArgument("; ".join(str(e) for e in bad)) from exc
            self._write_config(lambda: settings_file.write_changes(self.config_path, changes))
            return self._apply(
                Settings(values, self.config_path), f"{peer.user} (uid {peer.uid})", peer.uid
            )

    def _write_config(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            raise ReqpmError(
                f"cannot write {self.config_path}: {exc.strerror or exc}; reqpmd's user needs "
                f"write access to {self.config_path.parent} (nothing was changed)"
            ) from exc

    def replace_settings_text(self, text: str, peer: Peer) -> dict[str, Any]:
        """A whole new config (``reqpmctl settings edit``): valid or nothing changes."""
        with self._settings_lock:
            try:
                raw, lines = settings.parse_text(text, str(self.config_path))
                values = settings.validate(raw, lines, base_dir=self.config_path.parent.resolve())
            except SettingsInvalid as exc:
                raise InvalidArgument("; ".join(str(e) for e in exc.errors)) from exc
            self._write_config(lambda: settings_file.atomic_write(self.config_path, text.encode()))
            return self._apply(
                Settings(values, self.config_path), f"{peer.user} (uid {peer.uid})", peer.uid
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="reqpmd", description="reqpm build daemon (runs in the foreground; logs to stderr)"
    )
    ap.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("REQPM_CONFIG", settings.DEFAULT_CONFIG)),
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
            settings.load(args.check_config)
        except SettingsInvalid as exc:
            for error in exc.errors:
                print(f"{exc.source}: {error}", file=sys.stderr)
            return 1
        print(f"{args.check_config}: OK")
        return 0
    setup_logging()
    try:
        initial = settings.load(args.config)
    except SettingsInvalid as exc:
        for error in exc.errors:
            log.error("%s: %s", exc.source, error)
        return 1
    try:
        return Daemon(args.config, initial).run()
    except (RuntimeError, OSError) as exc:
        log.critical("reqpmd cannot run: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
