"""A private redis-server for one benchmark run: started in a temp dir under /tmp (a Unix
socket path must stay short), never persisted, stopped and removed however the run ends.
Benchmarks never touch a Redis they did not start."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
