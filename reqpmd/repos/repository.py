"""One chroot's repository: put a build's packages in, update the metadata (batched),
check and repair it, and say what it holds.

No store and no threads here: the publisher decides what to publish and when; this
module knows how to do it on disk so that readers and other daemons stay safe.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reqpmd.fsutil import fsync_dir
from reqpmd.repos import createrepo
from reqpmd.repos.createrepo import RunResult, Tool
from reqpmd.repos.layout import RepoLayout, build_of, public_dir
from reqpmd.repos.lock import LockTimeout, RepoLocks
from reqpmd.repos.metadata import MetadataError, Package, packages, verify

RepoError = (MetadataError, LockTimeout, OSError)


class NoPackages(Exception):
    """The build's result directory holds no RPM: there is nothing to publish."""


@dataclass(frozen=True)
class Placed:
    build_id: int
    files: list[str]


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
        """Put a build's RPMs (binary and source) into the repository's tree, whole or
        not at all: they are gathered out of the tree, then renamed in as one directory.
        Hard links when state_dir and repo_dir share a file system, else copies."""
        rpms = sorted(p for p in result_dir.glob("*.rpm") if p.is_file() and not p.is_symlink())
        if not rpms:
            raise NoPackages(f"build {build_id} produced no RPM in {result_dir}")
        lay = self.layout
        public_dir(lay.repo_dir)
        public_dir(lay.root)
        lay.work.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix="incoming-", dir=lay.work))
        try:
            for rpm in rpms:
                _link_or_copy(rpm, incoming / rpm.name)
            os.chmod(incoming, 0o755)
            fsync_dir(incoming)
            target = lay.build_dir(host, build_id)
            if target.exists():  # published before (a retried build): the new run wins
                old = Path(tempfile.mkdtemp(prefix="replaced-", dir=lay.work))
                os.replace(target, old / "dir")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(incoming, target)
            fsync_dir(lay.root)
        finally:
            shutil.rmtree(incoming, ignore_errors=True)
        return Placed(build_id, [r.name for r in rpms])

    def update(self) -> RunResult | None:
        """A metadata run covering everything in the tree now; None when another
        daemon's (or thread's) run covered it. Raises one of RepoError."""
        return self.locks.batched(
            self.layout, lambda: createrepo.make_metadata(self.layout, self.tool)
        )

    def sync(self, full: bool = False) -> SyncResult:
        """Check the served metadata against its files and the tree: regenerate it all
        when it is missing or broken (or ``full`` is asked for), update it when RPMs were
        added or removed by hand, and else leave it alone (clients then need not
        download anything)."""
        with self.locks.held(self.layout):
            lay = self.layout
            for stale in lay.work.glob("staging-*"):  # a run cut off by a crash
                shutil.rmtree(stale, ignore_errors=True)
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

    def info(self) -> dict[str, Any]:
        """What ``repos list`` shows of it, read from disk (any daemon's runs count)."""
        lay = self.layout
        out: dict[str, Any] = {
            "chroot": lay.chroot,
            "path": str(lay.root),
            "packages": None,
            "size": _tree_size(lay.root),
            "updated_at": None,
            "metadata_error": None,
        }
        with contextlib.suppress(OSError):
            out["updated_at"] = lay.repomd.stat().st_mtime
        try:
            out["packages"] = len(self.packages())
        except MetadataError as exc:
            out["metadata_error"] = str(exc)
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


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: copy
        shutil.copyfile(src, dst)
        with open(dst, "rb") as f:
            os.fsync(f.fileno())
    os.chmod(dst, 0o644)


def _tree_size(root: Path) -> int:
    total = 0
    for top, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(top, name)).st_size
    return total
