"""Fakes shared by the in-process unit tests."""

from __future__ import annotations

import threading

from tests.workers import wait_until


class FakeClock:
    """Monotonic time that only moves when the test says. ``reads`` counts the reads: a
    loop reads its clock once per turn, so a few more reads after a change prove the loop
    has looked again (the positive event behind a "nothing happened" assertion)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    def polled(self, times: int = 2) -> None:
        """Wait until the clock was read ``times`` more times."""
        with self._lock:
            target = self.reads + times
        wait_until(lambda: self.reads >= target, what=f"{times} more reads of the clock")
