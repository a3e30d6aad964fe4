"""The limiter's parts on their own: the heartbeat thread (fake renewals, a fake clock),
the grant listener (a real redis-server), and the waiter (fake WaitSteps, no Redis)."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from reqpmd.errors import RedisUnavailable, SlotTimeout, WaitCancelled
from reqpmd.slots.grants import GrantListener, Pending
from reqpmd.slots.heartbeat import Heartbeat
from reqpmd.slots.server import RedisServer
from reqpmd.slots.waiter import Attempt, Waiter
from tests.fakes import FakeClock

_names = itertools.count()


def wait_until(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` every 0.01 s until it is truthy (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(0.01)


# -- Heartbeat ---------------------------------------------------------------------------


@dataclass(eq=False)
class FakeSlot:
    name: str
    # not due until watch() says when: the thread may look between hold() and watch()
    next_renewal: float = 1e6


class Renewals:
    """The slots held and a fake ``renew``: scripted per slot, every call recorded."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.slots: list[FakeSlot] = []
        self.calls: list[str] = []
        self.gone: set[str] = set()  # renew answers None: released or lost
        self.fail_once: set[str] = set()  # renew raises, once
        self._lock = threading.Lock()

    def held(self) -> list[FakeSlot]:
        with self._lock:
            return list(self.slots)

    def hold(self, slot: FakeSlot) -> FakeSlot:
        with self._lock:
            self.slots.append(slot)
        return slot

    def renew(self, slot: FakeSlot) -> float | None:
        with self._lock:
            self.calls.append(slot.name)
            if slot.name in self.fail_once:
                self.fail_once.discard(slot.name)
                raise RuntimeError(f"surprise renewing {slot.name}")
            if slot.name in self.gone:
                self.slots.remove(slot)  # as the limiter does: a gone slot is not held
                return None
            return self.interval

    def count(self, name: str) -> int:
        with self._lock:
            return self.calls.count(name)

    def reached(self, name: str, times: int) -> Callable[[], bool]:
        return lambda: self.count(name) >= times


@pytest.fixture
def beat() -> Iterator[tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str]]:
    renewals, clock = Renewals(), FakeClock(0.0)
    name = f"test-heartbeat-{next(_names)}"
    hb: Heartbeat[FakeSlot] = Heartbeat(renewals.held, renewals.renew, clock, name=name)
    yield hb, renewals, clock, name
    hb.close()


def thread_alive(name: str) -> bool:
    return any(t.name == name and t.is_alive() for t in threading.enumerate())


def looked(clock: FakeClock, times: int = 3) -> None:
    """Wait until the heartbeat has looked at its slots since the caller's last change."""
    clock.polled(times)


def test_heartbeat_renews_each_slot_when_it_is_due(
    beat: tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str],
) -> None:
    hb, renewals, clock, _ = beat
    a = renewals.hold(FakeSlot("a"))
    b = renewals.hold(FakeSlot("b"))
    hb.watch(a, 0.02)
    hb.watch(b, 0.04)
    looked(clock)
    assert renewals.calls == []  # nothing is due while the clock stands still
    clock.advance(0.02)
    wait_until(lambda: renewals.count("a") == 1, what="a renewed")
    looked(clock)
    assert renewals.count("b") == 0  # b is due later
    assert renewals.count("a") == 1
    clock.advance(0.02)
    wait_until(lambda: renewals.count("a") == 2 and renewals.count("b") == 1, what="both")
    assert a.next_renewal == b.next_renewal == pytest.approx(0.04 + renewals.interval)


def test_heartbeat_stops_renewing_a_slot_once_renew_answers_none(
    beat: tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str],
) -> None:
    hb, renewals, clock, _ = beat
    a = renewals.hold(FakeSlot("a"))
    b = renewals.hold(FakeSlot("b"))
    renewals.gone.add("a")
    hb.watch(a, 0.0)
    hb.watch(b, 0.0)
    wait_until(lambda: renewals.count("a") == 1 and renewals.count("b") == 1, what="first")
    for n in range(2, 5):
        clock.advance(renewals.interval)
        wait_until(renewals.reached("b", n), what=f"b renewed {n} times")
        assert renewals.count("b") == n
    assert renewals.count("a") == 1


