"""Per-user limits on what waits in state_dir: unfinished builds and submitted bytes.

Admins have none. Submissions of one user in flight at once are counted while they are
stored (a reservation), so two parallel uploads cannot both slip under the limit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from reqpmd.builds.gates import MB
from reqpmd.builds.store import Store
from reqpmd.config.schema import Settings
from reqpmd.control.server import Peer
from reqpmd.errors import QuotaExceeded


class Quota:
    def __init__(self, store: Store, settings: Callable[[], Settings]) -> None:
        self._store = store
        self._settings = settings
        self._lock = threading.Lock()
        self._reserved: dict[int, tuple[int, int]] = {}  # uid -> (submissions, bytes)

    @contextmanager
    def reserve(self, peer: Peer, size: int) -> Iterator[None]:
        """Hold room for one more build of ``size`` bytes while it is stored."""
        if peer.admin:
            yield
            return
        s = self._settings()
        with self._lock:
            count, used = self._store.usage(peer.uid)
            pending, pending_bytes = self._reserved.get(peer.uid, (0, 0))
            count, used = count + pending, used + pending_bytes
            if count + 1 > s.max_queued_per_user:
                raise QuotaExceeded(
                    f"{peer.user} has {count} unfinished builds, the most max_queued_per_user="
                    f"{s.max_queued_per_user} allows; wait for some to end or cancel some"
                )
            if used + size > s.max_staged_mb_per_user * MB:
                raise QuotaExceeded(
                    f"{peer.user}'s unfinished builds hold {used // MB} MB of submitted files; "
                    f"{-(-size // MB)} MB more is over max_staged_mb_per_user="
                    f"{s.max_staged_mb_per_user}; wait for some to end or cancel some"
                )
            self._reserved[peer.uid] = (pending + 1, pending_bytes + size)
        try:
            yield
        finally:
            with self._lock:
                n, b = self._reserved.pop(peer.uid, (1, size))
                if n > 1:
                    self._reserved[peer.uid] = (n - 1, b - size)
