"""The build state machine and the SQLite store: real files, real SQLite, in tmp_path."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reqpmd.builds import states, store
from reqpmd.builds.states import ALLOWED, FINAL, IllegalTransition, State
from reqpmd.builds.store import Store
from reqpmd.errors import NotFound

# the transitions that bring a new build to each state
PATH_TO: dict[State, list[State]] = {
    State.QUEUED: [],
    State.WAITING: [State.WAITING],
    State.BUILDING: [State.WAITING, State.BUILDING],
    **{s: [State.WAITING, State.BUILDING, s] for s in FINAL},
}
STAMP = {
    State.WAITING: "waiting_at",
    State.BUILDING: "started_at",
    **{s: "finished_at" for s in FINAL},
}
LEGAL = sorted((old, new) for old in State for new in ALLOWED[old])
ILLEGAL = sorted((old, new) for old in State for new in State if new not in ALLOWED[old])
SPEC = {"hello.spec": b"Name: hello\n", "sources/x": b"source bytes"}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    yield s
    s.close()


def submit(s: Store, priority: int = 0, files: dict[str, bytes] | None = None) -> int:
    return s.submit(
        chroot="fedora-40-x86_64",
        kind="spec",
        source="hello.spec",
        inputs=s.stage(SPEC if files is None else files),
        priority=priority,
        uid=1000,
        user="alice",
    )


def raw_row(state_dir: Path, build_id: int) -> tuple[Any, ...] | None:
    """The row as another connection sees it: what is committed, not what one process caches."""
    con = sqlite3.connect(state_dir / "reqpm.db")
    try:
        row = con.execute("SELECT * FROM builds WHERE id = ?", (build_id,)).fetchone()
        return tuple(row) if row is not None else None
    finally:
        con.close()


def bring_to(s: Store, build_id: int, target: State) -> None:
    for step in PATH_TO[target]:
        s.transition(build_id, step)
    assert s.get(build_id).state == target


# -- the state machine -------------------------------------------------------------------


def test_every_state_has_its_edges() -> None:
    assert set(ALLOWED) == set(State)
    assert {s for s in State if s.final} == FINAL
    assert all(ALLOWED[s] == {State.QUEUED} for s in FINAL)  # only a retry leaves a final state


@pytest.mark.parametrize(("old", "new"), LEGAL)
def test_check_allows_the_edges_of_the_machine(old: State, new: State) -> None:
    states.check(old, new)


@pytest.mark.parametrize(("old", "new"), ILLEGAL)
def test_check_rejects_every_other_edge(old: State, new: State) -> None:
    with pytest.raises(IllegalTransition, match=f"from {old} to {new}"):
        states.check(old, new)


# -- transitions in the store ------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), LEGAL)
def test_an_allowed_transition_succeeds_and_sets_its_timestamp(
    db: Store, old: State, new: State
) -> None:
    build_id = submit(db)
    bring_to(db, build_id, old)
    before = time.time()
    build = db.transition(build_id, new)
    after = time.time()
    assert build.state == new
    assert db.get(build_id) == build
    if new in STAMP:
        stamp = getattr(build, STAMP[new])
        assert stamp is not None and before <= stamp <= after
    if new == State.QUEUED:
        assert (build.waiting_at, build.started_at, build.finished_at) == (None, None, None)


def test_the_happy_path_sets_each_timestamp_once(db: Store) -> None:
    build_id = submit(db)
    queued = db.get(build_id)
    assert queued.state == State.QUEUED
    assert (queued.waiting_at, queued.started_at, queued.finished_at) == (None, None, None)
    waiting = db.transition(build_id, State.WAITING)
    assert waiting.waiting_at is not None
    assert (waiting.started_at, waiting.finished_at) == (None, None)
    building = db.transition(build_id, State.BUILDING, pid=4242, slot_token=7)
    assert building.waiting_at == waiting.waiting_at
    assert building.started_at is not None and building.started_at >= waiting.waiting_at
    assert building.finished_at is None
    assert (building.pid, building.slot_token) == (4242, 7)
    done = db.transition(build_id, State.SUCCEEDED, exit_code=0)
    assert done.finished_at is not None and done.finished_at >= building.started_at
    assert (done.waiting_at, done.started_at) == (waiting.waiting_at, building.started_at)
    assert done.exit_code == 0


def test_an_explicit_timestamp_is_kept(db: Store) -> None:
    build_id = submit(db)
    assert db.transition(build_id, State.WAITING, waiting_at=123.5).waiting_at == 123.5


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (State.SUCCEEDED, State.BUILDING),
        (State.QUEUED, State.SUCCEEDED),
        (State.QUEUED, State.BUILDING),
        (State.FAILED, State.WAITING),
        (State.CANCELLED, State.CANCELLED),
        (State.WAITING, State.SUCCEEDED),
        (State.BUILDING, State.WAITING),
    ],
)
def test_an_illegal_transition_raises_and_changes_nothing(
    db: Store, old: State, new: State
) -> None:
    build_id = submit(db)
    bring_to(db, build_id, old)
    before_row = raw_row(db.layout.state_dir, build_id)
    before = db.get(build_id)
    with pytest.raises(IllegalTransition):
        db.transition(build_id, new, pid=99, exit_code=3, error="should not be written")
    assert db.get(build_id) == before
    assert raw_row(db.layout.state_dir, build_id) == before_row
    # and the store is still usable: the failed transaction was rolled back
    legal = min(ALLOWED[old])
    assert db.transition(build_id, legal).state == legal


def test_every_illegal_transition_leaves_the_row_alone(db: Store) -> None:
    for old, new in ILLEGAL:
        build_id = submit(db)
        bring_to(db, build_id, old)
        before = raw_row(db.layout.state_dir, build_id)
        with pytest.raises(IllegalTransition):
            db.transition(build_id, new)
        assert raw_row(db.layout.state_dir, build_id) == before, (old, new)


def test_a_transition_with_an_unknown_field_is_refused(db: Store) -> None:
    build_id = submit(db)
    before = raw_row(db.layout.state_dir, build_id)
    with pytest.raises(ValueError, match="unknown build fields"):
        db.transition(build_id, State.WAITING, colour="red")
    assert raw_row(db.layout.state_dir, build_id) == before


def test_a_transition_of_a_missing_build_is_not_found(db: Store) -> None:
    with pytest.raises(NotFound):
        db.transition(404, State.WAITING)
    with pytest.raises(NotFound):
        db.get(404)


@pytest.mark.parametrize("old", [State.WAITING, State.BUILDING, State.FAILED])
def test_a_requeue_clears_the_previous_run(db: Store, old: State) -> None:
    build_id = submit(db)
    bring_to(db, build_id, old)
    db.update(build_id, pid=4242, pid_started=1.5, slot_token=17, exit_code=1, runs=1)
    build = db.transition(build_id, State.QUEUED, retries=1)
    assert build.state == State.QUEUED
    assert build.pid is None
    assert build.pid_started is None
    assert build.started_at is None
    assert build.waiting_at is None
    assert build.finished_at is None
    assert build.exit_code is None
    assert build.slot_token is None
    assert (build.runs, build.retries) == (1, 1)  # the counts are history, not run state
    assert db.get(build_id) == build


def test_update_sets_fields_but_never_the_state(db: Store) -> None:
    build_id = submit(db)
    db.update(build_id, pid=10, pid_started=2.0)
    assert (db.get(build_id).pid, db.get(build_id).pid_started) == (10, 2.0)
    with pytest.raises(ValueError):
        db.update(build_id, state=State.SUCCEEDED)
    with pytest.raises(ValueError):
        db.update(build_id, colour="red")
    assert db.get(build_id).state == State.QUEUED


# -- submit ------------------------------------------------------------------------------


def test_submit_writes_the_row_and_input_files_before_returning(
    db: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(store.os, "fsync", recording_fsync)
    build_id = submit(db)
    monkeypatch.setattr(store.os, "fsync", real_fsync)

    files = db.files(build_id)
    bdir, inputs = files.root, files.input
    assert (inputs / "hello.spec").read_bytes() == b"Name: hello\n"
    assert (inputs / "sources" / "x").read_bytes() == b"source bytes"
    # each file and the directories holding them were fsynced in the staging area (then
    # renamed into place), and the build's directory and the builds directory after that
    staged = [p for p in synced if "/incoming/submit-" in p]
    assert any(p.endswith("/hello.spec") for p in staged)
    assert any(p.endswith("/sources/x") for p in staged)
    assert any(p.endswith("/sources") for p in staged)
    for path in (bdir, db.layout.builds):
        assert str(path) in synced, path
    assert list(db.layout.incoming.iterdir()) == []  # nothing left in the staging area
    # the row is committed: another connection sees it
    row = raw_row(db.layout.state_dir, build_id)
    assert row is not None
    build = db.get(build_id)
    assert build.state == State.QUEUED
    assert (build.chroot, build.kind, build.source) == ("fedora-40-x86_64", "spec", "hello.spec")
    assert (build.submitted_by, build.submitted_name, build.priority) == (1000, "alice", 0)
    assert (build.runs, build.retries) == (0, 0)


def test_submitted_ids_increase(db: Store) -> None:
    ids = [submit(db) for _ in range(5)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 5
    assert ids[0] >= 1


def test_a_submission_that_fails_writing_leaves_no_row(db: Store) -> None:
    # "a" is a file, so "a/b" cannot be created: the row must be rolled back
    with pytest.raises(OSError):
        submit(db, files={"a": b"1", "a/b": b"2"})
    assert db.recent() == []
    # the next submission gets a clean build directory
    build_id = submit(db)
    inputs = db.files(build_id).input
    assert sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*")) == [
        "hello.spec",
        "sources",
        "sources/x",
    ]


# -- durability --------------------------------------------------------------------------


def test_builds_survive_closing_and_reopening(tmp_path: Path) -> None:
    first = Store(tmp_path / "state")
    a = submit(first, priority=5)
    b = submit(first)
    first.transition(b, State.WAITING)
    first.transition(b, State.BUILDING, pid=77)
    before = [first.get(a), first.get(b)]
    first.close()

    second = Store(tmp_path / "state")
    try:
        assert [second.get(a), second.get(b)] == before
        assert second.count(State.BUILDING) == 1
        assert [x.id for x in second.in_states(State.WAITING, State.BUILDING)] == [b]
        c = submit(second)
        assert c > b
    finally:
        second.close()


def test_two_stores_on_one_dir_see_each_others_commits(tmp_path: Path) -> None:
    one, two = Store(tmp_path / "state"), Store(tmp_path / "state")
    try:
        build_id = submit(one)
        assert two.get(build_id).state == State.QUEUED
        two.transition(build_id, State.WAITING)
        assert one.get(build_id).state == State.WAITING
    finally:
        one.close()
        two.close()


def test_the_database_is_in_wal_mode(db: Store) -> None:
    con = sqlite3.connect(db.layout.database)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


# -- queries -----------------------------------------------------------------------------


def test_next_queued_orders_by_priority_then_id(db: Store) -> None:
    ids: dict[int, list[int]] = {p: [] for p in (0, 5, -3)}
    for priority in (0, 5, -3, 5, 0):
        ids[priority].append(submit(db, priority=priority))
    order = [*ids[5], *ids[0], *ids[-3]]

    seen: list[int] = []
    exclude: set[int] = set()
    while (build := db.next_queued(exclude)) is not None:
        seen.append(build.id)
        exclude.add(build.id)
    assert seen == order
    # taking the head out of the queue moves the next one up
    db.transition(order[0], State.WAITING)
    nxt = db.next_queued()
    assert nxt is not None and nxt.id == order[1]


def test_next_queued_is_none_when_nothing_is_queued(db: Store) -> None:
    assert db.next_queued() is None
    build_id = submit(db)
    db.transition(build_id, State.CANCELLED)
    assert db.next_queued() is None


def test_recent_and_count(db: Store) -> None:
    ids = [submit(db) for _ in range(3)]
    db.transition(ids[1], State.CANCELLED)
    assert [b.id for b in db.recent()] == ids[::-1]
    assert [b.id for b in db.recent(limit=2)] == ids[:0:-1]
    assert [b.id for b in db.recent(State.CANCELLED)] == [ids[1]]
    assert (db.count(State.QUEUED), db.count(State.CANCELLED)) == (2, 1)


def test_as_dict_has_every_column(db: Store) -> None:
    build = db.get(submit(db))
    d = build.as_dict()
    assert d["id"] == build.id
    assert d["state"] == "queued"
    assert set(d) == set(store._COLUMNS)


# -- settings audit ----------------------------------------------------------------------


def test_settings_history_round_trips_newest_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "state")
    before = time.time()
    s.audit_setting(1000, "alice", "max_concurrent_builds", 4, 8)
    s.audit_setting(-1, "SIGHUP reload", "mock_root_dir", Path("/a"), Path("/b"))
    after = time.time()
    s.close()

    s = Store(tmp_path / "state")
    try:
        history = s.settings_history()
        assert [{k: v for k, v in h.items() if k != "at"} for h in history] == [
            {
                "uid": -1,
                "user": "SIGHUP reload",
                "key": "mock_root_dir",
                "old": "/a",
                "new": "/b",
            },
            {"uid": 1000, "user": "alice", "key": "max_concurrent_builds", "old": "4", "new": "8"},
        ]
        assert all(before <= h["at"] <= after for h in history)
        assert history[0]["at"] >= history[1]["at"]
        assert s.settings_history(limit=1) == history[:1]
    finally:
        s.close()
