"""How reqpm talks to Redis: one policy for timeouts and retries, one way to fail.

redis-py's default retries a failed connection ten times with backoff (seconds per
call). A limiter call must fail fast instead, so the caller can report "Redis down"
once and keep builds running; reqpm's own loops do the retrying. That holds for the
Sentinels too: left to its defaults, redis-py asks each of them ten times over before a
call fails (23 s with every Sentinel refusing, minutes with one that never answers).

Every Redis failure counts, not only lost connections: an error reply (OOM, READONLY
after a failover, BUSY, NOPERM) must not escape as an unexpected exception and kill a
thread, so all of them become RedisUnavailable.
"""

from __future__ import annotations

import contextlib
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis
import redis.cluster
import redis.commands.core
import redis.sentinel
from redis._parsers.encoders import Encoder
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from reqpmd.config.redis_url import RedisAddress, parse
from reqpmd.config.schema import Settings
from reqpmd.config.secrets import check_file, named, read_secret
from reqpmd.errors import RedisUnavailable

# RedisClusterException is no RedisError: a Cluster that cannot serve a slot, a call
# whose keys span slots
REDIS_ERRORS = (redis.RedisError, redis.exceptions.RedisClusterException)
SENTINEL_TIMEOUT = 1.0  # seconds to wait for each Sentinel, to connect and to answer


def _options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        "health_check_interval": 30,
    }
    options.update(overrides)
    return options


