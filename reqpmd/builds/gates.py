"""Admission gates: may this host take a new slot now?

Checked before a build joins the cluster-wide queue and while it waits there: a host
that cannot run a build now (disk full, overloaded, at its own cap) stands aside so it
does not hold the head of the line for the whole farm.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from reqpmd.config.schema import Settings

GB = 1000**3
MB = 1000**2


@dataclass(frozen=True)
class Gate:
    name: str  # "host_max_builds", "disk", "load"
    open: bool
    detail: str


def _existing(path: Path) -> Path:
    """The path itself or its nearest existing parent (mock's basedir may not exist yet)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def load_per_cpu() -> float:
    return float(psutil.getloadavg()[0]) / (psutil.cpu_count() or 1)


@dataclass
class Gates:
    disk_free: Callable[[Path], int] = disk_free_bytes
    load: Callable[[], float] = load_per_cpu

    def check(self, settings: Settings, building_here: int) -> list[Gate]:
        gates = []
        cap = settings.host_max_builds
        if cap:
            gates.append(
                Gate(
                    "host_max_builds",
                    building_here < cap,
                    f"{building_here}/{cap} builds on this host",
                )
            )
        want = settings.min_free_disk_gb
        free = self.disk_free(settings.mock_root_dir) / GB
        gates.append(
            Gate(
                "disk",
                free >= want,
                f"{free:.1f} GB free {'>=' if free >= want else '<'} {want:g} GB "
                f"under {settings.mock_root_dir}",
            )
        )
        want_mb = settings.min_free_state_mb
        free_mb = self.disk_free(settings.state_dir) / MB
        gates.append(
            Gate(
                "state_disk",
                free_mb >= want_mb,
                f"{free_mb:.0f} MB free {'>=' if free_mb >= want_mb else '<'} {want_mb} MB "
                f"under {settings.state_dir} (builds write their logs and results there)",
            )
        )
        limit = settings.max_load_per_cpu
        if limit > 0:
            load = self.load()
            gates.append(
                Gate(
                    "load",
                    load <= limit,
                    f"load per CPU {load:.2f} {'<=' if load <= limit else '>'} {limit:g}",
                )
            )
        return gates


def closed(gates: list[Gate]) -> list[Gate]:
    return [g for g in gates if not g.open]


def describe_closed(gates: list[Gate]) -> str:
    return "; ".join(f"{g.name} gate closed: {g.detail}" for g in closed(gates))


def disk_shortage(gates: list[Gate]) -> str | None:
    """Why a disk gate (mock_root_dir or state_dir) is closed, or None: what makes the
    maintenance job clean up at once."""
    for g in gates:
        if g.name in ("disk", "state_disk") and not g.open:
            return f"{g.name} gate closed ({g.detail})"
    return None
