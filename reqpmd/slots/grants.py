"""One pub/sub subscription per limiter, handing each grant to the waiter it names
(sharded, SSUBSCRIBE, where the server has it: Redis 7 on).

A release grants the next slot inside its script and publishes "name owner token".
Subscribing per wait would put a connect, a SUBSCRIBE and its confirmation on every
waiter's path; one listener thread keeps the subscription and wakes the right waiter.
If the subscription drops, grants may have been missed, so every waiter is told to
ask Redis again.

Each listener has a channel of its own (``keys.grant_channel``), named by the first part
of its waiters' owners, so a grant wakes the one process that waits for it rather than
every process of the namespace: with a thousand hosts, a thousand wake-ups per grant.
The shared channel is still heard, for grants published by limiters of an earlier
release.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis

from reqpmd.backoff import Backoff
from reqpmd.slots.connection import REDIS_ERRORS, text, unavailable
from reqpmd.slots.keys import grant_channel

log = logging.getLogger(__name__)

IDLE_EXIT = 30.0  # seconds without waiters before the listener lets go of its connection
SUBSCRIBE_TIMEOUT = 5.0


@dataclass
class Pending:
    key: str
    event: threading.Event = field(default_factory=threading.Event)
    token: int | None = None
    repoll: bool = False


class GrantListener:
    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client = client
        self._channel = channel
        self._lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._error = ""
        self.listener = uuid.uuid4().hex[:16]  # names this listener's channel
        self._own = grant_channel(channel, self.listener)

    def owner(self) -> str:
        """A new owner id for a waiter of this limiter: its grant comes on our channel."""
        return f"{self.listener}.{uuid.uuid4().hex}"

    def register(self, name: str, owner: str) -> Pending:
        """Listen for this waiter's grant; returns once the subscription is live."""
        pending = Pending(f"{name} {owner}")
        with self._lock:
            self._pending[pending.key] = pending
            if self._thread is None:
                self._closed = False
                self._thread = threading.Thread(target=self._run, name="slot-grants", daemon=True)
                self._thread.start()
        if not self._subscribed.wait(SUBSCRIBE_TIMEOUT):
            self.unregister(pending)
            raise unavailable(
                RuntimeError(f"cannot subscribe to grants ({self._error or 'no confirmation'})")
            )
        return pending

    def unregister(self, pending: Pending) -> None:
        with self._lock:
            self._pending.pop(pending.key, None)

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def _wake_all(self) -> None:
        with self._lock:
            for p in self._pending.values():
                p.repoll = True
                p.event.set()

    def _run(self) -> None:
        backoff = Backoff(first=0.05, cap=2.0)
        idle_since: float | None = None
        pubsub, sharded = None, False
        try:
            while True:
                with self._lock:
                    if self._closed or (
                        idle_since is not None and time.monotonic() - idle_since > IDLE_EXIT
                    ):
                        self._thread = None
                        self._subscribed.clear()
                        return
                    idle_since = (idle_since or time.monotonic()) if not self._pending else None
                try:
                    if pubsub is None:
                        pubsub, sharded = self._subscribe()
                        self._subscribed.set()
                        self._wake_all()  # grants published before we listened: ask again
                        backoff.succeeded()
                    read = pubsub.get_sharded_message if sharded else pubsub.get_message
                    msg = read(timeout=1.0)
                except (*REDIS_ERRORS, OSError, ValueError) as exc:
                    # ValueError/OSError: the client's connection pool was closed under us
                    self._error = str(exc)
                    self._subscribed.clear()
                    self._wake_all()
                    if pubsub is not None:
                        with contextlib.suppress(Exception):
                            pubsub.close()
                        pubsub = None
                    time.sleep(backoff.failed())
                    continue
                if msg and msg.get("type") in ("message", "smessage"):
                    self._dispatch(text(msg["data"]))
        except Exception:
            log.exception(
                "grant listener failed; waiters fall back to polling until the "
                "next wait starts a new listener"
            )
            self._wake_all()
        finally:
            with self._lock:
                # an idle exit let go already, and a new listener may have started since
                if self._thread is threading.current_thread():
                    self._thread = None
                    self._subscribed.clear()
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _subscribe(self) -> tuple[redis.client.PubSub, bool]:
        """A live subscription to our channels, and whether it is sharded: SSUBSCRIBE
        where the server has it (Redis 7 on, as the scripts' SPUBLISH), else SUBSCRIBE."""
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.ssubscribe(self._channel, self._own)
            self._confirmed(pubsub.get_sharded_message, "SSUBSCRIBE")
            return pubsub, True
        except redis.ResponseError as exc:
            with contextlib.suppress(Exception):
                pubsub.close()
            if "unknown command" not in str(exc).lower():
                raise
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self._channel, self._own)
            self._confirmed(pubsub.get_message, "SUBSCRIBE")
        except BaseException:
            with contextlib.suppress(Exception):
                pubsub.close()
            raise
        return pubsub, False

    @staticmethod
    def _confirmed(read: Callable[..., Any], command: str) -> None:
        for _ in range(2):  # one confirmation per channel
            if read(timeout=SUBSCRIBE_TIMEOUT) is None:
                raise redis.TimeoutError(f"no confirmation of {command}")

    def _dispatch(self, data: str) -> None:
        key, _, token = data.rpartition(" ")
        if not (token.isascii() and token.isdigit() and len(token) <= 20):
            log.warning("ignoring a malformed grant message %r", data[:200])
            return
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None:
            pending.token = int(token)
            pending.event.set()
