"""Retention of finished builds: cleanup_builds_after_days.

A build that ended longer ago than the setting loses its files (inputs, logs, results)
and its packages in the repositories; its row stays as a history record for RECORD_DAYS.
Never touched: builds that have not ended, a build whose publish is still pending, and,
whatever its age, the newest build of each source package and chroot that a repository
serves (Copr's policy), so a repository never loses the last build of a package.

The order makes a crash harmless: packages leave the repository metadata first (through
the repository code: a batched run that retires their directories, deleted a grace
period later), then the row is marked cleaned (only if the build was not retried since
the plan), then its files go; a run cut off before that last step is finished by the
next. A kill -9
anywhere leaves no metadata naming a deleted file, and the next run finishes the job.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reqpmd.builds.results import package_name
from reqpmd.builds.states import Publish
from reqpmd.builds.store import Build, Store
from reqpmd.config.schema import Settings
from reqpmd.repos.layout import build_of
from reqpmd.repos.metadata import MetadataError
from reqpmd.repos.publisher import Publisher
from reqpmd.repos.repository import RepoError

log = logging.getLogger(__name__)

RECORD_DAYS = 365  # a cleaned build's history record is kept this long after it ended
DAY = 86400.0


@dataclass(frozen=True)
class Doomed:
    build: Build
    size: int  # bytes of its files in state_dir
    files: int  # how many


@dataclass
class Plan:
    cutoff: float  # wall time: builds that ended before it are old
    delete: list[Doomed] = field(default_factory=list)
    keep: list[tuple[int, str]] = field(default_factory=list)  # (build id, why)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cutoff": self.cutoff,
            "delete": [
                {
                    "id": d.build.id,
                    "chroot": d.build.chroot,
                    "package": d.build.package,
                    "state": str(d.build.state),
                    "finished_at": d.build.finished_at,
                    "bytes": d.size,
                    "files": d.files,
                    "published": d.build.published_at is not None,
                }
                for d in self.delete
            ],
            "keep": [{"id": i, "why": why} for i, why in self.keep],
            "bytes": sum(d.size for d in self.delete),
            "files": sum(d.files for d in self.delete),
        }


class Retention:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        settings: Callable[[], Settings],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.wall = wall

    def plan(self) -> Plan:
        days = self.settings().cleanup_builds_after_days
        plan = Plan(cutoff=self.wall() - days * DAY)
        served, unreadable = self._newest_served()
        for build in self.store.to_clean(plan.cutoff):
            if build.publish_state == Publish.PENDING:
                plan.keep.append((build.id, "its publish is still pending"))
            elif build.id in served:
                chroot, package = served[build.id]
                plan.keep.append(
                    (build.id, f"the newest build of {package} that repository {chroot} serves")
                )
            elif build.published_at is not None and build.chroot in unreadable:
                why = f"repository {build.chroot} cannot be read now, so its newest is unknown"
                plan.keep.append((build.id, why))
            else:
                plan.delete.append(Doomed(build, *_size(self.store.files(build.id).root)))
        return plan

    def _newest_served(self) -> tuple[dict[int, tuple[str, str]], set[str]]:
        """This host's builds that are the newest succeeded build of their source package
        that their repository serves ({build id: (chroot, package)}), and the repositories
        whose metadata cannot be read (none of their builds may go until it can)."""
        served: dict[tuple[str, str], set[int]] = defaultdict(set)
        unreadable: set[str] = set()
        for repo in self.publisher.repositories():
            try:
                pkgs = repo.packages()
            except MetadataError:
                unreadable.add(repo.chroot)
                continue
            for pkg in pkgs:
                owner = build_of(pkg.href)
                if owner is not None and owner[0] == self.publisher.host:
                    served[(repo.chroot, package_name(pkg.sourcerpm) or pkg.name)].add(owner[1])
        # a build still listed but retried and failed since is not the one to keep
        succeeded = set(self.store.succeeded_among(sorted(set().union(*served.values()))))
        newest: dict[int, tuple[str, str]] = {}
        for key, ids in served.items():
            good = ids & succeeded
            if good:
                newest[max(good)] = key
        return newest, unreadable

    def _finish_interrupted(self) -> None:
        """Files of builds already made history records: a run cut off between marking a
        build and deleting its files (a crash) is finished here."""
        root = self.store.layout.builds
        try:
            ids = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
        except OSError:
            return
        for build_id in self.store.cleaned_among(ids):
            shutil.rmtree(self.store.files(build_id).root, ignore_errors=True)

    def _out_of_repository(self, chroot: str, builds: list[Build]) -> bool:
        """Take the builds' packages out of the repository's metadata (one batched run that
        retires their directories); False if that failed, and nothing may be deleted."""
        repo = self.publisher.repository(chroot)
        host = self.publisher.host
        dirs = [d for b in builds for d in repo.published_dirs(host, b.id)]
        try:
            if dirs:
                repo.update(dirs)
        except RepoError as exc:
            log.error("cleanup: repository %s could not be updated: %s", chroot, exc)
            return False
        self.store.unpublished(builds)
        return True

    def run(self, plan: Plan | None = None) -> dict[str, Any]:
        """Carry out a plan (a fresh one by default); what was freed, and what was kept."""
        plan = plan or self.plan()
        by_chroot: dict[str, list[Doomed]] = defaultdict(list)
        for doomed in plan.delete:
            by_chroot[doomed.build.chroot].append(doomed)
        cleaned, freed = [], 0
        for chroot, group in sorted(by_chroot.items()):
            published = [d.build for d in group if d.build.published_at is not None]
            if published and not self._out_of_repository(chroot, published):
                plan.keep += [
                    (b.id, f"repository {chroot} could not be updated") for b in published
                ]
                group = [d for d in group if d.build.published_at is None]
            for doomed in group:
                if not self.store.mark_cleaned(doomed.build):
                    plan.keep.append((doomed.build.id, "it was retried since the plan was made"))
                    continue
                shutil.rmtree(self.store.files(doomed.build.id).root, ignore_errors=True)
                cleaned.append(doomed.build.id)
                freed += doomed.size
        self._finish_interrupted()
        forgotten = self.store.forget(self.wall() - RECORD_DAYS * DAY)
        return {
            "cleaned": cleaned,
            "bytes": freed,
            "kept": [{"id": i, "why": why} for i, why in plan.keep],
            "records_forgotten": forgotten,
        }


def _size(root: Path) -> tuple[int, int]:
    """(bytes, files) under ``root``."""
    total = count = 0
    for top, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                continue
            count += 1
    return total, count
