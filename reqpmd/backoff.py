"""Exponential backoff for the loops that retry Redis (the daemon's health check, a
waiter, the grant listener): one policy, so every retry loop behaves alike.

It also remembers whether the current run of failures has been reported, so each loop
logs an outage once, when it starts, rather than at every retry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    first: float = 0.05
    cap: float = 2.0
    factor: float = 2.0
    _next: float = 0.0
    _failures: int = 0

    def __post_init__(self) -> None:
        self._next = self.first

    @property
    def failing(self) -> bool:
        """True from the first failure until the next success."""
        return self._failures > 0

    def failed(self) -> float:
        """Record a failure; returns the seconds to wait before the next try."""
        delay = self._next
        self._failures += 1
        self._next = min(self._next * self.factor, self.cap)
        return delay

    def succeeded(self) -> bool:
        """Record a success; returns True if it ends a run of failures."""
        recovered = self._failures > 0
        self._failures = 0
        self._next = self.first
        return recovered
