"""The daemon's one error vocabulary.

Every failure the daemon reports to a client is one of these classes; each carries a
stable ``code`` that reqpmctl maps once to its exit codes. Keeping them in one module
means a new failure mode has to pick its place in that mapping deliberately.
"""

from __future__ import annotations

import errno


class ReqpmError(Exception):
    """Base of every error reqpm raises on purpose."""

    code = "failed"


class LimiterError(ReqpmError):
    """Base of the build-slot limiter's errors."""


class SlotTimeout(TimeoutError, LimiterError):
    """No slot was granted within the caller's timeout.

    Subclasses TimeoutError so callers written against the seed's API keep working.
    """

    code = "timeout"


class WaitCancelled(LimiterError):
    """The caller gave up waiting for a slot (its cancel event was set)."""

    code = "cancelled"


class SlotLost(LimiterError):
    """A held slot's lease ran out or it was force-released; the holder must stop."""

    code = "slot_lost"


class SlotNameInUse(LimiterError):
    """The slot name is already held or awaited by another owner."""

    code = "conflict"


class RedisUnavailable(LimiterError):
    """Redis could not be reached; held slots survive if it returns within their lease."""

    code = "unavailable"


class InvalidArgument(ReqpmError):
    """A caller passed a value outside its allowed range."""

    code = "invalid"


class PermissionDenied(ReqpmError):
    """The caller's role may not do this; the message names the role needed."""

    code = "permission"


class NotFound(ReqpmError):
    """No such build, slot or setting."""

    code = "not_found"


class Busy(ReqpmError):
    """The daemon is at a cap (clients, uploads); the request may be tried again."""

    code = "unavailable"


class AlreadyExists(ReqpmError):
    """A name that must be unique (a project) is taken."""

    code = "conflict"


class QuotaExceeded(ReqpmError):
    """A user is at one of their limits (unfinished builds, bytes submitted)."""

    code = "quota"


class DiskFull(ReqpmError):
    """state_dir has no room: the request changed nothing and may be tried later."""

    code = "unavailable"


def disk_full(exc: BaseException) -> bool:
    """Whether an error means "no space left" (ENOSPC, EDQUOT; the store raises SQLite's
    "database or disk is full" as ENOSPC too)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class BadRequest(ReqpmError):
    """A control request that is malformed (not a bad value: that is InvalidArgument)."""

    code = "bad_request"
