#!/usr/bin/env python3
"""Benchmark: `reqpmctl stats` over a store of 100 000 builds, with the finished_at index
and, side by side in the same run, without it (a full scan).

Run from the repository root (``./dev bench stats`` does the same):

    python bench/stats_bench.py [--builds 100000] [--rounds 5]

The builds are spread evenly over the last 60 days in 4 chroots and 20 projects, in a
temp dir that is removed at the end.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from reqpmd.builds.analytics import window_stats  # noqa: E402
from reqpmd.builds.store import Store  # noqa: E402

WINDOWS = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}


def fill(store: Store, count: int, now: float) -> None:
    rng = random.Random(1)
    rows = []
    for i in range(count):
        finished = now - (i / count) * 60 * 86400
        started = finished - rng.uniform(60, 3600)
        waiting = started - rng.uniform(0, 600)
        rows.append(
            (
                rng.choice(["succeeded"] * 8 + ["failed", "cancelled"]),
                f"fedora-4{i % 4}-x86_64",
                waiting - 1,
                waiting,
                started,
                finished,
                f"p{i % 20}",
            )
        )
    with store.tx() as db:
        db.executemany(
            "INSERT INTO builds (state, chroot, kind, source, submitted_by, submitted_name,"
            " submitted_at, waiting_at, started_at, finished_at, project)"
            " VALUES (?, ?, 'spec', 'x.spec', 1000, 'alice', ?, ?, ?, ?, ?)",
            rows,
        )


def timed(store: Store, seconds: float, now: float, by: str | None, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        window_stats(store, now - seconds, now, capacity=8, by=by)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="reqpm-stats-bench-"))
    try:
        store = Store(tmp)
        now = time.time()
        fill(store, args.builds, now)
        results: dict[str, dict[str, float]] = {}
        for label in ("indexed", "full scan"):
            if label == "full scan":
                with store.tx() as db:
                    db.execute("DROP INDEX builds_finished")
                    db.execute("DROP INDEX builds_uncleaned")
            results[label] = {
                f"{w}{' by chroot' if by else ''}": timed(store, s, now, by, args.rounds)
                for w, s in WINDOWS.items()
                for by in (None, "chroot")
            }
        print(f"reqpmctl stats over {args.builds} builds (median of {args.rounds})\n")
        print("| window | indexed | full scan |\n|---|---:|---:|")
        for key in results["indexed"]:
            a, b = results["indexed"][key], results["full scan"][key]
            print(f"| {key} | {a * 1000:.1f} ms | {b * 1000:.1f} ms |")
        store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
