#!/usr/bin/env python3
"""Benchmark (issue 15): the six scale figures in one run, with one summary table.

Run from the repository root (``./dev bench`` does the same):

    python bench/scale_bench.py [--quick] [--only queue,hosts,daemon,status] [--figures FILE]

Runs the four benches that measure the figures, one after another, each as a process of
its own (this interpreter), their output streamed as it comes:

    bench/queue_bench.py   figure 1 (grant cost against queue length) and 5 (contended
                           throughput as a share of the maximum)
    bench/hosts_bench.py   figure 2 (many hosts on one Redis)
    bench/daemon_bench.py  figures 3 (idle cost of one daemon) and 4 (submit to mock)
    bench/status_bench.py  figure 6 (status at scale)

Each writes its figures to a file given with ``--figures`` (bench/figures.py: one JSON
object a line), so the summary reads numbers, not their tables. At the end it prints the
date (UTC), the machine, the exact command and one markdown table of the six figures:
what was measured, the goal from the issue, met or not.

``--quick`` is a smoke test (about 40 s on 2 vCPUs; tests/test_bench.py runs it): each
bench's own ``--quick``, and shorter still: the hosts bench at 10 hosts only, its waiters
queued over 1 s instead of their 20 s poll; the daemon bench on its embedded Redis only
(not also on an external one); the queue bench with one contended run and 2 hand-overs
of the seed's poller. Its figures only show that each one is measured: the sizes are
small and the windows short. The full run takes about 8 minutes (queue ~50 s, hosts
~3.5 min, daemon ~3 min 15 s, status ~6 s).

``--figures FILE`` also writes the figures collected to FILE (JSON lines). The exit
status is 0 when every bench ran and wrote its figures, whether the goals are met or not.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import figures  # noqa: E402
from bench.figures import num  # noqa: E402
from bench.machine import cpu_model, redis_server_version  # noqa: E402
from bench.workers import stop_on_signals  # noqa: E402
from reqpmd.slots.server import find_redis_server  # noqa: E402

# bench name -> the figures it measures, in the order they run
BENCHES: dict[str, tuple[int, ...]] = {
    "queue": (1, 5),
    "hosts": (2,),
    "daemon": (3, 4),
    "status": (6,),
}
# what --quick adds to each bench's own --quick (see the module docstring)
QUICK: dict[str, list[str]] = {
    "queue": ["--churn-runs", "1", "--seed-rounds", "2"],
    "hosts": ["--sizes", "10", "--queue-spread", "1"],
    "daemon": ["--redis", "embedded"],
    "status": [],
}
# the goal of each figure as issue 15 states it, for a figure its bench did not report
GOALS = {
    1: "10 000-waiting p50 within 2x of the 10-waiting p50",
    2: "no numeric goal: measured",
    3: "< 0.5 % of a core, < 60 MB RSS, <= 2 Redis commands/s",
    4: "p50 < 100 ms",
    5: ">= 90 % of the physical maximum",
    6: "status and slots list < 200 ms",
}
WHAT = {
    1: "grant cost against queue length",
    2: "many hosts on one Redis",
    3: "idle cost of one daemon",
    4: "submit to mock latency",
    5: "contended throughput as a share of the maximum",
    6: "status at scale",
}
BENCHES_FIGURES = sorted(n for figs in BENCHES.values() for n in figs)
_PR_SET_PDEATHSIG = 1


def log(msg: str) -> None:
    print(f"[scale-bench] {msg}", file=sys.stderr, flush=True)


def _die_with_us() -> None:
    """In the child: SIGTERM if this process dies (the benches clean up on SIGTERM)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def run_bench(argv: list[str], output: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """Start one bench, its output going where ours goes (or to ``output``)."""
    return subprocess.Popen(argv, cwd=ROOT, preexec_fn=_die_with_us, stdout=output, stderr=output)


def wait_benches(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """Their exit codes; on Ctrl-C or SIGTERM, stop them (SIGTERM: the benches remove
    their servers and workers) and let the interrupt on."""
    try:
        return [p.wait() for p in procs]
    except KeyboardInterrupt:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise


# -- the summary ---------------------------------------------------------------------------


def machine() -> str:
    model = cpu_model()
    usable = len(os.sched_getaffinity(0))
    cpus = f"{os.cpu_count()} CPUs" + (f" ({usable} usable)" if usable != os.cpu_count() else "")
    redis_version = redis_server_version(find_redis_server())
    return (
        f"{cpus}, {model}; {platform.system()} {platform.release()} {platform.machine()}; "
        f"Python {platform.python_version()}; redis-server {redis_version}"
    )


def python() -> str:
    """This interpreter, relative to the repository when it is inside (the venv's)."""
    exe = Path(sys.executable).absolute()
    return str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else str(exe)


def command() -> str:
    """The command as it was typed: ./dev says how it was called; else our own argv."""
    return os.environ.get("REQPM_BENCH_COMMAND") or shlex.join([python(), *sys.argv])


def measured(fig: dict[str, Any]) -> str:
    parts = []
    for v in fig["values"]:
        unit = v["unit"]
        gap = "" if unit in ("x", "%", "/s") else " "
        parts.append(f"{v['name']}: {num(v['value'])}{gap}{unit}")
    return "; ".join(parts)


def verdict(fig: dict[str, Any]) -> str:
    met = fig["met"]
    return "- (no goal)" if met is None else "**met**" if met else "**not met**"


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def summary(
    found: dict[int, dict[str, Any]],
    ran: list[tuple[str, list[str], int, float]],
    args: argparse.Namespace,
    began: str,
    took: float,
    load: tuple[float, float],
) -> str:
    mode = (
        "quick (a smoke test: small sizes, short windows; not figures to publish)"
        if args.quick
        else "full"
    )
    if args.parallel:
        mode += ", the benches at once (figures skewed by each other)"
    out = [
        "## Scale benchmark (issue 15): summary",
        "",
        f"- date: {began}",
        f"- machine: {machine()}",
        f"- command: {command()}",
        f"- run: {mode}, {took:.0f} s; 1-minute load average {load[0]:.2f} at the start, "
        f"{load[1]:.2f} at the end",
        "",
        "| # | figure | measured | goal | met |",
        "|---:|---|---|---|---|",
    ]
    wanted = [n for name in args.only for n in BENCHES[name]]
    for n in BENCHES_FIGURES:
        fig = found.get(n)
        if fig is None:
            state = "not measured (its bench failed)" if n in wanted else "not run (--only)"
            out.append(f"| {n} | {WHAT[n]} | {state} | {GOALS[n]} | - |")
            continue
        value = measured(fig) + (f" ({fig['note']})" if fig.get("note") else "")
        out.append(
            f"| {n} | {cell(fig['what'])} | {cell(value)} | {cell(fig['goal'])} | {verdict(fig)} |"
        )
    out += ["", "Benches run:"]
    for _, argv, rc, secs in ran:
        out.append(f"- `{shlex.join(argv)}`: exit {rc}, {secs:.0f} s")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------


def bench_argv(name: str, quick: bool, figures_file: Path) -> list[str]:
    argv = [python(), f"bench/{name}_bench.py"]
    if quick:
        argv += ["--quick", *QUICK[name]]
    return [*argv, "--figures", str(figures_file)]


def run_together(
    args: argparse.Namespace, figures_file: Path, tmp: Path
) -> list[tuple[str, list[str], int, float]]:
    """Every bench at once, each one's output shown whole when all are done: a smoke
    test's shortcut (they compete for the CPUs, so the figures mean nothing)."""
    cmds = {name: bench_argv(name, args.quick, figures_file) for name in args.only}
    logs = {name: (tmp / f"{name}.out").open("w+b") for name in cmds}
    started = time.monotonic()
    procs = {name: run_bench(cmd, logs[name]) for name, cmd in cmds.items()}
    codes = wait_benches(list(procs.values()))
    took = time.monotonic() - started
    for name, cmd in cmds.items():
        print(f"\n=== {name} bench (all at once): {shlex.join(cmd)}\n", flush=True)
        logs[name].seek(0)
        sys.stdout.write(logs[name].read().decode(errors="replace"))
        logs[name].close()
    return [(name, cmd, rc, took) for (name, cmd), rc in zip(cmds.items(), codes, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--quick", action="store_true", help="a smoke test of every bench (~40 s on 2 vCPUs)"
    )
    ap.add_argument(
        "--only",
        default=",".join(BENCHES),
        help=f"comma-separated benches to run (default all: {','.join(BENCHES)})",
    )
    ap.add_argument(
        "--figures", metavar="FILE", default="", help="also write the figures to FILE (JSON lines)"
    )
    ap.add_argument(
        "--parallel",
        action="store_true",
        help="run the benches at once (a smoke test's shortcut: the figures are skewed)",
    )
    args = ap.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in args.only if b not in BENCHES]
    if unknown or not args.only:
        ap.error(f"--only: unknown bench {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    args.only = [b for b in BENCHES if b in args.only]  # always in the usual order

    stop_on_signals()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    ran: list[tuple[str, list[str], int, float]] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="rqscale") as tmp:
        figures_file = Path(tmp) / "figures.jsonl"
        try:
            if args.parallel:
                ran = run_together(args, figures_file, Path(tmp))
            else:
                for i, name in enumerate(args.only, 1):
                    cmd = bench_argv(name, args.quick, figures_file)
                    figs = ", ".join(str(n) for n in BENCHES[name])
                    print(
                        f"\n=== [{i}/{len(args.only)}] {name} bench (figures {figs}): "
                        f"{shlex.join(cmd)}\n",
                        flush=True,
                    )
                    started = time.monotonic()
                    (rc,) = wait_benches([run_bench(cmd)])
                    ran.append((name, cmd, rc, time.monotonic() - started))
            got = {f["figure"] for f in figures.read(figures_file)}
            for name, _, rc, _ in ran:
                missing = sorted(set(BENCHES[name]) - got)
                if rc != 0 or missing:
                    failed = True
                    log(f"{name} bench: exit {rc}; figures not written: {missing or 'none'}")
        except KeyboardInterrupt:
            log("interrupted: the bench running was stopped")
            return 130
        records = figures.read(figures_file)
    if args.figures:
        Path(args.figures).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    found = {r["figure"]: r for r in records}
    print()
    took, load = time.monotonic() - t0, (load0, os.getloadavg()[0])
    print(summary(found, ran, args, began, took, load), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
