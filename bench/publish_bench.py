#!/usr/bin/env python3
"""Benchmark: publishing one build into a large repository, reqpm's incremental run
against a full createrepo_c run of the same repository, side by side in one run.

Run from the repository root (``./dev bench publish`` does the same):

    python bench/publish_bench.py [--packages 2000] [--rounds 5] [--markdown]

It needs rpmbuild (Debian: apt-get install rpm). The packages are real RPMs built once
from a generated spec (one small file each) and cached under /tmp/reqpm-bench-rpms-N;
the repository is made in a temp dir that is removed at the end. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reqpmd.repos import createrepo  # noqa: E402
from reqpmd.repos.createrepo import run_tool  # noqa: E402
from reqpmd.repos.layout import RepoLayout  # noqa: E402
from reqpmd.repos.lock import RepoLocks  # noqa: E402
from reqpmd.repos.metadata import packages, verify  # noqa: E402
from reqpmd.repos.repository import Repository  # noqa: E402

PER_BUILD = 10  # packages per build directory in the big repository


def make_rpms(count: int, size_kb: int) -> Path:
    """``count`` distinct noarch RPMs of about ``size_kb`` each (random, uncompressed
    payload: what createrepo_c checksums is the whole file), one spec, cached."""
    cache = Path(tempfile.gettempdir()) / f"reqpm-bench-rpms-{count}x{size_kb}k"
    done = cache / "done"
    if done.exists():
        return cache / "rpms"
    rpmbuild = shutil.which("rpmbuild")
    if rpmbuild is None:
        sys.exit("publish_bench: needs rpmbuild (Debian: apt-get install rpm)")
    shutil.rmtree(cache, ignore_errors=True)
    (cache / "rpms").mkdir(parents=True)
    lines = ["Name: benchset", "Version: 1", "Release: 1", "Summary: bench", "License: MIT"]
    lines += ["BuildArch: noarch", "%description", "bench"]
    for i in range(count):
        lines += [
            f"%package -n bench{i:05d}",
            f"Summary: bench package {i}",
            f"%description -n bench{i:05d}",
            "bench",
            f"%files -n bench{i:05d}",
            f"/usr/share/bench/{i:05d}.txt",
        ]
    make_files = (
        f"for i in $(seq -w 00000 {count - 1}); do head -c {size_kb}K /dev/urandom"
        " > %{buildroot}/usr/share/bench/$i.txt; done"
    )
    lines += ["%prep", "%build", "%install", "mkdir -p %{buildroot}/usr/share/bench"]
    lines += [make_files, "%files"]
    spec = cache / "benchset.spec"
    spec.write_text("\n".join(lines) + "\n")
    print(f"building {count} RPMs once (cached in {cache}) ...", file=sys.stderr)
    subprocess.run(
        [
            rpmbuild,
            "-bb",
            "--define",
            f"_topdir {cache / 'top'}",
            "--define",
            "_binary_payload w0.ufdio",  # stored, not compressed: sizes as given
            str(spec),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for rpm in (cache / "top" / "RPMS" / "noarch").glob("bench[0-9]*.rpm"):
        os.replace(rpm, cache / "rpms" / rpm.name)
    shutil.rmtree(cache / "top")
    done.touch()
    return cache / "rpms"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packages", type=int, default=2000, help="packages already in the repo")
    ap.add_argument("--rounds", type=int, default=5, help="measured runs of each kind")
    ap.add_argument(
        "--size-kb", type=int, default=1024, help="size of each package (Fedora's mean: ~1 MB)"
    )
    ap.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each run (root): packages read from disk",
    )
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = ap.parse_args()
    rpms = sorted(make_rpms(args.packages + args.rounds, args.size_kb).iterdir())
    existing, fresh = rpms[: args.packages], rpms[args.packages :]
    tmp = Path(tempfile.mkdtemp(prefix="reqpm-publish-bench-"))
    try:
        return _run(tmp, existing, fresh, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(tmp: Path, existing: list[Path], fresh: list[Path], args: argparse.Namespace) -> int:
    layout = RepoLayout(tmp / "repos", "bench-chroot")
    repo = Repository(layout, RepoLocks("bench"), run_tool)
    for n in range(0, len(existing), PER_BUILD):
        d = layout.build_dir("bench", n // PER_BUILD + 1, 1)
        d.mkdir(parents=True)
        for rpm in existing[n : n + PER_BUILD]:
            os.link(rpm, d / rpm.name)
    start = time.monotonic()
    createrepo.make_metadata(layout, run_tool, full=True)
    print(f"initial metadata of {len(existing)} packages: {time.monotonic() - start:.2f} s")

    incremental: list[tuple[float, int]] = []
    full: list[tuple[float, int]] = []
    for i, rpm in enumerate(fresh):
        results = tmp / f"result-{i}"
        results.mkdir()
        shutil.copy2(rpm, results / rpm.name)
        build_id = 100000 + i
        _settle(args.cold)
        start = time.monotonic()
        repo.place("bench", build_id, results)
        run = repo.update()
        incremental.append((time.monotonic() - start, len(run.read) if run else 0))
        _settle(args.cold)
        start = time.monotonic()
        run = createrepo.make_metadata(layout, run_tool, full=True)
        full.append((time.monotonic() - start, len(run.read)))
    verify(layout)
    total = len(packages(layout))
    assert total == len(existing) + len(fresh), total

    def med(xs: list[tuple[float, int]]) -> tuple[float, int]:
        return statistics.median(x[0] for x in xs), int(statistics.median(x[1] for x in xs))

    inc_t, inc_r = med(incremental)
    full_t, full_r = med(full)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"createrepo_c: {createrepo.command()}")
    rows = [
        ("reqpm publish (place + createrepo_c --update, swap)", inc_t, inc_r),
        ("full createrepo_c run (same repo, same swap)", full_t, full_r),
    ]
    print(f"\npublish one new package into a repository of {len(existing)} packages")
    print(f"(median of {len(fresh)} rounds; 'read' = RPM headers createrepo_c read)\n")
    for name, t, r in rows:
        print(f"  {name:<55} {t * 1000:8.0f} ms   read {r:5d} RPMs")
    print(f"\n  speed-up: {full_t / inc_t:.1f}x, RPMs read: {inc_r} vs {full_r}")
    if args.markdown:
        print("\n| run | median time | RPMs read |\n|---|---|---|")
        for name, t, r in rows:
            print(f"| {name} | {t * 1000:.0f} ms | {r} |")
        print(f"| speed-up | {full_t / inc_t:.1f}x | |")
    return 0


def _settle(cold: bool) -> None:
    """Dirty pages written out; with ``cold``, the page cache dropped too."""
    os.sync()
    if cold:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


if __name__ == "__main__":
    sys.exit(main())
