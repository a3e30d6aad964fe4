"""Children that must not outlive reqpmd: mock's process groups and the embedded redis-server.

Under systemd, ``KillMode=control-group`` ends them when reqpmd dies. Started any other
way (``./dev run``, a container without systemd), a reqpmd killed with -9 would leave a
mock building past its slot's lease: the slot goes to another host while the orphan still
builds, one build more than the limit. The kernel's parent-death signal closes that gap.

PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, not the process: the
thread that starts mock is the one that waits for it, so it never ends first. A setuid
program (mock through consolehelper) drops the signal at exec; there crash recovery's ladder
and systemd's control group remain the only guards.
"""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Popen's preexec_fn: the kernel sends SIGTERM (mock cleans its chroot up on it) to
    this child when its parent thread dies. Async-signal-safe enough for a forked child of
    a threaded parent: one libc call, no lock, no logging."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
