"""The durable build queue and history: SQLite in state_dir.

WAL with synchronous=FULL, so a commit is on disk when it returns: a submission's id is
only handed out after its row and its input files are fsynced. One connection guarded
by a lock: the daemon writes little and rarely, and one writer keeps SQLite simple.
Every state change goes through ``transition``, which asserts the edge is allowed.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from reqpmd.builds import states
from reqpmd.builds.layout import BuildLayout, StateLayout
from reqpmd.builds.states import Publish, State
from reqpmd.errors import InvalidArgument, NotFound
from reqpmd.fsutil import fsync_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS builds (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    state         TEXT    NOT NULL,
    chroot        TEXT    NOT NULL,
    kind          TEXT    NOT NULL,          -- 'srpm' or 'spec'
    source        TEXT    NOT NULL,          -- the SRPM or spec file name
    priority      INTEGER NOT NULL DEFAULT 0,
    submitted_by  INTEGER NOT NULL,
    submitted_name TEXT   NOT NULL DEFAULT '',
    submitted_at  REAL    NOT NULL,
    waiting_at    REAL,
    started_at    REAL,
    finished_at   REAL,
    exit_code     INTEGER,
    error         TEXT,
    runs          INTEGER NOT NULL DEFAULT 0, -- times mock was started for it
    retries       INTEGER NOT NULL DEFAULT 0, -- re-queues after crashes / locked roots
    pid           INTEGER,                    -- mock's process group leader while running
    pid_started   REAL,                       -- its start time, to tell it from a reused pid
    slot_token    INTEGER,
    input_bytes   INTEGER NOT NULL DEFAULT 0,  -- size of what was submitted (quotas)
    publish       INTEGER NOT NULL DEFAULT 1,  -- 0: submitted with --no-publish
    publish_state TEXT,                        -- states.Publish once it succeeded
    publish_error TEXT,
    published_at  REAL,
    project       TEXT,                        -- the project it was built for, if any
    commit_id     TEXT,                        -- the commit its spec and sources came from
    package       TEXT,                        -- its source package name, once it ended
    cleaned_at    REAL                         -- when retention deleted its files
);
CREATE INDEX IF NOT EXISTS builds_state ON builds(state, priority, id);
CREATE INDEX IF NOT EXISTS builds_submitter ON builds(submitted_by, state);
CREATE TABLE IF NOT EXISTS daemon_state (    -- small facts the daemon keeps across restarts
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS settings_history (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     REAL NOT NULL,
    uid    INTEGER NOT NULL,
    user   TEXT NOT NULL,
    key    TEXT NOT NULL,
    old    TEXT,
    new    TEXT
);
"""

_TIMESTAMP_FOR = {
    State.WAITING: "waiting_at",
    State.BUILDING: "started_at",
    State.SUCCEEDED: "finished_at",
    State.FAILED: "finished_at",
    State.CANCELLED: "finished_at",
    State.TIMED_OUT: "finished_at",
}


