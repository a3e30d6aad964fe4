"""How reqpm connects to Redis: one policy for timeouts and retries.

redis-py's default retries a failed connection ten times with backoff (seconds per
call). A limiter call must fail fast instead, so the caller can report "Redis down"
once and keep builds running; the limiter's own loops do the retrying.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry


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
