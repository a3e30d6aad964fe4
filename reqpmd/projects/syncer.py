"""The project syncer: one thread that fetches projects, queues a build per chroot when a
branch moved, and deletes clones nobody used for cleanup_repos_after_days.

Scheduling is monotonic. Each project syncs one ``sync_interval_hours`` after its last
attempt (read live: a shorter interval brings the next sync forward). At start, the time
since the last sync recorded in the database is taken into account, and projects that
are due are spread over the first minutes by a phase drawn from their name, so a hundred
projects do not fetch in the same second. A failing fetch is retried with backoff and
reported once per change. ``projects sync`` and ``projects build`` work whatever
``auto_sync_projects`` says.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reqpmd.backoff import Backoff
from reqpmd.builds.events import build_event
from reqpmd.builds.layout import input_name
from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.store import Store
from reqpmd.config.schema import Settings
from reqpmd.errors import InvalidArgument, NotFound
from reqpmd.projects.export import ExportError, SpecPath, choose_spec, export, missing_sources
from reqpmd.projects.git import Git, GitError, shown_url
from reqpmd.projects.registry import Project, Projects, sync_submitter
from reqpmd.worker import Worker

log = logging.getLogger(__name__)

MAX_IDLE = 30.0  # seconds between passes when nothing wakes the thread
START_SPREAD = 600.0  # seconds over which projects due at start are spread
CLEANUP_EVERY = 3600.0  # seconds between clone cleanups
RETRY_FIRST, RETRY_CAP = 30.0, 3600.0  # backoff of a failing fetch, seconds
# a file of a project's spec directory, as large as a submitted one may be
MAX_EXPORT_FILE = 2 * 1024**3
_TIMINGS = re.compile(r"\d+(\.\d+)? ?(ms|milliseconds|seconds|s)\b")


@dataclass
class SyncRequest:
    name: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """What this daemon knows of one project's schedule and health."""

    base: float  # monotonic time of the last attempt (the next is one interval later)
    backoff: Backoff = field(default_factory=lambda: Backoff(RETRY_FIRST, RETRY_CAP))
    retry_at: float = 0.0
    error: str | None = None


