"""reqpm on a Sentinel-managed Redis: real servers and sentinels on loopback, a real
kill -9 of the master, and the limiter's guarantees across the failover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reqpmd.config.schema import SettingsInvalid
from reqpmd.errors import RedisUnavailable
from reqpmd.slots.connection import Credentials, credentials, open_redis
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.redis_topologies import SentinelSet
from tests.workers import wait_until


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    with SentinelSet() as s:
        yield s


def limiter(url: str, namespace: str, **kw: object) -> BuildConcurrencyLimiter:
    return BuildConcurrencyLimiter(
        open_redis(url),
        max_concurrent=2,
        namespace=namespace,
        lease_ttl=5,
        **kw,  # type: ignore[arg-type]
    )


def test_the_limiter_works_through_the_sentinels_master(sentinels: SentinelSet) -> None:
    lim = limiter(sentinels.url(), "basic")
    lim.declare_no_survivors()
    try:
        assert lim.try_acquire("a") is not None
        assert lim.try_acquire("b") is not None
        assert lim.try_acquire("c") is None  # the limit holds
        assert lim.release("a")
        assert lim.try_acquire("c") is not None
        counts = lim.counts()
        assert counts.active == 2 and counts.server
        # what the client wrote is on the master the sentinels name, and replicated
        with sentinels.master().client() as c:
            assert c.info("replication")["role"] == "master"
            assert c.zcard("{basic}:slots:holders") == 2
    finally:
        lim.close()


def test_an_unknown_master_name_is_an_error_naming_redis_url(sentinels: SentinelSet) -> None:
    lim = limiter(sentinels.url(master="no-such-master"), "unknown")
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="redis_url know no such master"):
        lim.counts()
    assert time.monotonic() - start < 5


def test_no_sentinel_reachable_fails_fast_naming_redis_url() -> None:
    from tests.redis_topologies import free_port

    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/m"
    lim = BuildConcurrencyLimiter(open_redis(url), namespace="none", lease_ttl=5)
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="no Sentinel named in redis_url answered"):
        lim.counts()
    # each sentinel asked once, not ten times with backoff (redis-py's default: 23 s)
    assert time.monotonic() - start < 5


def test_password_file_must_be_private_and_fit_the_url(tmp_path: Path) -> None:
    from reqpmd.config.parse import validate

    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    secret.chmod(0o644)

    def creds(**raw: object) -> Credentials:
        return credentials(validate({"redis_url": "redis://127.0.0.1:1", **raw}))

    with pytest.raises(SettingsInvalid, match=r"redis_password_file: .*chmod 600"):
        creds(redis_password_file=str(secret))
    secret.chmod(0o600)
    assert creds(redis_password_file=str(secret)).password == "s3cret"
    with pytest.raises(SettingsInvalid, match="redis_password_file: cannot read"):
        creds(redis_password_file=str(tmp_path / "missing"))
    with pytest.raises(SettingsInvalid, match="redis_tls_ca_file: is for TLS"):
        creds(redis_tls_ca_file=str(secret))
    with pytest.raises(SettingsInvalid, match="redis_sentinel_password_file: is for Sentinel"):
        creds(redis_sentinel_password_file=str(secret))
    with pytest.raises(SettingsInvalid, match="redis_url holds a password too"):
        credentials(
            validate({"redis_url": "redis://:pw@127.0.0.1:1", "redis_password_file": str(secret)})
        )


def test_a_holder_keeps_its_slot_across_a_failover_and_new_grants_wait_for_the_grace(
    sentinels: SentinelSet,
) -> None:
    """kill -9 of the master: the replica the sentinels promote is a new server (new
    run_id), so the restart grace applies there; the holder re-registers and keeps its
    slot, and no new slot is granted until the grace ends."""
    lim = limiter(sentinels.url(), "failover")
    lim.declare_no_survivors()
    other = limiter(sentinels.url(), "failover", host="other")
    try:
        assert lim.try_acquire("held") is not None
        first = lim.counts().server
        old = sentinels.master()
        # let the replicas have the holder before the master dies
        with old.client() as c:
            assert c.wait(2, 2000) == 2
        old.kill9()
        killed = time.monotonic()
        new = sentinels.wait_failover(old)
        after = wait_until(lambda: _counts(lim), timeout=20, what="the new master answers")
        recovered = time.monotonic() - killed
        assert after.server != first
        assert after.grace_left > 0  # the grace started on the new master
        assert other.try_acquire("newcomer") is None  # nothing new during the grace
        lim.renew("held")  # the holder's heartbeat re-registers it
        assert [s.name for s in lim.get_slots()] == ["held"]
        assert new.port != old.port
        print(f"kill -9 of the master -> limiter answering again: {recovered:.2f} s")
    finally:
        lim.close()
        other.close()


def _counts(lim: BuildConcurrencyLimiter) -> object:
    try:
        return lim.counts()
    except RedisUnavailable:
        return None
