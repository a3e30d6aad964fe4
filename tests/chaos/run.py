"""One chaos run, start to verdict: `python -m tests.chaos.run --seconds 60 --seed 7`
(`./dev chaos --minutes N [--seed S]`). Exit status 1 when a check failed; the report
then shows the seed, the fault schedule and the part of the history that violates it.
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reqpmctl.client import ClientError
from reqpmd.builds.layout import StateLayout
from reqpmd.repos import metadata
from reqpmd.repos.layout import RepoLayout
from reqpmd.repos.retired import Retired
from tests.chaos import checks
from tests.chaos.farm import LEASE, SETTINGS, Farm
from tests.chaos.history import History, events_file, mock_events
from tests.chaos.inject import Injector, Workload, sample_slots, supervise
from tests.chaos.plan import HOSTS, KINDS, Fault, default_kinds, last_heal, plan

DRAIN_POLL = 0.5
SHOW_PER_CHECK = 5  # violations printed per check


@dataclass
class Report:
    seed: int
    seconds: float
    root: Path
    faults: list[Fault]
    options: str = ""  # what else reproduces it: --sentinel, --kinds, --sabotage
    violations: list[checks.Violation] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def text(self, schedule: bool = False) -> str:
        lines = [
            f"chaos run: seed {self.seed}, {self.seconds:g} s of faults, history in {self.root}",
            f"reproduce: ./dev chaos --seconds {self.seconds:g} --seed {self.seed}{self.options}",
        ]
        for key, value in self.figures.items():
            lines.append(f"  {key}: {value}")
        if schedule or self.violations:
            lines.append("fault schedule:")
            lines += ["  " + f.describe() for f in self.faults]
        lines.append(f"violations: {len(self.violations)}")
        shown: Counter[str] = Counter()
        for v in self.violations:
            shown[v.check] += 1
            if shown[v.check] <= SHOW_PER_CHECK:
                lines.append(v.show())
        lines += [
            f"[{check}] ... {n - SHOW_PER_CHECK} more (history.jsonl has them all)"
            for check, n in shown.items()
            if n > SHOW_PER_CHECK
        ]
        return "\n".join(lines)


def _builds(farm: Farm, host: str) -> dict[int, dict[str, Any]] | None:
    try:
        rows = farm.call(host, "build.list", {"limit": 10000})
    except ClientError:
        return None
    return {int(b["id"]): b for b in rows}


def _unended(farm: Farm) -> int | None:
    """Builds not yet ended on all hosts, or None while a host does not answer."""
    listed = [_builds(farm, h) for h in HOSTS]
    if any(b is None for b in listed):
        return None
    return sum(row["state"] not in checks.FINAL for b in listed if b for row in b.values())


def _drain(farm: Farm, workload: Workload, since: float, bound: float) -> float | None:
    """Seconds from ``since`` until every build on every host has ended, or None."""
    deadline = since + bound + 30
    while time.time() < deadline:
        workload.flush_cancels()
        if _unended(farm) == 0:
            return time.time() - since
        time.sleep(DRAIN_POLL)
    return None


def _store(state_dir: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{StateLayout(state_dir).database}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        rows = [dict(r) for r in db.execute("SELECT * FROM builds")]
    finally:
        db.close()
    return {"integrity": integrity, "builds": rows}


def _repos(repo_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if not repo_dir.is_dir():
        return out
    for chroot in sorted(
        p for p in repo_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        layout = RepoLayout(repo_dir, chroot.name)
        retired = Retired(layout).dirs()  # out of the metadata, kept for slow readers
        present = {
            str(p.relative_to(layout.root))
            for p in layout.root.rglob("*.rpm")
            if "repodata" not in p.parts
            and not p.name.endswith(".src.rpm")  # unlisted
            and p.relative_to(layout.root).parts[0] not in retired
        }
        try:
            metadata.verify(layout)
            listed = {p.href for p in metadata.packages(layout)}
            out[chroot.name] = {"error": None, "listed": listed, "present": present}
        except metadata.MetadataError as exc:
            out[chroot.name] = {"error": str(exc), "listed": set(), "present": present}
    return out


def run_chaos(
    seed: int,
    seconds: float,
    root: Path,
    kinds: tuple[str, ...] | None = None,
    mock_sleep: float = 1.0,
    sabotage: str | None = None,
    sentinel: bool = False,
    backlog: int = 10,
) -> Report:
    history = History(root / "history.jsonl")
    farm = Farm(root, history, mock_sleep, sabotage=sabotage, sentinel=sentinel)
    kinds = kinds or default_kinds(sentinel)
    if not farm.small_disk:
        kinds = tuple(k for k in kinds if k != "disk_full")
    faults = plan(seed, seconds, kinds, lease=LEASE)
    options = (
        (" --sentinel" if sentinel else "")
        + (f" --kinds {','.join(kinds)}" if kinds != default_kinds(sentinel) else "")
        + (f" --sabotage {sabotage}" if sabotage else "")
        + (f" --mock-seconds {mock_sleep:g}" if mock_sleep != 1.0 else "")
    )
    report = Report(seed, seconds, root, faults, options)
    history.add(
        "plan", seed=seed, seconds=seconds, sentinel=sentinel, faults=[f.as_dict() for f in faults]
    )
    farm.start()
    try:
        try:
            _run(farm, history, faults, seed, seconds, report, backlog)
        finally:
            farm.stop()
        _judge(RunFiles(root), history.events, report)
    finally:
        farm.unmount()
    return report


def _run(
    farm: Farm,
    history: History,
    faults: list[Fault],
    seed: int,
    seconds: float,
    report: Report,
    backlog: int,
) -> None:
    t0 = time.monotonic()
    stop_faults, stop_submit, stop_all = threading.Event(), threading.Event(), threading.Event()
    injector = Injector(farm, history, faults, t0)
    workload = Workload(farm, history, seed, backlog)
    threads = [threading.Thread(target=injector.run, args=(stop_faults,), name="faults")]
    submitters = [
        threading.Thread(target=workload.run, args=(h, stop_submit), name=f"submit-{h}")
        for h in HOSTS
    ]
    helpers = [
        threading.Thread(target=supervise, args=(farm, history, injector, stop_all)),
        threading.Thread(target=sample_slots, args=(farm, history, stop_all)),
    ]
    for t in threads + submitters + helpers:
        t.daemon = True
        t.start()
    stop_all.wait(max(seconds, last_heal(faults)) - (time.monotonic() - t0))
    stop_submit.set()
    for t in submitters + threads:
        t.join(timeout=120)
    calm = time.time()
    history.add("faults_over")
    for host in HOSTS:  # every host up for the drain
        if not farm.alive(host):
            farm.start_daemon(host)
    left = None
    while left is None and time.time() < calm + 30:
        left = _unended(farm)
        if left is None:
            time.sleep(DRAIN_POLL)
    limit = next((f.value for f in reversed(faults) if f.kind == "limit"), None)
    bound = checks.drain_bound(
        left or 0, limit or SETTINGS["max_concurrent_builds"], farm.mock_sleep
    )
    report.figures["backlog_at_calm"] = left
    report.figures["drain_bound_s"] = bound
    history.add("calm", backlog=left, bound=bound)
    report.figures["drained_after_s"] = drained = _drain(farm, workload, calm, bound)
    history.add("drained", after=drained)
    stop_all.set()
    for t in helpers:
        t.join(timeout=10)
    report.figures["_final"] = {h: _builds(farm, h) or {} for h in HOSTS}


@dataclass(frozen=True)
class RunFiles:
    """What a run leaves in its directory, all the checks read: enough to judge a run
    again after the checks change (``--judge DIR``)."""

    root: Path

    def state_dir(self, host: str) -> Path:
        config = yaml.safe_load((self.root / host / "reqpmd.yaml").read_text())
        kept = self.root / host / "state-kept"  # a tmpfs's, copied before it went
        return kept if kept.is_dir() else Path(config["state_dir"])

    def log(self, host: str) -> str:
        path = self.root / host / "reqpmd.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _judge(files: RunFiles, events: list[dict[str, Any]], report: Report) -> None:
    final = report.figures.pop("_final", None)
    stores = {h: _store(files.state_dir(h)) for h in HOSTS}
    if final is None:  # judged again: the stores say how each build ended
        final = {h: {int(b["id"]): b for b in s["builds"]} for h, s in stores.items()}
    mocks = [e for h in HOSTS for e in mock_events(events_file(files.root, h), h)]
    all_runs = checks.runs(mocks)
    rounds = []
    old = SETTINGS["max_concurrent_builds"]
    starts = {}
    for e in events:
        if e["kind"] == "fault" and e["fault"] == "limit":
            if e["phase"] == "start":
                starts[e["at"]] = e
            else:
                rounds.append(
                    checks.LimitRound(starts[e["at"]].get("token"), e.get("token"), old, e["value"])
                )
                old = e["value"]
    paused = checks.pauses(events)
    found, safety_figures = checks.safety(
        all_runs, SETTINGS["max_concurrent_builds"], rounds, paused, LEASE
    )
    report.violations += found
    fenced = checks.fenced(all_runs, paused, LEASE)
    report.violations += checks.nothing_lost(events, final, all_runs, fenced)
    report.violations += checks.liveness(
        events,
        report.figures.get("drained_after_s"),
        all_runs,
        LEASE,
        report.figures["drain_bound_s"],
    )
    repos = _repos(files.root / "repos")
    report.violations += checks.consistency(
        stores,
        repos,
        {h: files.log(h) for h in HOSTS},
        SETTINGS["max_build_retries"],
    )
    submits = [e for e in events if e["kind"] == "submit"]
    report.figures.update(
        {
            "faults": dict(
                Counter(
                    e["fault"] for e in events if e["kind"] == "fault" and e["phase"] == "start"
                )
            ),
            "submissions": {
                "acknowledged": sum(e["ok"] for e in submits),
                "refused_or_lost_reply": sum(not e["ok"] for e in submits),
            },
            "final_states": dict(Counter(b["state"] for s in stores.values() for b in s["builds"])),
            "mock_build_runs": len(all_runs),
            **safety_figures,
            "limit_changes": len(rounds),
            "repositories": {k: len(v["listed"]) for k, v in repos.items()},
        }
    )


def judge_again(root: Path) -> Report:
    """A finished run judged by the checks as they are now."""
    events = History.read(root / "history.jsonl")
    plan_event = events[0]
    faults = [Fault(**f) for f in plan_event["faults"]]
    report = Report(plan_event["seed"], plan_event["seconds"], root, faults)
    drained = [e for e in events if e["kind"] == "drained"]
    calm = [e for e in events if e["kind"] == "calm"]
    report.figures["drained_after_s"] = drained[-1]["after"] if drained else None
    report.figures["drain_bound_s"] = calm[-1]["bound"] if calm else checks.drain_bound(0, 1)
    _judge(RunFiles(root), events, report)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="./dev chaos", description=__doc__)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float)
    length.add_argument("--seconds", type=float)
    p.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    p.add_argument("--kinds", help=f"comma-separated subset of: {', '.join(KINDS)}")
    p.add_argument("--root", type=Path, help="where the run's files go (kept)")
    p.add_argument("--sabotage", help="break the daemons on purpose (tests/chaos/sabotage.py)")
    p.add_argument(
        "--sentinel",
        action="store_true",
        help="a master, two replicas and three Sentinels (failover faults), not one server",
    )
    p.add_argument("--schedule", action="store_true", help="print the fault schedule")
    p.add_argument("--judge", type=Path, metavar="DIR", help="judge a finished run's files again")
    p.add_argument(
        "--mock-seconds", type=float, default=1.0, help="how long each mock step builds (1)"
    )
    a = p.parse_args(argv)
    if a.judge:
        report = judge_again(a.judge)
        print(report.text(schedule=a.schedule))
        return 1 if report.violations else 0
    seconds = a.seconds if a.seconds is not None else (a.minutes or 1.0) * 60
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1, 10**6)
    root = a.root or Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"chaos: seed {seed}, {seconds:g} s, files in {root}", flush=True)
    kinds = tuple(a.kinds.split(",")) if a.kinds else None
    report = run_chaos(
        seed, seconds, root, kinds, a.mock_seconds, sabotage=a.sabotage, sentinel=a.sentinel
    )
    print(report.text(schedule=a.schedule))
    (root / "report.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "seconds": seconds,
                "sentinel": a.sentinel,
                "figures": report.figures,
                "violations": [v.show() for v in report.violations],
            },
            indent=2,
            default=str,
        )
    )
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
