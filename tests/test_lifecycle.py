"""What an outcome means (reqpmd.builds.lifecycle): the rules, one test each."""

from __future__ import annotations

import pytest

from reqpmd.builds.lifecycle import (
    Outcome,
    StopReason,
    StopRequest,
    settle,
    step_outcome,
)
from reqpmd.builds.states import State


def stop(*requests: tuple[StopReason, str]) -> StopRequest:
    s = StopRequest()
    for reason, note in requests:
        s.request(reason, note)
    return s


def test_a_cancel_wins_over_an_earlier_or_later_reason() -> None:
    for order in (
        [(StopReason.REQUEUE, "gate closed"), (StopReason.CANCEL, "cancelled by ann")],
        [(StopReason.CANCEL, "cancelled by ann"), (StopReason.TIMEOUT, "too slow")],
    ):
        s = stop(*order)
        assert (s.reason, s.note) == (StopReason.CANCEL, "cancelled by ann")
        assert s.outcome(130) == Outcome(State.CANCELLED, 130, "cancelled by ann")
        assert s.requested and s.event.is_set()


@pytest.mark.parametrize(
    ("reason", "state"),
    [
        (StopReason.REQUEUE, State.QUEUED),
        (StopReason.TIMEOUT, State.TIMED_OUT),
        (StopReason.CANCEL, State.CANCELLED),
    ],
)
def test_each_stop_reason_has_its_state_and_a_default_note(
    reason: StopReason, state: State
) -> None:
    outcome = stop((reason, "")).outcome()
    assert outcome.state == state and outcome.error


def test_mock_exit_codes() -> None:
    assert step_outcome("rebuild", 0) is None
    locked = step_outcome("rebuild", 60)
    assert locked is not None and locked.state == State.QUEUED and "locked" in str(locked.error)
    failed = step_outcome("buildsrpm", 1)
    assert failed == Outcome(State.FAILED, 1, "mock --buildsrpm exited with 1; see build.log")


@pytest.mark.parametrize("state", [State.QUEUED, State.TIMED_OUT])
def test_settle_turns_a_rerun_or_timeout_that_meets_a_cancel_into_cancelled(state: State) -> None:
    s = stop((StopReason.CANCEL, "cancelled by bob"))
    got, changes = settle(
        Outcome(state, None, "x"), stop=s, retries=0, max_retries=3, count_retry=True
    )
    assert got == State.CANCELLED and changes["error"] == "cancelled by bob"
    assert "retries" not in changes  # a cancel uses up no retry


@pytest.mark.parametrize("state", [State.SUCCEEDED, State.FAILED])
def test_settle_keeps_what_mock_itself_decided(state: State) -> None:
    s = stop((StopReason.CANCEL, "late"))
    got, _ = settle(Outcome(state, 0, None), stop=s, retries=0, max_retries=3, count_retry=False)
    assert got == state


def test_settle_counts_retries_and_gives_up_past_the_budget() -> None:
    rerun = Outcome(State.QUEUED, 60, "locked")
    got, changes = settle(rerun, stop=None, retries=1, max_retries=2, count_retry=True)
    assert (got, changes["retries"]) == (State.QUEUED, 2) and "exit_code" not in changes
    got, changes = settle(rerun, stop=None, retries=2, max_retries=2, count_retry=True)
    assert got == State.FAILED and changes["error"] == "gave up after 2 retries: locked"
    assert changes["exit_code"] == 60
    got, changes = settle(rerun, stop=None, retries=2, max_retries=2, count_retry=False)
    assert got == State.QUEUED and "retries" not in changes  # e.g. the daemon stopping