def test_heartbeat_goes_on_after_a_renewal_raises(
    beat: tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hb, renewals, clock, _ = beat
    a = renewals.hold(FakeSlot("a"))
    b = renewals.hold(FakeSlot("b"))
    renewals.fail_once.add("a")
    hb.watch(a, 0.0)
    hb.watch(b, 0.0)
    wait_until(lambda: renewals.count("a") == 1 and renewals.count("b") == 1, what="first")

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "renewing a slot failed" in r.getMessage()]

    wait_until(failures, what="the failure's log record")
    # the other slot is still renewed on time ...
    clock.advance(renewals.interval)
    wait_until(lambda: renewals.count("b") == 2, what="b renewed again")
    assert renewals.count("a") == 1
    assert len(failures()) == 1
    record = failures()[0]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert "surprise renewing a" in str(record.exc_info[1])
    # ... and the failed one is tried again a second later
    assert a.next_renewal == pytest.approx(1.0)
    clock.advance(1.0)
    wait_until(lambda: renewals.count("a") == 2, what="a retried")


def test_heartbeat_thread_exits_when_nothing_is_held_and_restarts_on_watch(
    beat: tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str],
) -> None:
    hb, renewals, clock, name = beat
    a = renewals.hold(FakeSlot("a"))
    renewals.gone.add("a")
    hb.watch(a, 0.0)
    wait_until(lambda: renewals.count("a") == 1, what="a renewed")
    wait_until(lambda: not thread_alive(name), what="the heartbeat thread to exit")
    b = renewals.hold(FakeSlot("b"))
    hb.watch(b, 0.0)
    assert thread_alive(name)
    wait_until(lambda: renewals.count("b") == 1, what="b renewed by a new thread")
    clock.advance(renewals.interval)
    wait_until(lambda: renewals.count("b") == 2, what="b renewed again")


def test_heartbeat_does_not_miss_a_slot_watched_as_its_thread_exits() -> None:
    """A grant that lands just as the thread finds nothing held must still be renewed.
    The thread used to give up its lock before it cleared ``_thread``: a watch() in that
    gap started no thread, and the new slot went unrenewed until its lease ran out."""

    @dataclass(eq=False)
    class S:
        name: str
        next_renewal: float = 0.0

    missed = 0
    for i in range(40):
        held: list[S] = []
        renewed: list[str] = []
        emptied = threading.Event()

        def get_held(held: list[S] = held, emptied: threading.Event = emptied) -> list[S]:
            now_held = list(held)
            if not now_held:  # the thread is about to exit: widen the window
                emptied.set()
                time.sleep(0.002)
            return now_held

        def renew(s: S, held: list[S] = held, renewed: list[str] = renewed) -> float | None:
            renewed.append(s.name)
            if s.name == "a":
                held.remove(s)  # released: the thread finds nothing held next
                return None
            return 10.0

        hb: Heartbeat[S] = Heartbeat(get_held, renew, time.monotonic, name=f"hb-race-{i}")
        first = S("a")
        held.append(first)
        hb.watch(first, 0.0)
        assert emptied.wait(5)
        late = S("b")
        held.append(late)
        hb.watch(late, 0.0)  # a new grant, due at once
        deadline = time.monotonic() + 2
        while "b" not in renewed and time.monotonic() < deadline:
            time.sleep(0.001)
        missed += "b" not in renewed
        hb.close()
    assert missed == 0, f"{missed}/40 slots watched as the thread exited were never renewed"


def test_heartbeat_close_stops_the_thread(
    beat: tuple[Heartbeat[FakeSlot], Renewals, FakeClock, str],
) -> None:
    hb, renewals, _, name = beat
    a = renewals.hold(FakeSlot("a"))
    hb.watch(a, 0.0)
    wait_until(lambda: renewals.count("a") == 1, what="a renewed")
    hb.close()
    wait_until(lambda: not thread_alive(name), what="the heartbeat thread to exit")
    hb.watch(a, 0.0)  # closed: no new thread
    assert not thread_alive(name)


# -- GrantListener ---------------------------------------------------------------------------

CHANNEL = "test-grants"


