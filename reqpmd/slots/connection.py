"""How reqpm talks to Redis: one policy for timeouts and retries, one way to fail.

redis-py's default retries a failed connection ten times with backoff (seconds per
call). A limiter call must fail fast instead, so the caller can report "Redis down"
once and keep builds running; reqpm's own loops do the retrying.

Every Redis failure counts, not only lost connections: an error reply (OOM, READONLY
after a failover, BUSY, NOPERM) must not escape as an unexpected exception and kill a
thread, so all of them become RedisUnavailable.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from reqpmd.errors import RedisUnavailable

REDIS_ERRORS = (redis.RedisError,)


def connect(url: str, **overrides: Any) -> redis.Redis:
    """A client for ``redis://``, ``rediss://`` or ``unix://`` URLs."""
    options: dict[str, Any] = {
        "socket_timeout": 5.0,
        "socket_connect_timeout": 2.0,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
        "health_check_interval": 30,
    }
    options.update(overrides)
    return redis.Redis.from_url(url, **options)


def unavailable(exc: BaseException) -> RedisUnavailable:
    """The one message for a failed Redis call."""
    return RedisUnavailable(f"Redis is unreachable or refused: {exc}")


def text(value: Any) -> str:
    """A reply element as str (clients may or may not decode responses). Bytes that are
    not UTF-8 (anyone can write any into Redis) are replaced, not fatal."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