def connect(url: str, **overrides: Any) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` or ``unix://`` URLs."""
    return redis.Redis.from_url(url, **_options(**overrides))


@dataclass(frozen=True)
class Credentials:
    """What the settings add to redis_url: secrets read from their files, TLS files."""

    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def credentials(s: Settings) -> Credentials:
    """The secrets and TLS files the settings name, read and checked now: a missing,
    unreadable or exposed file is an error naming its setting (validation already
    refused files that do not fit redis_url: parse.validate, where every Settings
    comes from)."""
    ca, cert, key = (
        named(p) for p in (s.redis_tls_ca_file, s.redis_tls_cert_file, s.redis_tls_key_file)
    )
    for path, name, private in (
        (ca, "redis_tls_ca_file", False),
        (cert, "redis_tls_cert_file", False),
        (key, "redis_tls_key_file", True),
    ):
        if path is not None:
            check_file(path, name, private)
    password, sentinel_password = (
        read_secret(path, name) if path is not None else None
        for name, path in (
            ("redis_password_file", named(s.redis_password_file)),
            ("redis_sentinel_password_file", named(s.redis_sentinel_password_file)),
        )
    )
    return Credentials(password, sentinel_password, ca, cert, key)


def _tls(address: RedisAddress, creds: Credentials) -> dict[str, Any]:
    if not address.tls:
        return {}
    out: dict[str, Any] = {}
    if creds.ca_file:
        out["ssl_ca_certs"] = str(creds.ca_file)
    if creds.cert_file and creds.key_file:
        out["ssl_certfile"], out["ssl_keyfile"] = str(creds.cert_file), str(creds.key_file)
    return out


# Error replies that say the server is no longer the master the Sentinels named: a demoted
# master (READONLY: Redis 6.2 puts it inside a script's error, which redis-py does not
# take for a lost master), or one cut off from its replicas (NOREPLICAS, with
# min-replicas-to-write) or from its master (MASTERDOWN).
_NOT_THE_MASTER = re.compile(r"\b(READONLY|NOREPLICAS|MASTERDOWN)\b|read only replica")


class _Following:
    """A connection to the Sentinels' master that lets go of a server that is no master
    any more: it drops itself and fails as a lost connection, so the next one asks the
    Sentinels. Left alone, redis-py would keep this connection, and every call through
    it would fail, for as long as the old server runs."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.ResponseError as exc:
            if not _NOT_THE_MASTER.search(str(exc)):
                raise
            self.disconnect()  # type: ignore[attr-defined]
            raise redis.ConnectionError(f"the server is not the master now: {exc}") from exc


class _FollowingConnection(_Following, redis.sentinel.SentinelManagedConnection):
    pass


class _FollowingSSLConnection(_Following, redis.sentinel.SentinelManagedSSLConnection):
    pass


class _SentinelClient(redis.Redis):
    """One Sentinel. A server on its port that is no Sentinel ("unknown command") counts
    as one that did not answer, so the next one listed is asked."""

    def sentinel_masters(self) -> Any:
        try:
            return super().sentinel_masters()
        except redis.ResponseError as exc:
            raise redis.ConnectionError(f"not a Sentinel: {exc}") from exc


class _Sentinel(redis.sentinel.Sentinel):
    """A Sentinel answer that does not parse (a wrong or hostile server on its port) is
    a failed discovery, not a TypeError out of a limiter call."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.sentinels = [
            _SentinelClient(connection_pool=s.connection_pool) for s in self.sentinels
        ]

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)  # type: ignore[no-untyped-call]
        except (TypeError, KeyError, ValueError, IndexError, AttributeError) as exc:
            raise redis.sentinel.MasterNotFoundError(
                f"a Sentinel's answer did not parse ({type(exc).__name__})"
            ) from exc


def open_redis(url: str, creds: Credentials = Credentials()) -> redis.Redis:
    """The client for a shared Redis (``redis_url`` other than 'embedded'): one server,
    or the master a set of Sentinels names now (a failover is followed without a
    restart: each new connection asks the Sentinels)."""
    address = parse(url)
    tls = _tls(address, creds)
    if address.kind == "single":
        password = {"password": creds.password} if creds.password else {}
        return connect(url, **password, **tls)
    if address.kind == "sentinel":
        auth = {"username": address.username, "password": creds.password or address.password}
        ssl = {"ssl": True, **tls} if address.tls else {}
        # The Sentinels: each asked once per call, a short wait each (see the module
        # doc); a lone Sentinel that sees no other may be cut off, so with several named
        # it must see one other.
        sentinels = {
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "password": creds.sentinel_password,
            **ssl,
        }
        manager = _Sentinel(
            list(address.nodes),
            min_other_sentinels=1 if len(address.nodes) > 1 else 0,
            sentinel_kwargs=sentinels,
            # no retry either: a retry would ask every Sentinel again
            **_options(retry=Retry(NoBackoff(), 0), **auth, **ssl),
        )
        client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
            address.master,
            db=address.db,
            connection_class=_FollowingSSLConnection if address.tls else _FollowingConnection,
        )
        return client
    if address.kind == "cluster":
        nodes = [
            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in address.nodes
        ]
        options = _options(
            # one more try after a MOVED or a failed node, then the caller's own loop
            retry=Retry(NoBackoff(), 1),
            username=address.username,
            password=creds.password or address.password,
            **({"ssl": True, **tls} if address.tls else {}),
        )
        lazy = _LazyCluster(lambda: redis.cluster.RedisCluster(startup_nodes=nodes, **options))
        return cast(redis.Redis, lazy)  # the commands reqpm uses, routed by key slot
    raise ValueError(f"{address.kind} is not a shared Redis")


def follow_master(client: redis.Redis) -> None:
    """Under Sentinel, ask the Sentinels which server is master now and let go of the
    connections to any other (the next call connects to the one named).

    A connection breaks by itself only when its server dies or answers READONLY or
    NOREPLICAS. A master the Sentinels replaced while it lived (SENTINEL FAILOVER, or a
    false "down" in a failover storm) takes writes until they demote it, about 10 s, and
    what it granted or renewed meanwhile is lost with it. A holder still talking to it
    would miss the new master's restart grace and not re-register; the new master would
    then grant its slot again; a waiter still talking to it could be granted a slot the
    new master never hears of. Asked at most once per third of a lease before a limiter
    call, every caller reaches the new master within its grace. Costs one Sentinel round
    trip then (up to SENTINEL_TIMEOUT per Sentinel when they do not answer). Other
    clients: nothing to do."""
    if isinstance(client, _LazyCluster):
        return  # (its attributes are the cluster client's, made at first use)
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        with contextlib.suppress(*REDIS_ERRORS):  # the next call says what is wrong
            pool.get_master_address()  # type: ignore[no-untyped-call]


def serving(client: redis.Redis, key: str) -> str | None:
    """host:port of the server that answers for ``key`` now, where that can change while
    we run: the master Sentinels named last, or the Cluster node owning its slot."""
    if isinstance(client, _LazyCluster):
        try:
            node = client.get_node_from_key(key)
        except (*REDIS_ERRORS, AttributeError):
            return None
        return str(node.name) if node is not None else None
    address = getattr(getattr(client, "connection_pool", None), "master_address", None)
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) else None


class _LazyCluster:
    """A Redis Cluster client made at its first use, and made again after that failed.
    redis-py's RedisCluster connects in its constructor, and reqpmd must start (and keep
    its running builds) while the cluster is down. Scripts are registered against this
    object, so they reach whichever client is current."""

    def __init__(self, make: Callable[[], redis.cluster.RedisCluster]) -> None:
        self._make = make
        self._client: redis.cluster.RedisCluster | None = None
        self._lock = threading.Lock()

    def _current(self) -> redis.cluster.RedisCluster:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._make()
                except redis.exceptions.RedisClusterException as exc:
                    if "not enabled" in str(exc):
                        raise redis.ConnectionError(
                            "redis_url names a server that is no Redis Cluster node "
                            "(cluster mode is not enabled there)"
                        ) from exc
                    raise redis.ConnectionError(f"Redis Cluster: {exc}") from exc
            return self._client

    def register_script(self, script: str) -> redis.commands.core.Script:
        return redis.commands.core.Script(self, script)  # type: ignore[arg-type]

    def get_encoder(self) -> Encoder:
        # what Script encodes its text with; asking the client would connect
        return Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._current(), name)


def unavailable(exc: BaseException) -> RedisUnavailable:
    """The one message for a failed Redis call. Sentinel's answers name the setting to
    check: a master name the Sentinels do not know is a mistake in redis_url, not an
    outage to wait out. redis-py's own text of that error is not passed on: it lists each
    Sentinel client with its options (some releases, their passwords too)."""
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        if isinstance(exc.__cause__, Exception) and "did not parse" in str(exc):
            return RedisUnavailable(f"redis_url: {exc}")
        if " : " in str(exc):  # redis-py appends each Sentinel's error: none answered
            return RedisUnavailable(
                "no Sentinel named in redis_url answered (each refused, timed out or "
                "failed; see their logs)"
            )
        return RedisUnavailable(
            "the Sentinels named in redis_url know no such master, or none has one now"
        )
    if _tls_failure(exc):
        return RedisUnavailable(
            f"Redis refused the TLS handshake or its certificate did not verify: {exc} "
            "(check redis_tls_ca_file, and redis_tls_cert_file with redis_tls_key_file "
            "if the server asks for a client certificate)"
        )
    return RedisUnavailable(f"Redis is unreachable or refused: {exc}")


def _tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(5):  # the error and what caused it
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError) or "[SSL" in str(seen) or "_ssl.c" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def text(value: Any) -> str:
    """A reply element as str (clients may or may not decode responses). Bytes that are
    not UTF-8 (anyone can write any into Redis) are replaced, not fatal."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