@pytest.fixture
def listener(rclient: redis.Redis) -> Iterator[GrantListener]:
    grants = GrantListener(rclient, CHANNEL)
    yield grants
    grants.close()


def settled(grants: GrantListener, name: str = "warm-up") -> Pending:
    """Register a first waiter and wait until the listener has told it to ask Redis
    again (it does once a subscription starts): after that, waiters registered see only
    what is published."""
    first = grants.register(name, "o")
    wait_until(lambda: first.repoll, what="the subscription's wake-up")
    return first


def test_register_returns_once_subscribed(listener: GrantListener, rclient: redis.Redis) -> None:
    pending = listener.register("slot", "owner")
    # PUBLISH answers how many subscribers got the message: the listener already does
    assert rclient.publish(CHANNEL, "slot owner 7") == 1
    wait_until(lambda: pending.token == 7, what="the token")
    assert pending.event.is_set()


def test_a_grant_sets_the_token_and_the_event(
    listener: GrantListener, rclient: redis.Redis
) -> None:
    settled(listener)
    pending = listener.register("slot", "owner")
    assert not pending.event.is_set()
    assert (pending.token, pending.repoll) == (None, False)
    rclient.publish(CHANNEL, "slot owner 12")
    assert pending.event.wait(5)
    assert (pending.token, pending.repoll) == (12, False)


def test_a_malformed_message_is_logged_and_ignored(
    listener: GrantListener, rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    settled(listener)
    pending = listener.register("slot", "owner")

    def malformed() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "malformed grant message" in r.getMessage()]

    rclient.publish(CHANNEL, "slot owner not-a-token")
    wait_until(malformed, what="the malformed message's log record")
    assert malformed()[0].levelno == logging.WARNING
    assert "not-a-token" in malformed()[0].getMessage()
    assert not pending.event.is_set()
    assert pending.token is None
    rclient.publish(CHANNEL, "garbage")
    rclient.publish(CHANNEL, "slot owner 3")
    assert pending.event.wait(5)
    assert pending.token == 3
    assert len(malformed()) == 2


def test_grants_for_other_waiters_leave_this_one_alone(
    listener: GrantListener, rclient: redis.Redis
) -> None:
    settled(listener)
    pending = listener.register("slot", "owner")
    sentinel = listener.register("sentinel", "owner")
    for message in ("slot other-owner 5", "other-slot owner 6", "slot 7", "slot owner x 8"):
        rclient.publish(CHANNEL, message)
    rclient.publish(CHANNEL, "sentinel owner 9")  # one thread, in order: it comes last
    assert sentinel.event.wait(5)
    assert sentinel.token == 9
    assert not pending.event.is_set()
    assert (pending.token, pending.repoll) == (None, False)


def test_an_unregistered_waiter_is_not_told(listener: GrantListener, rclient: redis.Redis) -> None:
    settled(listener)
    pending = listener.register("slot", "owner")
    sentinel = listener.register("sentinel", "owner")
    listener.unregister(pending)
    rclient.publish(CHANNEL, "slot owner 5")
    rclient.publish(CHANNEL, "sentinel owner 9")
    assert sentinel.event.wait(5)
    assert pending.token is None and not pending.event.is_set()


def test_every_waiter_repolls_when_the_server_dies(
    listener: GrantListener, redis_server: RedisServer
) -> None:
    settled(listener)
    waiters = [listener.register(f"slot{i}", "owner") for i in range(3)]
    assert not any(p.event.is_set() or p.repoll for p in waiters)
    redis_server.kill()
    wait_until(lambda: all(p.repoll and p.event.is_set() for p in waiters), what="repoll")
    assert all(p.token is None for p in waiters)


