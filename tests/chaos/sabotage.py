"""reqpmd broken on purpose, to show that each check catches its violation:
`python -m tests.chaos.sabotage NAME --config FILE` patches one thing, then runs reqpmd.
`./dev chaos --sabotage NAME` runs a whole farm of such daemons.

  none         nothing patched (the harness's own control)
  no_grace     no restart grace after Redis lost its data       -> safety
  no_fencing   a paused holder never notices its lease ran out (no fence at all)
                                                              -> safety (fencing)
  no_guard     no lease guard: a daemon stopped alone leaves its mock building on -> safety
  drop_submit  every 4th submission is acknowledged, not kept    -> nothing lost
  no_recovery  builds a crashed daemon left are never requeued   -> liveness, nothing lost
  no_metadata  packages are published without a metadata run   -> consistency
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable
from typing import Any


def _no_grace() -> None:
    from reqpmd.slots import limiter

    original = limiter.BuildConcurrencyLimiter.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        self.restart_grace = 0.0

    limiter.BuildConcurrencyLimiter.__init__ = init  # type: ignore[method-assign]


def _no_fencing() -> None:
    """Every layer: the sweep, on_lost, the lease guard and the run's own lease check."""
    from reqpmd.builds import guard
    from reqpmd.slots import limiter

    limiter.BuildConcurrencyLimiter._sweep_expired = lambda self: None  # type: ignore[method-assign]
    original = limiter.BuildConcurrencyLimiter._renew_due

    def renew(self: Any, slot: Any) -> float | None:
        slot.on_lost = None  # a lost slot goes unnoticed by the build
        return original(self, slot)

    limiter.BuildConcurrencyLimiter._renew_due = renew  # type: ignore[method-assign]
    _no_guard()
    guard.Fence.lapsed = lambda self: False  # type: ignore[method-assign]
    guard.Fence.expired = lambda self, result_dir: False  # type: ignore[method-assign]


def _no_guard() -> None:
    from reqpmd.builds import guard

    guard.LeaseGuard.watch = lambda self, result_dir, deadline, early: None  # type: ignore[method-assign]


def _drop_submit() -> None:
    from reqpmd.builds import store

    original = store.Store.submit
    count = itertools.count(1)

    def submit(self: Any, **kwargs: Any) -> int:
        build_id = original(self, **kwargs)
        if next(count) % 4 == 0:
            with self.tx() as db:
                db.execute("DELETE FROM builds WHERE id = ?", (build_id,))
        return build_id

    store.Store.submit = submit  # type: ignore[method-assign]


def _no_recovery() -> None:
    from reqpmd.builds import scheduler

    scheduler.Scheduler.start_recovery = lambda self, stopper: 0  # type: ignore[method-assign]


def _no_metadata() -> None:
    from reqpmd.repos import repository

    repository.Repository.update = lambda self, retire=None: None  # type: ignore[method-assign]


SABOTAGES: dict[str, Callable[[], None]] = {
    "none": lambda: None,
    "no_grace": _no_grace,
    "no_fencing": _no_fencing,
    "no_guard": _no_guard,
    "drop_submit": _drop_submit,
    "no_recovery": _no_recovery,
    "no_metadata": _no_metadata,
}


def main() -> int:
    name, rest = sys.argv[1], sys.argv[2:]
    SABOTAGES[name]()
    from reqpmd.daemon import main as reqpmd_main

    return reqpmd_main(rest)


if __name__ == "__main__":
    sys.exit(main())
