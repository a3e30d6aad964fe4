"""Per-user limits: what waits in state_dir (unfinished builds, submitted bytes), and the
uploads being copied to disk at once.

Admins have no quota. Submissions of one user in flight at once are counted while they
are stored (a reservation), so two parallel uploads cannot both slip under the limit.
A non-admin user stores one upload at a time, and one of the upload places is kept for
admins, so a user whose files read slowly (a FUSE mount) cannot make submit busy for all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from reqpmd.builds.gates import MB
from reqpmd.builds.store import Store
from reqpmd.config.schema import Settings
from reqpmd.control.server import Peer
from reqpmd.errors import Busy, QuotaExceeded

MAX_UPLOADS = 4  # submissions copied to disk at once, in all


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


class Uploads:
    def __init__(self, total: int = MAX_UPLOADS) -> None:
        self._total = total
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}  # uid -> uploads being stored (non-admins)
        self._admins = 0

    @contextmanager
    def storing(self, peer: Peer) -> Iterator[None]:
        with self._lock:
            users = sum(self._active.values())
            if users + self._admins >= self._total:
                raise Busy(f"{self._total} submissions are being stored already; try again")
            if not peer.admin:
                if self._active.get(peer.uid, 0) >= 1:
                    raise Busy(
                        f"{peer.user} is storing a submission already (one at a time); "
                        "try again when it is stored"
                    )
                if users >= self._total - 1:  # the last place is kept for admins
                    raise Busy(f"{users} submissions are being stored already; try again")
                self._active[peer.uid] = self._active.get(peer.uid, 0) + 1
            else:
                self._admins += 1
        try:
            yield
        finally:
            with self._lock:
                if peer.admin:
                    self._admins -= 1
                elif self._active.get(peer.uid, 0) <= 1:
                    self._active.pop(peer.uid, None)
                else:
                    self._active[peer.uid] -= 1
