"""reqpm on a Sentinel-managed Redis: real servers and sentinels on loopback, a real
kill -9 of the master, and the limiter's guarantees across the failover."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reqpmd.config.schema import SettingsInvalid
from reqpmd.errors import RedisUnavailable
from reqpmd.slots.connection import Credentials, credentials, open_redis
from reqpmd.slots.keys import slot_keys
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.redis_topologies import MASTER, SentinelSet, counts_or_none
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


def test_a_server_listed_as_a_sentinel_that_is_none_is_passed_over(
    sentinels: SentinelSet,
) -> None:
    hosts = ",".join([sentinels.servers[1].address] + [s.address for s in sentinels.sentinels])
    lim = limiter(f"redis+sentinel://{hosts}/{MASTER}", "wrong-port")
    assert lim.counts().server


def test_an_unknown_master_name_is_an_error_naming_redis_url(sentinels: SentinelSet) -> None:
    lim = limiter(sentinels.url(master="no-such-master"), "unknown")
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="redis_url know no such master"):
        lim.counts()
    assert time.monotonic() - start < 10  # redis-py's own retries: 23 s and more


def test_no_sentinel_reachable_fails_fast_naming_redis_url() -> None:
    from tests.redis_topologies import free_port

    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/m"
    lim = BuildConcurrencyLimiter(open_redis(url), namespace="none", lease_ttl=5)
    start = time.monotonic()
    with pytest.raises(RedisUnavailable, match="no Sentinel named in redis_url answered"):
        lim.counts()
    # each sentinel asked once, not ten times with backoff (redis-py's default: 23 s)
    assert time.monotonic() - start < 10  # redis-py's own retries: 23 s and more


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


def test_a_graceful_failover_is_followed_and_the_old_master_let_go(
    sentinels: SentinelSet,
) -> None:
    """SENTINEL FAILOVER: the old master lives on as a replica. A connection still open to
    it gets READONLY (inside the script's error on Redis 6.2), which must make the client
    ask the Sentinels again rather than keep failing against the old server."""
    lim = limiter(sentinels.url(), "graceful")
    lim.declare_no_survivors()
    try:
        first = lim.counts().server
        old = sentinels.master()
        with sentinels.sentinels[0].client(socket_timeout=5) as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER)
        new = sentinels.wait_failover(old)
        started = time.monotonic()
        after = wait_until(
            lambda: (c := counts_or_none(lim)) and c.server != first and c,
            timeout=15,
            what="the limiter reaches the new master",
        )
        print(f"graceful failover -> limiter on the new master: {time.monotonic() - started:.2f} s")
        assert after.grace_left > 0
        with new.client() as c:
            assert c.info("server")["run_id"] == after.server
    finally:
        lim.close()


def test_a_holder_leaves_a_replaced_master_that_still_takes_writes(
    sentinels: SentinelSet,
) -> None:
    """After SENTINEL FAILOVER the old master takes writes for about 10 s, until the
    Sentinels demote it. A holder renewing there all that time would miss the new
    master's restart grace (one lease, 5 s here), and the new master would grant its slot
    again (found by the chaos suite: three builds under a limit of two). The holder must
    renew on the new master within its grace, while the old one still takes writes."""
    holders = slot_keys("follow").holders
    lim = limiter(sentinels.url(), "follow")
    lim.declare_no_survivors()
    try:
        slot = lim.try_acquire("held")
        assert slot is not None
        old = sentinels.master()
        with sentinels.sentinels[0].client(socket_timeout=5) as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER)
        new = sentinels.wait_failover(old)
        started = time.monotonic()
        with new.client(socket_timeout=1) as c:
            replicated = c.zscore(holders, "held")  # what the old master had sent it

        def renewed_on_new() -> bool:
            with new.client(socket_timeout=1) as c:
                score = c.zscore(holders, "held")
            return score is not None and (replicated is None or score > replicated)

        wait_until(renewed_on_new, timeout=lim.lease_ttl, what="a renewal on the new master")
        took = time.monotonic() - started
        with old.client(socket_timeout=1) as c:
            old_role = c.info("replication")["role"]
        print(f"holder renewed on the new master {took:.2f} s after the failover")
        assert old_role == "master", "the old master was demoted first: nothing was shown"
        assert not slot.lost.is_set()
    finally:
        lim.close()


def test_secret_files_are_read_safely(tmp_path: Path) -> None:
    import os
    import threading

    from reqpmd.config.secrets import read_secret

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(_refusal(read_secret, fifo)))
    reader.start()
    reader.join(5)
    assert not reader.is_alive(), "reading a FIFO blocked"  # it must not hang a start
    assert "not a regular file" in str(result[0])
    path = tmp_path / "pw"
    for content, expected in (
        (b"\xef\xbb\xbfpw \n", "pw "),  # an editor's BOM goes, spaces stay
        (b"pw\r\n", "pw"),
    ):
        path.write_bytes(content)
        path.chmod(0o600)
        assert read_secret(path, "redis_password_file") == expected
    for bad in (b"\npw\n", b"p\rw\n", b"", b"\xff\n"):
        path.write_bytes(bad)
        assert "redis_password_file" in str(_refusal(read_secret, path))
    if os.geteuid() == 0:  # root checks a file the service user owns (--check-config)
        os.chown(path, 4242, 4242)
        path.write_bytes(b"pw\n")
        assert read_secret(path, "redis_password_file") == "pw"


def _refusal(read: Any, path: Path) -> object:
    try:
        return read(path, "redis_password_file")
    except SettingsInvalid as exc:
        return exc


def test_urls_that_validate_are_ones_the_client_reads_and_errors_never_quote_them() -> None:
    from reqpmd.config.parse import validate

    for url in (
        "redis://:hunter/2@redis.example:6379/0",  # '/' in a password: unescaped
        "redis://h:99999/0",
        "redis+sentinel://u:hunter2@h:0/m",
    ):
        with pytest.raises(SettingsInvalid) as info:
            validate({"redis_url": url})
        assert "hunter" not in str(info.value) and "redis_url" in str(info.value)
    # a password in the URL's query counts as one in the URL
    with pytest.raises(SettingsInvalid, match="holds a password too"):
        validate({"redis_url": "redis://h/0?password=x", "redis_password_file": "/etc/pw"})


def test_a_holder_the_new_master_never_heard_of_keeps_its_slot_through_the_grace(
    sentinels: SentinelSet,
) -> None:
    """kill -9 of the master right after a grant its replicas never got (they were
    stopped): the promoted replica does not know that holder. It is a new server (new
    run_id), so the restart grace applies: no newcomer takes the slot while the holder's
    next renewal puts it back. This is the case the grace exists for."""
    lim = limiter(sentinels.url(), "failover", auto_renew=False)  # renewed by the test
    lim.declare_no_survivors()
    other = limiter(sentinels.url(), "failover", host="other")
    try:
        assert lim.try_acquire("replicated") is not None
        first = lim.counts().server
        old = sentinels.master()
        with old.client() as c:
            assert c.wait(1, 2000) >= 1
        replicas = [n for n in sentinels.servers if n is not old and n.process]
        for r in replicas:  # stopped, and cut off: what the master writes now, they miss
            assert r.process is not None
            r.process.send_signal(signal.SIGSTOP)
        with old.client() as c:
            c.client_kill_filter(_type="replica")
        try:
            assert lim.try_acquire("unreplicated") is not None
        finally:
            old.kill9()
            for r in replicas:
                assert r.process is not None
                r.process.send_signal(signal.SIGCONT)
        killed = time.monotonic()
        new = sentinels.wait_failover(old)
        after = wait_until(lambda: counts_or_none(lim), timeout=20, what="the new master answers")
        recovered = time.monotonic() - killed
        assert after.server != first
        assert after.grace_left > 0  # the grace started on the new master
        with new.client() as c:  # the new master never heard of the second grant
            assert c.zscore("{failover}:slots:holders", "unreplicated") is None
        assert other.try_acquire("newcomer") is None  # nothing new during the grace
        lim.renew("unreplicated")  # the holders' heartbeat re-registers them
        lim.renew("replicated")
        assert sorted(s.name for s in lim.get_slots()) == ["replicated", "unreplicated"]
        assert other.try_acquire("newcomer") is None  # and after it, the limit is full
        print(f"kill -9 of the master -> limiter answering again: {recovered:.2f} s")
    finally:
        lim.close()
        other.close()


def test_a_connection_to_a_demoted_master_lets_go(tmp_path: Path) -> None:
    """A script's write refused by a server that is a replica now (READONLY inside the
    script's error on Redis 6.2) drops that connection as lost, so the next one asks the
    Sentinels; redis-py alone keeps it and fails every call through it."""
    import redis

    from reqpmd.slots.connection import _Following
    from tests.redis_topologies import Node, free_port

    class Conn(_Following, redis.Connection):  # the Sentinel-free part of the class
        pass

    master = Node(tmp_path / "m", free_port(), [])
    replica = Node(tmp_path / "r", free_port(), [])
    master.start()
    replica.start()
    try:
        with replica.client() as c:
            c.replicaof("127.0.0.1", master.port)
        pool = redis.ConnectionPool(
            connection_class=Conn, host="127.0.0.1", port=replica.port, socket_timeout=5
        )
        client = redis.Redis(connection_pool=pool)
        conn = pool.get_connection()
        pool.release(conn)
        with pytest.raises(redis.ConnectionError, match="not the master now"):
            client.eval("return redis.call('SET', KEYS[1], 'x')", 1, "{t}:k")
        assert conn._sock is None  # dropped, not handed out again
        with pytest.raises(redis.ResponseError, match="unknown command"):
            client.execute_command("NO-SUCH-COMMAND")  # other errors pass as they are
    finally:
        master.kill9()
        replica.kill9()
