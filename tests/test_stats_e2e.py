"""Stats and metrics through real daemons: reqpmctl stats (here and --cluster across two
hosts sharing a Redis), reqpmctl metrics against the /metrics endpoint, and a metrics
port in use."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from reqpmd.slots.keys import host_stats_key, hosts_key
from reqpmd.slots.server import RedisServer
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.test_reqpmctl import ctl


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (x.name, tuple(sorted(x.labels.items()))): x.value
        for f in text_string_to_metric_families(text)
        for x in f.samples
    }


def test_stats_and_metrics_of_two_hosts(
    daemons: Callable[..., Reqpmd], redis_server: RedisServer
) -> None:
    port = free_port()
    common: dict[str, Any] = {"redis_url": redis_server.url, "mock_sleep": 0.05}
    a = daemons(
        "a", host_id="host-a", settings={"metrics_listen": f"127.0.0.1:{port}"}, **common
    ).start()
    b = daemons("b", host_id="host-b", **common).start()
    ids = [
        (a, a.submit("a1-1-1.src.rpm")),
        (a, a.submit("a2-1-1.src.rpm")),
        (b, b.submit("b1-1-1.src.rpm")),
    ]
    for d, i in ids:
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded"

    here = json.loads(ctl(a, "--json", "stats", "--since", "1h").stdout)
    assert here["all"]["builds"] == 2 and here["all"]["states"] == {"succeeded": 2}
    assert here["all"]["duration"]["count"] == 2
    text = ctl(a, "stats", "--since", "1h").stdout
    assert "2 ended (2 succeeded)" in text and "build duration" in text and "per hour:" in text
    empty = ctl(a, "stats", "--since", "1h", "--by", "project").stdout
    assert "project (none)" in empty

    # --cluster: each host's figures travel with its heartbeat (recomputed 10 s after a
    # build ended at the latest)
    def merged() -> dict[str, Any] | None:
        r = json.loads(
            ctl(a, "--json", "stats", "--since", "1h", "--cluster", "--by", "host").stdout
        )
        return r if r["all"]["builds"] == 3 else None

    cluster = wait_for(merged, timeout=30)  # b's heartbeat after its build carries them
    assert cluster["hosts"] == ["host-a", "host-b"]
    assert {h: g["builds"] for h, g in cluster["groups"].items()} == {"host-a": 2, "host-b": 1}
    # the figures live apart from the heartbeat every scrape reads; an older release's
    # heartbeat that carries them itself is still merged
    r = redis_server.client()
    assert "stats" not in json.loads(r.hget(hosts_key("reqpm"), "host-b") or "{}")
    figures = json.loads(r.hget(host_stats_key("reqpm"), "host-b") or "{}")
    old = {"host_id": "host-c", "last_seen": time.time(), "stats": figures}
    r.hset(hosts_key("reqpm"), "host-c", json.dumps(old))
    three = json.loads(
        ctl(a, "--json", "stats", "--since", "1h", "--cluster", "--by", "host").stdout
    )
    assert {h: g["builds"] for h, g in three["groups"].items()} == {
        "host-a": 2,
        "host-b": 1,
        "host-c": 1,
    }
    r.hdel(hosts_key("reqpm"), "host-c")
    bad = ctl(a, "stats", "--since", "3h", "--cluster")
    assert bad.returncode == 2 and "1h, 24h or 7d" in bad.stderr

    # the endpoint and reqpmctl metrics: the same families, the builds counted
    over_http = (
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    )
    by_ctl = ctl(a, "metrics").stdout
    assert {k[0] for k in samples(over_http)} == {k[0] for k in samples(by_ctl)}
    got = samples(by_ctl)
    assert (
        got[("reqpm_builds_total", (("chroot", "fedora-42-x86_64"), ("state", "succeeded")))] == 2
    )
    assert got[("reqpm_slots_limit", ())] == 4
    assert got[("reqpm_host_last_seen_timestamp_seconds", (("peer", "host-b"),))] > 0


def test_a_metrics_port_in_use_leaves_the_daemon_running_and_says_so(
    daemons: Callable[..., Reqpmd],
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        d = daemons(settings={"metrics_listen": f"127.0.0.1:{port}"}).start()
        status = d.call("status")
        assert "cannot serve metrics" in (status["metrics_problem"] or "")
        assert "cannot serve metrics" in status["summary"]
        assert "reqpmd runs on without its /metrics endpoint" in d.log()
        assert ctl(d, "metrics").returncode == 0  # reqpmctl metrics still works
    finally:
        taken.close()
