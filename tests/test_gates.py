"""Admission gates with injected measurements (the e2e disk gate test uses the real disk)."""

from __future__ import annotations

from pathlib import Path

from reqpmd.builds.gates import GB, Gates, closed, describe_closed
from reqpmd.config import parse, schema


def make(**values: object) -> schema.Settings:
    return parse.validate(values, environ={})


def test_all_open_when_measurements_are_inside_the_limits() -> None:
    gates = Gates(disk_free=lambda p: 50 * GB, load=lambda: 0.5)
    result = gates.check(make(min_free_disk_gb=10, max_load_per_cpu=2, host_max_builds=3), 1)
    assert [g.name for g in result] == ["host_max_builds", "disk", "state_disk", "load"]
    assert closed(result) == []


def test_each_gate_closes_and_says_why() -> None:
    gates = Gates(disk_free=lambda p: int(3.1 * GB), load=lambda: 4.0)
    s = make(min_free_disk_gb=10, max_load_per_cpu=2, host_max_builds=2)
    shut = closed(gates.check(s, 2))
    assert [g.name for g in shut] == ["host_max_builds", "disk", "load"]
    text = describe_closed(gates.check(s, 2))
    assert "disk gate closed: 3.1 GB free < 10 GB" in text
    assert "load gate closed: load per CPU 4.00 > 2" in text
    assert "host_max_builds gate closed: 2/2 builds on this host" in text


def test_optional_gates_are_absent_when_off() -> None:
    gates = Gates(disk_free=lambda p: 0, load=lambda: 99.0)
    result = gates.check(
        make(min_free_disk_gb=0, min_free_state_mb=0, max_load_per_cpu=0, host_max_builds=0), 5
    )
    assert [g.name for g in result] == ["disk", "state_disk"]
    assert closed(result) == []  # 0 GB free >= 0 GB wanted


def test_disk_gate_measures_the_nearest_existing_parent(tmp_path: Path) -> None:
    seen: list[Path] = []
    gates = Gates(disk_free=lambda p: seen.append(p) or 100 * GB, load=lambda: 0.0)
    gates.check(make(mock_root_dir=str(tmp_path / "not" / "yet"), state_dir=str(tmp_path)), 0)
    assert seen == [tmp_path / "not" / "yet", tmp_path]
    from reqpmd.builds.gates import disk_free_bytes

    assert disk_free_bytes(tmp_path / "not" / "yet") > 0


def test_the_state_disk_gate_watches_state_dir() -> None:
    """state_dir holds the queue, logs and results: full, it must stop new builds too."""
    free = {"/var/lib/mock": 500 * GB, "/var/lib/reqpm": 200 * 1000**2}
    gates = Gates(disk_free=lambda p: free[str(p)], load=lambda: 0.0)
    s = make(mock_root_dir="/var/lib/mock", state_dir="/var/lib/reqpm", min_free_state_mb=1024)
    [shut] = closed(gates.check(s, 0))
    assert shut.name == "state_disk"
    assert "200 MB free < 1024 MB under /var/lib/reqpm" in shut.detail
