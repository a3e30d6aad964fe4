"""The daemon's pass-based threads (reqpmd/worker.py): a failing pass is logged and the
thread goes on; a full state_dir is said in one line, not as a traceback (the chaos
suite's full disk made the publisher log one, which reads as a crash at 3 a.m.)."""

from __future__ import annotations

import errno
import logging

import pytest

from reqpmd.worker import Worker
from tests.workers import wait_until


class Failing(Worker):
    def __init__(self, exc: Exception) -> None:
        super().__init__("failing")
        self.exc, self.passes = exc, 0

    def _pass(self) -> None:
        self.passes += 1
        raise self.exc

    def _idle(self) -> float:
        return 0.01


@pytest.mark.parametrize(
    ("exc", "traceback"),
    [(OSError(errno.ENOSPC, "database or disk is full"), False), (ValueError("bug"), True)],
)
def test_a_failed_pass_is_logged_and_the_thread_goes_on(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    exc: Exception,
    traceback: bool,
) -> None:
    monkeypatch.setattr("reqpmd.worker.FAILED_PAUSE", 0.01)
    w = Failing(exc)
    with caplog.at_level(logging.ERROR, logger="reqpmd.worker"):
        w.start()
        try:
            wait_until(lambda: w.passes >= 2, what="a second pass after the failure")
        finally:
            w.stop(timeout=5)
    [first, *_] = [r for r in caplog.records if r.name == "reqpmd.worker"]
    assert (first.exc_info is not None) == traceback
    if not traceback:
        assert first.getMessage() == (
            "failing: state_dir is full ([Errno 28] database or disk is full); trying again"
        )
