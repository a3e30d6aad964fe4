"""Two real reqpmd daemons on a Sentinel-managed Redis, and a kill -9 of the master while
both slots are held and builds wait: the limit holds through the failover, every build
ends succeeded, and the pause before the next build starts is the failover plus the
restart grace (what keeps a holder the new master does not know yet from losing its
slot to a newcomer)."""

from __future__ import annotations

import time
from collections.abc import Callable

from reqpmd.slots.connection import open_redis
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.daemon_harness import FINAL, Reqpmd, max_overlap, wait_for
from tests.redis_topologies import SentinelSet

LEASE = 5  # slot_lease_seconds, and so the restart grace


def test_builds_on_two_hosts_survive_a_kill_9_of_the_master_within_the_limit(
    daemons: Callable[..., Reqpmd],
) -> None:
    with SentinelSet() as sentinels:
        url = sentinels.url()
        client = open_redis(url)
        BuildConcurrencyLimiter(client).declare_no_survivors()  # a fresh set: no grace
        client.close()
        common = {
            "redis_url": url,
            "mock_sleep": 2.0,
            "mock_log": sentinels.root / "all-mock.jsonl",
            "settings": {"max_concurrent_builds": 2, "slot_lease_seconds": LEASE},
        }
        a = daemons("a", host_id="host-a", **common).start()
        b = daemons("b", host_id="host-b", **common).start()
        ids = [(d, d.submit(f"p{i}-1-1.src.rpm")) for i in range(4) for d in (a, b)]
        # both slots held, the rest waiting for them
        wait_for(
            lambda: (s := a.call("status"))["active_count"] == 2 and s["waiting_total"] >= 4,
            timeout=30,
        )
        old = sentinels.master()
        old.kill9()
        killed = time.time()
        new = sentinels.wait_failover(old)

        for d, i in ids:
            build = d.wait_state(i, FINAL, timeout=120)
            assert build["state"] == "succeeded", (build, d.log()[-3000:])
        runs = a.mock_runs()  # one log for both hosts
        builds = [r for r in runs if r.get("mode") == "rebuild"]
        assert len(builds) == len(ids)
        assert max_overlap(runs) <= 2, runs
        # The first build granted after the kill waited for the failover and the grace.
        # (A mock starting within 2 s of the kill had its grant from the old master: the
        # new one grants nothing for the failover, 2 s at least, and the 5 s grace.)
        next_start = min(r["start"] for r in builds if r["start"] > killed + 2.0)
        pause = next_start - killed
        print(f"kill -9 of the master -> next build started: {pause:.1f} s")
        assert pause >= LEASE, pause  # the grace held new slots back
        # each daemon says which server it talks to now, and that it changed
        for d in (a, b):
            redis = wait_for(
                lambda d=d: (r := d.call("status")["redis"])["server_changes"] >= 1 and r
            )
            assert redis["master"] == new.address, redis
            assert redis["server_changed_at"] >= killed - 1
            assert "is another server now" in d.log()
        # host-b's heartbeat (every 5 s) names the new master too
        wait_for(
            lambda: (
                {h["host_id"]: h for h in a.call("hosts")}["host-b"]["redis"]["master"]
                == new.address
            ),
            timeout=15,
        )