@dataclass(frozen=True)
class Build:
    id: int
    state: State
    chroot: str
    kind: str
    source: str
    priority: int
    submitted_by: int
    submitted_name: str
    submitted_at: float
    waiting_at: float | None
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    error: str | None
    runs: int
    retries: int
    pid: int | None
    pid_started: float | None
    slot_token: int | None
    input_bytes: int
    publish: bool
    publish_state: Publish | None
    publish_error: str | None
    published_at: float | None
    project: str | None
    commit_id: str | None
    package: str | None
    cleaned_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_COLUMNS = [f.name for f in fields(Build)]


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.layout = StateLayout(Path(state_dir))
        self.layout.builds.mkdir(parents=True, exist_ok=True)
        # uploads cut off by a crash; the directory itself stays (a full disk may refuse
        # to make it again)
        self.layout.incoming.mkdir(exist_ok=True)
        for leftover in self.layout.incoming.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
        self._db = sqlite3.connect(
            self.layout.database, check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        _migrate(self._db)
        self._lock = threading.RLock()

    def rows(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A read of the shared database, under the store's lock."""
        with self._lock:
            return list(self._db.execute(query, args).fetchall())

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE), for this module and the records that
        share the database (projects)."""
        with self._lock, _full_is_enospc():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- builds ----------------------------------------------------------------------

    def files(self, build_id: int) -> BuildLayout:
        return self.layout.build(build_id)

    def stage(self, files: Mapping[str, bytes | int], max_file_bytes: int | None = None) -> Path:
        """Write a submission's files into a fresh staging directory, fsynced.

        A value is the content, or an open descriptor to copy from (never a path: the
        daemon does not open what a client names). This runs outside the store's lock, so a
        large upload never holds up the daemon; ``submit`` then only renames the directory.
        """
        staging = Path(tempfile.mkdtemp(prefix="submit-", dir=self.layout.incoming))
        try:
            for name, source in files.items():
                target = staging / name
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_synced(target, source, name, max_file_bytes)
                fsync_dir(target.parent)
            fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def submit(
        self,
        *,
        chroot: str,
        kind: str,
        source: str,
        inputs: Path,
        priority: int,
        uid: int,
        user: str = "",
        input_bytes: int = 0,
        publish: bool = True,
        project: str | None = None,
        commit_id: str | None = None,
        refused: str | None = None,
    ) -> int:
        """Queue a build whose files ``stage`` wrote to ``inputs``; row and files are on disk
        before the id is returned. ``refused``: it cannot run (why): made failed at once,
        so it shows with its reason and is never started."""
        state, finished = (State.QUEUED, None) if refused is None else (State.FAILED, time.time())
        try:
            with self.tx() as db:
                cur = db.execute(
                    "INSERT INTO builds (state, chroot, kind, source, priority, submitted_by,"
                    " submitted_name, submitted_at, input_bytes, publish, project, commit_id,"
                    " error, finished_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        state,
                        chroot,
                        kind,
                        source,
                        priority,
                        uid,
                        user,
                        time.time(),
                        input_bytes,
                        int(publish),
                        project,
                        commit_id,
                        refused,
                        finished,
                    ),
                )
                build_id = int(cur.lastrowid or 0)
                files = self.files(build_id)
                # left by a submission that rolled back
                shutil.rmtree(files.root, ignore_errors=True)
                files.root.mkdir(parents=True)
                os.rename(inputs, files.input)
                fsync_dir(files.root)
                fsync_dir(self.layout.builds)
        finally:
            shutil.rmtree(inputs, ignore_errors=True)  # only left if the row was not made
        return build_id

    def get(self, build_id: int) -> Build:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM builds WHERE id = ?", (build_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no build {build_id}")
        return _build(row)

    def recent(self, state: State | None = None, limit: int = 50) -> list[Build]:
        query = f"SELECT {', '.join(_COLUMNS)} FROM builds"
        args: tuple[Any, ...] = ()
        if state is not None:
            query += " WHERE state = ?"
            args = (state,)
        query += " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [_build(r) for r in rows]

    def in_states(self, *wanted: State) -> list[Build]:
        marks = ", ".join("?" for _ in wanted)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM builds WHERE state IN ({marks})"
                " ORDER BY priority DESC, id",
                wanted,
            ).fetchall()
        return [_build(r) for r in rows]

    def usage(self, uid: int) -> tuple[int, int]:
        """(unfinished builds, bytes they were submitted with) of one submitter."""
        marks = ", ".join("?" for _ in _UNFINISHED)
        with self._lock:
            count, total = self._db.execute(
                f"SELECT COUNT(*), COALESCE(SUM(input_bytes), 0) FROM builds"
                f" WHERE submitted_by = ? AND state IN ({marks})",
                (uid, *_UNFINISHED),
            ).fetchone()
        return int(count), int(total)

    def count(self, state: State) -> int:
        with self._lock:
            return int(
                self._db.execute(
                    "SELECT COUNT(*) FROM builds WHERE state = ?", (state,)
                ).fetchone()[0]
            )

    def next_queued(self, exclude: set[int] | frozenset[int] = frozenset()) -> Build | None:
        for build in self.in_states(State.QUEUED):
            if build.id not in exclude:
                return build
        return None

    def transition(self, build_id: int, new: State, **changes: Any) -> Build:
        """Move a build to ``new`` (asserting the edge is allowed) and set ``changes``."""
        unknown = set(changes) - set(_COLUMNS)
        if unknown:
            raise ValueError(f"unknown build fields {sorted(unknown)}")
        with self.tx() as db:
            row = db.execute("SELECT state FROM builds WHERE id = ?", (build_id,)).fetchone()
            if row is None:
                raise NotFound(f"no build {build_id}")
            states.check(State(row[0]), new)
            stamp = _TIMESTAMP_FOR.get(new)
            if stamp and stamp not in changes:
                changes[stamp] = time.time()
            if new == State.QUEUED:  # a re-run starts from a clean slate
                for key in (
                    "waiting_at",
                    "started_at",
                    "finished_at",
                    "exit_code",
                    "pid",
                    "pid_started",
                    "slot_token",
                    "publish_state",
                    "publish_error",
                ):
                    changes.setdefault(key, None)
            changes["state"] = new
            assignments = ", ".join(f"{k} = ?" for k in changes)
            db.execute(
                f"UPDATE builds SET {assignments} WHERE id = ?", (*changes.values(), build_id)
            )
        return self.get(build_id)

    def update(self, build_id: int, **changes: Any) -> None:
        """Set fields that are not the state (pid of mock, slot token, ...)."""
        if "state" in changes or set(changes) - set(_COLUMNS):
            raise ValueError(f"update() cannot set {sorted(changes)}")
        with self.tx() as db:
            assignments = ", ".join(f"{k} = ?" for k in changes)
            db.execute(
                f"UPDATE builds SET {assignments} WHERE id = ?", (*changes.values(), build_id)
            )

    # -- publishing -------------------------------------------------------------------

    def to_publish(self) -> list[Build]:
        """Succeeded builds whose packages are not in their repository yet (pending, or
        failed before and due for another try), oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM builds WHERE publish_state IN (?, ?)"
                " AND cleaned_at IS NULL ORDER BY id",
                (Publish.PENDING, Publish.PUBLISH_FAILED),
            ).fetchall()
        return [_build(r) for r in rows]

    def set_publish(self, builds: list[Build], state: Publish, error: str | None = None) -> None:
        """Record where the builds' packages are, for the runs the publisher took: a build
        retried meanwhile (another run, another finished_at) is left alone, and its new run
        publishes anew."""
        at = time.time() if state == Publish.PUBLISHED else None
        with self.tx() as db:
            for b in builds:
                db.execute(
                    "UPDATE builds SET publish_state = ?, publish_error = ?,"
                    " published_at = COALESCE(?, published_at)"
                    " WHERE id = ? AND state = ? AND finished_at = ?",
                    (state, error, at, b.id, State.SUCCEEDED, b.finished_at),
                )

    def to_unpublish(self) -> list[Build]:
        """Builds whose packages are in a repository although they did not succeed (a
        published build that was retried and then failed, or was cancelled)."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM builds WHERE published_at IS NOT NULL"
                " AND state IN (?, ?, ?) ORDER BY id",
                (State.FAILED, State.CANCELLED, State.TIMED_OUT),
            ).fetchall()
        return [_build(r) for r in rows]

    def unpublished(self, builds: list[Build]) -> None:
        """Their packages left the repository (for runs that still have not succeeded)."""
        with self.tx() as db:
            for b in builds:
                db.execute(
                    "UPDATE builds SET published_at = NULL WHERE id = ? AND state = ?",
                    (b.id, b.state),
                )

    def publish_counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT publish_state, COUNT(*) FROM builds WHERE publish_state IS NOT NULL"
                " GROUP BY publish_state"
            ).fetchall()
        return {str(state): int(n) for state, n in rows}

    # -- retention ----------------------------------------------------------------------

    def to_clean(self, before: float) -> list[Build]:
        """Ended builds whose files are still there and that ended before ``before``
        (wall time), oldest first."""
        marks = ", ".join("?" for _ in states.FINAL)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM builds WHERE cleaned_at IS NULL"
                f" AND finished_at IS NOT NULL AND finished_at < ? AND state IN ({marks})"
                " ORDER BY finished_at",
                (before, *states.FINAL),
            ).fetchall()
        return [_build(r) for r in rows]

    def mark_cleaned(self, build: Build) -> bool:
        """Make the row a history record before its files are deleted: True only if it is
        still the run that was planned (ended, same finished_at). A retry since is left
        alone; one after is refused (scheduler.retry). A publish still owed is given up."""
        marks = ", ".join("?" for _ in states.FINAL)
        with self.tx() as db:
            cur = db.execute(
                "UPDATE builds SET cleaned_at = ?,"
                " publish_state = CASE WHEN publish_state IN (?, ?) THEN ? ELSE publish_state END,"
                " publish_error = CASE WHEN publish_state IN (?, ?) THEN ? ELSE publish_error END"
                f" WHERE id = ? AND finished_at IS ? AND cleaned_at IS NULL AND state IN ({marks})",
                (
                    time.time(),
                    Publish.PENDING,
                    Publish.PUBLISH_FAILED,
                    Publish.NOT_PUBLISHED,
                    Publish.PENDING,
                    Publish.PUBLISH_FAILED,
                    "its files were cleaned up before it could be published",
                    build.id,
                    build.finished_at,
                    *states.FINAL,
                ),
            )
            return cur.rowcount == 1

    def succeeded_among(self, build_ids: list[int]) -> list[int]:
        """Which of these builds are succeeded now."""
        return self._ids_among(build_ids, "state = 'succeeded'")

    def cleaned_among(self, build_ids: list[int]) -> list[int]:
        """Which of these builds are history records (their files should be gone)."""
        return self._ids_among(build_ids, "cleaned_at IS NOT NULL")

    def _ids_among(self, build_ids: list[int], condition: str) -> list[int]:
        found: list[int] = []
        for start in range(0, len(build_ids), 500):
            chunk = build_ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            found += [
                int(r[0])
                for r in self.rows(
                    f"SELECT id FROM builds WHERE {condition} AND id IN ({marks})", tuple(chunk)
                )
            ]
        return found

    def forget(self, before: float) -> int:
        """Delete the history records of builds cleaned up and ended before ``before``."""
        with self.tx() as db:
            return int(
                db.execute(
                    "DELETE FROM builds WHERE cleaned_at IS NOT NULL AND finished_at < ?",
                    (before,),
                ).rowcount
            )

    # -- daemon state -------------------------------------------------------------------

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute(
                "SELECT value FROM daemon_state WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, key: str, value: str) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO daemon_state (key, value) VALUES (?, ?)", (key, value)
            )

    # -- settings audit -----------------------------------------------------------------

    def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
        with self.tx() as db:
            db.execute(
                "INSERT INTO settings_history (at, uid, user, key, old, new)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (time.time(), uid, user, key, str(old), str(new)),
            )

    def settings_history(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT at, uid, user, key, old, new FROM settings_history"
                " ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [dict(zip(("at", "uid", "user", "key", "old", "new"), r, strict=True)) for r in rows]


_UNFINISHED = (State.QUEUED, State.WAITING, State.BUILDING)


@contextmanager
def _full_is_enospc() -> Iterator[None]:
    """SQLite's "database or disk is full" as the OSError(ENOSPC) every other write on a
    full disk raises: callers have one error to recognise (errors.disk_full)."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
            raise
        raise OSError(errno.ENOSPC, str(exc)) from exc


