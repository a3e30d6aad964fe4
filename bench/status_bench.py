#!/usr/bin/env python3
"""Benchmark: `reqpmctl status`, `slots list` and `hosts` with a big cluster in Redis
(issue 15, figure 6): N builds waiting for a slot (default 10 000, over 100 projects and
1 000 hosts) and H host heartbeats (default 1 000), against one real reqpmd.

Run from the repository root (``./dev bench status`` does the same):

    python bench/status_bench.py [--waiting 10000] [--hosts 1000] [--runs 7] [--quick]

Each command runs as a user runs it (a new reqpmctl process), and its wall time is
reported beside the socket request alone (in this process) and the size of its output.
The waiters are queued through the limiter (leases of an hour, so none expires during
the run) by a second limiter that plays the other hosts; the heartbeats are copies of
the daemon's own record under other host ids.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import figures  # noqa: E402
from bench.scratch import scratch_redis  # noqa: E402
from bench.workers import stop_on_signals  # noqa: E402
from reqpmd.slots.keys import hosts_key  # noqa: E402
from reqpmd.slots.limiter import BuildConcurrencyLimiter  # noqa: E402
from tests.daemon_harness import Reqpmd  # noqa: E402

LIMIT = 20
GOAL_MS = 200.0  # status and slots list


def fill(lim: BuildConcurrencyLimiter, waiting: int, hosts: int) -> None:
    """LIMIT holders and ``waiting`` waiters, spread over 100 projects and the hosts."""
    for i in range(waiting + LIMIT):
        host = f"sim{i % hosts}"
        info = lim._info_json({"build_id": i, "host_id": host}, 0, f"p{i % 100}")
        lim._attempt(f"build_{i}@{host}", uuid.uuid4().hex, 0, info, try_only=False)


def run_ctl(env: dict[str, str], argv: list[str]) -> tuple[float, int]:
    start = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", *argv], env=env, capture_output=True, text=True
    )
    took = time.monotonic() - start
    if r.returncode != 0:
        raise RuntimeError(f"reqpmctl {' '.join(argv)}: {r.stderr.strip()}")
    return took, len(r.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--waiting", type=int, default=10_000, help="builds waiting for a slot")
    ap.add_argument("--hosts", type=int, default=1_000, help="host heartbeats in Redis")
    ap.add_argument("--runs", type=int, default=7, help="runs of each command (median shown)")
    ap.add_argument("--quick", action="store_true", help="1 000 waiting, 100 hosts, 3 runs")
    figures.add_option(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.waiting, args.hosts, args.runs = 1_000, 100, 3
    stop_on_signals()  # Ctrl-C, SIGTERM, SIGHUP: the daemon and redis-server are stopped
    tmp = Path(tempfile.mkdtemp(prefix="rqst", dir="/tmp"))
    try:
        run(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run(args: argparse.Namespace, tmp: Path) -> None:
    walls_ms: dict[str, float] = {}
    with scratch_redis("rqst") as server:
        server.start()
        BuildConcurrencyLimiter(server.client()).declare_no_survivors()
        daemon = Reqpmd(tmp / "d", redis_url=server.url, settings={"max_concurrent_builds": LIMIT})
        daemon.start()
        try:
            client = server.client()
            others = BuildConcurrencyLimiter(
                server.client(),
                max_concurrent=LIMIT,
                host="sim",
                lease_ttl=3600,
                auto_renew=False,
            )
            started = time.monotonic()
            fill(others, args.waiting, args.hosts)
            filled = time.monotonic() - started
            record = json.loads(client.hget(hosts_key("reqpm"), "h1") or "{}")
            for i in range(args.hosts - 1):
                client.hset(
                    hosts_key("reqpm"), f"sim{i}", json.dumps(dict(record, host_id=f"sim{i}"))
                )
            env = dict(os.environ, PYTHONPATH=str(ROOT), REQPM_SOCKET=str(daemon.socket))
            print(
                f"status at scale: {args.waiting:,} builds waiting (+{LIMIT} holding) over 100 "
                f"projects, {args.hosts:,} hosts; queued in {filled:.1f}s"
            )
            print(
                f"  Python {platform.python_version()}, {platform.machine()}, "
                f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            )
            print("| command | wall p50 ms | socket request p50 ms | output bytes |")
            print("|---|---:|---:|---:|")
            for argv, op in (
                (["status"], "status"),
                (["slots", "list"], "slots.list"),
                (["hosts"], "hosts"),
                (["--version"], None),
            ):
                walls, size = [], 0
                for _ in range(args.runs):
                    took, size = run_ctl(env, argv)
                    walls.append(took)
                requests = []
                for _ in range(args.runs if op else 0):
                    start = time.monotonic()
                    daemon.call(op)  # type: ignore[arg-type]
                    requests.append(time.monotonic() - start)
                request = f"{statistics.median(requests) * 1000:.1f}" if requests else "-"
                wall = statistics.median(walls) * 1000
                walls_ms[" ".join(argv)] = wall
                print(f"| reqpmctl {' '.join(argv)} | {wall:.0f} | {request} | {size:,} |")
        finally:
            daemon.kill_all()
    status, slots = walls_ms["status"], walls_ms["slots list"]
    figures.record(
        args.figures,
        6,
        f"status at scale: `reqpmctl status` / `slots list` / `hosts` with {args.waiting:,} "
        f"builds waiting and {args.hosts:,} hosts (wall p50, a new process each)",
        [
            ("status", status, "ms"),
            ("slots list", slots, "ms"),
            ("hosts", walls_ms["hosts"], "ms"),
        ],
        f"status and slots list < {GOAL_MS:.0f} ms",
        status < GOAL_MS and slots < GOAL_MS,
        bench="status",
        quick=args.quick,
        note=f"median of {args.runs} runs each",
    )


if __name__ == "__main__":
    sys.exit(main())
