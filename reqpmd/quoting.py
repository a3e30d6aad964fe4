"""Quoting values that came from elsewhere (a client, a config file, a shared Redis) in
messages, logs and terminals: one way, so a huge or hostile value is cut short and
escaped wherever it is shown."""

from __future__ import annotations

from typing import Any

from reqpmd.checks import is_int

SHOWN_MAX = 80  # characters of a bad value quoted in a message


def shown(value: Any, limit: int = SHOWN_MAX) -> str:
    """A value as an error message quotes it: repr, cut short (a value may be huge; the
    repr of an integer of thousands of digits would even raise)."""
    text = repr(value) if not (is_int(value) and abs(value) > 10**limit) else "a huge integer"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def printable(text: str, limit: int = 500) -> str:
    """Text fit for a log line or a terminal: control characters (an escape sequence, a
    newline) escaped, cut at ``limit`` characters."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])
    return out if len(text) <= limit else out + "..."
