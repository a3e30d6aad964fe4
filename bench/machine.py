"""Facts about the machine a bench ran on, the same way in every bench's header."""

from __future__ import annotations

import contextlib
import platform
import subprocess


def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def redis_server_version(binary: str, full: bool = False) -> str:
    """``--version`` of the redis-server at ``binary``: the whole line, or the version
    number alone ("6.2.14"); "? (why)" when it cannot be run."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"? ({exc})"
    if full:
        return out
    return next((w.removeprefix("v=") for w in out.split() if w.startswith("v=")), out or "?")
