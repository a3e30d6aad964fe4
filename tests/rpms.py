"""Real RPMs for tests and benchmarks, built with rpmbuild from tests/data."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"


def need_rpmbuild() -> str:
    """rpmbuild's path, or skip saying why (``./dev test`` installs Debian's rpm)."""
    found = shutil.which("rpmbuild")
    if found is None:
        pytest.skip("rpmbuild is not on PATH (Debian: apt-get install rpm; ./dev test does)")
    return found


def build(spec: Path, out: Path, sources: Path | None = None, check: bool = True) -> list[Path]:
    """rpmbuild -ba the spec; its binary and source RPMs, copied flat into ``out``."""
    top = out / ".rpmbuild"
    done = subprocess.run(
        [
            need_rpmbuild(),
            "-ba",
            "--define",
            f"_topdir {top}",
            "--define",
            f"_sourcedir {sources or spec.parent}",
            str(spec),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"rpmbuild failed:\n{done.stderr[-2000:]}")
    made = []
    for rpm in sorted(top.rglob("*.rpm")):
        made.append(Path(shutil.copy2(rpm, out / rpm.name)))
    shutil.rmtree(top, ignore_errors=True)
    return made


def build_data(out: Path, *names: str) -> dict[str, list[Path]]:
    """The packages of tests/data/<name>/<name>.spec, each into a directory of its own."""
    need_rpmbuild()
    made = {}
    for name in names:
        where = out / name
        where.mkdir()
        made[name] = build(DATA / name / f"{name}.spec", where)
    return made
