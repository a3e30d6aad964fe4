"""A background thread of the daemon that works in passes: the publisher, the project
syncer and the maintenance job. One way to start, wake, pace and stop them, and one rule
for failures: a pass that raises is logged, and the thread goes on after a pause."""

from __future__ import annotations

import logging
import threading

from reqpmd.errors import disk_full

log = logging.getLogger(__name__)

FAILED_PAUSE = 5.0  # seconds before the pass after one that raised


class Worker:
    def __init__(self, name: str) -> None:
        self.name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Ask the thread to stop after its pass in progress; wait up to ``timeout``."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wake(self, *_: object) -> None:
        """Run a pass now (any arguments are ignored: usable as any callback)."""
        self._wake.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._pass()
            except Exception as exc:  # the thread outlives any one failure
                if disk_full(exc):  # an operator's matter, said in one line
                    log.error("%s: state_dir is full (%s); trying again", self.name, exc)
                else:
                    log.exception("%s: pass failed; trying again", self.name)
                self._stop.wait(FAILED_PAUSE)
            self._wake.wait(self._idle())
            self._wake.clear()

    def _pass(self) -> None:
        raise NotImplementedError

    def _idle(self) -> float:
        """Seconds to wait for a wake-up before the next pass."""
        return 30.0
