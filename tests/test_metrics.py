"""Prometheus metrics: the families and their names, counters that only go up, the text
format as Prometheus's own parser and promtool read it, the listener's errors, and the
shipped alert rules (promtool check and promtool's rule unit tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from reqpmd.builds.states import State
from reqpmd.builds.store import Store
from reqpmd.config.parse import validate
from reqpmd.config.schema import SettingsInvalid
from reqpmd.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def status() -> dict[str, Any]:
    return {
        "max_concurrent": 4,
        "active_count": 2,
        "active_builds": [{"age": 30.0}, {"age": 90.0}],
        "waiting": [{}, {}, {}],
        "waiting_total": 3,
        "redis": {"ok": True},
        "queued": 5,
        "building_here": 1,
        "gates": [{"name": "disk", "open": True}, {"name": "load", "open": False}],
        "publish": {"pending": 1, "failed": 2},
        "groups": [
            {"group": "greet", "holders": 1, "waiting": 2, "max_concurrent": 1, "weight": 1},
            {"group": "~alice", "holders": 1, "waiting": 1, "max_concurrent": None, "weight": 1},
        ],
    }


def hosts() -> list[dict[str, Any]]:
    return [{"host_id": "h1", "last_seen": 1000.0}, {"host_id": "h2", "last_seen": 990.0}]


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def ended(tmp_path: Path, state: State, run: float, waited: float) -> Any:
    store = Store(tmp_path)
    inputs = store.stage({"x.spec": b"x"})
    build_id = store.submit(
        chroot="c1", kind="spec", source="x.spec", inputs=inputs, priority=0, uid=0
    )
    store.transition(build_id, State.WAITING, waiting_at=1000.0)
    store.transition(build_id, State.BUILDING, started_at=1000.0 + waited)
    return store.transition(build_id, state, finished_at=1000.0 + waited + run)


def test_the_families_and_their_values(tmp_path: Path) -> None:
    m = Metrics(status, hosts, lambda: 28800.0, "h1")
    m.build_ended(ended(tmp_path / "a", State.SUCCEEDED, run=700, waited=20))
    m.publish_failed("c1")
    f = families(m.text())
    value = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in f.values()
        for s in fam.samples
    }
    assert value[("reqpm_slots_busy", ())] == 2
    assert value[("reqpm_slots_limit", ())] == 4
    assert value[("reqpm_slot_waiters", ())] == 3
    assert value[("reqpm_slot_oldest_age_seconds", ())] == 90
    assert value[("reqpm_project_slots_busy", (("project", "greet"),))] == 1
    assert value[("reqpm_project_slot_waiters", (("project", "~alice"),))] == 1
    assert value[("reqpm_project_max_concurrent", (("project", "greet"),))] == 1
    assert ("reqpm_project_max_concurrent", (("project", "~alice"),)) not in value
    assert value[("reqpm_queue_length", (("host", "h1"),))] == 5
    assert value[("reqpm_redis_up", (("host", "h1"),))] == 1
    assert value[("reqpm_gate_open", (("gate", "load"), ("host", "h1")))] == 0
    assert value[("reqpm_builds_total", (("chroot", "c1"), ("state", "succeeded")))] == 1
    assert value[("reqpm_publish_failures_total", (("chroot", "c1"),))] == 1
    assert value[("reqpm_build_duration_seconds_count", (("chroot", "c1"),))] == 1
    assert value[("reqpm_build_duration_seconds_bucket", (("chroot", "c1"), ("le", "600.0")))] == 0
    assert value[("reqpm_build_duration_seconds_bucket", (("chroot", "c1"), ("le", "1200.0")))] == 1
    assert value[("reqpm_slot_wait_seconds_sum", ())] == 20
    assert value[("reqpm_host_last_seen_timestamp_seconds", (("peer", "h2"),))] == 990
    assert f["reqpm_builds"].type == "counter"
    assert f["reqpm_build_duration_seconds"].type == "histogram"


def test_promtool_reads_the_text(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    m = Metrics(status, hosts, lambda: 0.0, "h1")
    m.build_ended(ended(tmp_path, State.FAILED, run=5, waited=1))
    done = subprocess.run(
        [promtool, "check", "metrics"], input=m.text(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_counters_only_go_up_while_the_daemon_runs(tmp_path: Path) -> None:
    m = Metrics(status, hosts, lambda: 0.0, "h1")
    seen = []
    for i, state in enumerate([State.SUCCEEDED, State.FAILED, State.SUCCEEDED]):
        m.build_ended(ended(tmp_path / str(i), state, run=10, waited=1))
        samples = families(m.text())["reqpm_builds"].samples
        seen.append(sum(s.value for s in samples if s.name == "reqpm_builds_total"))
    assert seen == [1, 2, 3]


def test_bad_metrics_listen_values_are_clear_errors() -> None:
    for bad in ("9464", "localhost:0", "localhost:70000", "-x:80", "host:port", "a b:80"):
        with pytest.raises(SettingsInvalid) as info:
            validate({"metrics_listen": bad}, environ={})
        (error,) = info.value.errors
        assert error.key == "metrics_listen" and "HOST:PORT" in error.message
    for good in ("off", "127.0.0.1:9464", "[::1]:9464", "build01.example.com:65535"):
        assert validate({"metrics_listen": good}, environ={}).metrics_listen == good


def test_a_port_in_use_is_an_error_that_leaves_the_rest_running() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        m = Metrics(status, hosts, lambda: 0.0, "h1")
        m.serve(f"127.0.0.1:{port}")
        assert m.listening is None and "Address already in use" in (m.listen_error or "")
    finally:
        taken.close()
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    m.serve(f"127.0.0.1:{port}")
    assert m.listening == f"127.0.0.1:{port}"
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert set(families(body)) == set(families(m.text()))


def test_the_shipped_alert_rules_check_and_fire_as_documented() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rules = ROOT / "etc" / "reqpm" / "prometheus-alerts.yml"
    check = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = ROOT / "tests" / "data" / "prometheus" / "alerts-test.yml"
    test = subprocess.run(
        [promtool, "test", "rules", str(unit)], capture_output=True, text=True, cwd=unit.parent
    )
    assert test.returncode == 0, test.stdout + test.stderr


def test_idle_connections_to_the_endpoint_are_capped() -> None:
    import threading

    from reqpmd.metrics import MAX_CONNECTIONS

    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    m = Metrics(status, hosts, lambda: 0.0, "h1")
    m.serve(f"127.0.0.1:{port}")
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS + 20)]
    try:
        # each idle one is answered by a thread, or closed at once past the cap
        closed = 0
        for s in idle[MAX_CONNECTIONS:]:
            s.settimeout(5)
            if s.recv(1) == b"":
                closed += 1
        assert closed == 20
        assert threading.active_count() <= before + MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()
