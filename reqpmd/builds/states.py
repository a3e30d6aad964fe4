"""Build states and the transitions allowed between them.

queued -> waiting (for a slot) -> building -> succeeded | failed | cancelled | timed_out.
A build goes back to queued when it must run again (daemon stopped or crashed mid-build,
mock reported a locked root). Final states are final: a retry is a new run of the same
id that starts from queued again, and only an explicit retry may leave a final state.
"""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    WAITING = "waiting"
    BUILDING = "building"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def final(self) -> bool:
        return self in FINAL


FINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT})

ALLOWED: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.WAITING, State.CANCELLED, State.FAILED}),
    State.WAITING: frozenset(
        {State.BUILDING, State.QUEUED, State.CANCELLED, State.TIMED_OUT, State.FAILED}
    ),
    State.BUILDING: frozenset(FINAL | {State.QUEUED}),
    # an explicit retry by a user
    State.SUCCEEDED: frozenset({State.QUEUED}),
    State.FAILED: frozenset({State.QUEUED}),
    State.CANCELLED: frozenset({State.QUEUED}),
    State.TIMED_OUT: frozenset({State.QUEUED}),
}


class Publish(StrEnum):
    """Where a succeeded build's packages are: a second, smaller state beside ``State``.

    pending -> published | publish_failed | not_published; publish_failed -> published
    (retried) ... A build that did not succeed has none (NULL). Publishing never changes
    ``State``: a build whose packages could not be published still succeeded.
    """

    PENDING = "pending"
    PUBLISHED = "published"
    PUBLISH_FAILED = "publish_failed"
    NOT_PUBLISHED = "not_published"


class IllegalTransition(RuntimeError):
    """A bug: code tried to move a build along an edge the state machine does not have."""


def check(old: State, new: State) -> None:
    if new not in ALLOWED[old]:
        raise IllegalTransition(f"build cannot go from {old} to {new}")
