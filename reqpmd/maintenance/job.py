"""The maintenance job: retention and orphaned roots, at start and hourly (monotonic), at
once when the disk gate closes (at most every PRESSURE_EVERY while it stays closed), and
when an admin asks. One run at a time; the last report is kept for ``status``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from reqpmd.config.schema import Settings
from reqpmd.maintenance.orphans import Orphans
from reqpmd.maintenance.retention import Retention
from reqpmd.worker import Worker

log = logging.getLogger(__name__)

EVERY = 3600.0  # seconds between runs
PRESSURE_EVERY = 300.0  # seconds between runs while the disk gate stays closed
MB = 1024 * 1024


class Maintenance(Worker):
    def __init__(
        self,
        retention: Retention,
        orphans: Orphans,
        settings: Callable[[], Settings],
        disk_short: Callable[[], str | None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retention = retention
        self.orphans = orphans
        self.settings = settings
        self.disk_short = disk_short  # why the disk gate is closed, or None
        self.clock = clock
        self.last: dict[str, Any] | None = None
        self.shortage: str | None = None  # the disk is short and retention cannot help
        self._next: float | None = None  # monotonic: the next hourly run
        self._pressed_at: float | None = None  # monotonic: the last run for a closed gate
        self._run_lock = threading.Lock()
        super().__init__("maintenance")

    def plan(self) -> dict[str, Any]:
        """What a run now would do, changing nothing (``cleanup --dry-run``)."""
        builds = self.retention.plan()
        return {
            "builds": builds.as_dict(),
            "orphaned_roots": [r.as_dict() for r in self.orphans.plan()],
            "cleanup_builds_after_days": self.settings().cleanup_builds_after_days,
        }

    def run(self, why: str) -> dict[str, Any]:
        with self._run_lock:
            started = time.time()
            builds = self.retention.run()
            roots = self.orphans.run()
            report = {
                "at": started,
                "why": why,
                "seconds": time.time() - started,
                **builds,
                "orphaned_roots": roots,
            }
            self.last = report
        if builds["cleaned"] or roots["scrubbed"]:
            log.info(
                "cleanup (%s): %d build(s), %d MB freed; %d orphaned root(s) scrubbed",
                why,
                len(builds["cleaned"]),
                builds["bytes"] // MB,
                len(roots["scrubbed"]),
            )
        return report

    def _pass(self) -> None:
        short = self.disk_short()
        now = self.clock()
        due = self._next is None or now >= self._next
        if short is None:
            self._pressed_at = None  # the next closure of the gate runs at once again
            self.shortage = None
        pressed = short is not None and (
            self._pressed_at is None or now - self._pressed_at >= PRESSURE_EVERY
        )
        if not (due or pressed):
            return
        if due:
            self._next = now + EVERY
        if pressed:
            self._pressed_at = now
        self.run("disk gate closed" if pressed else "hourly")
        self._judge(short)

    def _judge(self, short: str | None) -> None:
        """Still short after a run: say so, and which setting frees more (nothing younger
        than cleanup_builds_after_days is deleted to make room)."""
        if short is None or self.disk_short() is None:
            self.shortage = None
            return
        days = self.settings().cleanup_builds_after_days
        freed = (self.last or {}).get("bytes", 0) // MB
        text = (
            f"{short}; cleanup freed {freed} MB and deletes nothing younger than "
            f"cleanup_builds_after_days={days}: lower it to free more"
        )
        if text != self.shortage:
            log.warning("%s", text)
        self.shortage = text