def test_register_fails_fast_when_redis_is_down(
    rclient: redis.Redis, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("reqpmd.slots.grants.SUBSCRIBE_TIMEOUT", 0.2)
    redis_server.kill()
    grants = GrantListener(rclient, CHANNEL)
    try:
        with pytest.raises(RedisUnavailable) as info:
            grants.register("slot", "owner")
        assert "cannot subscribe to grants" in str(info.value)
    finally:
        grants.close()


# -- Waiter ------------------------------------------------------------------------------------


@dataclass
class FakeSteps:
    """WaitSteps: each attempt answers the next scripted reply (an Attempt, or an
    exception to raise); once the script runs out, "not yet"."""

    script: list[Attempt | Exception] = field(default_factory=list)
    lease_ttl: float = 300.0  # the safety poll (lease/3, at most 5 s) never fires in a test
    attempts: int = 0
    withdrawn: int = 0
    listened: list[Pending] = field(default_factory=list)
    unlistened: int = 0
    timeout_error: SlotTimeout = field(default_factory=lambda: SlotTimeout("no slot: why"))
    waited: list[float] = field(default_factory=list)

    def attempt(self, name: str, owner: str, priority: int, info: str) -> Attempt:
        self.attempts += 1
        reply = self.script.pop(0) if self.script else Attempt(None)
        if isinstance(reply, Exception):
            raise reply
        return reply

    def withdraw(self, name: str, owner: str) -> None:
        self.withdrawn += 1

    def listen(self, name: str, owner: str) -> Pending:
        pending = Pending(f"{name} {owner}")
        self.listened.append(pending)
        return pending

    def unlisten(self, pending: Pending) -> None:
        self.unlistened += 1

    def timed_out(self, waited: float) -> SlotTimeout:
        self.waited.append(waited)
        return self.timeout_error


class Run:
    """``Waiter.run()`` in a thread of its own; its result or error kept."""

    def __init__(self, waiter: Waiter) -> None:
        self.result: tuple[int, float] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(waiter,), daemon=True)
        self.thread.start()

    def _run(self, waiter: Waiter) -> None:
        try:
            self.result = waiter.run()
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.thread.join(5)
        assert not self.thread.is_alive(), "the waiter did not return"


def make_waiter(
    steps: FakeSteps,
    deadline: float | None = None,
    cancel: threading.Event | None = None,
    **kwargs: Any,
) -> Waiter:
    return Waiter(steps, "slot", "owner", 0, "{}", deadline, cancel, **kwargs)


def test_waiter_granted_on_the_first_attempt() -> None:
    steps = FakeSteps([Attempt(7)])
    now = [50.0]
    token, sent_at = make_waiter(steps, clock=lambda: now[0]).run()
    assert (token, sent_at) == (7, 50.0)
    assert steps.attempts == 1
    assert len(steps.listened) == steps.unlistened == 1
    assert steps.withdrawn == 0


def test_a_notification_makes_the_waiter_ask_at_once_and_only_redis_grants() -> None:
    """A grant message may be old (its process stopped while it waited in the socket):
    the waiter asks Redis at once, and takes the token Redis answers, not the message's."""
    steps = FakeSteps([Attempt(None), Attempt(None), Attempt(42)])
    run = Run(make_waiter(steps))
    wait_until(lambda: steps.attempts == 1, what="the first attempt")
    pending = steps.listened[0]
    pending.token = 41  # an old grant: Redis still says wait
    pending.event.set()
    wait_until(lambda: steps.attempts == 2, what="asked at once, not at the safety poll")
    assert run.thread.is_alive()  # still waiting
    pending.token = 42
    pending.event.set()
    run.join()
    assert run.error is None
    assert run.result is not None and run.result[0] == 42
    assert steps.attempts == 3  # each message brought one question, no poll
    assert steps.unlistened == 1
    assert steps.withdrawn == 0


def test_waiter_asks_again_when_told_to_repoll() -> None:
    steps = FakeSteps([Attempt(None), Attempt(5)])
    run = Run(make_waiter(steps))
    wait_until(lambda: steps.attempts == 1, what="the first attempt")
    pending = steps.listened[0]
    pending.repoll = True
    pending.event.set()
    run.join()
    assert run.result is not None and run.result[0] == 5
    assert steps.attempts == 2


def test_waiter_polls_when_the_hint_says_the_state_may_change() -> None:
    steps = FakeSteps([Attempt(None, wake_hint=0.01), Attempt(None, wake_hint=0.01), Attempt(3)])
    token, _ = make_waiter(steps).run()
    assert token == 3
    assert steps.attempts == 3


def test_waiter_times_out_with_the_steps_error_and_withdraws() -> None:
    steps = FakeSteps()
    started = time.monotonic()
    with pytest.raises(SlotTimeout) as info:
        make_waiter(steps, deadline=started + 0.1).run()
    assert info.value is steps.timeout_error
    assert steps.withdrawn == 1
    assert steps.unlistened == 1
    assert len(steps.waited) == 1 and steps.waited[0] >= 0.09