def _migrate(db: sqlite3.Connection) -> None:
    """Columns added since the first release, for databases made before them (and the
    indexes on them, which _SCHEMA cannot make before the columns exist)."""
    have = {row[1] for row in db.execute("PRAGMA table_info(builds)")}
    added = {
        "input_bytes": "INTEGER NOT NULL DEFAULT 0",
        "publish": "INTEGER NOT NULL DEFAULT 1",
        "publish_state": "TEXT",
        "publish_error": "TEXT",
        "published_at": "REAL",
        "project": "TEXT",
        "commit_id": "TEXT",
        "package": "TEXT",
        "cleaned_at": "REAL",
    }
    for column, kind in added.items():
        if column not in have:
            db.execute(f"ALTER TABLE builds ADD COLUMN {column} {kind}")
    db.execute("CREATE INDEX IF NOT EXISTS builds_publish ON builds(publish_state, chroot)")
    db.execute("CREATE INDEX IF NOT EXISTS builds_project ON builds(project, chroot, state)")
    db.execute("CREATE INDEX IF NOT EXISTS builds_finished ON builds(finished_at)")
    db.execute(
        "CREATE INDEX IF NOT EXISTS builds_uncleaned ON builds(finished_at)"
        " WHERE cleaned_at IS NULL AND finished_at IS NOT NULL"
    )
    db.execute(
        "CREATE INDEX IF NOT EXISTS builds_published ON builds(state)"
        " WHERE published_at IS NOT NULL"
    )


def _build(row: tuple[Any, ...]) -> Build:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["state"] = State(values["state"])
    values["publish"] = bool(values["publish"])
    if values["publish_state"] is not None:
        values["publish_state"] = Publish(values["publish_state"])
    return Build(**values)


def _write_synced(path: Path, source: bytes | int, name: str, cap: int | None) -> None:
    with open(path, "wb") as f:
        if isinstance(source, bytes):
            f.write(source)
        else:
            offset = 0
            while chunk := os.pread(source, 1024 * 1024, offset):
                offset += len(chunk)
                if cap is not None and offset > cap:
                    raise InvalidArgument(f"{name}: over the cap of {cap} bytes")
                f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
