"""Queue analytics on builds with known timestamps: exact means and percentiles, empty
windows, groups, utilisation and the hours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from reqpmd.builds.analytics import HOUR, percentile, summary, window_stats
from reqpmd.builds.states import State
from reqpmd.builds.store import Store

T0 = 1_800_000_000.0  # a fixed start of the window


def add(
    store: Store,
    *,
    state: State = State.SUCCEEDED,
    chroot: str = "c1",
    submitted: float,
    waiting: float | None,
    started: float | None,
    finished: float,
    project: str | None = None,
) -> None:
    with store.tx() as db:
        db.execute(
            "INSERT INTO builds (state, chroot, kind, source, submitted_by, submitted_name,"
            " submitted_at, waiting_at, started_at, finished_at, project)"
            " VALUES (?, ?, 'spec', 'x.spec', 1000, 'alice', ?, ?, ?, ?, ?)",
            (state, chroot, submitted, waiting, started, finished, project),
        )


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 11)]
    assert [percentile(values, p) for p in (50, 90, 99, 100)] == [5, 9, 10, 10]
    assert summary([]) == {
        "count": 0,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
    }


def test_known_builds_give_exact_figures(tmp_path: Path) -> None:
    store = Store(tmp_path)
    # ten builds: waited i seconds for a slot, were submitted 10 s before waiting, ran
    # 60*i seconds, all ending in the first hour of the window
    for i in range(1, 11):
        start = T0 + 100 * i
        add(
            store,
            submitted=start - i - 10,
            waiting=start - i,
            started=start,
            finished=start + 60 * i,
        )
    add(store, state=State.CANCELLED, submitted=T0, waiting=None, started=None, finished=T0 + 5)
    add(store, submitted=T0 - 9000, waiting=None, started=T0 - 8000, finished=T0 - 10)  # before
    stats = window_stats(store, T0, T0 + 2 * HOUR, capacity=2)
    a = stats["all"]
    assert a["builds"] == 11
    assert a["states"] == {"cancelled": 1, "succeeded": 10}
    assert a["slot_wait"] == {"count": 10, "mean": 5.5, "p50": 5, "p90": 9, "p99": 10, "max": 10}
    assert a["submit_to_start"]["mean"] == 15.5 and a["submit_to_start"]["max"] == 20
    assert a["duration"] == {
        "count": 10,
        "mean": 330.0,
        "p50": 300,
        "p90": 540,
        "p99": 600,
        "max": 600,
    }
    assert a["per_hour"] == [11, 0]
    assert a["throughput_per_hour"] == 5.5
    assert a["busiest_hour"] == {"start": T0, "builds": 11}
    assert a["utilisation"] == pytest.approx(3300 / (2 * 2 * HOUR))


def test_a_build_running_across_the_window_start_counts_only_inside(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, submitted=T0 - 1000, waiting=T0 - 900, started=T0 - 1800, finished=T0 + 1800)
    stats = window_stats(store, T0, T0 + HOUR, capacity=1)
    assert stats["all"]["utilisation"] == 0.5  # 1800 of its 3600 s were inside


def test_an_empty_window_says_so(tmp_path: Path) -> None:
    stats = window_stats(Store(tmp_path), T0, T0 + HOUR, capacity=4)
    a = stats["all"]
    assert a["builds"] == 0 and a["states"] == {} and a["duration"]["mean"] is None
    assert a["throughput_per_hour"] == 0 and a["utilisation"] == 0 and a["busiest_hour"] is None


def test_groups(tmp_path: Path) -> None:
    store = Store(tmp_path)
    add(store, chroot="c1", project="p", submitted=T0, waiting=T0, started=T0, finished=T0 + 10)
    add(store, chroot="c2", submitted=T0, waiting=T0, started=T0, finished=T0 + 20)
    add(store, chroot="c2", submitted=T0, waiting=T0, started=T0, finished=T0 + 30)
    by_chroot = window_stats(store, T0, T0 + HOUR, 4, by="chroot")["groups"]
    assert {k: v["builds"] for k, v in by_chroot.items()} == {"c1": 1, "c2": 2}
    assert by_chroot["c2"]["duration"]["mean"] == 25
    by_project = window_stats(store, T0, T0 + HOUR, 4, by="project")["groups"]
    assert {k: v["builds"] for k, v in by_project.items()} == {"(none)": 2, "p": 1}
    by_user = window_stats(store, T0, T0 + HOUR, 4, by="user")["groups"]
    assert list(by_user) == ["alice"]
    with pytest.raises(ValueError, match="by must be one of"):
        window_stats(store, T0, T0 + HOUR, 4, by="colour")


def test_hosts_aggregates_merge_into_the_cluster_figures(tmp_path: Path) -> None:
    from reqpmd.builds.analytics import aggregates, merged, valid_aggregate

    now = T0 + HOUR
    stores = [Store(tmp_path / "a"), Store(tmp_path / "b")]
    for i, store in enumerate(stores):
        for j in range(1, 6):  # host a: runs of 100..500 s; host b: 1100..1500 s
            start = T0 + 60 * j
            run = 1000 * i + 100 * j
            add(store, submitted=start - 7, waiting=start - 5, started=start, finished=start + run)
    parts = [aggregates(s, now) for s in stores]
    windows = [valid_aggregate(p, "1h") for p in parts]
    assert all(w is not None for w in windows)
    figures = merged([w for w in windows if w is not None], "1h", now, capacity=4)
    assert figures["builds"] == 10 and figures["states"] == {"succeeded": 10}
    d = figures["duration"]
    assert d["count"] == 10 and d["mean"] == 800 and d["max"] == 1500
    assert d["p50"] == 600 and d["p90"] == 1500  # bucket bounds: 500 s is in (300, 600]
    assert figures["slot_wait"]["mean"] == 5 and figures["submit_to_start"]["mean"] == 7
    # a host whose record was tampered with is left out, not believed
    for bad in (
        {"1h": {"states": {"x": -1}}},
        {"1h": "nope"},
        None,
        {"1h": {**windows[0], "busy": float("inf")}},
    ):
        assert valid_aggregate(bad, "1h") is None


def test_hostile_figures_from_other_hosts_are_refused_or_shown_escaped() -> None:
    from reqpmctl.stats import render
    from reqpmd.builds.analytics import valid_aggregate
    from reqpmd.cluster import MAX_HEARTBEAT_BYTES, _heartbeat

    good = {"states": {}, "per_hour": [0], "busy": 0}
    assert valid_aggregate({"1h": {**good, "states": {"succeeded\x1b[31m": 1}}}, "1h") is None
    with pytest.raises(ValueError, match="over"):
        _heartbeat(
            b'{"host_id": "x", "last_seen": 1, "pad": "' + b"x" * MAX_HEARTBEAT_BYTES + b'"}'
        )
    empty = {"builds": 0}
    text = render(
        {
            "since": T0,
            "until": T0 + HOUR,
            "capacity": 2,
            "by": None,
            "all": empty,
            "hosts": ["evil\x1b]0;owned\x07", "host-a"],
        }
    )
    assert "\x1b" not in text and "\x07" not in text


def test_a_queued_build_cancelled_counts_as_an_end(tmp_path: Path) -> None:
    from reqpmd.builds.scheduler import Scheduler

    store = Store(tmp_path)
    ended: list[Any] = []
    scheduler = Scheduler(store, None, lambda: None, None, on_end=ended.append)  # type: ignore[arg-type]
    inputs = store.stage({"x.spec": b"x"})
    first = store.submit(chroot="c", kind="spec", source="x.spec", inputs=inputs, priority=0, uid=0)
    inputs = store.stage({"x.spec": b"x"})
    second = store.submit(
        chroot="c", kind="spec", source="x.spec", inputs=inputs, priority=0, uid=0
    )
    scheduler.cancel(first, "no longer wanted")
    assert scheduler.cancel_if_queued(second, "superseded")
    assert [(b.id, b.state) for b in ended] == [(first, State.CANCELLED), (second, State.CANCELLED)]


def test_builds_still_running_count_in_utilisation(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with store.tx() as db:  # two builds holding both slots for the whole hour, not ended
        for _ in range(2):
            db.execute(
                "INSERT INTO builds (state, chroot, kind, source, submitted_by, submitted_at,"
                " waiting_at, started_at) VALUES ('building', 'c1', 'spec', 'x.spec', 0, ?, ?, ?)",
                (T0 - 7200, T0 - 7200, T0 - 7200),
            )
    a = window_stats(store, T0, T0 + HOUR, capacity=2, by="chroot")
    assert a["all"]["builds"] == 0 and a["all"]["utilisation"] == 1.0
