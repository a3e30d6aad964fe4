"""What happened during a chaos run, in order: submissions with their replies, faults,
limit changes, slot samples; mock's own start and end lines are read from its event files.

Wall time throughout: the mock stand-in stamps its lines with time.time(), every process
runs on this one host, and the suite never moves the clock.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any


class History:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"t": time.time(), "kind": kind, **fields}
        line = json.dumps(event, default=str)
        with self._lock:
            self.events.append(event)
            with open(self.path, "a") as f:
                f.write(line + "\n")
        return event

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """A finished run's history, from its file."""
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["kind"] == kind]


def events_file(root: Path, host: str) -> Path:
    """Where a run's stand-in mock writes one host's lines (FAKEMOCK_EVENTS)."""
    return root / host / "events.jsonl"


def mock_events(path: Path, host: str) -> list[dict[str, Any]]:
    """The stand-in's lines of one host, each tagged with it. A torn last line (the
    writer killed mid-write cannot tear one: a single O_APPEND write) is reported."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line:
            out.append({**json.loads(line), "host": host})
    return out
