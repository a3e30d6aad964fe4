"""What left a repository's metadata, and when: deleted only a grace period later.

A client that read ``repomd.xml`` a moment before a swap goes on to fetch the files that
revision names, and then the packages it lists. So neither the metadata files of the
revision before nor the package directories it lists (an older attempt of a build that
was published again, a build that was unpublished) are deleted at the swap: they are
recorded here with the time they stopped being served, kept out of every later run and
scan, and deleted once OLD_REVISION_GRACE has passed since then.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterable

from reqpmd.fsutil import atomic_write
from reqpmd.repos.layout import RepoLayout

OLD_REVISION_GRACE = 600.0  # seconds what left the metadata stays for slow readers
METADATA = "repodata/"


class Retired:
    def __init__(self, repo: RepoLayout) -> None:
        self.repo = repo
        self.entries: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            loaded = json.loads(repo.retired.read_bytes())
            self.entries = {str(k): float(v) for k, v in loaded.items()}

    def dirs(self) -> set[str]:
        """Package directories out of the metadata, waiting for deletion."""
        return {k for k in self.entries if not k.startswith(METADATA)}

    def add(self, paths: Iterable[str], when: float | None = None) -> None:
        """Record paths (relative to the repository) as no longer served from ``when``;
        a path recorded before keeps its first time."""
        now = time.time() if when is None else when
        for path in paths:
            self.entries.setdefault(path, now)

    def prune(self, now: float | None = None) -> list[str]:
        """Delete what has been out of the metadata for the grace period."""
        now = time.time() if now is None else now
        gone = []
        for path, since in sorted(self.entries.items()):
            if now - since < OLD_REVISION_GRACE:
                continue
            target = self.repo.root / path
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
            del self.entries[path]
            gone.append(path)
        return gone

    def save(self) -> None:
        atomic_write(self.repo.retired, json.dumps(self.entries, sort_keys=True).encode())
