"""This host's view of the cluster: the limit policy (``decide_limit``, branch by branch)
and ``Cluster`` against a real redis-server, with a fake clock so its rate limits need
no sleeps."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.cluster import (
    CHECK_EVERY,
    HEARTBEAT_EVERY,
    NOT_CONNECTED,
    PUBLISHED,
    Cluster,
    LimitDecision,
    decide_limit,
)
from reqpmd.config.parse import load
from reqpmd.config.transaction import SettingsService
from reqpmd.errors import RedisUnavailable
from reqpmd.slots import keys
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from tests.conftest import MakeLimiter

NS = "clu"

# -- decide_limit: one test per branch -------------------------------------------------


def test_first_start_joins_the_cluster_limit_and_reports_a_difference() -> None:
    d = decide_limit(3, 5, None, False, None, NS)
    assert (d.publish, d.remember, d.in_force) == (False, True, 5)
    assert d.warning is not None
    assert "is 5 cluster-wide" in d.warning
    assert "this host's config says 3" in d.warning
    assert NS in d.warning


def test_first_start_joining_an_equal_limit_does_not_warn() -> None:
    assert decide_limit(5, 5, None, False, None, NS) == LimitDecision(False, True, 5, None)


def test_first_start_does_not_repeat_a_reported_difference() -> None:
    assert decide_limit(3, 5, None, False, 5, NS) == LimitDecision(False, True, 5, None)


def test_first_start_without_a_cluster_limit_publishes() -> None:
    assert decide_limit(3, None, None, False, None, NS) == LimitDecision(True, True, 3, None)


def test_a_redis_that_lost_its_limit_gets_ours_again() -> None:
    assert decide_limit(3, None, "3", False, 3, NS) == LimitDecision(True, True, 3, None)


def test_changed_here_publishes_and_says_it_is_now_on_every_host() -> None:
    d = decide_limit(6, 4, "4", True, 4, NS)
    assert (d.publish, d.remember, d.in_force) == (True, True, 6)
    assert d.warning == (
        f"max_concurrent_builds is now 6 on every host sharing namespace {NS} (was 4)"
    )


def test_changed_here_to_the_cluster_value_publishes_without_a_warning() -> None:
    assert decide_limit(4, 4, "3", True, 4, NS) == LimitDecision(True, True, 4, None)


def test_changed_here_on_a_first_start_publishes() -> None:
    d = decide_limit(6, 4, None, True, None, NS)
    assert (d.publish, d.remember, d.in_force) == (True, True, 6)
    assert d.warning is not None and "now 6" in d.warning


def test_file_edited_while_stopped_publishes() -> None:
    d = decide_limit(6, 4, "4", False, None, NS)
    assert (d.publish, d.remember, d.in_force) == (True, True, 6)
    assert d.warning is not None and "now 6 on every host" in d.warning


def test_agreed_steady_state_does_nothing() -> None:
    assert decide_limit(4, 4, "4", False, 4, NS) == LimitDecision(False, False, 4, None)
    assert decide_limit(4, 4, "4", False, None, NS) == LimitDecision(False, False, 4, None)


def test_another_host_changed_the_limit_it_applies_reported_once() -> None:
    first = decide_limit(4, 7, "4", False, 4, NS)
    assert (first.publish, first.remember, first.in_force) == (False, False, 7)
    assert first.warning is not None
    assert "is 7 cluster-wide" in first.warning
    assert "this host's config says 4" in first.warning
    assert "the cluster's value applies" in first.warning
    # the next check: the disagreement was already reported
    assert decide_limit(4, 7, "4", False, 7, NS) == LimitDecision(False, False, 7, None)


# -- Cluster against a real redis-server ---------------------------------------------------


@dataclass
class Memory:
    """The store's daemon_state and audit trail, in a dict."""

    state: dict[str, str] = field(default_factory=dict)
    audited: list[tuple[int, str, str, Any, Any]] = field(default_factory=list)

    def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    def set_state(self, key: str, value: str) -> None:
        self.state[key] = value

    def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
        self.audited.append((uid, user, key, old, new))


@dataclass
class Env:
    cluster: Cluster
    limiter: BuildConcurrencyLimiter
    settings: SettingsService
    memory: Memory
    clock: list[float]
    wall: list[float]

    def advance(self, seconds: float) -> None:
        self.clock[0] += seconds
        self.wall[0] += seconds

    def other_host_sets(self, limit: int | None) -> None:
        self.limiter.set_cluster_limit(limit)


@pytest.fixture
def make_env(tmp_path: Path, rclient: redis.Redis, make_limiter: MakeLimiter) -> Callable[..., Env]:
    def make(max_concurrent: int = 3, memory: Memory | None = None) -> Env:
        config = tmp_path / "reqpmd.yaml"
        config.write_text(
            f"max_concurrent_builds: {max_concurrent}\nnamespace: {NS}\nhost_id: h1\n"
        )
        memory = memory or Memory()
        settings = SettingsService(config, load(config, environ={}), audit=memory)
        current = settings.current
        limiter = make_limiter(
            rclient, max_concurrent=lambda: current().max_concurrent_builds, namespace=NS
        )
        clock, wall = [1000.0], [1_700_000_000.0]
        cluster = Cluster(
            rclient,
            limiter,
            current,
            memory,
            clock=lambda: clock[0],
            wall=lambda: wall[0],
        )
        settings.subscribe(cluster.on_settings_change)
        return Env(cluster, limiter, settings, memory, clock, wall)

    return make


