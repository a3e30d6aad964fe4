"""Auto-scaling of a host with an injected load source and clock: additive increase under
headroom, halving under pressure, bounds, the cluster limit, and waiters withdrawn."""

from __future__ import annotations

from typing import Any

from reqpmd.builds.autoscale import AutoScaler, Sample
from reqpmd.config.parse import validate
from reqpmd.config.schema import Settings
from tests.fakes import FakeClock

CALM = Sample(load_per_cpu=0.1, mem_available_mb=64000, cpu_pressure=0.0, mem_pressure=0.0)


def scaler(**settings: Any) -> tuple[AutoScaler, FakeClock, list[Sample]]:
    s: Settings = validate(
        {"auto_scale": True, "auto_scale_interval_seconds": 60, **settings}, environ={}
    )
    clock = FakeClock()
    now = [CALM]
    return AutoScaler(lambda: s, source=lambda: now[0], clock=clock), clock, now


def test_the_cap_rises_one_step_per_interval_of_headroom_up_to_the_ceiling() -> None:
    a, clock, _ = scaler()
    caps = []
    for _ in range(12):
        caps.append(a.cap(ceiling=4))
        clock.advance(30)
    assert caps == [1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4]
    assert "headroom" in a.why or "ceiling" in a.why


def test_pressure_halves_it_at_once_and_one_spike_is_one_halving() -> None:
    a, clock, now = scaler()
    for _ in range(20):
        a.cap(ceiling=8)
        clock.advance(60)
    assert a.current == 8
    now[0] = Sample(load_per_cpu=3.0, mem_available_mb=64000, cpu_pressure=None, mem_pressure=None)
    assert a.cap(ceiling=8) == 4
    clock.advance(1)
    assert a.cap(ceiling=8) == 4  # within a quarter interval: not again
    clock.advance(15)
    assert a.cap(ceiling=8) == 2
    assert "load per CPU 3.00" in a.why
    now[0] = Sample(load_per_cpu=0.1, mem_available_mb=100, cpu_pressure=None, mem_pressure=None)
    clock.advance(15)
    assert a.cap(ceiling=8) == 1 and "memory available" in a.why
    clock.advance(15)
    assert a.cap(ceiling=8) == 1  # never below 1
    now[0] = Sample(load_per_cpu=0.1, mem_available_mb=64000, cpu_pressure=55.0, mem_pressure=0.0)
    a.current = 4
    clock.advance(60)
    assert a.cap(ceiling=8) == 2 and "CPU pressure 55.0%" in a.why


def test_never_above_the_cluster_limit() -> None:
    a, clock, _ = scaler()
    a.current = 6
    assert a.cap(ceiling=3) == 3  # the cluster limit was lowered
    for _ in range(10):
        clock.advance(60)
        assert a.cap(ceiling=3) == 3
    assert a.cap(ceiling=0) == 1  # a ceiling below 1 still lets one build run
