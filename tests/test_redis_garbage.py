"""Everything read from Redis is untrusted: malformed records, JSON, limits, counters,
heartbeats and keys of the wrong type are skipped or repaired (and said so once), never
obeyed blindly, and never stop the limiter, the cluster view or the daemon."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reqpmctl.client import ClientError
from reqpmd.cluster import Cluster
from reqpmd.config.parse import load
from reqpmd.config.transaction import SettingsService
from reqpmd.errors import InvalidArgument, RedisUnavailable, SlotNameInUse, SlotTimeout
from reqpmd.slots.keys import host_stats_key, hosts_key, slot_keys
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from tests.conftest import MakeDaemon, MakeLimiter
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.workers import wait_until

K = slot_keys("reqpm")
SLOT_KEYS = {
    "holders": K.holders,
    "holder_info": K.holder_info,
    "waiters": K.waiters,
    "waiter_leases": K.waiter_leases,
    "waiter_info": K.waiter_info,
    "meta": K.meta,
    "group_queue": K.group_queue,
    "ready": K.ready,
    "parked": K.parked,
    "shares": K.shares,
}
OWNER_RE = re.compile(r"([0-9a-f]{16}\.)?[0-9a-f]{32}")  # the owners the limiter makes


def redis_ms(r: redis.Redis) -> int:
    sec, usec = r.time()
    return int(sec) * 1000 + int(usec) // 1000


def warnings_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


# -- holder records ------------------------------------------------------------------------


def test_the_findings_garbage_holder_is_dead_removed_and_logged_once(
    rclient: redis.Redis, make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    rclient.zadd(K.holders, {"evil": redis_ms(rclient) + 10**9})
    rclient.hset(K.holder_info, "evil", "garbage")
    lim = make_limiter(rclient, max_concurrent=1)
    for _ in range(3):  # every poll reads it; it is reported once
        assert lim.snapshot() == ([], [])
        assert lim.counts().active == 0
    assert lim.try_acquire("a") is not None  # the one slot was not pinned by it
    assert lim.get_active_builds() == ["a"]
    assert not rclient.hexists(K.holder_info, "evil")
    assert len(warnings_naming(caplog, "evil")) == 1


def test_a_lease_without_a_record_and_a_record_without_a_lease_pin_nothing(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    rclient.zadd(K.holders, {"ghost": redis_ms(rclient) + 10**9})
    rclient.hset(K.holder_info, "orphan", "x 1 1 60000 {}")
    lim = make_limiter(rclient, max_concurrent=1)
    assert lim.try_acquire("a") is not None
    assert lim.get_active_builds() == ["a"]
    assert rclient.hkeys(K.holder_info) == [b"a"]
    assert lim.try_acquire("orphan") is None  # full: its stale record no longer says "held"


def test_a_lease_beyond_its_records_length_is_cut_back(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    now = redis_ms(rclient)
    rclient.zadd(K.holders, {"far": now + 10**12})
    rclient.hset(K.holder_info, "far", f"someone 7 {now} 60000 {{}}")
    lim = make_limiter(rclient, max_concurrent=2)
    [far] = lim.get_slots()
    assert far.lease_expires_at <= now / 1000 + 61


# -- waiter records ------------------------------------------------------------------------


def test_a_waiter_record_that_does_not_parse_is_removed_not_promoted(
    rclient: redis.Redis, make_limiter: MakeLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    later = redis_ms(rclient) + 10**9
    rclient.zadd(K.waiters, {"evil": -(10**15), "no-record": -(10**15) + 1})
    rclient.zadd(K.waiter_leases, {"evil": later, "no-record": later})
    rclient.hset(K.waiter_info, "evil", "garbage")
    lim = make_limiter(rclient, max_concurrent=1)
    assert lim.get_waiting() == []
    assert lim.try_acquire("a") is not None
    assert lim.get_active_builds() == ["a"]
    assert rclient.zcard(K.waiters) == 0 and rclient.hlen(K.waiter_info) == 0
    assert len(warnings_naming(caplog, "evil")) == 1


@pytest.mark.parametrize("record", ["garbage", "someone 0 1 60000 {}"])
def test_a_garbage_waiter_record_does_not_lock_its_name_out(
    rclient: redis.Redis, make_limiter: MakeLimiter, record: str
) -> None:
    """Not a waiter: a record that does not parse, or one without a lease, which nothing
    would ever reap."""
    rclient.hset(K.waiter_info, "build_7@h1", record)
    lim = make_limiter(rclient, max_concurrent=1)
    slot = lim.wait_for_slot("build_7@h1", timeout=2)  # not SlotNameInUse
    assert slot.token > 0


def test_a_waiter_that_lost_its_place_in_the_queue_queues_again(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, max_concurrent=1)
    assert lim.try_acquire("a") is not None
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(lim.wait_for_slot("w", timeout=10).token))
    t.start()
    wait_until(lambda: lim.get_waiting(), what="w queued")
    rclient.zrem(K.waiters, "w")  # its record and lease stay: its next poll re-queues it
    lim.release("a")
    t.join(15)
    assert got


# -- the caller's JSON inside a record -------------------------------------------------------

BAD_INFO = [
    "{not json",
    "[1, 2]",
    '"a string"',
    '{"pid": "abc", "host": 5, "labels": [1], "priority": "x"}',
    '{"pid": 1e999}',
    '{"priority": NaN}',
    '{"pid": ' + "9" * 5000 + "}",
    "[" * 100_000,
]


@pytest.mark.parametrize("info", BAD_INFO, ids=range(len(BAD_INFO)))
def test_bad_json_in_a_record_is_shown_with_defaults_and_still_counts(
    rclient: redis.Redis,
    make_limiter: MakeLimiter,
    caplog: pytest.LogCaptureFixture,
    info: str,
) -> None:
    now = redis_ms(rclient)
    rclient.zadd(K.holders, {"odd": now + 30_000})
    rclient.hset(K.holder_info, "odd", f"someone 7 {now} 60000 {info}")
    rclient.zadd(K.waiters, {"odd-w": 0})
    rclient.zadd(K.waiter_leases, {"odd-w": now + 30_000})
    rclient.hset(K.waiter_info, "odd-w", f"other 0 {now} 60000 {info}")
    lim = make_limiter(rclient, max_concurrent=1)
    for _ in range(3):
        holders, waiters = lim.snapshot()
        assert [(h.name, h.host, h.pid, h.token, h.labels) for h in holders] == [
            ("odd", "", 0, 7, {})
        ]
        assert [(w.name, w.host, w.priority, w.labels) for w in waiters] == [("odd-w", "", 0, {})]
    assert lim.try_acquire("a") is None  # the odd holder is a holder: the limit holds
    assert len(warnings_naming(caplog, "'odd'")) == 1
    assert len(warnings_naming(caplog, "'odd-w'")) == 1


def test_a_name_that_is_not_utf8_is_shown_not_fatal(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    now = redis_ms(rclient)
    rclient.zadd(K.holders, {b"\xff\xfe": now + 30_000})
    rclient.hset(K.holder_info, b"\xff\xfe", f"someone 7 {now} 60000 {{}}".encode())
    lim = make_limiter(rclient, max_concurrent=2)
    [odd] = lim.get_slots()
    assert odd.token == 7


# -- the cluster limit -----------------------------------------------------------------------

BAD_LIMITS = ["0", "-1", "21", "abc", "9" * 400, "1e400", "nan", "inf", "2.5", " 3", "0x3", ""]


@pytest.mark.parametrize("value", BAD_LIMITS, ids=range(len(BAD_LIMITS)))
def test_an_invalid_cluster_limit_is_ignored_and_reported(
    rclient: redis.Redis, make_limiter: MakeLimiter, value: str
) -> None:
    rclient.hset(K.meta, "limit", value)
    lim = make_limiter(rclient, max_concurrent=2)
    counts = lim.counts()
    assert counts.cluster_limit is None
    assert counts.cluster_limit_invalid is not None
    assert counts.cluster_limit_invalid == value[: len(counts.cluster_limit_invalid)]
    assert value.startswith(counts.cluster_limit_invalid[:20])
    assert lim.get_cluster_limit() is None
    assert lim.try_acquire("a") is not None  # the caller's own 2 applies
    assert lim.try_acquire("b") is not None
    assert lim.try_acquire("c") is None
    assert rclient.hget(K.meta, "limit") == value.encode()  # shown, not silently replaced


def test_only_limits_in_the_settings_range_can_be_set(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(rclient, max_concurrent=2)
    for bad in (0, 21, 1000):
        with pytest.raises(InvalidArgument):
            lim.set_cluster_limit(bad)
    assert lim.set_cluster_limit(20) is None
    assert lim.get_cluster_limit() == 20
    assert lim.counts().cluster_limit_invalid is None


# -- counters and the grace --------------------------------------------------------------------

BAD_COUNTERS = ["garbage", "-5", "1.5", "9" * 30, "99999999999999999", ""]


@pytest.mark.parametrize("value", BAD_COUNTERS, ids=range(len(BAD_COUNTERS)))
def test_a_bad_token_counter_is_repaired_and_tokens_keep_growing(
    rclient: redis.Redis, make_limiter: MakeLimiter, value: str
) -> None:
    lim = make_limiter(rclient, max_concurrent=2)
    first = lim.try_acquire("a")
    assert first is not None
    rclient.hset(K.meta, "token", value)
    second = lim.try_acquire("b")
    assert second is not None and second.token > first.token
    lim.release("a")
    third = lim.try_acquire("c")
    assert third is not None and third.token > second.token


@pytest.mark.parametrize("value", ["garbage", "1.5", "9" * 30, ""])
def test_a_bad_queue_counter_is_repaired(
    rclient: redis.Redis, make_limiter: MakeLimiter, value: str
) -> None:
    lim = make_limiter(rclient, max_concurrent=1)
    rclient.hset(K.meta, "seq", value)
    assert lim.try_acquire("a") is not None
    got: list[str] = []
    threads = [
        threading.Thread(target=lambda n=n: got.append(lim.wait_for_slot(n, timeout=10).name))
        for n in ("first", "second")
    ]
    threads[0].start()
    wait_until(lambda: len(lim.get_waiting()) == 1, what="first queued")
    threads[1].start()
    wait_until(lambda: len(lim.get_waiting()) == 2, what="second queued")
    assert [w.name for w in lim.get_waiting()] == ["first", "second"]  # arrival order kept
    lim.release("a")
    wait_until(lambda: got == ["first"], what="first granted")
    lim.release("first")
    for t in threads:
        t.join(10)
    assert got == ["first", "second"]


@pytest.mark.parametrize("value", ["garbage", "1e400", "9" * 30, ""])
def test_a_bad_grace_end_is_repaired_to_one_grace(
    rclient: redis.Redis, make_limiter: MakeLimiter, value: str
) -> None:
    lim = make_limiter(rclient, max_concurrent=1, restart_grace=0.5)
    rclient.hset(K.meta, "grace_until", value)
    counts = lim.counts()  # the health check of every daemon: it must answer
    assert 0 <= counts.grace_left <= 0.5
    wait_until(lambda: lim.try_acquire("a"), timeout=3, what="a grant after one grace")


# -- keys of the wrong type -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["string", "list"])
@pytest.mark.parametrize("key", sorted(SLOT_KEYS))
def test_a_key_of_the_wrong_type_is_repaired_and_the_limit_kept(
    rclient: redis.Redis,
    make_limiter: MakeLimiter,
    caplog: pytest.LogCaptureFixture,
    key: str,
    kind: str,
) -> None:
    lim = make_limiter(rclient, max_concurrent=2, lease_ttl=5, restart_grace=0.5)
    assert lim.try_acquire("a") is not None
    name = SLOT_KEYS[key]
    rclient.delete(name)
    if kind == "string":
        rclient.set(name, "garbage")
    else:
        rclient.rpush(name, "garbage", "more")
    counts = lim.counts()  # answers: repaired, not a WRONGTYPE error forever
    assert counts.active <= 1
    lim.renew("a")  # a holder that lost its record re-registers in the grace
    got = wait_until(lambda: lim.try_acquire("b"), timeout=3, what="a grant after the repair")
    assert got is not None
    assert lim.try_acquire("c") is None  # a and b hold: the limit of 2 is kept
    assert sorted(lim.get_active_builds()) == ["a", "b"]
    assert 1 <= len(warnings_naming(caplog, name)) <= 2  # said, not said every poll
    for _ in range(3):
        lim.counts()
    assert len(warnings_naming(caplog, name)) <= 2


def test_nothing_but_redis_unavailable_escapes_when_everything_is_garbage(
    rclient: redis.Redis, make_limiter: MakeLimiter
) -> None:
    later = redis_ms(rclient) + 10**9
    rclient.zadd(K.holders, {"evil": later, "b": later})
    rclient.hset(K.holder_info, mapping={"evil": "garbage", "x": "1 2 3"})
    rclient.zadd(K.waiters, {"w": -1, "b": 0})
    rclient.hset(K.waiter_info, mapping={"w": "w w w w", "b": "garbage"})
    rclient.hset(K.meta, mapping={"token": "t", "seq": "s", "limit": "l", "grace_until": "g"})
    lim = make_limiter(rclient, max_concurrent=2, restart_grace=0.3)
    wait_until(lambda: lim.try_acquire("a"), timeout=3, what="a grant")
    lim.renew("a")
    lim.snapshot()
    assert lim.force_release("nobody") is False
    with pytest.raises(SlotTimeout):
        make_limiter(rclient, max_concurrent=1).wait_for_slot("z", timeout=0.2)
    assert lim.set_cluster_limit(3) is None
    lim.declare_no_survivors()
    assert lim.clear_all() == 1
    assert lim.release("a") is False


# -- the cluster view: the limit, the health check, host heartbeats ----------------------------


@dataclass
class Memory:
    state: dict[str, str] = field(default_factory=dict)

    def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    def set_state(self, key: str, value: str) -> None:
        self.state[key] = value

    def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
        pass


@dataclass
class View:
    cluster: Cluster
    limiter: BuildConcurrencyLimiter
    settings: SettingsService


@pytest.fixture
def make_view(
    tmp_path: Path, rclient: redis.Redis, make_limiter: MakeLimiter
) -> Callable[..., View]:
    def make(max_concurrent: int = 3) -> View:
        config = tmp_path / "reqpmd.yaml"
        config.write_text(f"max_concurrent_builds: {max_concurrent}\nhost_id: h1\n")
        memory = Memory()
        service = SettingsService(config, load(config, environ={}), audit=memory)
        current = service.current
        limiter = make_limiter(
            rclient, max_concurrent=lambda: current().max_concurrent_builds, restart_grace=0.3
        )
        cluster = Cluster(rclient, limiter, current, memory)
        service.subscribe(cluster.on_settings_change)
        return View(cluster, limiter, service)

    return make


def test_an_invalid_cluster_limit_is_shown_ignored_and_replaced_only_by_a_change(
    rclient: redis.Redis, make_view: Callable[..., View], caplog: pytest.LogCaptureFixture
) -> None:
    view = make_view(max_concurrent=3)
    c = view.cluster
    c.check(force=True)
    assert c.cluster_limit == 3
    rclient.hset(K.meta, "limit", "0")
    for _ in range(3):
        c.check(force=True)
        assert (c.ok, c.cluster_limit_invalid, c.limit()) == (True, "0", 3)
    assert rclient.hget(K.meta, "limit") == b"0"  # left for the admin to see
    assert len(warnings_naming(caplog, "'0'")) == 1
    view.settings.set({"max_concurrent_builds": 2}, "root", 0)
    c.check(force=True)
    assert (c.cluster_limit_invalid, c.cluster_limit, c.limit()) == (None, 2, 2)
    assert rclient.hget(K.meta, "limit") == b"2"


def test_the_health_check_survives_a_garbage_grace_end(
    rclient: redis.Redis, make_view: Callable[..., View]
) -> None:
    c = make_view().cluster
    rclient.hset(K.meta, "grace_until", "garbage")
    c.check(force=True)  # used to raise out of the daemon's main loop
    assert c.ok


def test_garbage_heartbeats_are_skipped_and_reported_once(
    rclient: redis.Redis, make_view: Callable[..., View], caplog: pytest.LogCaptureFixture
) -> None:
    c = make_view().cluster
    c.check(force=True)
    good: dict[str, Any] = {
        "host_id": "h1",
        "version": "1",
        "building": 0,
        "waiting": 0,
        "queued": 0,
        "max_concurrent_builds": 3,
        "host_max_builds": 0,
        "gates": [],
    }
    c.heartbeat(lambda: good)
    hk = hosts_key("reqpm")
    rclient.hset(
        hk,
        mapping={
            "bad-json": "not json",
            "bad-list": "[1]",
            "bad-nan": json.dumps({**good, "host_id": "n", "last_seen": "NaN"}),
            "bad-fields": json.dumps({"host_id": "x"}),
            "bad-types": json.dumps({**good, "host_id": 5, "last_seen": 1, "gates": "open"}),
            "bad-deep": "[" * 100_000,
            "bad-redis-kind": json.dumps({**good, "host_id": "r", "last_seen": 1, "redis": "x"}),
            "bad-redis-time": json.dumps(
                {**good, "host_id": "t", "last_seen": 1, "redis": {"changed_at": 10**400}}
            ),
            "bad-redis-master": json.dumps(
                {**good, "host_id": "m", "last_seen": 1, "redis": {"master": "x" * 65}}
            ),
            b"\xff": b"\xff\xfe",
        },
    )
    for _ in range(3):
        assert [h["host_id"] for h in c.hosts()] == ["h1"]
    for name in (
        "bad-json",
        "bad-list",
        "bad-nan",
        "bad-fields",
        "bad-types",
        "bad-deep",
        "bad-redis-kind",
        "bad-redis-time",
        "bad-redis-master",
    ):
        assert len(warnings_naming(caplog, name)) == 1, name


def test_a_hosts_key_of_the_wrong_type_is_unavailable_then_repaired(
    rclient: redis.Redis, make_view: Callable[..., View]
) -> None:
    c = make_view().cluster
    c.check(force=True)
    rclient.set(hosts_key("reqpm"), "garbage")
    with pytest.raises(RedisUnavailable):
        c.hosts()
    c.heartbeat(lambda: {"host_id": "h1"})
    assert rclient.type(hosts_key("reqpm")) == b"hash"


# -- a real reqpmd ------------------------------------------------------------------------------


def inject_the_findings_garbage(r: redis.Redis) -> None:
    r.zadd(K.holders, {"evil": redis_ms(r) + 10**9})
    r.hset(K.holder_info, "evil", "garbage")
    r.hset(hosts_key("reqpm"), "evil", "garbage")


def _passes(d: Reqpmd, n: int = 3) -> dict[str, Any]:
    """Status after the main loop made ``n`` more passes (each one checks Redis)."""
    start = d.call("status")["scheduler_ticks"]
    return dict(wait_for(lambda: (s := d.call("status"))["scheduler_ticks"] >= start + n and s))


def test_the_findings_garbage_neither_stops_reqpmd_nor_its_restart(
    daemons: MakeDaemon, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    d = daemons(redis_url=redis_server.url, settings={"max_concurrent_builds": 1}).start()
    inject_the_findings_garbage(r)
    r.hset(K.meta, "grace_until", "garbage")  # the health check's own read
    status = _passes(d)
    assert d.proc is not None and d.proc.poll() is None
    assert status["redis"]["ok"] and status["active_count"] == 0
    assert [h["host_id"] for h in d.call("hosts")] == ["h1"]
    assert d.call("slots.list")["holders"] == []
    # the one slot is not pinned by the dead holder
    assert d.wait_state(d.submit(), FINAL, timeout=30)["state"] == "succeeded"
    assert d.stop() == 0
    inject_the_findings_garbage(r)
    r.hset(K.meta, "grace_until", "garbage")
    d.start()  # with the garbage still there
    status = _passes(d)
    assert d.proc is not None and d.proc.poll() is None
    assert status["redis"]["ok"]
    assert d.wait_state(d.submit(), FINAL, timeout=30)["state"] == "succeeded"
    assert "Traceback" not in d.log()
    r.close()


def test_an_invalid_cluster_limit_in_redis_is_ignored_and_shown(
    daemons: MakeDaemon, redis_server: RedisServer
) -> None:
    r = redis_server.client()
    d = daemons(redis_url=redis_server.url, settings={"max_concurrent_builds": 2}).start()
    r.hset(K.meta, "limit", "0")
    status = wait_for(lambda: (s := d.call("status")).get("cluster_limit_invalid") and s)
    assert status["cluster_limit_invalid"] == "0"
    assert status["max_concurrent"] == 2
    assert "'0'" in status["summary"] and "ignored" in status["summary"]
    out = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", "--socket", str(d.socket), "status"],
        capture_output=True,
        text=True,
        check=False,
        env=d.env,
    )
    assert out.returncode == 0, out.stderr
    [line] = [x for x in out.stdout.splitlines() if x.startswith("limit:")]
    assert "'0'" in line and "ignored" in line
    assert d.wait_state(d.submit(), FINAL, timeout=30)["state"] == "succeeded"  # grants go on
    assert r.hget(K.meta, "limit") == b"0"
    assert d.log().count("'0'") == 1  # warned once, not every check
    r.close()


# -- arbitrary bytes into every key while builds and acquisitions run --------------------------

LIMIT = 2
ALL_KEYS = [*SLOT_KEYS.values(), hosts_key("reqpm"), host_stats_key("reqpm")]
NAMES = [f"c{i}-{k}" for i in range(2) for k in range(3)] + [f"build_{i}@h1" for i in range(8)]
META_FIELDS = ["limit", "token", "seq", "run_id", "grace_until", "repaired", "vtime"]
GROUPS = ["default", "~root", "p", "p 1", "default 00000000000000001 c0-1"]

blobs = st.binary(max_size=40)
# well-formed records carrying odd values: never a limiter owner (32 hex digits)
records = st.builds(
    lambda owner, token, at, lease, info: f"{owner} {token} {at} {lease} {info}".encode(),
    st.text(alphabet="ghijklmnopqrstuvwxyz!#%", min_size=1, max_size=8),
    st.integers(0, 10**17),
    st.integers(0, 10**17),
    st.integers(0, 10**17),
    st.one_of(st.just("{}"), st.text(max_size=20)),
)
fields = st.one_of(st.sampled_from(NAMES + META_FIELDS + GROUPS).map(str.encode), blobs)
values = st.one_of(blobs, records, st.integers(-(10**20), 10**20).map(lambda n: str(n).encode()))
scores = st.one_of(
    st.floats(allow_nan=False),
    st.integers(-(10**16), 10**16).map(float),
)
ops = st.one_of(
    st.tuples(st.just("hset"), st.sampled_from(ALL_KEYS), fields, values),
    st.tuples(st.just("zadd"), st.sampled_from(ALL_KEYS), fields, scores),
    st.tuples(st.just("set"), st.sampled_from(ALL_KEYS), blobs),
    st.tuples(st.just("rpush"), st.sampled_from(ALL_KEYS), blobs),
    st.tuples(st.just("delete"), st.sampled_from(ALL_KEYS)),
    st.tuples(st.just("hdel"), st.sampled_from(ALL_KEYS), fields),
    st.tuples(st.just("publish"), blobs),
)


def _a_valid_limit_above(value: bytes, floor: int) -> bool:
    """A value the limiter must obey as a cluster limit (a legitimate change, not garbage)."""
    return re.fullmatch(rb"\d+", value) is not None and floor < int(value) <= 20


def apply(r: redis.Redis, op: tuple[Any, ...]) -> None:
    kind, *args = op
    try:
        if kind == "hset":
            key, fld, value = args
            if key == K.meta and fld == b"limit" and _a_valid_limit_above(value, LIMIT):
                value = b"0"  # a real admin's raise of the limit is not what is tested
            r.hset(key, fld, value)
        elif kind == "zadd":
            r.zadd(args[0], {args[1]: args[2]})
        elif kind == "set":
            r.set(args[0], args[1])
        elif kind == "rpush":
            r.rpush(args[0], args[1])
        elif kind == "delete":
            r.delete(args[0])
        elif kind == "hdel":
            r.hdel(args[0], args[1])
        elif kind == "publish":
            r.publish(K.grants, args[0])
    except redis.ResponseError:
        pass  # our own write hit a key of another type: that garbage is there already


@dataclass
class Rig:
    daemon: Reqpmd
    redis: redis.Redis
    errors: list[str] = field(default_factory=list)
    most_holders: int = 0
    grants: int = 0  # slots the clients were granted: the rig did run
    stop: threading.Event = field(default_factory=threading.Event)


class _Errors(logging.Handler):
    """ERROR records of this process's limiters: an unexpected exception in a thread."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.ERROR)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.sink.append(self.format(record))


