"""Where a repository's files live: the one place that spells those names.

    <repo_dir>/<chroot>/                 one dnf repository per mock config
        <host>-<build id>-<attempt>/     one publish of a succeeded build: its RPMs
        repodata/                        createrepo_c's metadata; repomd.xml is swapped last
    <repo_dir>/.reqpm/<chroot>/          ours, outside the tree createrepo_c walks:
        lock                             flock held for a metadata run (all daemons)
        pending/                         one file per daemon's request for a run (batching)
        staging-*/                       a metadata run writing; never read by clients
        incoming-*/                      a build's packages being copied, before the rename
        skipped.json                     RPMs the last run could not read (not worth retrying)
        retired.json                     what left the metadata, and when: deleted after a grace

A build's directory is named after the host and the build id because build ids come
from each host's own database: two daemons sharing repo_dir never collide. Each publish
of a build (a retry publishes again) gets a new attempt number, so files a served
revision names are never replaced underneath it: the older attempt leaves the metadata
at the next run and is deleted a grace period later.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

# greedy host: the last two dash-separated numbers are the build id and the attempt
_BUILD_DIR = re.compile(r"(?P<host>[A-Za-z0-9_.-]+)-(?P<id>[0-9]+)-(?P<attempt>[0-9]+)")


WORK = ".reqpm"


@dataclass(frozen=True)
class RepoLayout:
    repo_dir: Path
    chroot: str

    @property
    def root(self) -> Path:
        return self.repo_dir / self.chroot

    @property
    def repodata(self) -> Path:
        return self.root / "repodata"

    @property
    def repomd(self) -> Path:
        return self.repodata / "repomd.xml"

    @property
    def work(self) -> Path:
        return self.repo_dir / WORK / self.chroot

    @property
    def lock(self) -> Path:
        return self.work / "lock"

    @property
    def pending(self) -> Path:
        return self.work / "pending"

    @property
    def skipped(self) -> Path:
        return self.work / "skipped.json"

    @property
    def retired(self) -> Path:
        return self.work / "retired.json"

    def build_dir(self, host: str, build_id: int, attempt: int) -> Path:
        return self.root / f"{host}-{build_id}-{attempt}"

    def attempts(self, host: str, build_id: int) -> list[int]:
        """The attempts of a build present in the tree, oldest first."""
        found = []
        for path in self.root.glob(f"{host}-{build_id}-*"):
            match = _BUILD_DIR.fullmatch(path.name)
            if match and match["host"] == host and int(match["id"]) == build_id:
                found.append(int(match["attempt"]))
        return sorted(found)

    def superseded(self) -> list[str]:
        """Build directories with a newer attempt of the same build beside them."""
        newest: dict[tuple[str, int], int] = {}
        dirs: list[tuple[str, tuple[str, int], int]] = []
        try:
            names = [p.name for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []
        for name in names:
            match = _BUILD_DIR.fullmatch(name)
            if match:
                key, attempt = (match["host"], int(match["id"])), int(match["attempt"])
                newest[key] = max(newest.get(key, attempt), attempt)
                dirs.append((name, key, attempt))
        return sorted(name for name, key, attempt in dirs if attempt < newest[key])


def build_of(href: str) -> tuple[str, int] | None:
    """(host, build id) of a package's location in the repository, if reqpm put it there
    (an RPM added by hand has none)."""
    first, sep, _ = href.partition("/")
    match = _BUILD_DIR.fullmatch(first) if sep else None
    return (match["host"], int(match["id"])) if match else None


def repositories(repo_dir: Path) -> list[RepoLayout]:
    """The repositories under repo_dir, by name."""
    try:
        entries = sorted(repo_dir.iterdir())
    except FileNotFoundError:
        return []
    return [
        RepoLayout(repo_dir, p.name) for p in entries if p.is_dir() and not p.name.startswith(".")
    ]


def public_dir(path: Path) -> None:
    """Make a directory dnf users and web servers may read, whatever the daemon's umask
    (the unit's UMask=0027 would make it 0750)."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_mode & 0o777 != 0o755:
        os.chmod(path, 0o755)