def warnings_of(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "reqpmd.cluster" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_check_reports_health_holders_and_publishes_a_missing_limit(
    make_env: Callable[..., Env],
) -> None:
    env = make_env(max_concurrent=3)
    c = env.cluster
    assert (c.ok, c.detail, c.active, c.cluster_limit) == (False, NOT_CONNECTED, None, None)
    assert c.limit() == 3  # this host's own, until Redis has told us
    env.limiter.declare_no_survivors()
    assert env.limiter.try_acquire("a") is not None
    assert env.limiter.get_cluster_limit() is None
    c.check()
    assert (c.ok, c.detail, c.active, c.cluster_limit) == (True, "ok", 1, 3)
    assert c.grace_left == 0
    assert env.limiter.get_cluster_limit() == 3
    assert env.memory.state[PUBLISHED] == "3"


def test_check_reports_a_restart_grace(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.cluster.check()  # a new namespace looks like a restarted Redis
    assert env.cluster.grace_left > 0
    env.limiter.declare_no_survivors()
    env.cluster.check(force=True)
    assert env.cluster.grace_left == 0


def test_check_is_rate_limited_unless_forced(make_env: Callable[..., Env]) -> None:
    env = make_env(max_concurrent=3)
    env.cluster.check()
    assert env.cluster.cluster_limit == 3
    env.other_host_sets(8)
    env.advance(CHECK_EVERY / 2)
    env.cluster.check()
    assert env.cluster.cluster_limit == 3  # not asked again yet
    env.advance(CHECK_EVERY / 2)
    env.cluster.check()
    assert env.cluster.cluster_limit == 8
    env.other_host_sets(9)
    env.cluster.check(force=True)
    assert env.cluster.cluster_limit == 9


def test_first_start_joins_an_existing_limit_and_warns_once(
    make_env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(max_concurrent=3)
    env.other_host_sets(5)
    for _ in range(3):
        env.cluster.check(force=True)
    assert env.cluster.cluster_limit == 5
    assert env.cluster.limit() == 5
    assert env.limiter.get_cluster_limit() == 5  # not overwritten
    assert env.memory.state[PUBLISHED] == "3"
    assert len(warnings_of(caplog, "is 5 cluster-wide")) == 1


def test_a_file_edited_while_stopped_is_published_at_start(
    make_env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(max_concurrent=6, memory=Memory({PUBLISHED: "4"}))
    env.other_host_sets(4)
    env.cluster.check()
    assert env.limiter.get_cluster_limit() == 6
    assert env.cluster.cluster_limit == 6
    assert env.memory.state[PUBLISHED] == "6"
    assert len(warnings_of(caplog, "now 6 on every host")) == 1


def test_a_settings_change_is_published_at_once(
    make_env: Callable[..., Env], caplog: pytest.LogCaptureFixture
) -> None:
    env = make_env(max_concurrent=3)
    env.cluster.check()
    env.settings.set({"max_concurrent_builds": 7}, "root (uid 0)", 0)
    # no check() in between: the subscriber published it
    assert env.limiter.get_cluster_limit() == 7
    assert env.cluster.cluster_limit == 7
    assert env.memory.state[PUBLISHED] == "7"
    assert len(warnings_of(caplog, "now 7 on every host")) == 1


def test_a_change_of_another_key_does_not_publish(make_env: Callable[..., Env]) -> None:
    env = make_env(max_concurrent=3)
    env.cluster.check()
    env.other_host_sets(5)
    env.settings.set({"host_max_builds": 2}, "root (uid 0)", 0)
    assert env.limiter.get_cluster_limit() == 5
    env.cluster.check(force=True)
    assert env.cluster.cluster_limit == 5


def test_redis_outage_is_reported_once_and_recovery_logged(
    make_env: Callable[..., Env],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="reqpmd.cluster")
    env = make_env(max_concurrent=3)
    c = env.cluster
    c.check()
    assert c.ok
    redis_server.kill()
    for _ in range(3):
        c.check(force=True)
        env.advance(60)
        c.check()  # a due (not forced) check too
    assert c.ok is False
    assert c.detail not in ("ok", NOT_CONNECTED)
    assert "unreachable" in c.detail
    assert c.active is None
    outage = warnings_of(caplog, "unreachable")
    assert len(outage) == 1
    assert "running builds go on" in outage[0].getMessage()
    assert c.limit() == 3  # the last known limit still applies
    redis_server.start()
    c.check(force=True)
    assert (c.ok, c.detail) == (True, "ok")
    again = [r for r in caplog.records if "reachable again" in r.getMessage()]
    assert len(again) == 1
    # the restarted Redis (no persistence) lost its limit: it gets ours again
    assert env.limiter.get_cluster_limit() == 3


def test_first_check_with_redis_down_is_reported(
    make_env: Callable[..., Env],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = make_env()
    redis_server.kill()
    env.cluster.check()
    env.cluster.check(force=True)
    assert env.cluster.ok is False
    assert len(warnings_of(caplog, "unreachable")) == 1


def test_a_change_made_while_redis_was_down_is_published_when_it_is_back(
    make_env: Callable[..., Env],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = make_env(max_concurrent=3)
    env.cluster.check()
    redis_server.kill()
    env.cluster.check(force=True)
    env.settings.set({"max_concurrent_builds": 6}, "root (uid 0)", 0)
    assert env.settings.current().max_concurrent_builds == 6  # applied here at once
    assert len(warnings_of(caplog, "when Redis is back")) == 1
    redis_server.start()
    # as if Redis had kept the old value (a persisted one, or another host set it back)
    env.other_host_sets(3)
    env.cluster.check(force=True)
    assert env.cluster.ok
    assert env.limiter.get_cluster_limit() == 6
    assert env.cluster.cluster_limit == 6
    assert env.memory.state[PUBLISHED] == "6"


def test_heartbeat_then_hosts_lists_this_host(make_env: Callable[..., Env]) -> None:
    env = make_env()
    records: list[int] = []

    def record() -> dict[str, Any]:
        records.append(1)
        return {"host_id": "h1", "building": len(records)}

    env.cluster.heartbeat(record)
    assert records == []  # not connected yet: nothing is published
    env.cluster.check()
    env.cluster.heartbeat(record)
    hosts = env.cluster.hosts()
    assert len(hosts) == 1
    h = hosts[0]
    assert (h["host_id"], h["building"], h["last_seen"]) == ("h1", 1, env.wall[0])
    assert h["age"] == 0.0
    assert h["stale"] is False
    # rate-limited: the next one is due HEARTBEAT_EVERY later
    env.advance(HEARTBEAT_EVERY / 2)
    env.cluster.heartbeat(record)
    assert len(records) == 1
    assert env.cluster.hosts()[0]["age"] == HEARTBEAT_EVERY / 2
    env.advance(HEARTBEAT_EVERY / 2)
    env.cluster.heartbeat(record)
    assert len(records) == 2
    assert env.cluster.hosts()[0]["building"] == 2
    # a host not heard of for three heartbeats is stale
    env.advance(3 * HEARTBEAT_EVERY + 1)
    h = env.cluster.hosts()[0]
    assert h["age"] == 3 * HEARTBEAT_EVERY + 1
    assert h["stale"] is True


def test_figures_are_written_apart_from_the_heartbeat_only_when_recomputed(
    make_env: Callable[..., Env], rclient: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """The heartbeat every reader parses stays small; the figures (the bulk, read only by
    stats --cluster) go to their own hash, once per recomputation."""
    env = make_env()
    env.cluster.check()
    figures: dict[str, Any] = {"at": 1.0, "1h": {"busy": 0}}

    def heartbeat() -> None:
        env.cluster.heartbeat(lambda: {"host_id": "h1"}, lambda: dict(figures))
        env.advance(HEARTBEAT_EVERY)

    heartbeat()
    assert "stats" not in env.cluster.hosts()[0]
    assert env.cluster.host_stats() == {"h1": figures}
    rclient.hdel(keys.host_stats_key(NS), "h1")
    heartbeat()  # the same figures: not written again
    assert env.cluster.host_stats() == {}
    figures["at"] = 61.0
    heartbeat()
    assert env.cluster.host_stats() == {"h1": figures}
    # garbage from anyone else is skipped and said once; a key of the wrong type replaced
    rclient.hset(keys.host_stats_key(NS), mapping={"junk": "[1", "list": "[1]", "big": "x" * 20000})
    for _ in range(2):
        assert env.cluster.host_stats() == {"h1": figures}
    for name in ("junk", "list", "big"):
        assert len(warnings_of(caplog, f"figures of host '{name}'")) == 1, name
    rclient.set(keys.host_stats_key(NS), "garbage")
    with pytest.raises(RedisUnavailable):
        env.cluster.host_stats()
    figures["at"] = 121.0
    heartbeat()
    assert env.cluster.host_stats() == {"h1": figures}
    assert len(warnings_of(caplog, "is not a hash of host figures")) == 1


def test_a_settings_change_makes_the_next_heartbeat_due(make_env: Callable[..., Env]) -> None:
    env = make_env()
    env.cluster.check()
    sent: list[int] = []

    def record() -> dict[str, Any]:
        sent.append(env.settings.current().host_max_builds)
        return {"host_id": "h1"}

    env.cluster.heartbeat(record)
    env.settings.set({"host_max_builds": 2}, "root (uid 0)", 0)
    env.cluster.heartbeat(record)  # no time has passed, but the change is news
    assert sent == [0, 2]


def test_hosts_with_redis_down_is_unavailable(
    make_env: Callable[..., Env], redis_server: RedisServer
) -> None:
    env = make_env()
    redis_server.kill()
    with pytest.raises(RedisUnavailable):
        env.cluster.hosts()