@pytest.fixture
def rig(daemons: MakeDaemon, redis_server: RedisServer, make_limiter: MakeLimiter) -> Iterator[Rig]:
    r = redis_server.client(socket_timeout=5)
    d = daemons(
        redis_url=redis_server.url, mock_sleep=0.1, settings={"max_concurrent_builds": LIMIT}
    ).start()
    rig = Rig(d, r)
    handler = _Errors(rig.errors)
    logging.getLogger("reqpmd").addHandler(handler)

    def client(i: int) -> None:
        lim = make_limiter(
            redis_server.client(socket_timeout=5),
            max_concurrent=LIMIT,
            lease_ttl=2,
            restart_grace=0.5,
        )
        n = 0
        while not rig.stop.is_set():
            name = f"c{i}-{n % 3}"
            n += 1
            try:
                lim.wait_for_slot(name, timeout=1)
            except (SlotTimeout, SlotNameInUse):
                continue
            except RedisUnavailable:
                time.sleep(0.05)
                continue
            except Exception as exc:
                rig.errors.append(f"client {i}: {exc!r}")
                return
            rig.grants += 1
            time.sleep(0.02)
            try:
                lim.release(name)
            except RedisUnavailable:
                pass
            except Exception as exc:
                rig.errors.append(f"client {i} release: {exc!r}")
                return

    def monitor() -> None:
        obs = make_limiter(
            redis_server.client(socket_timeout=5),
            max_concurrent=LIMIT,
            lease_ttl=2,
            restart_grace=0.5,
        )
        while not rig.stop.is_set():
            try:
                holders, _ = obs.snapshot()
            except RedisUnavailable:
                time.sleep(0.005)
                continue
            except Exception as exc:
                rig.errors.append(f"monitor: {exc!r}")
                return
            ours = sum(1 for h in holders if OWNER_RE.fullmatch(h.owner))
            rig.most_holders = max(rig.most_holders, ours)
            time.sleep(0.005)

    def feeder() -> None:
        for _ in range(40):
            try:
                d.submit()
            except ClientError as exc:
                rig.errors.append(f"submit: {exc}")
                return
            if rig.stop.wait(0.3):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=monitor), threading.Thread(target=feeder)]
    for t in threads:
        t.start()

    def running() -> bool:
        builds = d.call("build.list", {"limit": 100})
        return rig.grants > 0 and any(b["state"] == "succeeded" for b in builds)

    try:
        wait_until(running, timeout=30, what="builds and acquisitions running")  # then garbage
        yield rig
    finally:
        rig.stop.set()
        for t in threads:
            t.join(10)
        logging.getLogger("reqpmd").removeHandler(handler)
        r.close()
    assert "Traceback" not in d.log(), d.log()[-4000:]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(ops, min_size=1, max_size=8))
def test_arbitrary_bytes_in_every_key_stop_nothing_and_keep_the_limit(
    rig: Rig, batch: list[tuple[Any, ...]]
) -> None:
    for op in batch:
        apply(rig.redis, op)
    time.sleep(0.3)  # the clients, the daemon and the monitor read it
    d = rig.daemon
    assert d.proc is not None and d.proc.poll() is None, d.log()[-4000:]
    status = d.call("status")  # answers, whatever Redis holds
    assert isinstance(status["summary"], str)
    for request in ("hosts", "slots.list"):
        try:
            d.call(request)
        except ClientError as exc:  # a key of the wrong type, until it is repaired
            assert exc.code == "unavailable", exc
    assert rig.errors == []
    assert rig.most_holders <= LIMIT
