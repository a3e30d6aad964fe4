"""Argument checks shared by every layer, so one rule reads the same everywhere.

``True`` is an ``int`` to Python; a JSON ``true`` for a count or a priority is a
client's mistake, so the integer check excludes bools.
"""

from __future__ import annotations

from typing import Any

from reqpmd.errors import InvalidArgument


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in_range(key: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an integer in [lo, hi] (no upper bound when hi is None);
    otherwise InvalidArgument naming the key, the value and the range."""
    if is_int(value) and value >= lo and (hi is None or value <= hi):
        return int(value)
    allowed = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"
    raise InvalidArgument(f"{key} {value!r} is out of range: {allowed}")
