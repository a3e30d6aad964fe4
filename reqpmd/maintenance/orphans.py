"""Mock roots left behind: directories under mock_root_dir named as mock names the roots
of ``--uniqueext build<N>`` (``<config>-build<N>``, ``<config>-bootstrap-build<N>``).

Only roots of this host's own ended builds are scrubbed: the build number and the config
must both match a build in this host's store (mock_root_dir may be shared, build numbers
are per host, and a config may itself be named like ``x-build2``). They are scrubbed the
way a finished build's roots are: through mock, ``--scrub=chroot --scrub=bootstrap`` with
a private cache_topdir (never ``--scrub=all``, never ``rm -rf``), while the scheduler is
kept from starting that build. A root is left alone, with the reason, when its build has
not ended, when it is a failed build's root kept on purpose (keep_failed_roots, until
retention cleans the build up), when any host holds a slot for a build of that number,
when Redis cannot say (unreachable), or when something is mounted under it. Each of those
is checked again right before the scrub.
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
from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.states import State
from reqpmd.config.schema import Settings
from reqpmd.errors import NotFound, RedisUnavailable
from reqpmd.slots.limiter import BuildConcurrencyLimiter

log = logging.getLogger(__name__)

_ROOT = re.compile(r"(?P<prefix>.+)-build(?P<id>[1-9][0-9]*)")
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
            "why": self.skip or "its build ended and nothing uses the root",
        }


def mount_points(mountinfo: Path = Path("/proc/self/mountinfo")) -> list[str]:
    """Every mount point of this mount namespace (octal escapes decoded, resolved)."""
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
        scheduler: Scheduler,
        limiter: BuildConcurrencyLimiter,
        settings: Callable[[], Settings],
        runner: Runner,
        mounts: Callable[[], list[str]] = mount_points,
    ) -> None:
        self.scheduler = scheduler
        self.store = scheduler.store
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
        roots = []
        for name in names:
            match = _ROOT.fullmatch(name)
            if match is None:
                continue
            build_id = int(match["id"])
            config = match["prefix"].removesuffix("-bootstrap")
            roots.append(
                Root(base / name, config, build_id, self._why_not(base / name, config, build_id))
            )
        return [r for r in roots if r.skip != _NOT_OURS]

    def _why_not(self, path: Path, config: str, build_id: int) -> str | None:
        """Why the root must be left alone now (checked again before each scrub)."""
        try:
            build = self.store.get(build_id)
        except NotFound:
            return _NOT_OURS
        if build.chroot != config:
            return _NOT_OURS
        if not build.state.final:
            return f"build {build_id} is {build.state} here: its root is or will be in use"
        if (
            build.state == State.FAILED
            and build.cleaned_at is None
            and self.settings().keep_failed_roots
        ):
            return (
                f"failed build {build_id}'s root is kept for debugging (keep_failed_roots) "
                "until the build is cleaned up"
            )
        try:
            holders = {str(h.labels.get("build_id")) for h in self.limiter.snapshot()[0]}
        except RedisUnavailable:
            return f"Redis is unreachable, so another host's build {build_id} cannot be ruled out"
        if str(build_id) in holders:
            return f"a build {build_id} holds a slot (this host or another): its root may be in use"
        real = os.path.realpath(path)
        inside = [
            m
            for m in self.mounts()
            if os.path.realpath(m) == real or os.path.realpath(m).startswith(real + "/")
        ]
        if inside:
            return f"something is mounted under it ({inside[0]}): a mock may still be at work"
        return None

    def run(self, plan: list[Root] | None = None) -> dict[str, Any]:
        """Scrub what the plan says (one mock run per config and build number), each one
        checked again first and with its build kept from starting meanwhile."""
        plan = self.plan() if plan is None else plan
        for root in plan:
            if root.skip:
                log.info("orphaned mock root %s left alone: %s", root.path, root.skip)
        targets = sorted({(r.config, r.build_id) for r in plan if not r.skip})
        scrubbed, skipped = [], [r.as_dict() for r in plan if r.skip]
        for config, build_id in targets:
            paths = [r.path for r in plan if (r.config, r.build_id) == (config, build_id)]
            with self.scheduler.holding(build_id) as held:
                why = self._why_not(paths[0], config, build_id) if held else "it started"
                if why is not None:
                    skipped += [Root(p, config, build_id, why).as_dict() for p in paths]
                    continue
                code = self._scrub(config, build_id)
            gone = [str(p) for p in paths if not p.exists()]
            scrubbed += gone
            if code == 0 and len(gone) == len(paths):
                log.warning("scrubbed orphaned mock root(s) of build %d: %s", build_id, gone)
            else:
                left = [str(p) for p in paths if p.exists()]
                log.error(
                    "mock --scrub of orphaned build %d exited %d; left: %s", build_id, code, left
                )
        return {"scrubbed": scrubbed, "skipped": skipped}

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


# not a root of one of this host's builds: another host's, or a config named like one
_NOT_OURS = "not a root of this host's builds"