def test_waiter_cancelled_withdraws() -> None:
    steps = FakeSteps()
    cancel = threading.Event()
    run = Run(make_waiter(steps, cancel=cancel))
    wait_until(lambda: steps.attempts == 1, what="the first attempt")
    cancel.set()
    run.join()
    assert isinstance(run.error, WaitCancelled)
    assert "'slot'" in str(run.error)
    assert steps.withdrawn == 1
    assert steps.unlistened == 1


def test_waiter_cancelled_while_redis_is_down() -> None:
    steps = FakeSteps([RedisUnavailable("down")] * 1000)
    cancel = threading.Event()
    run = Run(make_waiter(steps, cancel=cancel))
    wait_until(lambda: steps.attempts >= 2, what="a retry")
    cancel.set()
    run.join()
    assert isinstance(run.error, WaitCancelled)
    assert steps.withdrawn == 1


def test_waiter_retries_redis_outages_with_backoff_logging_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reqpmd.slots.waiter")
    down = RedisUnavailable("Redis is unreachable")
    steps = FakeSteps([down, down, down, down, Attempt(9)])
    slept: list[float] = []
    token, _ = make_waiter(steps, sleep=slept.append).run()
    assert token == 9
    assert slept == [0.05, 0.1, 0.2, 0.4]
    assert steps.attempts == 5
    assert len(steps.listened) == steps.unlistened == 5
    assert steps.withdrawn == 0
    records = [r for r in caplog.records if r.name == "reqpmd.slots.waiter"]
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "retrying with backoff" in warnings[0].getMessage()
    assert "Redis is unreachable" in warnings[0].getMessage()
    assert [r.getMessage() for r in records if r.levelno == logging.INFO] == [
        "waiting for slot slot: Redis reachable again"
    ]


def test_waiter_retries_a_failed_listen_too() -> None:
    steps = FakeSteps([Attempt(4)])
    listen = steps.listen
    failures = [RedisUnavailable("cannot subscribe")]

    def flaky_listen(name: str, owner: str) -> Pending:
        if failures:
            raise failures.pop()
        return listen(name, owner)

    steps.listen = flaky_listen  # type: ignore[method-assign]
    slept: list[float] = []
    token, _ = make_waiter(steps, sleep=slept.append).run()
    assert token == 4
    assert slept == [0.05]


def test_waiter_gives_up_when_redis_stays_down_past_the_deadline() -> None:
    steps = FakeSteps([RedisUnavailable("down")] * 100)
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(RedisUnavailable) as info:
        make_waiter(steps, deadline=0.3, clock=lambda: now[0], sleep=sleep).run()
    assert "gave up waiting for slot 'slot'" in str(info.value)
    assert now[0] == pytest.approx(0.3)  # the last sleep was cut to the deadline
    assert steps.withdrawn == 1


def test_a_server_an_earlier_run_left_on_the_directory_is_ended_first(short_tmp: Any) -> None:
    """Redis does not exit at SIGTERM while its final save fails (a full disk), so the
    embedded server can outlive its daemon; the next start must end it, or two servers
    share the directory and the old one deletes the new one's socket. A stopped process
    stands in for the one that ignores SIGTERM."""
    import os
    import signal

    old = RedisServer(short_tmp / "redis", persist=True)
    old.start()
    assert old.process is not None
    left = old.process
    left.send_signal(signal.SIGSTOP)  # deaf to SIGTERM, as on a full disk
    new = RedisServer(short_tmp / "redis", persist=True)
    try:
        new.start()
        assert left.wait(5) == -signal.SIGKILL  # ended, the hard way
        assert new.client().ping()
        assert int(new.pid_file.read_text()) == new.process.pid  # type: ignore[union-attr]
        # a pid file naming some other process is left alone
        new.pid_file.write_text(f"{os.getpid()}\n")
        new.stop()
        again = RedisServer(short_tmp / "redis", persist=True)
        again.start()  # and the test runner lives on
        again.kill()
    finally:
        new.kill()
        old.kill()