class ProjectSyncer(Worker):
    def __init__(
        self,
        store: Store,
        projects: Projects,
        scheduler: Scheduler,
        settings: Callable[[], Settings],
        git: Git | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wake_scheduler: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.wake_scheduler = wake_scheduler  # queued builds start without waiting a tick
        self.projects = projects
        self.scheduler = scheduler
        self.settings = settings
        self.git = git or Git()
        self.clock = clock
        self.wall = wall
        self.git_dir = settings().state_dir / "git"  # state_dir is restart-only
        self._states: dict[str, _State] = {}
        self._clone_locks: dict[str, threading.Lock] = {}
        self._requests: list[SyncRequest] = []
        self._next_cleanup: float | None = None
        self._lock = threading.Lock()
        super().__init__("projects")

    # -- any thread -----------------------------------------------------------------------

    def request_sync(self, name: str) -> SyncRequest:
        request = SyncRequest(name)
        with self._lock:
            self._requests.append(request)
        self.wake()
        return request

    def clone_of(self, name: str) -> Path:
        return self.git_dir / name

    def health(self, name: str) -> dict[str, Any]:
        """For ``projects show``: the error being retried, and when the next sync is."""
        with self._lock:
            st = self._states.get(name)
            if st is None:
                return {"error": None, "next_sync_in": None}
            due = self._due(st)
        return {"error": st.error, "next_sync_in": max(0.0, due - self.clock())}

    def failing(self) -> dict[str, str]:
        with self._lock:
            return {n: st.error for n, st in self._states.items() if st.error is not None}

    def build_now(
        self, name: str, commit: str | None, chroot: str | None, who: str
    ) -> dict[str, Any]:
        """``projects build``: fetch, then queue builds of ``commit`` (default: the branch
        head), changed or not. Runs in the caller's thread under the clone's lock. These
        builds are the asker's: no sync supersedes them, and they supersede nothing."""
        project = self.projects.get(name)
        with self._clone(name):
            clone = self._fetch(project)
            target = commit or self.git.resolve(clone, self._branch(project, clone))
            if not self.git.has_commit(clone, target):
                raise GitError(f"commit {target} is not in {shown_url(project.url)}")
            chroots = (chroot,) if chroot else project.chroots
            ids = self._queue(project, clone, target, chroots, asked_by=who)
        self.projects.used(name)
        return {"commit": target, "builds": ids}

    def probe(self, name: str, url: str, branch: str | None, spec: str | None) -> str | None:
        """Check a project before it is added or changed: fetch it into its clone, then
        refuse (ExportError, GitError for the branch) what can never build: a branch that
        does not exist, a spec path that does not exist, two specs and no --spec. A fetch
        that fails is not refused (the host may be down for now): its error is returned."""
        with self._clone(name):
            clone = self.clone_of(name)
            shutil.rmtree(clone, ignore_errors=True)  # another URL, perhaps: start afresh
            try:
                self.git.mirror(url, clone)
            except GitError as exc:
                return str(exc)
            try:
                head = self.git.resolve(clone, branch or self.git.head_branch(clone, url))
                choose_spec(self.git, clone, head, spec)
            except (GitError, ExportError):
                shutil.rmtree(clone, ignore_errors=True)
                raise
        return None

    # -- the syncer's thread --------------------------------------------------------------

    def _idle(self) -> float:
        now = self.clock()
        with self._lock:
            due = [self._due(st) - now for st in self._states.values()]
        return min(MAX_IDLE, max(0.05, min(due, default=MAX_IDLE)))

    def _interval(self) -> float:
        return self.settings().sync_interval_hours * 3600.0

    def _due(self, st: _State) -> float:
        due = st.base + self._interval()
        return min(due, st.retry_at) if st.backoff.failing else due

    def _pass(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        for request in requests:
            self._serve(request)
        if self.settings().auto_sync_projects:
            now = self.clock()
            for project in self.projects.all():
                if self.stopping:
                    return
                if project.enabled and now >= self._due(self._state(project)):
                    self.sync(project.name)
        if self._next_cleanup is None or self.clock() >= self._next_cleanup:
            self._next_cleanup = self.clock() + CLEANUP_EVERY
            self.cleanup()

    def _state(self, project: Project) -> _State:
        """A project's schedule, made the first time this daemon sees it."""
        with self._lock:
            st = self._states.get(project.name)
            if st is None:
                st = self._states[project.name] = _State(self._first_base(project))
            return st

    def _first_base(self, project: Project) -> float:
        now, interval = self.clock(), self._interval()
        if project.last_sync_at is not None:
            elapsed = max(0.0, self.wall() - project.last_sync_at)
            if elapsed < interval:
                return now - elapsed  # due when its interval since the last sync ends
        phase = zlib.crc32(project.name.encode()) / 2**32
        return now - interval + phase * min(interval, START_SPREAD)

    def _serve(self, request: SyncRequest) -> None:
        try:
            request.result = self.sync(request.name)
        finally:
            request.done.set()

    def sync(self, name: str) -> dict[str, Any]:
        """Fetch the project; queue builds of the branch head if it moved."""
        try:
            project = self.projects.get(name)
        except NotFound as exc:
            return {"ok": False, "error": str(exc)}
        st = self._state(project)
        with self._lock:
            st.base = self.clock()
        ids: list[int] = []
        try:
            with self._clone(name):
                clone = self._fetch(project)
                head = self.git.resolve(clone, self._branch(project, clone))
                if head == project.last_commit:
                    result = f"unchanged at {head[:12]}"
                else:
                    ids = self._queue(project, clone, head, project.chroots)
                    result = f"{head[:12]}: queued build(s) {', '.join(map(str, ids))}"
            self.projects.synced(name, ok=True, result=result, commit=head)
        except NotFound:  # removed while it synced: what it queued goes too
            for build_id in ids:
                self.scheduler.cancel_if_queued(build_id, f"project {name} was removed")
            return {"ok": False, "error": f"project {name} was removed during its sync"}
        except (GitError, ExportError, OSError, InvalidArgument) as exc:
            self._failed(project, st, str(exc))
            return {"ok": False, "error": str(exc)}
        self._recovered(project, st)
        return {"ok": True, "commit": head, "builds": ids, "result": result}

    def _fetch(self, project: Project) -> Path:
        clone = self.clone_of(project.name)
        self.git.mirror(project.url, clone)
        return clone

    def _branch(self, project: Project, clone: Path) -> str:
        return project.branch or self.git.head_branch(clone, project.url)

    def _queue(
        self,
        project: Project,
        clone: Path,
        commit: str,
        chroots: tuple[str, ...],
        asked_by: str | None = None,
    ) -> list[int]:
        """One build of ``commit`` per chroot, from the spec's directory at that commit.
        A sync's builds supersede the sync builds of the project in that chroot that have
        not started; builds someone asked for (``asked_by``) supersede and are superseded
        by nothing."""
        spec = choose_spec(self.git, clone, commit, project.spec)
        tree = export(self.git, clone, commit, spec, self.store.layout.incoming)
        user = sync_submitter(project.name)
        if asked_by is not None:
            user += f", asked by {asked_by}"
        try:
            missing = missing_sources(tree / spec.name)
            refused = (
                f"{', '.join(missing)}, named by {spec.path}, not in "
                f"{spec.directory or 'the top level'} at commit {commit[:12]}"
                if missing
                else None
            )
            ids = []
            for chroot in chroots:
                if asked_by is None:
                    self._supersede(project, chroot, commit)
                build_id = self._submit(project, tree, spec, chroot, commit, refused, user)
                ids.append(build_id)
                why = "new commit" if asked_by is None else f"asked by {asked_by}"
                build_event(
                    build_id,
                    f"queued for project {project.name} ({why}): commit {commit[:12]}"
                    + (f"; failed before mock: {refused}" if refused else ""),
                )
        finally:
            shutil.rmtree(tree.parent, ignore_errors=True)
        self.wake_scheduler()
        return ids

    def _supersede(self, project: Project, chroot: str, commit: str) -> None:
        note = f"superseded by commit {commit[:12]} of project {project.name}"
        for build_id, older in self.projects.queued_builds(project.name, chroot):
            if older != commit:
                self.scheduler.cancel_if_queued(build_id, note)

    def _submit(
        self,
        project: Project,
        tree: Path,
        spec: SpecPath,
        chroot: str,
        commit: str,
        refused: str | None,
        user: str,
    ) -> int:
        files: dict[str, int] = {}
        try:
            for path in sorted(tree.rglob("*")):
                if path.is_symlink() or not path.is_file():
                    continue
                rel = path.relative_to(tree).as_posix()
                name = spec.name if rel == spec.name else input_name(rel, is_source=True)
                files[name] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            size = sum(os.fstat(fd).st_size for fd in files.values())
            staged = self.store.stage(files, max_file_bytes=MAX_EXPORT_FILE)
        finally:
            for fd in files.values():
                os.close(fd)
        return self.store.submit(
            chroot=chroot,
            kind="spec",
            source=spec.name,
            inputs=staged,
            priority=project.priority,
            uid=os.getuid(),
            user=user,
            input_bytes=size,
            project=project.name,
            commit_id=commit,
            refused=refused,
        )

    # -- health and cleanup ---------------------------------------------------------------

    def _failed(self, project: Project, st: _State, error: str) -> None:
        with self._lock:
            # the same failure reads the same: curl's messages carry elapsed times
            changed = _TIMINGS.sub("#", error) != _TIMINGS.sub("#", st.error or "")
            st.error = error
            st.retry_at = self.clock() + st.backoff.failed()
        self.projects.synced(project.name, ok=False, result=error)
        if changed:
            log.error(
                "project %s (%s): sync failed: %s; retrying with backoff",
                project.name,
                shown_url(project.url),
                error,
            )

    def _recovered(self, project: Project, st: _State) -> None:
        with self._lock:
            was = st.error
            st.error = None
            st.backoff.succeeded()
        if was is not None:
            log.info("project %s: syncing again", project.name)

    @contextlib.contextmanager
    def _clone(self, name: str, wait: bool = True) -> Iterator[bool]:
        """The clone's lock: a fetch, an export and a cleanup never overlap on one clone."""
        with self._lock:
            lock = self._clone_locks.setdefault(name, threading.Lock())
        got = lock.acquire(blocking=wait)
        try:
            yield got
        finally:
            if got:
                lock.release()

    def forget_clone(self, name: str) -> None:
        """Delete a project's clone now (removed, or pointed at another URL), waiting for
        a fetch or export in progress on it to end."""
        with self._clone(name):
            shutil.rmtree(self.clone_of(name), ignore_errors=True)
        with self._lock:
            self._states.pop(name, None)

    def summary(self) -> dict[str, Any]:
        """For ``status``: how many projects, and those whose sync is failing."""
        return {"count": len(self.projects.all()), "failing": self.failing()}

    def cleanup(self) -> list[str]:
        """Delete clones of removed projects, and of those neither synced nor built for
        cleanup_repos_after_days; a clone in use is left for the next round."""
        keep = self.settings().cleanup_repos_after_days * 86400.0
        known = {p.name: p for p in self.projects.all()}
        deleted = []
        try:
            clones = sorted(p for p in self.git_dir.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        for clone in clones:
            project = known.get(clone.name)
            last = None if project is None else (project.last_used_at or project.created_at)
            if last is not None and self.wall() - last < keep:
                continue
            with self._clone(clone.name, wait=False) as got:
                if not got:
                    continue
                shutil.rmtree(clone, ignore_errors=True)
            deleted.append(clone.name)
            why = "its project was removed" if project is None else "unused for too long"
            log.info("deleted the git clone %s: %s", clone, why)
        return deleted
