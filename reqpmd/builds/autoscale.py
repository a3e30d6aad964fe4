"""Auto-scaling of one host (auto_scale): how many builds it runs at once follows its
own load, between 1 and its ceiling (host_max_builds, else the cluster limit), never
above the cluster limit.

Additive increase, multiplicative decrease, as TCP does with a shared link: one build
more after a whole auto_scale_interval_seconds of headroom (load per CPU under the
target, memory available above the floor, CPU and memory pressure under the threshold
where /proc/pressure exists), half as many at once when a sample has none (at most once
a quarter interval, so one spike is one halving). It never stops a running build: the
scheduler only asks for fewer slots, and withdraws the waiters above the cap.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from reqpmd.config.schema import Settings


@dataclass(frozen=True)
class Sample:
    load_per_cpu: float
    mem_available_mb: float
    cpu_pressure: float | None  # % of the last 10 s some task waited for CPU, if known
    mem_pressure: float | None  # the same for memory


def _pressure(kind: str) -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
        fields = dict(f.split("=", 1) for f in line.split()[1:])
        return float(fields["avg10"])
    return None


def read_sample() -> Sample:
    return Sample(
        load_per_cpu=os.getloadavg()[0] / (os.cpu_count() or 1),
        mem_available_mb=psutil.virtual_memory().available / 2**20,
        cpu_pressure=_pressure("cpu"),
        mem_pressure=_pressure("memory"),
    )


def short_of(sample: Sample, s: Settings) -> str | None:
    """What the host lacks now, or None when it has headroom."""
    if sample.load_per_cpu >= s.auto_scale_load_per_cpu:
        return f"load per CPU {sample.load_per_cpu:.2f} >= {s.auto_scale_load_per_cpu:g}"
    if sample.mem_available_mb < s.auto_scale_min_free_memory_mb:
        return (
            f"{sample.mem_available_mb:.0f} MB memory available < "
            f"{s.auto_scale_min_free_memory_mb} MB"
        )
    for kind, value in (("CPU", sample.cpu_pressure), ("memory", sample.mem_pressure)):
        if value is not None and value >= s.auto_scale_max_pressure:
            return f"{kind} pressure {value:.1f}% >= {s.auto_scale_max_pressure:g}%"
    return None


class AutoScaler:
    def __init__(
        self,
        settings: Callable[[], Settings],
        source: Callable[[], Sample] = read_sample,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.source = source
        self.clock = clock
        self.current = 1  # start low: a host earns its builds
        self.why = "starting at 1"
        self._good_since: float | None = None
        self._last_cut = -1e18

    def cap(self, ceiling: int) -> int:
        """The number of builds this host may run now (called once per scheduler pass)."""
        s, now = self.settings(), self.clock()
        ceiling = max(1, ceiling)
        lacking = short_of(self.source(), s)
        if lacking is not None:
            self._good_since = None
            if self.current > 1 and now - self._last_cut >= s.auto_scale_interval_seconds / 4:
                self.current = max(1, self.current // 2)
                self._last_cut = now
                self.why = f"halved to {self.current}: {lacking}"
        elif self._good_since is None:
            self._good_since = now
        elif now - self._good_since >= s.auto_scale_interval_seconds and self.current < ceiling:
            self.current += 1
            self._good_since = now
            self.why = f"raised to {self.current}: headroom for {s.auto_scale_interval_seconds} s"
        if self.current > ceiling:
            self.current = ceiling
            self.why = f"held at the ceiling, {ceiling}"
        return self.current
