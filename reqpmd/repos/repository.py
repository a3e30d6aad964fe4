"""One chroot's repository: put a build's packages in, update the metadata (batched),
check and repair it, and say what it holds.

No store and no threads here: the publisher decides what to publish and when; this
module knows how to do it on disk so that readers and other daemons stay safe.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reqpmd.fsutil import fsync_dir
from reqpmd.repos import createrepo
from reqpmd.repos.createrepo import RunResult, Tool
from reqpmd.repos.layout import RepoLayout, build_of, public_dir
from reqpmd.repos.lock import LockTimeout, RepoLocks
from reqpmd.repos.metadata import MetadataError, Package, packages, verify
from reqpmd.repos.retired import Retired

RepoError = (MetadataError, LockTimeout, OSError)
LEFTOVER_AGE = 3600.0  # seconds before an incoming dir is taken for a crash's leftover
# what a package file may be called here: createrepo_c refuses control characters, and a
# name that needs quoting in a URL is trouble for every client
_RPM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~^-]*\.rpm")


class NoPackages(Exception):
    """The build's result directory holds no RPM: there is nothing to publish."""


@dataclass(frozen=True)
class Placed:
    build_id: int
    directory: str  # its attempt directory, relative to the repository
    files: list[str]

    def binaries(self) -> set[str]:
        """Paths the metadata must list once it is published (not the source RPMs)."""
        return {f"{self.directory}/{f}" for f in self.files if not f.endswith(".src.rpm")}


@dataclass(frozen=True)
class SyncResult:
    action: str  # "none", "update" or "regenerate"
    reason: str
    run: RunResult | None


class Repository:
    def __init__(self, layout: RepoLayout, locks: RepoLocks, tool: Tool) -> None:
        self.layout = layout
        self.locks = locks
        self.tool = tool

    @property
    def chroot(self) -> str:
        return self.layout.chroot

    def place(self, host: str, build_id: int, result_dir: Path) -> Placed:
        """Put a build's RPMs (binary and source) into the repository's tree as a new
        attempt directory, whole or not at all: gathered out of the tree, then renamed in.
        Copies, never hard links: mock rewrites its result files in place when a build is
        retried, and a served package must not change under its checksum."""
        rpms = sorted(
            p
            for p in result_dir.glob("*.rpm")
            if p.is_file() and not p.is_symlink() and _RPM_NAME.fullmatch(p.name)
        )
        if not rpms:
            raise NoPackages(f"build {build_id} produced no RPM (with a plain file name)")
        lay = self.layout
        public_dir(lay.repo_dir)
        public_dir(lay.root)
        lay.work.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix="incoming-", dir=lay.work))
        try:
            for rpm in rpms:
                _copy(rpm, incoming / rpm.name)
            os.chmod(incoming, 0o755)
            fsync_dir(incoming)
            attempt = max(lay.attempts(host, build_id), default=0) + 1
            target = lay.build_dir(host, build_id, attempt)
            os.rename(incoming, target)
            fsync_dir(lay.root)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return Placed(build_id, target.name, [r.name for r in rpms])

    def published_dirs(self, host: str, build_id: int) -> list[str]:
        lay = self.layout
        return [lay.build_dir(host, build_id, a).name for a in lay.attempts(host, build_id)]

    def update(self, retire: list[str] | None = None) -> RunResult | None:
        """A metadata run covering everything in the tree now, without the build
        directories in ``retire``; None when another daemon's (or thread's) run covered
        it. Raises one of RepoError."""
        return self.locks.batched(
            self.layout,
            lambda dirs: createrepo.make_metadata(self.layout, self.tool, retire=dirs),
            retire or [],
        )

    def listed(self) -> set[str]:
        """The package paths the served metadata lists."""
        return {p.href for p in self.packages()}

    def sync(self, full: bool = False) -> SyncResult:
        """Check the served metadata against its files and the tree: regenerate it all
        when it is missing or broken (or ``full`` is asked for), update it when RPMs were
        added or removed by hand, and else leave it alone (clients then need not
        download anything)."""
        with self.locks.held(self.layout):
            lay = self.layout
            _clear_leftovers(lay)
            retired = Retired(lay)  # what left the metadata, once its grace is over
            if retired.prune():
                retired.save()
            reason = "a full run was asked for" if full else None
            if reason is None:
                try:
                    verify(lay)
                except MetadataError as exc:
                    reason = str(exc)
            if reason is not None:
                run = createrepo.make_metadata(lay, self.tool, full=True)
                return SyncResult("regenerate", reason, run)
            if self._changed():
                run = createrepo.make_metadata(lay, self.tool)
                return SyncResult("update", "RPMs were added or removed", run)
            return SyncResult("none", "metadata matches the packages", None)

    def _changed(self) -> bool:
        """Whether the RPMs in the tree differ from what the metadata lists (by path,
        size and mtime, as --update compares them), leaving out those that could not be
        read last time and have not changed since."""
        listed = {p.href: (p.size, p.mtime) for p in self.packages()}
        skipped = createrepo.skipped_before(self.layout)
        on_disk = {
            path: seen
            for path, seen in createrepo.scan(self.layout).items()
            if skipped.get(path) != seen
        }
        return on_disk != listed

    def packages(self) -> list[Package]:
        return packages(self.layout)

    def info(self, pkgs: list[Package] | None = None) -> dict[str, Any]:
        """What ``repos list`` shows of it, read from its metadata (any daemon's runs
        count); ``pkgs`` when the caller has them already."""
        lay = self.layout
        out: dict[str, Any] = {
            "chroot": lay.chroot,
            "path": str(lay.root),
            "packages": None,
            "size": None,  # of the packages the metadata lists
            "updated_at": None,
            "metadata_error": None,
        }
        with contextlib.suppress(OSError):
            out["updated_at"] = lay.repomd.stat().st_mtime
        try:
            listed = self.packages() if pkgs is None else pkgs
        except MetadataError as exc:
            out["metadata_error"] = str(exc)
            return out
        out["packages"] = len(listed)
        out["size"] = sum(p.size for p in listed)
        return out


def package_json(pkg: Package) -> dict[str, Any]:
    owner = build_of(pkg.href)
    return {
        "name": pkg.name,
        "epoch": pkg.epoch,
        "version": pkg.version,
        "release": pkg.release,
        "arch": pkg.arch,
        "nvr": pkg.nvr,
        "href": pkg.href,
        "size": pkg.size,
        "host": owner[0] if owner else None,
        "build": owner[1] if owner else None,
    }


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(dst, 0o644)


def _clear_leftovers(lay: RepoLayout) -> None:
    """What a run or a placement cut off by a crash left in the work directory: staging
    dirs (the caller holds the lock: no run is writing one), and incoming dirs older than
    LEFTOVER_AGE (another daemon may be copying into a young one right now)."""
    for stale in lay.work.glob("staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    now = time.time()
    for stale in lay.work.glob("incoming-*"):
        with contextlib.suppress(OSError):
            if now - stale.stat().st_mtime > LEFTOVER_AGE:
                shutil.rmtree(stale, ignore_errors=True)
