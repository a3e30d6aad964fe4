"""Mock roots left behind: directories under mock_root_dir named as mock names the roots
of ``--uniqueext build<N>`` (``<config>-build<N>``, ``<config>-bootstrap-build<N>``) whose
build is not running.

They are scrubbed the way a finished build's roots are: through mock, ``--scrub=chroot
--scrub=bootstrap`` with a private cache_topdir (never ``--scrub=all``, never ``rm -rf``).
A root is left alone, with the reason, when its build runs here, when it is a failed
build's root kept on purpose (keep_failed_roots, until retention cleans the build up),
when any host holds a slot for a build of that number (mock_root_dir may be shared, and build numbers are per
host), when Redis cannot say (unreachable), or when something is mounted under it (a
mock may still be at work there).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reqpmd.builds import mock
from reqpmd.builds.process import Runner, Stopper
from reqpmd.builds.states import State
from reqpmd.builds.store import Store
from reqpmd.config.schema import CHROOT_RE, Settings
from reqpmd.errors import NotFound, RedisUnavailable
from reqpmd.slots.limiter import BuildConcurrencyLimiter

log = logging.getLogger(__name__)

_ROOT = re.compile(r"(?P<config>.+?)(?P<bootstrap>-bootstrap)?-build(?P<id>[0-9]+)")
SCRUB_TIMEOUT = 600.0


@dataclass(frozen=True)
class Root:
    path: Path
    config: str
    build_id: int
    skip: str | None  # why it is left alone, or None: to be scrubbed

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "config": self.config,
            "build": self.build_id,
            "action": "skip" if self.skip else "scrub",
            "why": self.skip or "its build is not running anywhere",
        }


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Every mount point of this mount namespace (octal escapes decoded)."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split()
        if len(fields) > 4:
            found.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return found


class Orphans:
    def __init__(
        self,
        store: Store,
        limiter: BuildConcurrencyLimiter,
        settings: Callable[[], Settings],
        runner: Runner,
        mounts: Callable[[], list[str]] = mount_points,
    ) -> None:
        self.store = store
        self.limiter = limiter
        self.settings = settings
        self.runner = runner
        self.mounts = mounts

    def plan(self) -> list[Root]:
        base = self.settings().mock_root_dir
        try:
            names = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return []
        candidates = []
        for name in names:
            match = _ROOT.fullmatch(name)
            if match and CHROOT_RE.fullmatch(match["config"]):
                candidates.append((base / name, match["config"], int(match["id"])))
        if not candidates:
            return []
        try:
            holders = {str(h.labels.get("build_id")) for h in self.limiter.snapshot()[0]}
            redis_error = None
        except RedisUnavailable as exc:
            holders, redis_error = set(), str(exc)
        mounted = self.mounts()
        return [
            Root(
                path, config, build_id, self._why_not(path, build_id, holders, redis_error, mounted)
            )
            for path, config, build_id in candidates
        ]

    def _why_not(
        self,
        path: Path,
        build_id: int,
        holders: set[str],
        redis_error: str | None,
        mounted: list[str],
    ) -> str | None:
        try:
            build = self.store.get(build_id)
        except NotFound:
            build = None
        if build is not None and build.state in (State.WAITING, State.BUILDING):
            return f"build {build_id} is running here"
        if (
            build is not None
            and build.state == State.FAILED
            and build.cleaned_at is None
            and self.settings().keep_failed_roots
        ):
            return (
                f"failed build {build_id}'s root is kept for debugging (keep_failed_roots) "
                "until the build is cleaned up"
            )
        if redis_error is not None:
            return f"Redis is unreachable, so another host's build {build_id} cannot be ruled out"
        if str(build_id) in holders:
            return f"a build {build_id} holds a slot (this host or another): its root is in use"
        inside = [m for m in mounted if m == str(path) or m.startswith(f"{path}/")]
        if inside:
            return f"something is mounted under it ({inside[0]}): a mock may still be at work"
        return None

    def run(self, plan: list[Root] | None = None) -> dict[str, Any]:
        """Scrub what the plan says (one mock run per config and build number)."""
        plan = self.plan() if plan is None else plan
        for root in plan:
            if root.skip:
                log.info("orphaned mock root %s left alone: %s", root.path, root.skip)
        targets = sorted({(r.config, r.build_id) for r in plan if not r.skip})
        scrubbed = []
        for config, build_id in targets:
            code = self._scrub(config, build_id)
            paths = [r.path for r in plan if (r.config, r.build_id) == (config, build_id)]
            gone = [str(p) for p in paths if not p.exists()]
            scrubbed += gone
            if code == 0 and len(gone) == len(paths):
                log.warning("scrubbed orphaned mock root(s) of build %d: %s", build_id, gone)
            else:
                log.error(
                    "mock --scrub of orphaned build %d exited with %d; left: %s",
                    build_id,
                    code,
                    [str(p) for p in paths if p.exists()],
                )
        return {
            "scrubbed": scrubbed,
            "skipped": [r.as_dict() for r in plan if r.skip],
        }

    def _scrub(self, config: str, build_id: int) -> int:
        s = self.settings()
        if mock.check_executable(s.mock_command):
            return -1
        cache = Path(tempfile.mkdtemp(prefix="orphan-scrub-", dir=self.store.layout.state_dir))
        try:
            argv = mock.scrub_argv(s.mock_command, config, build_id, cache)
            with open(os.devnull, "wb") as sink:
                proc = self.runner(argv, sink, cache)
                try:
                    return proc.wait(timeout=SCRUB_TIMEOUT)
                except subprocess.TimeoutExpired:
                    return Stopper(grace=s.cancel_grace_seconds).stop(proc)
        except OSError as exc:
            log.error("mock --scrub of orphaned build %d could not start: %s", build_id, exc)
            return -1
        finally:
            shutil.rmtree(cache, ignore_errors=True)
