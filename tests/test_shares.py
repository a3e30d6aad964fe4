"""Per-group caps and fair share of the cluster's slots, on a real Redis: caps hold across
processes, a capped group never blocks the groups behind it, weights share slots in
proportion, a group that starts waiting is served next, a lowered cap evicts nobody."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.errors import InvalidArgument, SlotLost
from reqpmd.slots.limiter import Share, ShareChange
from reqpmd.slots.server import RedisServer
from tests.conftest import MakeLimiter, MakeWorker
from tests.workers import Worker, wait_until


def queue_in(lim: BuildConcurrencyLimiter, name: str, group: str, priority: int = 0) -> bool:
    """Queue ``name`` without blocking (the waiter's own first step); True if granted."""
    info = lim._info_json({}, priority, group)
    return lim._attempt(name, uuid.uuid4().hex, priority, info, try_only=False).token is not None


def fresh(lim: BuildConcurrencyLimiter) -> BuildConcurrencyLimiter:
    """A limiter on the test's own new Redis, whose restart grace has nothing to wait for."""
    lim.declare_no_survivors()
    return lim


def cluster_of_three(
    admin: BuildConcurrencyLimiter, capped: tuple[str, ...] = ()
) -> BuildConcurrencyLimiter:
    """A fresh namespace with a cluster limit of 3, the ``capped`` groups at 1 each."""
    fresh(admin).set_cluster_limit(3)
    for g in capped:
        admin.set_share(g, ShareChange(max_concurrent=1))
    return admin


def held_by(lim: BuildConcurrencyLimiter) -> Counter[str]:
    return Counter(s.group for s in lim.get_slots())


def grants_of(ws: list[Worker]) -> list[dict[str, Any]]:
    """Every grant message the workers have sent so far."""
    for w in ws:
        while w.poll(lambda m: False) is not None:
            pass
    return [m for w in ws for m in w.seen if m["cmd"] == "grant"]


def test_capped_groups_never_hold_more_than_their_cap_across_processes(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    cluster_of_three(make_limiter(rclient, max_concurrent=3), capped=("capped-a", "capped-b"))
    ws = [workers(max_concurrent=3, host=f"h{i}") for i in range(4)]
    for i, w in enumerate(ws):
        w.send(f"stream capped-{'ab'[i % 2]} 3 0.01")
    wait_until(
        lambda: (
            min(Counter(m["group"] for m in grants_of(ws)).values(), default=0) >= 40
            and len(Counter(m["group"] for m in grants_of(ws))) == 2
        ),
        timeout=60,
        what="40 grants to each capped group",
    )
    for w in ws:
        w.call("stop")
    grants = grants_of(ws)
    assert all(m["ok"] for m in grants), grants
    assert max(m["held"] for m in grants) == 1, "a group held more than its cap"


def test_a_capped_group_never_blocks_a_later_group(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    admin = cluster_of_three(
        make_limiter(rclient, max_concurrent=3), capped=("capped-a", "capped-b")
    )
    a, b, c = (workers(max_concurrent=3, host=h) for h in ("ha", "hb", "hc"))
    a.send("stream capped-a 4 60")  # each holds its one slot for the whole test
    b.send("stream capped-b 4 60")
    wait_until(
        lambda: (
            held_by(admin) == Counter({"capped-a": 1, "capped-b": 1})
            and Counter(w.group for w in admin.get_waiting())
            == Counter({"capped-a": 3, "capped-b": 3})
        ),
        what="both capped groups at their cap with a backlog queued",
    )
    c.send("acquire late 0 - third")
    c.granted("late", timeout=5)  # nothing is released meanwhile: it took the free slot
    assert held_by(admin) == Counter({"capped-a": 1, "capped-b": 1, "third": 1})
    assert len(grants_of([a, b])) == 2


def test_weights_share_slots_two_to_one(
    workers: MakeWorker, rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    admin = cluster_of_three(make_limiter(rclient, max_concurrent=3))
    admin.set_share("heavy", ShareChange(weight=2))
    procs = {
        g: [workers(max_concurrent=3, host=f"{g}{i}") for i in range(2)] for g in ("heavy", "light")
    }
    for g, ws in procs.items():
        for w in ws:
            w.send(f"stream {g} 3 0.02")
    everyone = [w for ws in procs.values() for w in ws]
    wait_until(lambda: len(grants_of(everyone)) >= 60, timeout=30, what="60 grants")
    start = max(m["token"] for m in grants_of(everyone))  # tokens order grants cluster-wide
    wait_until(lambda: len(grants_of(everyone)) >= 60 + 330, timeout=60, what="330 more grants")
    for w in everyone:
        w.call("stop")
    after = (m for m in grants_of(everyone) if m["token"] > start)
    window = sorted(after, key=lambda m: m["token"])[:300]
    counts = Counter(m["group"] for m in window)
    ratio = counts["heavy"] / counts["light"]
    assert 1.8 <= ratio <= 2.2, counts


def test_a_waiting_light_group_is_served_within_its_bound(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """Between two grants to a group of weight w that keeps waiting, a group of weight w'
    gets at most floor(w'/w) + 1; a group that starts waiting is served next."""
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    lim.set_share("heavy", ShareChange(weight=10))
    assert queue_in(lim, "first", "heavy")
    for i in range(60):
        queue_in(lim, f"h{i}", "heavy")
    for i in range(6):
        queue_in(lim, f"l{i}", "light")
    order = []
    holder = "first"
    for step in range(40):
        if step == 20:
            queue_in(lim, "newcomer", "new")
        lim.force_release(holder)
        (slot,) = lim.get_slots()
        holder = slot.name
        order.append(slot.group)
    # served next, unless a group tied with it at the current virtual time (light, here)
    assert order.index("new") in (20, 21), order
    light_at = [i for i, g in enumerate(order) if g == "light"]
    assert len(light_at) >= 3, order
    gaps = [b - a - 1 for a, b in zip([-1, *light_at], light_at, strict=False)]
    assert max(gaps) <= 10 // 1 + 1 + 1, order  # the newcomer's one grant may fall between


def test_within_a_group_priority_then_arrival_order_hold(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    assert queue_in(lim, "holder", "p")
    for name, priority in [("p-first", 0), ("p-second", 0), ("p-urgent", 5)]:
        queue_in(lim, name, "p", priority)
    served = []
    holder = "holder"
    for _ in range(3):
        lim.force_release(holder)
        holder = lim.get_slots()[0].name
        served.append(holder)
    assert served == ["p-urgent", "p-first", "p-second"]


def test_lowering_a_cap_applies_to_the_next_grant_and_evicts_nobody(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=4))
    for i in range(3):
        assert queue_in(lim, f"a{i}", "a")
    for i in range(3, 6):
        assert not queue_in(lim, f"a{i}", "a") or i == 3
    assert held_by(lim)["a"] == 4
    assert lim.set_share("a", ShareChange(max_concurrent=1)) == (Share(), Share(1, 1))
    assert held_by(lim)["a"] == 4, "a lowered cap evicted a holder"
    assert not queue_in(lim, "b0", "b")  # the cluster is full: b waits
    lim.force_release("a0")
    assert held_by(lim) == Counter({"a": 3, "b": 1}), "the free slot went to the capped group"
    after = []
    for name in ("a1", "a2", "a3"):
        lim.force_release(name)
        after.append(held_by(lim)["a"])
    assert after == [2, 1, 1]  # nothing granted to a until it is under its cap, then a4
    assert {s.name for s in lim.get_slots()} == {"a4", "b0"}


def test_shares_are_validated_and_read_back(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient)
    for group, share in [
        ("bad group", ShareChange()),
        ("", ShareChange()),
        ("x" * 65, ShareChange()),
        ("ok", ShareChange(max_concurrent=-1)),
        ("ok", ShareChange(max_concurrent=21)),
        ("ok", ShareChange(weight=0)),
        ("ok", ShareChange(weight=101)),
    ]:
        with pytest.raises(InvalidArgument):
            lim.set_share(group, share)
    assert lim.shares() == {}
    lim.set_share("p1", ShareChange(max_concurrent=2, weight=3))
    lim.set_share("p2", ShareChange(weight=5))
    assert lim.shares() == {"p1": Share(2, 3), "p2": Share(None, 5)}
    # what a change leaves out stays; the default share is no entry at all
    assert lim.set_share("p1", ShareChange(weight=1)) == (Share(2, 3), Share(2, 1))
    assert lim.set_share("p1", ShareChange(max_concurrent=0)) == (Share(2, 1), Share(None, 1))
    assert lim.shares() == {"p2": Share(None, 5)}


def test_a_share_another_writer_broke_is_dropped_and_reported(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=2))
    shares_key = lim._keys.shares
    rclient.hset(shares_key, "p", "lots 1")
    assert lim.shares() == {}
    assert queue_in(lim, "x", "p")
    assert rclient.hget(shares_key, "p") is None
    assert "dropped the share of" in (lim.counts().repaired or "")


def test_junk_in_the_share_index_is_dropped_and_grants_go_on(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    k = lim._keys
    assert queue_in(lim, "holder", "p")
    queue_in(lim, "w1", "p")
    junk = ["p 0000000000000000 ghost", "garbage", "q 0000000000000000 w1", "p 1 w1"]
    rclient.zadd(k.group_queue, dict.fromkeys(junk, 0))
    rclient.zadd(k.ready, {"q": -5, "p": float("inf"), "zz": 1e300})
    rclient.zadd(k.parked, {"nobody": 3})
    rclient.hset(k.meta, "vtime", "garbage")
    lim.force_release("holder")
    assert [s.name for s in lim.get_slots()] == ["w1"]
    queue_in(lim, "w2", "r")
    lim.force_release("w1")
    assert [s.name for s in lim.get_slots()] == ["w2"]
    assert "reset the virtual time" in (lim.counts().repaired or "")
    left = {e.decode() for e in rclient.zrange(k.group_queue, 0, -1)}
    assert not left & {"p 0000000000000000 ghost", "q 0000000000000000 w1"}


def test_a_capped_group_whose_holder_vanished_is_served_at_its_next_refresh(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=3))
    lim.set_share("p", ShareChange(max_concurrent=1))
    assert queue_in(lim, "p1", "p")
    assert not queue_in(lim, "p2", "p")  # parked: p is at its cap
    rclient.hdel(lim._keys.holder_info, "p1")  # p1 is gone without any release
    lim.counts()  # the holder without a record is removed; p2 not yet refreshed
    info = lim._info_json({}, 0, "p")
    owner = rclient.hget(lim._keys.waiter_info, "p2").decode().split(" ")[0]
    assert lim._attempt("p2", owner, 0, info, try_only=False).token is not None


def test_a_holder_re_registering_after_a_restart_keeps_to_its_groups_cap(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    old = fresh(make_limiter(rclient, max_concurrent=3, auto_renew=False))
    old.set_share("p", ShareChange(max_concurrent=1))
    slot = old.wait_for_slot("p1", timeout=1, group="p")
    old.force_release("p1")
    assert queue_in(old, "p2", "p")  # p's one slot went to p2
    rclient.hset(old._keys.meta, "run_id", "an-earlier-server")  # a restart: a grace begins
    with pytest.raises(SlotLost):  # within the grace p1 may come back, but not past the cap
        old.renew(slot.name)
    assert held_by(old) == Counter({"p": 1})


def test_a_group_that_leaves_and_comes_back_at_once_gains_nothing(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    """A light project that queues one build at a time, as soon as the last was granted,
    still gets its weight's share against a heavy backlog, not every other slot."""
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    lim.set_share("heavy", ShareChange(weight=100))
    assert queue_in(lim, "h0", "heavy")
    for i in range(1, 250):
        queue_in(lim, f"h{i}", "heavy")
    holder, light, order = "h0", 0, []
    for _ in range(202):
        if not any(w.group == "light" for w in lim.get_waiting()):
            light += 1
            queue_in(lim, f"l{light}", "light")
        lim.force_release(holder)
        (slot,) = lim.get_slots()
        holder = slot.name
        order.append(slot.group)
    assert 1 <= order.count("light") <= 3, Counter(order)  # 2 per 101 grants by weight


def test_groups_leave_the_sharing_with_their_last_waiter(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    assert queue_in(lim, "holder", "p")
    for i in range(300):
        queue_in(lim, f"w{i}", f"~user{i}")
        lim.force_release(f"w{i}")  # withdrawn
    k = lim._keys
    assert rclient.zcard(k.ready) + rclient.zcard(k.parked) == 0  # only groups that wait
    assert rclient.zcard(k.group_queue) == 0


def test_waiters_an_earlier_release_queued_are_served(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=1))
    assert queue_in(lim, "holder", "p")
    k = lim._keys  # a waiter as the previous release wrote it: no group, no index entry
    now_ms = int(rclient.time()[0]) * 1000
    rclient.zadd(k.waiters, {"old": 1})
    rclient.zadd(k.waiter_leases, {"old": now_ms + 60_000})
    rclient.hset(k.waiter_info, "old", f"{'a' * 32} 0 {now_ms} 60000 " + '{"host":"h0"}')
    lim.force_release("holder")
    assert [(s.name, s.group) for s in lim.get_slots()] == [("old", "@default")]
    assert "put 1 waiter(s) back" in (lim.counts().repaired or "")


def test_garbage_in_the_sharing_is_bounded_and_obeys_no_cap_bypass(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = fresh(make_limiter(rclient, max_concurrent=3))
    k = lim._keys
    lim.set_share("p", ShareChange(max_concurrent=1))
    assert queue_in(lim, "p1", "p")
    queue_in(lim, "p2", "p")
    # a member of ``ready`` that is no group name, whose lex range would be p's queue
    rclient.zadd(k.ready, {"p 0": 0, "p": 0})
    for i in range(2000):  # and thousands of bad shares met in one call
        rclient.hset(k.shares, f"g{i}", "0005 1")
        rclient.zadd(k.ready, {f"g{i}": 0})
    queue_in(lim, "q1", "q")
    assert held_by(lim) == Counter({"p": 1, "q": 1})
    note = lim.counts().repaired or ""
    assert "and " in note and len(note) < 2000, len(note)  # the first few, then a count
    rclient.hset(k.meta, "vtime", "9007199254740991")  # far past any real virtual time
    queue_in(lim, "q2", "q")
    assert "reset the virtual time" in (lim.counts().repaired or "")
    assert held_by(lim) == Counter({"p": 1, "q": 2})


# -- a model: random steps never leave a slot free while a group under its cap waits ----

_queue = st.tuples(st.just("queue"), st.sampled_from("abc"), st.integers(0, 2))
_steps = st.lists(
    st.one_of(
        _queue,
        _queue,
        st.tuples(st.just("release"), st.integers(0, 50), st.just(0)),
        st.tuples(st.just("cap"), st.sampled_from("abc"), st.integers(0, 3)),
        st.tuples(st.just("weight"), st.sampled_from("abc"), st.integers(1, 4)),
    ),
    min_size=15,
    max_size=40,
)


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(steps=_steps)
def test_grants_keep_caps_and_leave_no_slot_idle(
    redis_server: RedisServer, steps: list[tuple[str, Any, int]]
) -> None:
    client = redis_server.client()
    client.flushall()
    lim = BuildConcurrencyLimiter(client, max_concurrent=3, auto_renew=False)
    lim.declare_no_survivors()
    caps: dict[str, int] = {}
    n = 0
    try:
        for op, arg, k in steps:
            before = held_by(lim)
            if op == "queue":
                n += 1
                queue_in(lim, f"w{n}", arg, priority=k)
            elif op == "release":
                holders = lim.get_slots()
                if holders:
                    lim.force_release(holders[arg % len(holders)].name)
            else:
                change = ShareChange(k) if op == "cap" else ShareChange(weight=k)
                _, new = lim.set_share(arg, change)
                caps[arg] = new.max_concurrent or 0
            held = held_by(lim)
            for g, count in held.items():
                cap = caps.get(g, 0)
                # a grant never takes a group over its cap; a lowered cap keeps its holders
                assert not cap or count <= max(cap, before[g]), (g, count, cap)
            waiting = {w.group for w in lim.get_waiting()}
            if sum(held.values()) < 3:
                blocked = {g for g in waiting if caps.get(g, 0) and held[g] >= caps[g]}
                assert waiting <= blocked, (op, arg, held, waiting, caps)
    finally:
        lim.close()
