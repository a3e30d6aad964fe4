"""Shared fixtures: every test that needs Redis gets a real redis-server of its own."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from tests.daemon_harness import Reqpmd
from tests.sandbox import Sandbox, SandboxRefused
from tests.workers import Worker

MakeLimiter = Callable[..., BuildConcurrencyLimiter]


@pytest.fixture
def make_limiter() -> Iterator[MakeLimiter]:
    """Limiters that release what they hold (and stop their threads) after the test."""
    made: list[BuildConcurrencyLimiter] = []

    def make(client: redis.Redis, **kwargs: Any) -> BuildConcurrencyLimiter:
        kwargs.setdefault("max_concurrent", 1)
        lim = BuildConcurrencyLimiter(client, **kwargs)
        made.append(lim)
        return lim

    yield make
    for lim in made:
        lim.close()


MakeWorker = Callable[..., Worker]


@pytest.fixture
def workers(redis_server: RedisServer) -> Iterator[MakeWorker]:
    """Limiter clients in processes of their own (tests/slot_worker.py)."""
    started: list[Worker] = []

    def make(**kwargs: object) -> Worker:
        w = Worker(redis_server.url, **kwargs)  # type: ignore[arg-type]
        started.append(w)
        return w

    yield make
    for w in started:
        w.close()


MakeDaemon = Callable[..., Reqpmd]


@pytest.fixture
def daemons(short_tmp: Path) -> Iterator[MakeDaemon]:
    """reqpmd daemons for one test, killed at its end with whatever mock they left."""
    started: list[Reqpmd] = []

    def make(name: str = "d1", **kwargs: object) -> Reqpmd:
        d = Reqpmd(short_tmp / name, **kwargs)  # type: ignore[arg-type]
        started.append(d)
        return d

    yield make
    for d in started:
        d.kill_all()


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


def _hidden_in_sandbox(path: Path) -> bool:
    """The sandbox mounts a fresh /tmp, /run and /dev over the host's."""
    return any(path.is_relative_to(top) for top in ("/tmp", "/run", "/dev"))


@pytest.fixture(scope="module")
def systemd_sandbox() -> Iterator[Sandbox]:
    """A real systemd, PID 1 of fresh namespaces over a tmpfs overlay of / (tests/sandbox/),
    for one test module. Skipped, with the reason, where it cannot boot (not root, unshare
    refused, no systemd). Always powered off at the end, whatever the tests did."""
    checkout = Path(__file__).resolve().parent.parent
    needed = {checkout, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    tops = {p for p in needed if not any(p != q and p.is_relative_to(q) for q in needed)}
    binds = sorted(str(p) for p in tops if _hidden_in_sandbox(p))
    try:
        sandbox = Sandbox.boot(binds=binds)
    except SandboxRefused as exc:
        pytest.skip(str(exc))
    try:
        yield sandbox
    finally:
        sandbox.stop()
