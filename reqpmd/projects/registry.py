"""Projects as the daemon keeps them: a table in the store's SQLite database, beside the
builds that record the project and commit they were built from."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, fields
from typing import Any

from reqpmd.builds.states import State
from reqpmd.builds.store import Store
from reqpmd.errors import AlreadyExists, NotFound

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
NAME_DOC = "1-64 characters from A-Z a-z 0-9 . _ -"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    name             TEXT PRIMARY KEY,
    url              TEXT NOT NULL,
    branch           TEXT,             -- NULL: the remote's default branch
    spec             TEXT,             -- NULL: the one *.spec at the top level
    chroots          TEXT NOT NULL,    -- JSON list of mock configs
    priority         INTEGER NOT NULL DEFAULT 0,
    enabled          INTEGER NOT NULL DEFAULT 1,
    created_at       REAL NOT NULL,
    created_by       TEXT NOT NULL,
    last_sync_at     REAL,             -- wall time of the last sync attempt
    last_sync_result TEXT,             -- what it did, or why it failed
    last_sync_ok     INTEGER,
    last_commit      TEXT,             -- the branch head the last good sync saw
    last_used_at     REAL              -- last sync or build: clone cleanup counts from it
)
"""


def sync_submitter(name: str) -> str:
    """How a project's sync builds name their submitter; builds someone asked for add
    ", asked by WHO", and so are never taken for a sync's own (superseding)."""
    return f"project {name}"


@dataclass(frozen=True)
class Project:
    name: str
    url: str
    branch: str | None
    spec: str | None
    chroots: tuple[str, ...]
    priority: int
    enabled: bool
    created_at: float
    created_by: str
    last_sync_at: float | None = None
    last_sync_result: str | None = None
    last_sync_ok: bool | None = None
    last_commit: str | None = None
    last_used_at: float | None = None


_COLUMNS = [f.name for f in fields(Project)]
EDITABLE = ("url", "branch", "spec", "chroots", "priority", "enabled")


class Projects:
    def __init__(self, store: Store) -> None:
        self.store = store
        with store.tx() as db:
            db.execute(_SCHEMA)

    def add(self, project: Project) -> None:
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM projects WHERE name = ?", (project.name,)).fetchone():
                raise AlreadyExists(f"a project named {project.name} exists already")
            marks = ", ".join("?" for _ in _COLUMNS)
            db.execute(
                f"INSERT INTO projects ({', '.join(_COLUMNS)}) VALUES ({marks})",
                _row(project),
            )

    def get(self, name: str) -> Project:
        rows = self.store.rows(
            f"SELECT {', '.join(_COLUMNS)} FROM projects WHERE name = ?", (name,)
        )
        if not rows:
            raise NotFound(f"no project named {name}")
        return _project(rows[0])

    def all(self) -> list[Project]:
        rows = self.store.rows(f"SELECT {', '.join(_COLUMNS)} FROM projects ORDER BY name")
        return [_project(r) for r in rows]

    def edit(self, name: str, **changes: Any) -> Project:
        unknown = set(changes) - set(EDITABLE)
        if unknown:
            raise ValueError(f"cannot edit {sorted(unknown)}")
        if changes:
            self._update(name, **changes)
        return self.get(name)

    def remove(self, name: str) -> None:
        with self.store.tx() as db:
            if db.execute("DELETE FROM projects WHERE name = ?", (name,)).rowcount == 0:
                raise NotFound(f"no project named {name}")

    def synced(self, name: str, *, ok: bool, result: str, commit: str | None = None) -> None:
        """Record a sync attempt (and the head it saw, when it worked)."""
        now = time.time()
        changes: dict[str, Any] = {
            "last_sync_at": now,
            "last_sync_result": result,
            "last_sync_ok": ok,
            "last_used_at": now,
        }
        if commit is not None:
            changes["last_commit"] = commit
        self._update(name, **changes)

    def used(self, name: str) -> None:
        self._update(name, last_used_at=time.time())

    def _update(self, name: str, **changes: Any) -> None:
        values = [_column_value(k, v) for k, v in changes.items()]
        assignments = ", ".join(f"{k} = ?" for k in changes)
        with self.store.tx() as db:
            cur = db.execute(f"UPDATE projects SET {assignments} WHERE name = ?", (*values, name))
            if cur.rowcount == 0:
                raise NotFound(f"no project named {name}")

    # -- its builds ---------------------------------------------------------------------

    def queued_builds(self, name: str, chroot: str) -> list[tuple[int, str | None]]:
        """(id, commit) of the builds the project's syncs queued in ``chroot`` that have not
        started."""
        rows = self.store.rows(
            "SELECT id, commit_id FROM builds WHERE project = ? AND chroot = ? AND state = ?"
            " AND submitted_name = ?",  # a sync's own builds, not those someone asked for
            (name, chroot, State.QUEUED, sync_submitter(name)),
        )
        return [(int(i), c) for i, c in rows]

    def last_builds(self, name: str) -> dict[str, dict[str, int]]:
        """Per chroot, the newest build of each state: {chroot: {state: id}}."""
        rows = self.store.rows(
            "SELECT chroot, state, MAX(id) FROM builds WHERE project = ? GROUP BY chroot, state",
            (name,),
        )
        out: dict[str, dict[str, int]] = {}
        for chroot, state, build_id in rows:
            out.setdefault(str(chroot), {})[str(state)] = int(build_id)
        return out


def _column_value(key: str, value: Any) -> Any:
    if key == "chroots":
        return json.dumps(list(value))
    if isinstance(value, bool):
        return int(value)
    return value


def _row(project: Project) -> tuple[Any, ...]:
    return tuple(_column_value(k, getattr(project, k)) for k in _COLUMNS)


def _project(row: tuple[Any, ...]) -> Project:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["chroots"] = tuple(json.loads(values["chroots"]))
    values["enabled"] = bool(values["enabled"])
    if values["last_sync_ok"] is not None:
        values["last_sync_ok"] = bool(values["last_sync_ok"])
    return Project(**values)
