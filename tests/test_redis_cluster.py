"""reqpm on a real Redis Cluster (three masters, each with a replica, on loopback): the
limiter's own tests run against it unchanged, and a failover of the master that owns
reqpm's hash slot, by kill -9 or by CLUSTER FAILOVER, keeps the same guarantees."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    with ClusterSet() as c:
        yield c


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
