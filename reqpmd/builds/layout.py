"""Where a build's files live: the one place that spells those names.

    <state_dir>/builds/<id>/
        input/            what the submitter sent: the SRPM, or the spec file ...
        input/sources/    ... and its sources
        result/           mock's --resultdir: packages and mock's own logs
        build.log         mock's output and reqpm's notes, as the build runs
        scrub-cache/      a throwaway cache_topdir while the root is scrubbed
    <state_dir>/incoming/ submissions being written, before they get an id
    <state_dir>/reqpm.db  the queue and history (SQLite)
    <state_dir>/redis/    the embedded redis-server's socket and data

Nothing stores these paths: they follow from the id, so moving state_dir moves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOURCES = "sources"


@dataclass(frozen=True)
class BuildLayout:
    root: Path

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def sources(self) -> Path:
        return self.input / SOURCES

    @property
    def result(self) -> Path:
        return self.root / "result"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    @property
    def scrub_cache(self) -> Path:
        return self.root / "scrub-cache"

    def submitted(self, name: str) -> Path:
        """The SRPM or spec file the submitter sent."""
        return self.input / name


def input_name(name: str, is_source: bool) -> str:
    """Where a submitted file goes, relative to ``input/``."""
    return f"{SOURCES}/{name}" if is_source else name


@dataclass(frozen=True)
class StateLayout:
    state_dir: Path

    @property
    def builds(self) -> Path:
        return self.state_dir / "builds"

    @property
    def incoming(self) -> Path:
        return self.state_dir / "incoming"

    @property
    def database(self) -> Path:
        return self.state_dir / "reqpm.db"

    @property
    def redis(self) -> Path:
        return self.state_dir / "redis"

    def build(self, build_id: int) -> BuildLayout:
        return BuildLayout(self.builds / str(build_id))
