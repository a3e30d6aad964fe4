"""Shared fixtures: every test that needs Redis gets a real redis-server of its own."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.redis_server import RedisServer


def fresh_start(server: RedisServer) -> None:
    """A server we just started holds no forgotten slots: skip the restart grace."""
    client = server.client()
    BuildConcurrencyLimiter(client).declare_no_survivors()
    client.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths are capped at 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server(short_tmp: Path) -> Iterator[RedisServer]:
    server = RedisServer(short_tmp / "redis", persist=False)
    server.start()
    fresh_start(server)
    yield server
    server.kill()


@pytest.fixture
def rclient(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client(socket_timeout=5)
    yield client
    client.close()
