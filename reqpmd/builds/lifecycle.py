"""What an outcome means: the rules that turn "mock exited", "asked to stop" and "ran out
of retries" into a build's next state. ``states`` says which edges exist; this module
says which one a build takes, so no other module decides it.

Rules:
* A user's cancel wins over every other reason to stop (timeout, re-queue), whenever it
  comes: before the slot, while waiting, while mock runs, or as mock is being stopped;
  an outcome of "run again" or "timed out" that meets a cancel ends cancelled.
* mock exit 0 goes on; exit 60 (root locked) runs the build again; any other code fails.
* A run that must happen again (crash, locked root, lost slot) counts against
  ``max_build_retries`` if mock ran, except when the daemon itself is stopping; past the
  budget the build fails, saying how many retries it had.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reqpmd.builds.mock import BUILD_ROOT_LOCKED
from reqpmd.builds.states import Publish, State


class StopReason(StrEnum):
    CANCEL = "cancel"  # a user asked: cancelled
    TIMEOUT = "timeout"  # over build_timeout_minutes: timed_out
    REQUEUE = "requeue"  # daemon stopping, gate closed, slot lost: run it again later


_STATE_FOR = {
    StopReason.CANCEL: State.CANCELLED,
    StopReason.TIMEOUT: State.TIMED_OUT,
    StopReason.REQUEUE: State.QUEUED,
}
_DEFAULT_NOTE = {
    StopReason.CANCEL: "cancelled",
    StopReason.TIMEOUT: "timed out",
    StopReason.REQUEUE: "interrupted; will run again",
}


# outcomes a user's cancel turns into "cancelled" (mock's own success or failure stands)
_CANCELLABLE = frozenset({State.QUEUED, State.TIMED_OUT})


@dataclass(frozen=True)
class Outcome:
    state: State  # a final state, or QUEUED to run again
    exit_code: int | None = None
    error: str | None = None


@dataclass
class StopRequest:
    """Why a build must stop, shared by everyone who may ask (control socket, gates,
    timeouts, a lost slot) and the one thread that acts on it."""

    event: threading.Event = field(default_factory=threading.Event)
    reason: StopReason | None = None
    note: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def request(self, reason: StopReason, note: str = "") -> None:
        with self._lock:
            if self.reason is None or reason == StopReason.CANCEL:
                self.reason, self.note = reason, note
            self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def outcome(self, exit_code: int | None = None) -> Outcome:
        """How the build ends because it was asked to stop."""
        with self._lock:
            reason = self.reason or StopReason.CANCEL
            return Outcome(_STATE_FOR[reason], exit_code, self.note or _DEFAULT_NOTE[reason])


def step_outcome(step: str, code: int) -> Outcome | None:
    """None when a mock step succeeded (go on); otherwise how the build ends."""
    if code == 0:
        return None
    if code == BUILD_ROOT_LOCKED:
        return Outcome(
            State.QUEUED,
            code,
            "mock: build root is locked by another process (exit 60); the build will be retried",
        )
    return Outcome(State.FAILED, code, f"mock --{step} exited with {code}; see build.log")


def counts_as_retry(*, mock_ran: bool, daemon_stopping: bool, internal_error: bool = False) -> bool:
    """Whether a run that must happen again uses up one of the build's retries.

    A run counts if mock ran (or may have: a crash mid-build), unless the daemon itself
    stopped it. A wait for a slot never counts. An internal error always counts, so one
    that repeats cannot loop forever."""
    return internal_error or (mock_ran and not daemon_stopping)


def settle(
    outcome: Outcome,
    *,
    stop: StopRequest | None,
    retries: int,
    max_retries: int,
    count_retry: bool,
) -> tuple[State, dict[str, Any]]:
    """The state a build ends this run in, and the fields to store with it."""
    state = outcome.state
    changes: dict[str, Any] = {"exit_code": outcome.exit_code, "error": outcome.error}
    if stop is not None and stop.reason == StopReason.CANCEL and state in _CANCELLABLE:
        state, changes["error"] = State.CANCELLED, stop.note or _DEFAULT_NOTE[StopReason.CANCEL]
    if state == State.QUEUED and count_retry:
        changes["retries"] = retries + 1
        if retries + 1 > max_retries:
            state = State.FAILED
            changes["error"] = f"gave up after {retries} retries: {outcome.error}"
    if state == State.QUEUED:
        changes.pop("exit_code")
    return state, changes


def publish_fields(*, requested: bool, enabled: bool) -> dict[str, Any]:
    """What a succeeded build's publish state starts as: recorded in the same write as
    its success, so a crash between the two cannot lose a publish."""
    if not requested:
        return {
            "publish_state": Publish.NOT_PUBLISHED,
            "publish_error": "submitted with --no-publish",
        }
    if not enabled:
        return {
            "publish_state": Publish.NOT_PUBLISHED,
            "publish_error": "the publish setting is off",
        }
    return {"publish_state": Publish.PENDING, "publish_error": None}
