"""A private redis-server for one benchmark run: started in a temp dir under /tmp (a Unix
socket path must stay short), never persisted, stopped and removed however the run ends.
Benchmarks never touch a Redis they did not start."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import redis

from bench.workers import Workers, stop_on_signals
from reqpmd.slots.server import RedisServer


@contextlib.contextmanager
def scratch_redis(prefix: str) -> Iterator[RedisServer]:
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    server = RedisServer(tmp / "redis", persist=False)
    try:
        yield server
    finally:
        with contextlib.suppress(BaseException):
            server.stop(timeout=5)
        with contextlib.suppress(BaseException):
            server.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def run_with_workers(
    prefix: str, run: Callable[[RedisServer, Workers], None], log: Callable[[str], None]
) -> int:
    """A benchmark's main: ``run(server, workers)`` on a scratch Redis, the exit code it
    earns. Ctrl-C, SIGTERM and SIGHUP end it with the workers and the server stopped; a
    redis-server that died under it (Ctrl-C reaches its process group too) is said, not
    a traceback."""
    stop_on_signals()
    workers = Workers()
    with scratch_redis(prefix) as server:
        try:
            run(server, workers)
            return 0
        except KeyboardInterrupt:
            log("interrupted: stopping workers and redis-server")
            return 130
        except (redis.ConnectionError, RuntimeError) as exc:
            if server.process is not None and not server.alive():
                log(f"redis-server exited with {server.process.returncode}; stopping: {exc}")
                return 1
            raise
        finally:
            with contextlib.suppress(BaseException):
                workers.stop_all()
