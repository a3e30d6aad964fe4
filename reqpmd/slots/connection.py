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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from reqpmd.config.redis_url import RedisAddress, parse
from reqpmd.config.schema import SettingError, Settings, SettingsInvalid
from reqpmd.config.secrets import check_private, read_secret
from reqpmd.errors import RedisUnavailable

REDIS_ERRORS = (redis.RedisError,)


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

    password: str | None = None
    sentinel_password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def _given(path: Path) -> Path | None:
    return path if str(path) not in ("", ".") else None


def credentials(s: Settings) -> Credentials:
    """The secrets and TLS files the settings name, read and checked now: a missing or
    exposed file, or one that does not fit redis_url, is an error naming its setting."""
    address = parse(s.redis_url)
    files = {
        "redis_password_file": _given(s.redis_password_file),
        "redis_sentinel_password_file": _given(s.redis_sentinel_password_file),
        "redis_tls_ca_file": _given(s.redis_tls_ca_file),
        "redis_tls_cert_file": _given(s.redis_tls_cert_file),
        "redis_tls_key_file": _given(s.redis_tls_key_file),
    }
    errors = []
    for name, path in files.items():
        if path is None:
            continue
        if address.kind == "embedded":
            errors.append(SettingError(name, "is for a shared Redis; redis_url is 'embedded'"))
        elif name.startswith("redis_tls_") and not address.tls:
            errors.append(SettingError(name, "is for TLS; redis_url is not a rediss URL"))
        elif name == "redis_sentinel_password_file" and address.kind != "sentinel":
            errors.append(SettingError(name, "is for Sentinel; redis_url is not redis+sentinel"))
    if files["redis_password_file"] and address.password is not None:
        errors.append(
            SettingError(
                "redis_password_file",
                "redis_url holds a password too: keep it in the file only",
            )
        )
    if bool(files["redis_tls_cert_file"]) != bool(files["redis_tls_key_file"]):
        errors.append(
            SettingError("redis_tls_cert_file", "and redis_tls_key_file go together: set both")
        )
    if errors:
        raise SettingsInvalid(errors)
    if files["redis_tls_key_file"]:
        check_private(files["redis_tls_key_file"], "redis_tls_key_file")
    for name in ("redis_tls_ca_file", "redis_tls_cert_file"):
        path = files[name]
        if path is not None and not path.is_file():
            raise SettingsInvalid([SettingError(name, f"{path} is not a readable file")])
    password, sentinel_password = (
        read_secret(path, name) if path else None
        for name, path in (
            ("redis_password_file", files["redis_password_file"]),
            ("redis_sentinel_password_file", files["redis_sentinel_password_file"]),
        )
    )
    return Credentials(
        password,
        sentinel_password,
        files["redis_tls_ca_file"],
        files["redis_tls_cert_file"],
        files["redis_tls_key_file"],
    )


def _tls(address: RedisAddress, creds: Credentials) -> dict[str, Any]:
    if not address.tls:
        return {}
    out: dict[str, Any] = {}
    if creds.ca_file:
        out["ssl_ca_certs"] = str(creds.ca_file)
    if creds.cert_file and creds.key_file:
        out["ssl_certfile"], out["ssl_keyfile"] = str(creds.cert_file), str(creds.key_file)
    return out


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
        # the Sentinels: each asked once per call, a short wait each (see the module doc)
        sentinels = {
            "socket_timeout": 2.0,
            "socket_connect_timeout": 2.0,
            "retry": Retry(NoBackoff(), 0),
            "password": creds.sentinel_password,
            **ssl,
        }
        manager = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(address.nodes), sentinel_kwargs=sentinels, **_options(**auth, **ssl)
        )
        client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
            address.master, db=address.db
        )
        return client
    raise ValueError(f"{address.kind} is not a shared Redis")


def failed(client: redis.Redis, exc: BaseException) -> RedisUnavailable:
    """RedisUnavailable for a failed call, after forgetting a server that turned out to be
    a replica. A script that writes on a demoted master fails with READONLY inside its
    reply (Redis 6.2), which redis-py does not take for a lost master: its connections
    would keep going back to that server, failing every call, until it was restarted."""
    if isinstance(exc, redis.ResponseError) and "READONLY" in str(exc):
        client.connection_pool.disconnect()
    return unavailable(exc)


def unavailable(exc: BaseException) -> RedisUnavailable:
    """The one message for a failed Redis call. Sentinel's answers name the setting to
    check: a master name the Sentinels do not know is a mistake in redis_url, not an
    outage to wait out."""
    if isinstance(exc, redis.sentinel.MasterNotFoundError):
        text = str(exc)
        if " : " in text:  # redis-py appends each Sentinel's error: none answered
            return RedisUnavailable(f"no Sentinel named in redis_url answered ({exc})")
        return RedisUnavailable(
            f"the Sentinels named in redis_url know no such master, or none has one now ({exc})"
        )
    if "ssl" in str(exc).lower():  # the handshake: a CA, a client certificate missing
        return RedisUnavailable(
            f"Redis refused the TLS handshake or its certificate did not verify: {exc} "
            "(check redis_tls_ca_file, and redis_tls_cert_file with redis_tls_key_file "
            "if the server asks for a client certificate)"
        )
    return RedisUnavailable(f"Redis is unreachable or refused: {exc}")


def text(value: Any) -> str:
    """A reply element as str (clients may or may not decode responses). Bytes that are
    not UTF-8 (anyone can write any into Redis) are replaced, not fatal."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
