"""The publisher: one thread that puts succeeded builds into their repositories and
keeps every repository in sync.

Its queue is the store (builds whose ``publish_state`` is pending or publish_failed),
so a crash loses nothing: the next start publishes what was not. Builds that finish
close together are published with one metadata run per repository: each pass takes
every build waiting for a repository, places them all, then runs createrepo_c once.
A failure is recorded on the builds and the repository (shown in ``status`` and
``repos``, logged once per change) and retried with backoff; it never changes a
build's state. Every ``repository_sync_interval_minutes`` (read live) each repository
is checked and repaired (``Repository.sync``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reqpmd.backoff import Backoff
from reqpmd.builds.events import build_event
from reqpmd.builds.states import Publish
from reqpmd.builds.store import Build, Store
from reqpmd.config.schema import Settings
from reqpmd.repos.createrepo import RunResult, Tool, run_tool
from reqpmd.repos.layout import RepoLayout, public_dir, repositories
from reqpmd.repos.lock import RepoLocks
from reqpmd.repos.repository import NoPackages, Placed, RepoError, Repository
from reqpmd.worker import Worker

log = logging.getLogger(__name__)

MAX_IDLE = 30.0  # seconds between passes when nothing wakes the thread
RETRY_FIRST, RETRY_CAP = 5.0, 600.0  # backoff of a failing repository, seconds


@dataclass
class Health:
    """What this daemon saw of one repository (``repos list``, ``status``)."""

    runs: int = 0  # metadata runs made by this daemon
    published: int = 0  # builds it published
    last_run_at: float | None = None  # wall time, for display
    last_run_seconds: float | None = None
    last_read: int = 0  # packages the last run read (the rest were reused)
    skipped: list[str] = field(default_factory=list)  # unreadable RPMs the last run left out
    last_sync_at: float | None = None
    last_sync: str | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    failing: str | None = None  # "sync" or "publish": what failed last
    backoff: Backoff = field(default_factory=lambda: Backoff(RETRY_FIRST, RETRY_CAP))
    retry_at: float = 0.0  # monotonic; no publish before it while failing

    def as_dict(self) -> dict[str, Any]:
        return {
            "metadata_runs": self.runs,
            "published_builds": self.published,
            "last_run_at": self.last_run_at,
            "last_run_seconds": self.last_run_seconds,
            "last_run_read": self.last_read,
            "skipped": list(self.skipped),
            "last_sync_at": self.last_sync_at,
            "last_sync": self.last_sync,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }


@dataclass
class SyncRequest:
    chroot: str | None  # None: every repository
    full: bool = False  # re-read every package, whatever the check finds
    done: threading.Event = field(default_factory=threading.Event)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


class Publisher(Worker):
    def __init__(
        self,
        store: Store,
        settings: Callable[[], Settings],
        tool: Tool = run_tool,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str], None] = lambda chroot: None,
    ) -> None:
        self.on_failure = on_failure  # a publish or sync of this chroot failed (metrics)
        s = settings()
        self.store = store
        self.settings = settings
        self.repo_dir = s.repo_dir  # restart-only
        self.host = s.host_id
        self.tool = tool
        self.clock = clock
        self.locks = RepoLocks(s.host_id)
        self._health: dict[str, Health] = defaultdict(Health)
        self._requests: list[SyncRequest] = []
        self._last_sync: float | None = None  # monotonic; None: sync at the first pass
        self._lock = threading.Lock()
        super().__init__("publisher")

    # -- any thread -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread. A repo_dir that cannot be made is not fatal: builds still run,
        and each publish fails with the reason (status, journal) until it is fixed."""
        try:
            public_dir(self.repo_dir)
        except OSError as exc:
            log.error("repo_dir %s cannot be made: %s; publishing will fail", self.repo_dir, exc)
        super().start()

    def request_sync(self, chroot: str | None, full: bool = False) -> SyncRequest:
        request = SyncRequest(chroot, full)
        with self._lock:
            self._requests.append(request)
        self.wake()
        return request

    def repository(self, chroot: str) -> Repository:
        return Repository(RepoLayout(self.repo_dir, chroot), self.locks, self.tool)

    def repositories(self) -> list[Repository]:
        return [Repository(lay, self.locks, self.tool) for lay in repositories(self.repo_dir)]

    def health(self, chroot: str) -> dict[str, Any]:
        with self._lock:
            return self._health[chroot].as_dict()

    def summary(self) -> dict[str, Any]:
        """For ``status``: builds waiting to be published, failed ones, failing repos."""
        counts = self.store.publish_counts()
        with self._lock:
            failing = {
                chroot: {"error": h.last_error, "at": h.last_error_at}
                for chroot, h in self._health.items()
                if h.last_error is not None
            }
        return {
            "repo_dir": str(self.repo_dir),
            "pending": counts.get(Publish.PENDING, 0),
            "failed": counts.get(Publish.PUBLISH_FAILED, 0),
            "published": counts.get(Publish.PUBLISHED, 0),
            "failing_repos": failing,
        }

    def problem(self) -> str | None:
        """A line for the STATUS= summary while a repository is failing."""
        with self._lock:
            failing = sorted((c, h.last_error) for c, h in self._health.items() if h.last_error)
        if not failing:
            return None
        chroot, error = failing[0]
        more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
        return f"repository {chroot} failing: {error}{more}"

    # -- the publisher's thread -----------------------------------------------------------

    def _idle(self) -> float:
        """Seconds until the next sync or retry is due (re-read: settings are live)."""
        now = self.clock()
        due = [self._next_sync() - now]
        with self._lock:
            due += [h.retry_at - now for h in self._health.values() if h.failing]
        return min(MAX_IDLE, max(0.05, min(due)))

    def _next_sync(self) -> float:
        if self._last_sync is None:
            # due now, whenever "now" is read: returning clock() here made the check in
            # _pass (clock() >= _next_sync(), read left to right) false for ever with a
            # real clock, so the first sync never ran and _idle() polled every 0.05 s
            return -math.inf
        return self._last_sync + self.settings().repository_sync_interval_minutes * 60

    def _pass(self) -> None:
        with self._lock:
            requests, self._requests = self._requests, []
        if self.clock() >= self._next_sync():
            self._last_sync = self.clock()
            self._sync_all()
        else:
            self._retry_failed_syncs()
        for request in requests:
            self._serve(request)
        self._publish_pending()

    def _retry_failed_syncs(self) -> None:
        """A repository whose last sync failed is synced again when its backoff ends, not
        only at the next interval: a repair should not wait half an hour. (Failed
        publishes are retried by _publish_pending, with the same backoff.)"""
        now = self.clock()
        with self._lock:
            due = [c for c, h in self._health.items() if h.failing == "sync" and now >= h.retry_at]
        for chroot in due:
            repo = self.repository(chroot)
            if repo.layout.root.is_dir():
                self._sync(repo, full=False)

    def _serve(self, request: SyncRequest) -> None:
        try:
            repos = (
                [self.repository(request.chroot)]
                if request.chroot is not None
                else self.repositories()
            )
            for repo in repos:
                request.results[repo.chroot] = self._sync(repo, request.full)
                with self._lock:  # an operator asked: failed publishes go again now too
                    self._health[repo.chroot].retry_at = 0.0
        finally:
            request.done.set()

    def _sync_all(self) -> None:
        for repo in self.repositories():
            if self.stopping:
                return
            self._sync(repo, full=False)

    def _sync(self, repo: Repository, full: bool) -> dict[str, Any]:
        try:
            result = repo.sync(full)
        except RepoError as exc:
            self._failed(repo.chroot, f"sync failed: {exc}", "sync")
            return {"action": "failed", "error": str(exc)}
        with self._lock:
            h = self._health[repo.chroot]
            h.last_sync_at = time.time()
            h.last_sync = f"{result.action}: {result.reason}"
        if result.action == "regenerate":
            log.warning("repository %s: %s; regenerated its metadata", repo.chroot, result.reason)
        elif result.action == "update":
            log.info("repository %s: %s; metadata updated", repo.chroot, result.reason)
        if result.run is not None:
            self._ran(repo.chroot, result.run)
        self._recovered(repo.chroot, "sync")
        return {"action": result.action, "reason": result.reason}

    def _publish_pending(self) -> None:
        by_chroot: dict[str, list[Build]] = defaultdict(list)
        for build in self.store.to_publish():
            by_chroot[build.chroot].append(build)
        leaving: dict[str, list[Build]] = defaultdict(list)
        for build in self.store.to_unpublish():
            leaving[build.chroot].append(build)
        now = self.clock()
        for chroot in sorted(set(by_chroot) | set(leaving)):
            if self.stopping:
                return
            with self._lock:
                h = self._health[chroot]
                if h.failing and now < h.retry_at:
                    continue
            self._publish(self.repository(chroot), by_chroot[chroot], leaving[chroot])

    def _publish(self, repo: Repository, builds: list[Build], leaving: list[Build]) -> None:
        """Place the builds' packages, then one metadata run that lists them and drops
        the packages of ``leaving`` (builds that no longer succeeded); then check that
        the served metadata lists every placed binary before calling a build published."""
        placed: dict[int, tuple[Build, Placed]] = {}
        for build in builds:
            try:
                placed[build.id] = (
                    build,
                    repo.place(self.host, build.id, self.store.files(build.id).result),
                )
            except NoPackages as exc:
                self.store.set_publish([build], Publish.NOT_PUBLISHED, str(exc))
                build_event(build.id, f"not published: {exc}", logging.WARNING)
            except OSError as exc:
                error = f"cannot put its packages into {repo.layout.root}: {exc}"
                self.store.set_publish([build], Publish.PUBLISH_FAILED, error)
                self._failed(repo.chroot, error, "publish")
        retire = [d for b in leaving for d in repo.published_dirs(self.host, b.id)]
        if not placed and not leaving:
            return
        try:
            run = repo.update(retire)
            listed = repo.listed()
        except RepoError as exc:
            error = f"metadata run failed: {exc}"
            self.store.set_publish([b for b, _ in placed.values()], Publish.PUBLISH_FAILED, error)
            self._failed(repo.chroot, error, "publish")
            return
        if run is not None:
            self._ran(repo.chroot, run)
        self.store.unpublished(leaving)
        for build in leaving:
            build_event(build.id, f"its packages left {repo.layout.root} ({build.state})")
        published, refused = [], []
        for build, where in placed.values():
            left_out = sorted(where.binaries() - listed)
            if left_out:  # unreadable, or named like a source RPM: retrying will not help
                why = f"createrepo_c left out {', '.join(left_out)} (see the journal)"
                self.store.set_publish([build], Publish.NOT_PUBLISHED, why)
                build_event(build.id, f"not published: {why}", logging.WARNING)
                refused.append(where.directory)
            else:
                published.append(build)
        if refused:  # out of the tree too, or every later run would try to read them again
            try:
                repo.update(refused)
            except RepoError as exc:
                log.warning("repository %s: could not retire %s: %s", repo.chroot, refused, exc)
        self.store.set_publish(published, Publish.PUBLISHED)
        with self._lock:
            self._health[repo.chroot].published += len(published)
        self._recovered(repo.chroot, "publish")
        for build in published:
            build_event(build.id, f"published into {repo.layout.root}")

    # -- health -------------------------------------------------------------------------

    def _ran(self, chroot: str, run: RunResult) -> None:
        with self._lock:
            h = self._health[chroot]
            new_skips = sorted(set(run.skipped) - set(h.skipped))
            h.runs += 1
            h.last_run_at = time.time()
            h.last_run_seconds = run.seconds
            h.last_read = len(run.read)
            h.skipped = list(run.skipped)
        for skip in new_skips:  # once per file, not at every run
            log.warning("repository %s: left out an unreadable package: %s", chroot, skip)

    def _failed(self, chroot: str, error: str, source: str) -> None:
        if source == "publish":
            self.on_failure(chroot)
        with self._lock:
            h = self._health[chroot]
            changed = error != h.last_error
            h.last_error, h.last_error_at, h.failing = error, time.time(), source
            h.retry_at = self.clock() + h.backoff.failed()
        if changed:
            log.error("repository %s: %s (retrying with backoff)", chroot, error)

    def _recovered(self, chroot: str, source: str) -> None:
        """A success clears a failure of its own kind: a sync that works says nothing
        about a publish that could not copy its packages."""
        with self._lock:
            h = self._health[chroot]
            if h.failing not in (None, source):
                return
            recovered = h.backoff.succeeded()
            h.last_error = h.last_error_at = h.failing = None
        if recovered:
            log.info("repository %s: working again", chroot)
