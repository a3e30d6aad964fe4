"""Human output: aligned tables, relative times, colour only on a terminal."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from reqpmd.quoting import printable

_COLOURS = {
    "succeeded": "\033[32m",
    "building": "\033[36m",
    "waiting": "\033[33m",
    "queued": "\033[0m",
    "failed": "\033[31m",
    "timed_out": "\033[31m",
    "cancelled": "\033[35m",
}
_RESET = "\033[0m"


def use_colour(stream: TextIO = sys.stdout) -> bool:
    return stream.isatty()


def colour_state(state: str, enabled: bool) -> str:
    if not enabled or state not in _COLOURS:
        return state
    return f"{_COLOURS[state]}{state}{_RESET}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def ago(stamp: float | None, now: float | None = None) -> str:
    if not stamp:
        return "-"
    return duration((now or time.time()) - stamp) + " ago"


def safe(value: Any) -> str:
    """Text from elsewhere (names and hosts out of a shared Redis) as it may reach a
    terminal: control characters, escape sequences included, shown as \\xNN."""
    return printable(str(value))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell (ANSI colour codes do not count)."""
    cells = [[str(c) for c in headers]] + [
        [("-" if c is None else str(c)) for c in r] for r in rows
    ]
    widths = [max(_visible_len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        padded = [c + " " * (w - _visible_len(c)) for c, w in zip(row, widths, strict=True)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)


def _visible_len(text: str) -> int:
    import re

    return len(re.sub(r"\033\[[0-9;]*m", "", text))


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
