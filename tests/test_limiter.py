"""The build-slot limiter against a real redis-server, one test (or more) per promise."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from reqpmd.concurrency import (
    BuildConcurrencyLimiter,
    RedisUnavailable,
    SlotLost,
    SlotNameInUse,
    SlotTimeout,
)
from reqpmd.errors import InvalidArgument, WaitCancelled
from reqpmd.slots.server import RedisServer
from tests.conftest import MakeLimiter, MakeWorker, fresh_start
from tests.workers import wait_until

# -- basics ------------------------------------------------------------------------


def test_acquire_release_and_reads(rclient: redis.Redis, make_limiter: MakeLimiter) -> None:
    lim = make_limiter(rclient, max_concurrent=2, host="h1")
    with lim.acquire("build_19", timeout=5) as slot:
        assert lim.get_active_builds() == ["build_19"]
        assert lim.get_active_count() == 1
        [info] = lim.get_slots()
        assert (info.name, info.host, info.token) == ("build_19", "h1", slot.token)
        assert info.lease_expires_at - info.acquired_at == pytest.approx(60, abs=1)
    assert lim.get_active_builds() == []


def test_try_acquire_respects_the_limit(rclient: redis.Redis, make_limiter: MakeLimiter) -> None:
    lim = make_limiter(rclient, max_concurrent=2)
    assert lim.try_acquire("a") is not None
    assert lim.try_acquire("b") is not None
    assert lim.try_acquire("c") is None
    assert lim.get_waiting() == []  # a failed try leaves no trace in the queue
    assert lim.release("a") is True
    assert lim.try_acquire("c") is not None


def test_name_held_by_another_owner_is_refused(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, max_concurrent=3)
    other = make_limiter(rclient, max_concurrent=3)
    assert lim.try_acquire("build_1")
    with pytest.raises(SlotNameInUse):
        other.try_acquire("build_1")


def test_bad_arguments_are_refused_and_change_nothing(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient)
    for bad in ("", "has space", "x" * 201):
        with pytest.raises(InvalidArgument):
            lim.try_acquire(bad)
    with pytest.raises(InvalidArgument, match="priority"):
        lim.try_acquire("ok", priority=10_000)
    with pytest.raises(InvalidArgument, match="max_concurrent"):
        make_limiter(rclient, max_concurrent=0).try_acquire("ok")
    counts = lim.counts()
    assert (counts.active, counts.waiting) == (0, 0)  # nobody holds, nobody queued


def test_slot_timeout_message_names_wait_busy_count_and_setting(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, max_concurrent=1)
    assert lim.try_acquire("holder")
    with pytest.raises(SlotTimeout) as err:
        lim.wait_for_slot("late", timeout=0.3)
    assert isinstance(err.value, TimeoutError)
    msg = str(err.value)
    assert msg.startswith("Could not acquire build slot after 0.3")
    assert "1/1 slots busy (max_concurrent_builds=1)" in msg
    assert "reqpmctl slots release" in msg
    assert lim.get_waiting() == []  # the timed-out waiter left the queue


def test_timeout_none_waits_until_released(rclient: redis.Redis, make_limiter: MakeLimiter) -> None:
    lim = make_limiter(rclient)
    assert lim.try_acquire("holder")
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(lim.wait_for_slot("w", timeout=None).token))
    t.start()
    wait_until(lambda: [w.name for w in lim.get_waiting()] == ["w"])
    lim.release("holder")
    t.join(10)
    assert got and got[0] > 0


def test_cancel_event_withdraws_a_waiter(rclient: redis.Redis, make_limiter: MakeLimiter) -> None:
    lim = make_limiter(rclient)
    assert lim.try_acquire("holder")
    cancel = threading.Event()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            lim.wait_for_slot("w", timeout=None, cancel=cancel)
        except WaitCancelled as exc:
            errors.append(exc)

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: lim.get_waiting())
    cancel.set()
    t.join(5)
    assert errors and lim.get_waiting() == []


# -- 1. safety -----------------------------------------------------------------------


def test_never_more_holders_than_the_limit_across_processes(
    workers: MakeWorker, rclient: redis.Redis
) -> None:
    """Six processes on three 'hosts' churn through slots; an independent counter,
    incremented while holding, must never pass the limit."""
    procs = [workers(max_concurrent=3, host=f"host{i % 3}") for i in range(6)]
    for w in procs:
        w.send("churn 15 0.005 observed")
    results = [w.expect(lambda m: m["cmd"] == "churn", timeout=120) for w in procs]
    max_seen = max(r["max_seen"] for r in results)
    assert max_seen <= 3
    assert max_seen == 3  # contention was real: the limit was reached
    assert BuildConcurrencyLimiter(rclient).get_active_count() == 0


# -- 2. leases ----------------------------------------------------------------------


def test_killed_holder_frees_its_slot_within_its_lease(
    workers: MakeWorker, redis_server: RedisServer
) -> None:
    holder = workers(lease=2)
    holder.send("acquire a")
    holder.granted("a")
    waiter = workers(lease=2)
    waiter.send("acquire b")
    obs = BuildConcurrencyLimiter(redis_server.client(), lease_ttl=2)
    wait_until(lambda: [w.name for w in obs.get_waiting()] == ["b"], what="b queued")
    assert obs.get_active_builds() == ["a"]  # b is seen waiting behind a live holder
    killed_at = time.monotonic()
    holder.kill9()
    granted = waiter.granted("b", timeout=10)
    assert killed_at < granted["t"] <= killed_at + 2 + 1  # granted after, within the lease


def test_heartbeat_keeps_a_slot_past_its_lease(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, lease_ttl=1)
    slot = lim.wait_for_slot("long", timeout=5)
    other = make_limiter(rclient, lease_ttl=1)
    with pytest.raises(SlotTimeout):
        other.wait_for_slot("late", timeout=2.5)  # 2.5 leases: renewals kept 'long'
    assert not slot.lost.is_set()
    assert lim.get_active_builds() == ["long"]
    lim.release("long")


def test_holder_that_misses_renewals_learns_it_lost_the_slot(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, lease_ttl=1, auto_renew=False)
    slot = lim.wait_for_slot("sleepy", timeout=5)
    other = make_limiter(rclient, lease_ttl=1)
    other.wait_for_slot("next", timeout=5)  # granted only once sleepy's lease ran out
    with pytest.raises(SlotLost):
        lim.renew("sleepy")
    assert slot.lost.is_set()


def test_force_released_holder_is_told_at_next_renewal(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, auto_renew=False)
    lim.wait_for_slot("stuck", timeout=5)
    assert make_limiter(rclient).force_release("stuck") is True
    assert make_limiter(rclient).force_release("stuck") is False
    with pytest.raises(SlotLost):
        lim.renew("stuck")


def test_on_lost_callback_runs_from_the_heartbeat(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, lease_ttl=1)
    lost = threading.Event()
    lim.wait_for_slot("victim", timeout=5, on_lost=lambda slot: lost.set())
    make_limiter(rclient).force_release("victim")
    assert lost.wait(5)


# -- 3. fairness ----------------------------------------------------------------------


def test_first_come_first_served_with_priority_across_processes(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    observer = make_limiter(rclient)
    holder = workers()
    holder.send("acquire h")
    holder.granted("h")
    procs = {}
    for n in ["a", "b", "c", "d"]:
        procs[n] = workers(host=f"host-{n}")
        procs[n].send(f"acquire {n} {5 if n == 'd' else 0}")
        # arrival order is settled before the next one queues
        wait_until(lambda n=n: n in [w.name for w in observer.get_waiting()])
    assert [w.name for w in observer.get_waiting()] == ["d", "a", "b", "c"]
    holder.send("release h")
    served: list[str] = []
    for expected in ["d", "a", "b", "c"]:  # priority first, then arrival
        procs[expected].granted(expected)
        served.append(expected)
        for other, proc in procs.items():
            if other not in served:
                assert proc.poll(lambda m: m["cmd"] == "acquire") is None
        procs[expected].send(f"release {expected}")
    assert served == ["d", "a", "b", "c"]


def test_dead_waiter_does_not_block_the_queue(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, lease_ttl=60)
    assert lim.try_acquire("holder")
    dead = workers(lease=1)
    dead.send("acquire dead")
    wait_until(lambda: [w.name for w in lim.get_waiting()] == ["dead"])
    live = workers(lease=60)
    live.send("acquire live")
    wait_until(lambda: [w.name for w in lim.get_waiting()] == ["dead", "live"])
    dead.kill9()
    wait_until(lambda: [w.name for w in lim.get_waiting()] == ["live"], timeout=5)
    released_at = time.monotonic()
    lim.release("holder")
    assert live.granted("live")["t"] - released_at < 1


# -- 4. fast hand-over ------------------------------------------------------------------


def test_hand_over_is_notified_not_polled(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """With a 60 s lease the waiter's safety poll is 5 s away: only the pub/sub
    notification can make the hand-over this fast."""
    lim = make_limiter(rclient, lease_ttl=60)
    assert lim.try_acquire("holder")
    waiter = workers(lease=60)
    waiter.send("acquire next")
    # queued means listening: a waiter subscribes before it joins the queue, and its next
    # poll is a safety poll 5 s away
    wait_until(lambda: lim.get_waiting())
    released_at = time.monotonic()
    lim.release("holder")
    assert waiter.granted("next")["t"] - released_at < 1.0


def test_a_grant_wakes_only_the_process_that_waits_for_it(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """Each limiter hears its grants on a channel of its own: with many hosts, a grant
    must not wake every one of them."""
    from reqpmd.slots.keys import slot_keys

    lim = make_limiter(rclient, lease_ttl=60)
    assert lim.try_acquire("holder")
    shared = rclient.pubsub()
    shared.subscribe(slot_keys("reqpm").grants)
    assert shared.get_message(timeout=5)["type"] == "subscribe"
    waiters = [workers(lease=60) for _ in range(2)]
    waiters[0].send("acquire next")
    wait_until(lambda: lim.get_waiting())
    own = [c.decode() for c in rclient.pubsub_channels(f"{slot_keys('reqpm').grants}:*")]
    assert len(own) == 1  # the waiting process's own; the idle one listens to nothing
    lim.release("holder")
    waiters[0].granted("next")
    assert shared.get_message(timeout=0.5) is None  # nobody else was woken
    shared.close()


# -- 5. fencing -----------------------------------------------------------------------


def test_tokens_increase_with_every_grant(rclient: redis.Redis, make_limiter: MakeLimiter) -> None:
    lim = make_limiter(rclient, max_concurrent=2)
    tokens = []
    for i in range(10):
        slot = lim.try_acquire(f"b{i}")
        assert slot is not None
        tokens.append(slot.token)
        lim.release(f"b{i}")
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


# -- 6. Redis restarts ------------------------------------------------------------------


def test_restart_that_loses_data_admits_nobody_new_until_survivors_are_back(
    workers: MakeWorker, redis_server: RedisServer
) -> None:
    a = workers(max_concurrent=2, lease=2, host="ha")
    b = workers(max_concurrent=2, lease=2, host="hb")
    a.send("acquire a")
    b.send("acquire b")
    token_a = a.granted("a")["token"]
    b.granted("b")
    redis_server.kill()  # no persistence: every key is gone
    redis_server.start()
    c = workers(max_concurrent=2, lease=2, host="hc")
    c.send("acquire c")
    obs = redis_server.client()
    lim = BuildConcurrencyLimiter(obs, max_concurrent=2, lease_ttl=2)
    # Survivors re-register within the grace period; c waits all along.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert lim.get_active_count() <= 2
        assert c.poll(lambda m: m["cmd"] == "acquire") is None
        if sorted(lim.get_active_builds()) == ["a", "b"]:
            break
        time.sleep(0.02)
    assert sorted(lim.get_active_builds()) == ["a", "b"]
    assert {s.name: s.token for s in lim.get_slots()}["a"] == token_a
    grace_end = time.time() + lim.in_restart_grace()
    # c asks again once the grace is over (its waiter lease is refreshed then): with a and
    # b back, there is still no room for it
    wait_until(
        lambda: any(
            w.name == "c" and w.lease_expires_at > grace_end + 1.9 for w in lim.get_waiting()
        ),
        what="c's first attempt after the grace",
    )
    assert lim.in_restart_grace() == 0
    assert c.poll(lambda m: m["cmd"] == "acquire") is None
    assert sorted(lim.get_active_builds()) == ["a", "b"]
    assert a.call("renew a")["ok"]
    a.send("release a")
    token_c = c.granted("c")["token"]
    assert token_c > token_a  # fencing tokens keep growing across the restart


def test_restart_with_persistence_keeps_slots(short_tmp: object, make_limiter: MakeLimiter) -> None:
    server = RedisServer(short_tmp / "persist", persist=True)  # type: ignore[operator]
    server.start()
    fresh_start(server)
    try:
        lim = make_limiter(server.client(socket_timeout=2), lease_ttl=5, auto_renew=False)
        slot = lim.wait_for_slot("kept", timeout=5)
        server.stop()  # a clean shutdown persists
        server.start()
        lim.renew("kept")  # AOF kept the record: plain renewal
        assert lim.get_active_builds() == ["kept"]
        assert lim.in_restart_grace() > 0  # a new server: no new grants for a while
        assert lim.try_acquire("new") is None
        assert slot.token > 0
    finally:
        server.kill()


# -- 7. lowering the limit ---------------------------------------------------------------


def test_lowering_the_limit_keeps_holders_and_delays_new_grants(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    limit = {"n": 3}
    lim = make_limiter(rclient, max_concurrent=lambda: limit["n"])
    for n in ("a", "b", "c"):
        assert lim.try_acquire(n)
    limit["n"] = 1
    for n in ("a", "b", "c"):
        lim.renew(n)  # nobody is evicted
    got: list[str] = []
    t = threading.Thread(target=lambda: got.append(lim.wait_for_slot("d", timeout=10).name))
    t.start()
    wait_until(lambda: lim.get_waiting())
    lim.release("a")
    lim.release("b")
    # a release grants inside its own script: had d been admitted, it would hold now
    assert lim.get_active_builds() == ["c"]  # 1 holder left, limit 1: no room
    assert [w.name for w in lim.get_waiting()] == ["d"]
    assert got == []
    lim.release("c")
    t.join(5)
    assert got == ["d"]


# -- 8. Redis unreachable -------------------------------------------------------------------


def test_unreachable_redis_raises_a_clear_error_and_holders_survive_a_short_outage(
    redis_server: RedisServer,
    make_limiter: MakeLimiter,
) -> None:
    lim = make_limiter(redis_server.client(socket_timeout=1), lease_ttl=5, auto_renew=False)
    slot = lim.wait_for_slot("holder", timeout=5)
    redis_server.kill()
    with pytest.raises(RedisUnavailable):
        lim.try_acquire("other")
    with pytest.raises(RedisUnavailable):
        lim.renew("holder")
    assert not slot.lost.is_set()
    redis_server.start()  # back within the lease (data lost: re-registers in the grace)
    lim.renew("holder")
    assert lim.get_active_builds() == ["holder"]


def test_an_error_reply_during_renewal_does_not_stop_the_heartbeat(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """OOM (maxmemory with noeviction), READONLY or BUSY replies are not connection
    errors; they must not end the renewals of every slot of the process."""
    lim = make_limiter(rclient, lease_ttl=1)
    slot = lim.wait_for_slot("kept", timeout=5)
    rclient.config_set("maxmemory-policy", "noeviction")
    rclient.config_set("maxmemory", "1")  # every write is refused with OOM

    def refused() -> int:
        # the OOM reply comes from inside the renewal script; count every error reply
        stats = rclient.info("errorstats")
        return sum(int(v.get("count", 0)) for v in stats.values() if isinstance(v, dict))

    wait_until(lambda: refused() >= 2, timeout=0.9, what="two renewals refused with OOM")
    rclient.config_set("maxmemory", "0")
    other = make_limiter(rclient, lease_ttl=1)
    with pytest.raises(SlotTimeout):
        other.wait_for_slot("intruder", timeout=2.5)  # renewals resumed: still held
    assert not slot.lost.is_set()
    assert lim.get_active_builds() == ["kept"]


def test_a_malformed_grant_message_does_not_stop_the_listener(
    rclient: redis.Redis, make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    from reqpmd.slots.keys import slot_keys

    holder = make_limiter(rclient, lease_ttl=60)
    assert holder.try_acquire("holder")
    lim = make_limiter(rclient, lease_ttl=60)
    got: list[float] = []

    def wait() -> None:
        lim.wait_for_slot("next", timeout=30)
        got.append(time.monotonic())

    t = threading.Thread(target=wait)
    t.start()
    wait_until(lambda: holder.get_waiting())
    for junk in ("garbage without a token", "x y notanumber"):
        rclient.publish(slot_keys("reqpm").grants, junk)
    # the listener read both (and said so) before the real grant is published
    wait_until(
        lambda: caplog.text.count("ignoring a malformed grant message") == 2,
        what="both malformed messages read",
    )
    released_at = time.monotonic()
    holder.release("holder")
    t.join(10)
    assert got and got[0] - released_at < 1.0  # still notified, not polled


def test_holders_cut_off_from_redis_learn_they_lost_their_slots_at_the_deadline(
    redis_server: RedisServer, make_limiter: MakeLimiter
) -> None:
    """No Redis, no renewal: once the local lease deadline passes, every slot of the
    process is declared lost (its builds must stop), not left to run over the limit."""
    lim = make_limiter(redis_server.client(socket_timeout=1), max_concurrent=2, lease_ttl=2)
    lost: dict[str, float] = {}
    for name in ("a", "b"):
        lim.wait_for_slot(
            name, timeout=5, on_lost=lambda s: lost.setdefault(s.name, time.monotonic())
        )
    killed_at = time.monotonic()
    redis_server.kill()
    wait_until(lambda: len(lost) == 2, timeout=6)
    assert all(t - killed_at <= 2 + 1 for t in lost.values())
    assert lim.held() == []


# -- the cluster-wide limit ---------------------------------------------------------------


def test_a_cluster_limit_overrides_each_callers_own(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    a = make_limiter(rclient, max_concurrent=5, host="a")
    b = make_limiter(rclient, max_concurrent=5, host="b")
    assert a.get_cluster_limit() is None
    assert a.set_cluster_limit(2) is None
    assert b.get_cluster_limit() == 2
    assert a.try_acquire("a1") and b.try_acquire("b1")
    assert b.try_acquire("b2") is None  # 2 held: the cluster's 2, not the callers' 5
    with pytest.raises(SlotTimeout, match=r"2/2 slots busy \(max_concurrent_builds=2\)"):
        b.wait_for_slot("b3", timeout=0.2)
    with pytest.raises(InvalidArgument):
        a.set_cluster_limit(0)


def test_raising_the_cluster_limit_serves_waiters_at_once(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, max_concurrent=1, lease_ttl=60)
    lim.set_cluster_limit(1)
    assert lim.try_acquire("first")
    got: list[float] = []
    t = threading.Thread(
        target=lambda: (lim.wait_for_slot("second", timeout=30), got.append(time.monotonic()))
    )
    t.start()
    wait_until(lambda: lim.get_waiting())
    raised_at = time.monotonic()
    assert make_limiter(rclient).set_cluster_limit(2) == 1
    t.join(10)
    assert got and got[0] - raised_at < 1.0  # granted by SET_LIMIT itself, not by a poll
    assert lim.set_cluster_limit(None) == 2
    assert lim.get_cluster_limit() is None


def test_a_wait_in_the_restart_grace_says_so_and_logs_it_once(
    short_tmp: object, make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    """A brand-new Redis looks like a restarted one: no grant for one grace period. The
    timeout must say so (not "raise max_concurrent_builds"), and the log must too."""
    server = RedisServer(short_tmp / "new", persist=False)  # type: ignore[operator]
    server.start()  # no fresh_start(): the grace is in force
    try:
        lim = make_limiter(server.client(), max_concurrent=3, lease_ttl=60)
        with pytest.raises(SlotTimeout) as first:
            lim.wait_for_slot("b1", timeout=0.5)
        with pytest.raises(SlotTimeout):
            lim.wait_for_slot("b2", timeout=0.5)
        message = str(first.value)
        assert "grants are paused until" in message and "restart grace" in message
        assert "0/3 slots busy" in message
        assert "Raise max_concurrent_builds" not in message
        assert "declare_no_survivors()" in message  # how to end it, for a library user
        warnings = [r for r in caplog.records if "grants are paused until" in r.getMessage()]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
        assert "declare_no_survivors()" in warnings[0].getMessage()
        lim.declare_no_survivors()
        assert lim.in_restart_grace() == 0
        assert lim.try_acquire("b1") is not None
    finally:
        server.kill()


def test_ending_the_grace_serves_the_queue_at_once(
    short_tmp: object, make_limiter: MakeLimiter
) -> None:
    """A waiter queued in the grace polls again only when the grace would end (a lease
    away): ending it early must grant by notification, not at that poll."""
    server = RedisServer(short_tmp / "new", persist=False)  # type: ignore[operator]
    server.start()  # in its grace
    try:
        lim = make_limiter(server.client(), max_concurrent=2, lease_ttl=60)
        got: list[float] = []
        t = threading.Thread(
            target=lambda: got.append((lim.wait_for_slot("w", timeout=30), time.monotonic())[1])
        )
        t.start()
        wait_until(lambda: [w.name for w in lim.get_waiting()] == ["w"], what="w queued")
        assert lim.in_restart_grace() > 50
        ended_at = time.monotonic()
        lim.declare_no_survivors()
        t.join(10)
        assert got and got[0] - ended_at < 1.0
    finally:
        server.kill()


@pytest.mark.parametrize("late", [3.0, 7.0])
def test_a_grant_heard_late_is_renewed_before_use_or_known_lost(
    rclient: redis.Redis, make_limiter: MakeLimiter, late: float
) -> None:
    """A process stopped while its grant waited (SIGSTOP, a stall) must not trust the
    grant's old lease: seen more than a third of a lease late, it is renewed first (3 s
    of a 6 s lease), or, its lease over by then (7 s), lost and given back at once."""
    now = [100.0]
    lim = make_limiter(rclient, lease_ttl=6, clock=lambda: now[0], auto_renew=False)
    attempt = lim._attempt

    def heard_late(*args: object, **kwargs: object) -> object:
        reply = attempt(*args, **kwargs)  # type: ignore[arg-type]
        now[0] += late  # the grant is in; this process looks at it only now
        return reply

    lim._attempt = heard_late  # type: ignore[method-assign]
    slot = lim.try_acquire("late")
    assert slot is not None
    if late < 6:
        assert not slot.lost.is_set()
        assert slot.lease_deadline == 100.0 + late + 6  # from the renewal, not the grant
        assert lim.counts().active == 1
    else:
        assert slot.lost.is_set()
        assert lim.counts().active == 0  # given back, not left to its lease


def test_a_grant_message_is_checked_with_redis_not_trusted(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """A grant message can be old: a process stopped while the grant waited in its socket
    wakes after the slot was reaped and given to another (the chaos suite: four builds
    under a limit of two). Here a message for the waiter, with its owner, arrives while
    Redis says it still waits: the waiter must go on waiting, and take the real grant."""
    from reqpmd.slots.keys import slot_keys

    keys = slot_keys("reqpm")
    holder = make_limiter(rclient, lease_ttl=60)
    first = holder.try_acquire("holder")
    assert first is not None
    lim = make_limiter(rclient, lease_ttl=60)
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(lim.wait_for_slot("next", timeout=30).token))
    t.start()
    record = wait_until(lambda: rclient.hget(keys.waiter_info, "next"), what="the waiter queued")
    owner = record.decode().split()[0]
    rclient.publish(keys.grants, f"next {owner} 999999")  # a grant Redis never made
    time.sleep(0.5)  # were the message trusted, the waiter would hold a slot by now
    assert not got and holder.counts().active == 1
    holder.release("holder")
    t.join(10)
    assert got and got[0] != 999999 and got[0] > first.token
