"""Reading what others wrote to Redis: parse without trusting, say once what was wrong.

Anyone with access to the Redis server can write anything into a namespace. A value that
does not parse is skipped or repaired, and logged at WARNING once per distinct bad key
(not at every poll, which would flood the log every few seconds for as long as it stays).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Hashable
from typing import Any


class WarnOnce:
    """``warn(key, msg, *args)`` logs at WARNING the first time ``key`` is seen (at
    ERROR with the exception being handled, for a surprise).

    The memory is bounded: garbage with ever new keys must not grow it without end (past
    ``cap`` keys it starts afresh, so a key may be reported once more)."""

    def __init__(self, logger: logging.Logger, cap: int = 1000) -> None:
        self._log = logger
        self._cap = cap
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()

    def warn(self, key: Hashable, msg: str, *args: object, level: int = logging.WARNING) -> None:
        with self._lock:
            if key in self._seen:
                return
            if len(self._seen) >= self._cap:
                self._seen.clear()
            self._seen.add(key)
        self._log.log(level, msg, *args, exc_info=level >= logging.ERROR)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(raw: str | bytes) -> Any:
    """JSON from Redis; ValueError for anything that is not plain, finite JSON (NaN,
    Infinity, integers past Python's digit limit, nesting past the recursion limit)."""
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
