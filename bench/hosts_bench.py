#!/usr/bin/env python3
"""Benchmark: what many build hosts cost one Redis (issue 15, figure 2, "Many hosts").

Run from the repository root (``./dev bench hosts`` does the same):

    python bench/hosts_bench.py [--quick] [--sizes 10,100,1000] [--procs P]
                                [--waiters-per-host W] [--status-every S] [--limit L]

One private redis-server (Unix socket, no persistence, in a temp dir under /tmp) serves
N simulated hosts; it and every worker process are stopped at the end. A simulated host
is a reqpmd's Redis side built from the daemon's own classes, on a client of its own
(``connect``, as the daemon's): a ``BuildConcurrencyLimiter`` and a ``Cluster``, and a
``Status`` over stand-ins for the parts that never touch Redis (store, scheduler,
publisher). At the daemon's default cadence each host

* checks Redis: ``Cluster.check()`` (the COUNTS script) every ``CHECK_EVERY`` (5 s), called
  when the cluster says it is due;
* publishes its heartbeat: ``Cluster.heartbeat(Status.host_record)`` (HSET of its JSON
  record, stats included) every ``HEARTBEAT_EVERY`` (5 s);
* renews its running builds' leases: the limiter's own heartbeat thread (RENEW) every
  lease/3 (20 s with the default 60 s lease);
* has ``--waiters-per-host`` builds waiting: ``wait_for_slot`` in a thread each, with a
  cancel event, as the scheduler calls it. A waiter re-runs ACQUIRE only when the state
  can change silently or as its safety net: every ``SAFETY_POLL`` (20 s) here, since every
  holder's lease is renewed long before it could run out; it hears its grant on its
  host's one subscription to the grants channel;
* answers a ``reqpmctl status`` every ``--status-every`` seconds (``Status.status()``:
  COUNTS, SNAPSHOT, HGETALL of the shares).

The cluster: ``--limit`` slots (max_concurrent_builds, default 20, the setting's highest),
all held: L-1 by builds spread round robin over the hosts, one by the probe (below).
Every host has ``--waiters-per-host`` builds waiting (default 1), all in one project
group. Hosts are spread over ``--procs`` worker processes (threads: one per waiting or
running build, the limiter's own threads, a few for the main-loop calls). Each kind of
call is spread evenly over its period across the hosts, as in a farm whose hosts started
at random times.

For each size: first the unit costs (``calibrate``): each operation alone, back to back,
on a copy of the same state in a namespace of its own, with nothing else running; the
server's time from INFO commandstats. Then the load starts; after a warm-up, phase A
(the load alone) measures Redis CPU (INFO cpu), commands (INFO stats, commandstats) and
whether the generator kept the cadence; phase B adds the probe, a host of its own in the
parent process: it hands its slot over to a waiter of its own (priority 1, so it is
next) and times the release() call to that wait_for_slot's return, then times
wait_for_slot on a free slot (a second namespace, limit 1) and a COUNTS round trip.

The machine may be shared, and 1 000 simulated hosts on a few CPUs are not 1 000
machines: redis-server and the probe get the first CPU, the workers the others (niced),
and both phases keep only the time in which other processes left the CPUs alone (phase A
in slices, B per probe cycle), waiting a while for it; the tables say how much was kept
and what the others used.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import heapq
import inspect
import itertools
import json
import math
import os
import platform
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench import figures  # noqa: E402
from bench.figures import nearest_rank as pct  # noqa: E402
from bench.figures import num  # noqa: E402
from bench.machine import cpu_model, redis_server_version  # noqa: E402
from bench.scratch import run_with_workers  # noqa: E402
from bench.workers import (  # noqa: E402
    Workers,
    ask_all,
    child_init,
    expect,
    report_error,
)
from reqpmd.builds.analytics import aggregates  # noqa: E402
from reqpmd.builds.gates import Gate  # noqa: E402
from reqpmd.builds.scheduler import InFlight, slot_name  # noqa: E402
from reqpmd.cluster import CHECK_EVERY, HEARTBEAT_EVERY, Cluster  # noqa: E402
from reqpmd.config.schema import Settings  # noqa: E402
from reqpmd.errors import RedisUnavailable, WaitCancelled  # noqa: E402
from reqpmd.slots import keys  # noqa: E402
from reqpmd.slots.connection import connect  # noqa: E402
from reqpmd.slots.limiter import BuildConcurrencyLimiter, Slot  # noqa: E402
from reqpmd.slots.server import RedisServer  # noqa: E402
from reqpmd.slots.waiter import SAFETY_POLL  # noqa: E402
from reqpmd.status import Status  # noqa: E402

LEASE = Settings().slot_lease_seconds  # the default lease: renewals every LEASE / 3
RENEW_EVERY = LEASE / 3
GROUP = "farm"  # every build's project: one group (the probe's waiter is next by priority)
TICK = 0.5  # reqpmd's main-loop tick: a heartbeat not sent (Redis down) is tried again then
# the limiter's scripts, counted per host: attribute of the limiter -> script
SCRIPTS = {
    "_acquire": "ACQUIRE",
    "_release": "RELEASE",
    "_renew": "RENEW",
    "_counts": "COUNTS",
    "_snapshot": "SNAPSHOT",
}
# the commands each operation sends (the rest of what commandstats counts runs in Lua)
SENT = {
    "check": ("evalsha",),
    "heartbeat": ("hset",),
    "renew": ("evalsha",),
    "refresh": ("evalsha",),
    "status": ("evalsha", "hgetall"),
    "status_all": ("evalsha", "hgetall"),
    "hosts": ("hgetall",),
}
CLIENT_COMMANDS = ("evalsha", "eval", "hset", "hgetall", "ping", "subscribe", "script")


def log(msg: str) -> None:
    print(f"[hosts-bench] {msg}", file=sys.stderr, flush=True)


# -- the parts of a reqpmd that never touch Redis: stand-ins for Status -------------------


class Memory:
    """The store's daemon_state (Cluster remembers the limit it published there)."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}

    def get_state(self, key: str) -> str | None:
        return self.state.get(key)

    def set_state(self, key: str, value: str) -> None:
        self.state[key] = value


def history(now: float, builds: int = 200, seed: int = 1) -> list[tuple[Any, ...]]:
    """A host's finished builds of the last week, as ``aggregates`` reads them, so the
    heartbeat carries stats of the real shape and size."""
    rng = random.Random(seed)
    rows = []
    names = ("fedora-40-x86_64", GROUP, "pkg", "user")  # chroot, project, name, by
    for i in range(builds):
        finished = now - rng.uniform(0, 7 * 86400)
        started = finished - rng.uniform(30, 3600)
        waiting = started - rng.uniform(0, 600)
        state = "succeeded" if i % 5 else "failed"
        rows.append((state, *names, waiting - 5, waiting, started, finished))
    return rows


class FakeStore:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self._rows = rows

    def count(self, state: Any) -> int:
        return 0

    def rows(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        since, until = args
        return [r for r in self._rows if since <= r[8] < until]


class FakeScheduler:
    def __init__(self, flight: Callable[[], InFlight]) -> None:
        self.in_flight = flight
        self.ticks = 0
        self.recovering: set[int] = set()
        self.write_error: str | None = None
        self.last_gates = [
            Gate("host_max_builds", True, "no limit of its own"),
            Gate("disk", True, "412.0 GB free in /var/lib/mock"),
            Gate("state_disk", True, "412.0 GB free in /var/lib/reqpm"),
        ]
        self.autoscaler = None


class FakePublisher:
    def summary(self) -> dict[str, Any]:
        return {
            "repo_dir": "/var/lib/reqpm/repos",
            "pending": 0,
            "failed": 0,
            "published": 120,
            "failing_repos": {},
        }

    def problem(self) -> str | None:
        return None


class FakeSyncer:
    def summary(self) -> dict[str, Any]:
        return {"count": 3, "failing": {}}

    def failing(self) -> dict[str, str]:
        return {}


class FakeMaintenance:
    last = None
    shortage = None


def make_status(
    settings: Settings,
    cluster: Cluster,
    limiter: BuildConcurrencyLimiter,
    flight: Callable[[], InFlight],
    store: FakeStore,
    stats: dict[str, Any],
    stats_age: float,
) -> Status:
    status = Status(
        lambda: settings,
        cluster,
        FakeScheduler(flight),  # type: ignore[arg-type]
        store,  # type: ignore[arg-type]
        limiter,
        FakePublisher(),  # type: ignore[arg-type]
        FakeSyncer(),  # type: ignore[arg-type]
        FakeMaintenance(),  # type: ignore[arg-type]
    )
    # the host's stats as last computed (Status recomputes them in a thread once a minute,
    # from the stand-in store): heartbeats carry them from the first one on
    status._agg = (time.monotonic() - stats_age, stats)
    return status


def status_takes_rows() -> bool:
    """Whether this tree's Status.status() has a ``rows`` argument (a bounded listing)."""
    return "rows" in inspect.signature(Status.status).parameters


# -- one worker process: many hosts --------------------------------------------------------


class Tally:
    """What a worker's threads did: counts, and each scheduled call's lateness and time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.late: dict[str, list[float]] = collections.defaultdict(list)
        self.took: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: list[str] = []

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def op(self, kind: str, late: float, took: float) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.late[kind].append(late)
            self.took[kind].append(took)

    def error(self, what: str) -> None:
        with self.lock:
            self.counts["errors"] += 1
            if len(self.errors) < 5:
                self.errors.append(what)

    def take(self) -> dict[str, Any]:
        """Counts so far; lateness and times since the last take."""
        with self.lock:
            late, took = dict(self.late), dict(self.took)
            self.late, self.took = collections.defaultdict(list), collections.defaultdict(list)
            return {
                "counts": dict(self.counts),
                "late": late,
                "took": took,
                "errors": list(self.errors),
            }


class Counted:
    """A limiter script that counts its calls (the limiter looks it up at each call)."""

    def __init__(self, script: Any, name: str, tally: Tally) -> None:
        self._script = script
        self._name = name
        self._tally = tally

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._tally.add(self._name)
        return self._script(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._script, attr)


@dataclass
class Build:
    name: str
    holder: bool
    cancel: threading.Event = field(default_factory=threading.Event)
    granted: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class SimHost:
    """One reqpmd's Redis side: its client, limiter, cluster view and status."""

    def __init__(
        self,
        index: int,
        url: str,
        namespace: str,
        limit: int,
        tally: Tally,
        store: FakeStore,
        stats: dict[str, Any],
        rng: random.Random,
    ) -> None:
        self.host_id = f"host{index:04d}"
        settings = Settings(host_id=self.host_id, namespace=namespace, max_concurrent_builds=limit)
        self.settings = settings
        self.tally = tally
        self.client = connect(url)
        self.limiter = BuildConcurrencyLimiter(
            self.client,
            max_concurrent=lambda: settings.max_concurrent_builds,
            namespace=namespace,
            lease_ttl=settings.slot_lease_seconds,
            host=self.host_id,
        )
        for attr, name in SCRIPTS.items():
            setattr(self.limiter, attr, Counted(getattr(self.limiter, attr), name, tally))
        self.cluster = Cluster(self.client, self.limiter, lambda: settings, Memory())
        self.builds: list[Build] = []
        self.status = make_status(
            settings, self.cluster, self.limiter, self.flight, store, stats, rng.uniform(0, 60)
        )
        self._next_id = 1
        self.rng = random.Random(rng.random())

    def flight(self) -> InFlight:
        building = sum(b.granted.is_set() for b in self.builds)
        return InFlight(building, len(self.builds) - building)

    def start_build(self, holder: bool) -> Build:
        build = Build(slot_name(self._next_id, self.host_id), holder)
        self._next_id += 1
        build.thread = threading.Thread(
            target=self._fly, args=(build, self._next_id - 1), name=build.name, daemon=True
        )
        self.builds.append(build)
        build.thread.start()
        return build

    def _fly(self, build: Build, build_id: int) -> None:
        """The scheduler's flight, without mock: wait for a slot, hold it until told."""
        try:
            slot = self.limiter.wait_for_slot(
                build.name,
                timeout=None,
                labels={"build_id": build_id, "host_id": self.host_id},
                group=GROUP,
                on_lost=self._lost,
                cancel=build.cancel,
            )
        except WaitCancelled:
            return
        except Exception as exc:
            self.tally.error(f"{build.name}: wait_for_slot: {exc}")
            return
        build.granted.set()
        if build.holder:
            # the builds held at the start were granted within a second of each other; in
            # a farm they were not: each renewal comes at a phase of its own
            self.limiter._heartbeat.watch(slot, self.rng.uniform(1.0, RENEW_EVERY))
        else:
            self.tally.add("waiter granted")  # only the probe's waiter should be
        build.cancel.wait()
        try:
            self.limiter.release(build.name)
        except RedisUnavailable as exc:
            self.tally.error(f"{build.name}: release: {exc}")

    def _lost(self, slot: Slot) -> None:
        self.tally.error(f"{slot.name}: slot lost")


class Sim:
    """The hosts of one worker process and the threads that drive their main loops."""

    def __init__(self, url: str, namespace: str, indices: list[int], cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.tally = Tally()
        self.rng = random.Random(cfg["seed"] * 7919 + indices[0])
        now = time.time()
        store = FakeStore(history(now, seed=cfg["seed"]))
        stats = aggregates(store, now)  # type: ignore[arg-type]
        self.hosts = {
            i: SimHost(i, url, namespace, cfg["limit"], self.tally, store, stats, self.rng)
            for i in indices
        }
        self.stopping = threading.Event()
        self.loops: list[threading.Thread] = []
        self.started = time.monotonic()
        self.cpu0 = _cpu()

    def hold(self, per_host: dict[int, int]) -> None:
        builds = [
            self.hosts[i].start_build(holder=True) for i, n in per_host.items() for _ in range(n)
        ]
        for b in builds:
            if not b.granted.wait(30):
                raise RuntimeError(f"holder {b.name} was not granted a free slot")

    def queue(self, per_host: int, spread: float) -> None:
        """Start every waiter, spread over ``spread`` seconds: random safety-net phases."""
        order = [h for h in self.hosts.values() for _ in range(per_host)]
        self.rng.shuffle(order)
        began = time.monotonic()
        for k, host in enumerate(order):
            time.sleep(max(0.0, began + spread * k / max(1, len(order)) - time.monotonic()))
            host.start_build(holder=False)

    def run(self) -> None:
        """The main loops: every host checks Redis once at once (the daemon's start),
        then each call comes when the daemon would make it. The hosts' phases are spread
        evenly over each period (in random order), as a farm's hosts started at random
        times would be, so that a short window sees each kind at its average rate."""
        every = self.cfg["status_every"]
        hosts = list(self.hosts.values())
        for host in hosts:
            host.cluster.check(force=True)
        now = time.monotonic()
        first = max(h.cluster._next_check for h in hosts)

        def phases(period: float) -> list[float]:
            order = list(range(len(hosts)))
            self.rng.shuffle(order)
            return [(k + self.rng.random()) / len(hosts) * period for k in order]

        items: list[tuple[float, int, str, SimHost]] = []
        seq = itertools.count()
        checks, beats, statuses = phases(CHECK_EVERY), phases(HEARTBEAT_EVERY), phases(every)
        for i, host in enumerate(hosts):
            items.append((first + checks[i], next(seq), "check", host))
            items.append((now + beats[i], next(seq), "heartbeat", host))
            if every > 0:
                items.append((now + statuses[i], next(seq), "status", host))
        threads = max(1, self.cfg["threads"])
        for t in range(threads):
            heap = items[t::threads]
            heapq.heapify(heap)
            loop = threading.Thread(target=self._loop, args=(heap,), name=f"loop-{t}", daemon=True)
            self.loops.append(loop)
            loop.start()

    def _loop(self, heap: list[tuple[float, int, str, SimHost]]) -> None:
        while heap and not self.stopping.is_set():
            due, seq, kind, host = heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                self.stopping.wait(min(delay, 0.5))
                continue
            heapq.heappop(heap)
            start = time.monotonic()
            try:
                upcoming = self._call(kind, host, due, start)
            except Exception as exc:  # one host's surprise must not stop the others
                self.tally.error(f"{host.host_id} {kind}: {type(exc).__name__}: {exc}")
                upcoming = start + 1.0
            self.tally.op(kind, start - due, time.monotonic() - start)
            heapq.heappush(heap, (upcoming, seq, kind, host))

    def _call(self, kind: str, host: SimHost, due: float, start: float) -> float:
        """Make one call; returns when the next of its kind is due."""
        c = host.cluster
        if kind == "check":
            c.check()
            return max(c._next_check, start + 0.001)
        if kind == "heartbeat":
            c.heartbeat(host.status.host_record)
            return c._next_heartbeat if c._next_heartbeat > start else start + TICK
        host.status.status()
        return max(due + self.cfg["status_every"], start)

    def sample(self) -> dict[str, Any]:
        out = self.tally.take()
        out["cpu"] = _cpu()
        out["at"] = time.monotonic()
        out["threads"] = threading.active_count()
        return out

    def stop(self) -> None:
        self.stopping.set()
        for loop in self.loops:
            loop.join(10)
        builds = [b for h in self.hosts.values() for b in h.builds]
        waiting = [b for b in builds if not b.granted.is_set()]
        # waiters first: a holder's release would grant one of them a slot
        for batch in (waiting, [b for b in builds if b not in waiting]):
            for b in batch:
                b.cancel.set()
            deadline = time.monotonic() + 20
            for b in batch:
                if b.thread is not None:
                    b.thread.join(max(0.1, deadline - time.monotonic()))
        for h in self.hosts.values():  # the clients stay open: the process exits next
            with contextlib.suppress(Exception):
                h.limiter.close()


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _worker(
    url: str,
    namespace: str,
    indices: list[int],
    cfg: dict[str, Any],
    parent_pid: int,
    conn: Connection,
) -> None:
    """One worker process: ("hold", {host: n}), ("queue", per_host, spread), ("run",),
    ("mark",) and ("stop",) from the parent, each answered when done."""
    child_init(parent_pid)
    # Many hosts share 2 CPUs here, where a farm gives each its own: the workers yield to
    # redis-server and to the probe, so neither waits behind a burst of simulated hosts
    # (a grant wakes every host's listener at once).
    with contextlib.suppress(OSError):
        os.nice(cfg["nice"])
        if cfg["cpus"]:
            os.sched_setaffinity(0, cfg["cpus"])
    threading.stack_size(512 * 1024)  # a thread per build and per limiter: keep them small
    try:
        sim = Sim(url, namespace, indices, cfg)
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] == "hold":
                sim.hold(msg[1])
                conn.send(("held",))
            elif msg[0] == "queue":
                sim.queue(msg[1], msg[2])
                conn.send(("queued",))
            elif msg[0] == "run":
                sim.run()
                conn.send(("running",))
            elif msg[0] == "mark":
                conn.send(("mark", sim.sample()))
            elif msg[0] == "stop":
                sim.stop()
                conn.send(("stopped", sim.sample()))
                break
    except Exception as exc:
        report_error(conn, exc)


# -- the parent's side ---------------------------------------------------------------------


@dataclass
class Cycle:
    """One probe cycle: a hand-over, free-slot acquires, COUNTS round trips (seconds),
    and the CPUs other processes used meanwhile."""

    handover: float
    acquire: list[float] = field(default_factory=list)
    counts: list[float] = field(default_factory=list)
    others: float = 0.0
    quiet: bool = True


class Probe:
    """A host of its own in the parent: hands its slot over to its own waiter, which is
    next (priority 1 in the one group), and times acquire on a free slot elsewhere."""

    def __init__(self, url: str, namespace: str, limit: int, seed: int) -> None:
        self.client = connect(url)
        self.rng = random.Random(seed)
        self.lim = BuildConcurrencyLimiter(
            self.client, max_concurrent=limit, namespace=namespace, lease_ttl=LEASE, host="probe"
        )
        self.free = BuildConcurrencyLimiter(
            self.client,
            max_concurrent=1,
            namespace=f"{namespace}-free",
            lease_ttl=LEASE,
            host="probe",
        )
        self.free.declare_no_survivors()
        self.queued = threading.Event()
        steps = self.lim._steps
        attempt = steps.attempt

        def noted(*args: Any) -> Any:
            got = attempt(*args)
            if got.token is None:
                self.queued.set()  # queued, and listening since before
            return got

        steps.attempt = noted  # type: ignore[method-assign]
        self.k = itertools.count(1)
        self.held = self._name()
        if self.lim.try_acquire(self.held, group=GROUP) is None:
            raise RuntimeError("the probe found no free slot")
        self.cycles: list[Cycle] = []

    def _name(self) -> str:
        return slot_name(next(self.k), "probe")

    def hand_over(self) -> float:
        name = self._name()
        self.queued.clear()
        box: dict[str, Any] = {}

        def wait() -> None:
            try:
                self.lim.wait_for_slot(name, timeout=15, priority=1, group=GROUP)
                box["t"] = time.monotonic()
            except Exception as exc:
                box["error"] = exc

        thread = threading.Thread(target=wait, name="probe-waiter", daemon=True)
        thread.start()
        if not self.queued.wait(15):
            raise RuntimeError(f"the probe's waiter was not queued: {box.get('error')}")
        time.sleep(self.rng.uniform(0.005, 0.025))  # let it sit in its wait for the grant
        released = time.monotonic()
        self.lim.release(self.held)
        thread.join(20)
        if "t" not in box:
            raise RuntimeError(f"the probe's waiter got no slot: {box.get('error')}")
        self.held = name
        return float(box["t"] - released)

    def free_slot(self) -> float:
        name = self._name()
        began = time.monotonic()
        self.free.wait_for_slot(name, timeout=15, group=GROUP)
        took = time.monotonic() - began
        self.free.release(name)
        return took

    def check(self) -> float:
        began = time.monotonic()
        self.lim.counts()
        return time.monotonic() - began

    def run(self, seconds: float, period: float, quiet_cpus: float, patience: float) -> None:
        """One hand-over per ``period``; between two, three free-slot acquires and three
        COUNTS, each at a random point of its third of the period. The machine may be
        shared: a cycle in which other processes used ``quiet_cpus`` or more is kept
        apart, and the probe goes on (for up to ``patience`` seconds more) until
        ``seconds`` worth of quiet cycles are in."""
        self.free_slot()  # its limiter's grant subscription, made once
        began_all = time.monotonic()
        wanted = max(1, round(seconds / period))
        while sum(c.quiet for c in self.cycles) < wanted:
            if time.monotonic() - began_all > seconds + patience:
                break
            snap = others.snap()
            began = snap[0]
            cycle = Cycle(self.hand_over())
            for third in range(3):
                at = began + period * (third + self.rng.uniform(0.1, 0.9)) / 3
                time.sleep(max(0.0, at - time.monotonic()))
                cycle.acquire.append(self.free_slot())
                cycle.counts.append(self.check())
            time.sleep(max(0.0, began + period - time.monotonic()))
            cycle.others = others.between(snap, others.snap())
            cycle.quiet = cycle.others < quiet_cpus
            self.cycles.append(cycle)

    def close(self) -> None:
        for lim in (self.lim, self.free):
            with contextlib.suppress(Exception):
                lim.close()
        self.client.close()


# -- unit costs ----------------------------------------------------------------------------


@dataclass
class OpCost:
    calls: int
    script_us: float  # per call: its scripts' run time (EVALSHA in commandstats)
    plain_us: float  # per call: its other commands' (HSET, HGETALL)
    client_us: float  # per call: wall time in this (idle) process
    inner: dict[str, tuple[float, float]]  # command run in Lua -> (calls, µs) per call
    scripts: float  # scripts run per call

    @property
    def server_us(self) -> float:
        return self.script_us + self.plain_us


def calibrate(
    server: RedisServer, n: int, waiters: int, args: argparse.Namespace
) -> tuple[dict[str, OpCost], int]:
    """Each operation alone, K times, on a copy of the load's state (limit slots held,
    ``waiters`` waiting, ``n`` host records) in a namespace of its own."""
    space = f"cal{n}"
    client = server.client()
    lim = BuildConcurrencyLimiter(
        client,
        max_concurrent=args.limit,
        namespace=space,
        lease_ttl=LEASE,
        host="host0000",
        auto_renew=False,
    )
    try:
        lim.declare_no_survivors()
        lim.set_cluster_limit(args.limit)
        settings = Settings(host_id="host0000", namespace=space, max_concurrent_builds=args.limit)
        ticks = itertools.count(0, 100)  # a clock that makes every heartbeat due
        cluster = Cluster(client, lim, lambda: settings, Memory(), clock=lambda: next(ticks))
        now = time.time()
        store = FakeStore(history(now, seed=args.seed))
        status = make_status(
            settings,
            cluster,
            lim,
            lambda: InFlight(1, 1),
            store,
            aggregates(store, now),  # type: ignore[arg-type]
            0,
        )
        held = []
        for i in range(args.limit):
            name = slot_name(i + 1, f"host{i % n:04d}")
            if lim.try_acquire(name, labels={"build_id": i + 1}, group=GROUP) is None:
                raise RuntimeError("calibration: no free slot")
            held.append(name)
        queued = []
        for i in range(waiters):
            name = slot_name(10_000 + i, f"host{i % n:04d}")
            owner = uuid.uuid4().hex
            info = lim._info_json({"build_id": 10_000 + i, "host_id": f"host{i % n:04d}"}, 0, GROUP)
            if lim._attempt(name, owner, 0, info, try_only=False).token is not None:
                raise RuntimeError("calibration: a waiter was granted")
            queued.append((name, owner, info))
        record = json.dumps({**status.host_record(), "last_seen": now})
        hosts_key = keys.hosts_key(space)
        for i in range(1, n):
            client.hset(hosts_key, f"host{i:04d}", record.replace("host0000", f"host{i:04d}"))
        cluster.check(force=True)
        if not cluster.ok:
            raise RuntimeError(f"calibration: Redis check failed: {cluster.detail}")

        ops: dict[str, Callable[[int], Any]] = {
            "check": lambda k: cluster.check(force=True),
            "heartbeat": lambda k: cluster.heartbeat(status.host_record),
            "renew": lambda k: lim.renew(held[k % len(held)]),
            "refresh": lambda k: lim._attempt(
                *queued[k % len(queued)][:2], 0, queued[k % len(queued)][2], try_only=False
            ),
            "status": lambda k: status.status(),
            "hosts": lambda k: cluster.hosts(),
        }
        if status_takes_rows():
            ops["status_all"] = lambda k: status.status(rows=None)  # type: ignore[call-arg]
        costs = {}
        for op, call in ops.items():
            heavy = op in ("status_all", "hosts")
            k_calls = max(10, args.calls // 4) if heavy else args.calls
            call(0)  # warm: scripts loaded, connections open
            client.config_resetstat()
            began = time.perf_counter()
            for k in range(k_calls):
                call(k)
            took = time.perf_counter() - began
            stats = commandstats(client)
            sent = SENT[op]
            script = stats.get("evalsha", (0, 0))[1]
            costs[op] = OpCost(
                k_calls,
                script / k_calls,
                (sum(stats.get(c, (0, 0))[1] for c in sent) - script) / k_calls,
                took / k_calls * 1e6,
                {
                    c: (calls / k_calls, usec / k_calls)
                    for c, (calls, usec) in stats.items()
                    if c not in sent and c != "config"
                },
                stats.get("evalsha", (0, 0))[0] / k_calls,
            )
        return costs, len(record)
    finally:
        with contextlib.suppress(Exception):
            client.delete(*keys.slot_keys(space).as_list(), keys.hosts_key(space))
        lim.close()
        client.close()


def commandstats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec) since the last CONFIG RESETSTAT."""
    out = {}
    for key, value in client.info("commandstats").items():
        out[key.removeprefix("cmdstat_")] = (int(value["calls"]), int(value["usec"]))
    return out


def redis_cpu(client: redis.Redis) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


# -- one size ------------------------------------------------------------------------------


@dataclass
class Phase:
    wall: float
    redis_cpu: float  # seconds of CPU
    commands: int  # total_commands_processed
    stats: dict[str, tuple[int, int]]
    counts: dict[str, int]  # generator: what the hosts did in the phase
    late: dict[str, list[float]]
    took: dict[str, list[float]]
    gen_cpu: list[float]  # each worker's CPU use, in CPUs
    parent_cpu: float
    clients: int
    errors: list[str]
    others: float  # CPUs other processes on the machine used meanwhile
    used: int = 1  # slices measured and kept (quiet ones, see ``sliced``)
    total: int = 1


@dataclass
class SizeResult:
    hosts: int
    waiters: int
    holders: int
    procs: int
    costs: dict[str, OpCost]
    record_bytes: int
    a: Phase
    b: Phase
    cycles: list[Cycle]
    setup: float


def merge_marks(before: list[Any], after: list[Any]) -> tuple[dict[str, int], dict, dict, list]:
    counts: collections.Counter[str] = collections.Counter()
    late: dict[str, list[float]] = collections.defaultdict(list)
    took: dict[str, list[float]] = collections.defaultdict(list)
    cpu = []
    for b, a in zip(before, after, strict=True):
        b, a = b[1], a[1]
        for k, v in a["counts"].items():
            counts[k] += v - b["counts"].get(k, 0)
        for k, v in a["late"].items():
            late[k].extend(v)
        for k, v in a["took"].items():
            took[k].extend(v)
        cpu.append((a["cpu"] - b["cpu"]) / (a["at"] - b["at"]))
    return dict(counts), dict(late), dict(took), cpu


class Others:
    """CPU that processes other than this benchmark's use meanwhile (the machine may be
    shared): the machine's busy time (/proc/stat) minus this run's processes'."""

    def __init__(self) -> None:
        self.ours: list[int] = [os.getpid()]
        self._mark = (0.0, 0.0, 0.0)

    @staticmethod
    def _machine() -> float:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def _mine(self) -> float:
        total = 0.0
        for pid in self.ours:
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/stat") as fh:
                    stat = fh.read().rsplit(")", 1)[1].split()
                total += (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        return total

    def snap(self) -> tuple[float, float, float]:
        try:
            return time.monotonic(), self._machine(), self._mine()
        except (OSError, ValueError, IndexError):
            return time.monotonic(), math.nan, math.nan

    @staticmethod
    def between(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        """CPUs others used from snapshot ``a`` to ``b`` (nan where /proc cannot tell)."""
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / max(1e-9, b[0] - a[0])

    def start(self) -> None:
        self._mark = self.snap()

    def cpus(self) -> float:
        """CPUs others used since ``start``."""
        return self.between(self._mark, self.snap())

    def wait_quiet(self, limit: float, patience: float) -> float:
        """Wait (up to ``patience`` s) for 2 s in which others use under ``limit`` CPUs;
        returns what they used in the last 2 s."""
        deadline = time.monotonic() + patience
        while True:
            self.start()
            time.sleep(2)
            used = self.cpus()
            if not used >= limit or time.monotonic() > deadline:
                return used


others = Others()


def phase(
    client: redis.Redis,
    conns: list[Connection],
    seconds: float,
    action: Callable[[float], None],
) -> Phase:
    client.config_resetstat()
    cpu0, parent0 = redis_cpu(client), _cpu()
    began = time.monotonic()
    others.start()
    before = ask_all(conns, ("mark",), "mark", 30)
    action(seconds)
    wall = time.monotonic() - began
    cpu1, parent1 = redis_cpu(client), _cpu()
    busy = others.cpus()
    stats = commandstats(client)
    commands = int(client.info("stats")["total_commands_processed"])
    clients = int(client.info("clients")["connected_clients"])
    after = ask_all(conns, ("mark",), "mark", 30)
    counts, late, took, gen = merge_marks(before, after)
    errors = [e for m in after for e in m[1]["errors"]]
    return Phase(
        wall,
        cpu1 - cpu0,
        commands,
        stats,
        counts,
        late,
        took,
        gen,
        (parent1 - parent0) / wall,
        clients,
        errors,
        busy,
    )


def combine(slices: list[Phase]) -> Phase:
    """One phase from the slices kept: sums, and averages weighted by time."""
    wall = sum(p.wall for p in slices)
    stats: dict[str, tuple[int, int]] = {}
    counts: collections.Counter[str] = collections.Counter()
    late: dict[str, list[float]] = collections.defaultdict(list)
    took: dict[str, list[float]] = collections.defaultdict(list)
    for p in slices:
        for cmd, (calls, usec) in p.stats.items():
            c0, u0 = stats.get(cmd, (0, 0))
            stats[cmd] = (c0 + calls, u0 + usec)
        counts.update(p.counts)
        for k, v in p.late.items():
            late[k].extend(v)
        for k, v in p.took.items():
            took[k].extend(v)
    workers = len(slices[0].gen_cpu)
    return Phase(
        wall,
        sum(p.redis_cpu for p in slices),
        sum(p.commands for p in slices),
        stats,
        dict(counts),
        dict(late),
        dict(took),
        [sum(p.gen_cpu[w] * p.wall for p in slices) / wall for w in range(workers)],
        sum(p.parent_cpu * p.wall for p in slices) / wall,
        max(p.clients for p in slices),
        [e for p in slices for e in p.errors],
        sum(p.others * p.wall for p in slices) / wall,
    )


def sliced(client: redis.Redis, conns: list[Connection], args: argparse.Namespace) -> Phase:
    """Phase A in slices of ``--slice`` seconds, each kept if other processes left the
    CPUs alone meanwhile, until ``--measure`` seconds are kept, for up to ``--quiet-wait``
    seconds more (then, if under half was kept, every slice)."""
    slices: list[Phase] = []
    began = time.monotonic()
    while sum(p.wall for p in slices if p.others < args.quiet_cpus) < args.measure - 0.5:
        if time.monotonic() - began > args.measure + args.quiet_wait:
            break
        slices.append(phase(client, conns, args.slice, time.sleep))
    kept = [p for p in slices if p.others < args.quiet_cpus]
    if sum(p.wall for p in kept) < args.measure / 2:
        log(f"other processes kept the CPUs busy: measuring all {len(slices)} slices")
        kept = slices
    out = combine(kept)
    out.used, out.total = len(kept), len(slices)
    return out


def quiet(args: argparse.Namespace) -> None:
    """Measure on a machine nobody else keeps busy, if it becomes so soon enough."""
    if args.quiet_wait <= 0:
        return
    used = others.wait_quiet(args.quiet_cpus, args.quiet_wait)
    if used >= args.quiet_cpus:
        log(f"other processes still use {used:.2f} CPUs after {args.quiet_wait:g}s: measuring")


def run_size(n: int, args: argparse.Namespace, server: RedisServer, workers: Workers) -> SizeResult:
    began = time.monotonic()
    waiters = n * args.waiters_per_host
    log(f"{n} hosts: unit costs ({waiters} waiting, {args.limit} held, {n} host records)")
    costs, record_bytes = calibrate(server, n, waiters, args)
    space = f"hosts{n}"
    admin = server.client()
    lim = BuildConcurrencyLimiter(
        admin,
        max_concurrent=args.limit,
        namespace=space,
        lease_ttl=LEASE,
        host="bench",
        auto_renew=False,
    )
    lim.declare_no_survivors()
    lim.set_cluster_limit(args.limit)
    probe = Probe(server.url, space, args.limit, args.seed)
    procs = max(1, min(args.procs, n))
    parts = [list(range(n))[p::procs] for p in range(procs)]
    cfg = {
        "limit": args.limit,
        "status_every": args.status_every,
        "threads": args.threads,
        "seed": args.seed,
        "nice": args.nice,
        "cpus": args.worker_cpus,
    }
    log(f"{n} hosts: starting {procs} worker process(es)")
    spawned = [workers.spawn(_worker, server.url, space, part, cfg) for part in parts]
    conns = [c for c, _ in spawned]
    others.ours[2:] = [proc.pid for _, proc in spawned if proc.pid is not None]
    try:
        for c in conns:
            expect(c, "ready", 180)
        holders = collections.Counter(i % n for i in range(args.limit - 1))  # the probe has one
        for c, part in zip(conns, parts, strict=True):
            c.send(("hold", {h: holders[h] for h in part if holders[h]}))
        for c in conns:
            expect(c, "held", 60)
        # over SAFETY_POLL, the waiters' refreshes come at phases spread evenly
        spread = args.queue_spread if args.queue_spread > 0 else SAFETY_POLL
        log(f"{n} hosts: queueing {waiters} waiting builds over {spread:g}s")
        ask_all(conns, ("queue", args.waiters_per_host, spread), "queued", spread + 120)
        deadline = time.monotonic() + 60
        while (c := lim.counts()).waiting < waiters or c.active < args.limit:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{c.waiting}/{waiters} waiting, {c.active} held after 60s")
            time.sleep(0.2)
        ask_all(conns, ("run",), "running", 120)
        setup = time.monotonic() - began
        log(f"{n} hosts: running; warm-up {args.warmup:g}s, then {args.measure:g}s of load")
        time.sleep(args.warmup)
        quiet(args)
        a = sliced(admin, conns, args)
        log(f"{n} hosts: {args.probe_seconds:g}s of load with the probe")
        quiet(args)
        b = phase(
            admin,
            conns,
            args.probe_seconds,
            lambda s: probe.run(s, args.probe_every, args.quiet_cpus, args.quiet_wait),
        )
        log(f"{n} hosts: stopping")
        ask_all(conns, ("stop",), "stopped", 120)
    finally:
        for _, proc in spawned:
            proc.join(10)
            workers.stop(proc)
        probe.close()
        lim.close()
    admin.flushall()
    deadline = time.monotonic() + 30
    while int(admin.info("clients")["connected_clients"]) > 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    admin.close()
    return SizeResult(
        n,
        waiters,
        args.limit,
        procs,
        costs,
        record_bytes,
        a,
        b,
        probe.cycles,
        setup,
    )


# -- output --------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return num(seconds * 1000)


def intended(r: SizeResult, status_every: float) -> dict[str, float]:
    """Calls per second the daemon's cadence asks for, by kind."""
    return {
        "check": r.hosts / CHECK_EVERY,
        "heartbeat": r.hosts / HEARTBEAT_EVERY,
        "renew": (r.holders - 1) / RENEW_EVERY,  # the probe's slot is never held that long
        "refresh": r.waiters / SAFETY_POLL,
        "status": r.hosts / status_every if status_every > 0 else 0.0,
    }


def achieved(p: Phase) -> dict[str, float]:
    c = p.counts
    return {
        "check": c.get("check", 0) / p.wall,
        "heartbeat": c.get("heartbeat", 0) / p.wall,
        "renew": c.get("RENEW", 0) / p.wall,
        "refresh": c.get("ACQUIRE", 0) / p.wall,
        "status": c.get("status", 0) / p.wall,
    }


OPS = (
    ("check", "health check: Cluster.check -> COUNTS", f"{CHECK_EVERY:g} s"),
    ("heartbeat", "host heartbeat: Cluster.heartbeat -> HSET", f"{HEARTBEAT_EVERY:g} s"),
    ("refresh", "waiter safety net: Waiter -> ACQUIRE", f"{SAFETY_POLL:g} s per waiter"),
    ("renew", "lease renewal: limiter heartbeat -> RENEW", f"{RENEW_EVERY:g} s per holder"),
    ("status", "Status.status(): COUNTS+SNAPSHOT+HGETALL", "--status-every"),
)


def load_table(results: list[SizeResult], args: argparse.Namespace) -> str:
    out = [
        "| hosts | held / waiting | Redis CPU | Redis CPU per host | commands/s (all, incl. "
        "in Lua) | client commands/s: evalsha / hset / hgetall / ping | connections "
        "| calls/s achieved / intended | generator CPU (per process) | other processes "
        "(slices kept) |",
        "|---:|---|---:|---:|---:|---|---:|---|---|---:|",
    ]
    for r in results:
        a = r.a
        s = a.stats
        sent = " / ".join(
            num(s.get(c, (0, 0))[0] / a.wall) for c in ("evalsha", "hset", "hgetall", "ping")
        )
        want, got = intended(r, args.status_every), achieved(a)
        ratio = sum(got.values()) / sum(want.values())
        gen = " + ".join(f"{x:.0%}" for x in a.gen_cpu)
        out.append(
            f"| {r.hosts:,} | {r.holders} / {r.waiters:,} | {a.redis_cpu / a.wall:.1%} "
            f"| {num(a.redis_cpu / a.wall / r.hosts * 1e6)} µs/s "
            f"| {num(a.commands / a.wall)} | {sent} | {a.clients:,} "
            f"| {num(sum(got.values()))} / {num(sum(want.values()))} ({ratio:.0%}) "
            f"| {gen} | {a.others:.2f} CPU ({a.used}/{a.total}) |"
        )
    return "\n".join(out)


def cadence_table(results: list[SizeResult], args: argparse.Namespace) -> str:
    out = [
        "| hosts | call | intended /s | achieved /s | lateness p50 / p99 / max ms "
        "| call time p50 / p99 ms (sim hosts) |",
        "|---:|---|---:|---:|---|---|",
    ]
    for r in results:
        want, got = intended(r, args.status_every), achieved(r.a)
        for op, _, _ in OPS:
            late, took = r.a.late.get(op, []), r.a.took.get(op, [])
            timing = f"{ms(pct(late, 50))} / {ms(pct(late, 99))} / {ms(max(late))}" if late else "-"
            call = f"{ms(pct(took, 50))} / {ms(pct(took, 99))}" if took else "-"
            out.append(
                f"| {r.hosts:,} | {op} | {num(want[op])} "
                f"| {num(got[op])} ({got[op] / want[op]:.0%}) | {timing} | {call} |"
                if want[op]
                else f"| {r.hosts:,} | {op} | 0 | {num(got[op])} | {timing} | {call} |"
            )
    return "\n".join(out)


def latency_table(results: list[SizeResult], quiet_cpus: float) -> str:
    out = [
        "| hosts | probe cycles: quiet / all | hand-over p50 / p99 / max ms | free-slot "
        "wait_for_slot p50 / p99 ms | COUNTS round trip p50 / p99 ms | all cycles: hand-over "
        "/ free-slot / COUNTS p99 ms | PUBLISH of one grant (in RELEASE) | Redis CPU "
        "(load + probe) | other processes |",
        "|---:|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        quiet = [c for c in r.cycles if c.quiet]
        h = [c.handover for c in quiet]
        f = [x for c in quiet for x in c.acquire]
        q = [x for c in quiet for x in c.counts]
        ah = [c.handover for c in r.cycles]
        af = [x for c in r.cycles for x in c.acquire]
        aq = [x for c in r.cycles for x in c.counts]
        calls, usec = r.b.stats.get("publish", (0, 0))
        publish = f"{num(usec / calls)} µs to {r.hosts + 1:,}" if calls else "-"
        out.append(
            f"| {r.hosts:,} | {len(quiet)} / {len(r.cycles)} "
            f"| {ms(pct(h, 50))} / {ms(pct(h, 99))} / {ms(max(h, default=math.nan))} "
            f"| {ms(pct(f, 50))} / {ms(pct(f, 99))} | {ms(pct(q, 50))} / {ms(pct(q, 99))} "
            f"| {ms(pct(ah, 99))} / {ms(pct(af, 99))} / {ms(pct(aq, 99))} | {publish} "
            f"| {r.b.redis_cpu / r.b.wall:.1%} | {r.b.others:.2f} CPU |"
        )
    return "\n".join(out)


def split(r: SizeResult) -> tuple[dict[str, float], float]:
    """Redis µs per second of each operation in phase A: the rate achieved x its unit
    cost; the scripts' part scaled by one factor so that every script adds up to the
    EVALSHA time measured in the load (a script between other processes' work runs
    slower than back to back: cold caches). Returns the split and the factor."""
    got = achieved(r.a)
    scripts = {op: got[op] * r.costs[op].script_us for op, _, _ in OPS}
    measured = r.a.stats.get("evalsha", (0, 0))[1] / r.a.wall
    factor = measured / sum(scripts.values()) if sum(scripts.values()) else math.nan
    return {op: scripts[op] * factor + got[op] * r.costs[op].plain_us for op, _, _ in OPS}, factor


def where_table(results: list[SizeResult], status_every: float) -> str:
    sizes = " | ".join(f"{r.hosts:,}" for r in results)
    rule = "|".join("---:" for _ in results)
    out = [
        f"| operation (code path) | every (per host) | µs per call, alone: {sizes} hosts "
        f"| Redis µs per host per second, in the load: {sizes} hosts "
        f"| share at {results[-1].hosts:,} |",
        f"|---|---|{rule}|{rule}|---:|",
    ]
    splits = {r.hosts: split(r) for r in results}
    last = results[-1].hosts
    total_last = sum(splits[last][0].values())
    blank = " | ".join("" for _ in results)
    for op, label, cadence in OPS:
        if op == "status":
            cadence = f"{status_every:g} s"
        per_call = " | ".join(num(r.costs[op].server_us) for r in results)
        per_host = " | ".join(num(splits[r.hosts][0][op] / r.hosts) for r in results)
        share = splits[last][0][op] / total_last if total_last else math.nan
        out.append(f"| {label} | {cadence} | {per_call} | {per_host} | {share:.0%} |")
    commands, cpu, factor = [], [], []
    for r in results:
        usec = sum(r.a.stats.get(c, (0, 0))[1] for c in CLIENT_COMMANDS)
        commands.append(num(usec / r.a.wall / r.hosts))
        cpu.append(num(r.a.redis_cpu / r.a.wall / r.hosts * 1e6))
        factor.append(f"x{splits[r.hosts][1]:.2f}")
    out.append(
        f"| **commands the hosts sent** (commandstats) | | {blank} | {' | '.join(commands)} | |"
    )
    out.append(f"| **Redis CPU** (INFO cpu) | | {blank} | {' | '.join(cpu)} | |")
    out.append(
        f"| scripts in the load / alone (the factor applied above) | | {blank} "
        f"| {' | '.join(factor)} | |"
    )
    return "\n".join(out)


def findings(results: list[SizeResult], idle: float) -> list[str]:
    lines = []
    for r in results:
        usec = sum(r.a.stats.get(c, (0, 0))[1] for c in CLIENT_COMMANDS)
        cpu_us = r.a.redis_cpu * 1e6
        c = r.costs
        scrape = r.hosts / 15 * (c["status"].server_us + c["hosts"].server_us)
        line = (
            f"{r.hosts:,} hosts: commands are {usec / cpu_us:.0%} of Redis CPU (the rest: "
            f"sockets, pub/sub, timers; idle Redis {idle:.2%}); one status costs "
            f"{num(c['status'].server_us)} µs"
        )
        if "status_all" in c:
            line += f" (listing every waiter: {num(c['status_all'].server_us)} µs)"
        line += (
            f"; `Cluster.hosts()` (each Prometheus scrape, `reqpmctl hosts`) "
            f"{num(c['hosts'].server_us)} µs of Redis for {r.hosts:,} records of "
            f"{r.record_bytes:,} bytes, and {num(c['hosts'].client_us / 1000)} ms in the "
            f"caller: a scrape of every host every 15 s would add {num(scrape / r.hosts)} "
            f"µs per host per second (alone-costs)"
        )
        lines.append(line)
    return lines


def inner_table(cost: OpCost, title: str) -> str:
    rows = sorted(cost.inner.items(), key=lambda kv: -kv[1][1])
    total = sum(u for _, u in cost.inner.values())
    out = [
        f"| {title}: command run in Lua | calls per script | µs per script | share |",
        "|---|---:|---:|---:|",
    ]
    for cmd, (calls, usec) in rows[:10]:
        out.append(
            f"| {cmd.upper()} | {num(calls / max(cost.scripts, 1e-9))} "
            f"| {num(usec / max(cost.scripts, 1e-9))} | {usec / total:.0%} |"
        )
    out.append(f"| (whole script, EVALSHA) | | {num(cost.server_us / max(cost.scripts, 1e-9))} | |")
    return "\n".join(out)


def machine_facts(server: RedisServer, client: redis.Redis) -> list[tuple[str, str]]:
    cpu = cpu_model()
    version = redis_server_version(server.binary, full=True)
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "pure Python"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("date", time.strftime("%Y-%m-%d %H:%M %Z")),
        ("nproc", f"{usable} usable of {os.cpu_count()} ({cpu})"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("redis-py", f"{redis.__version__} ({parser} parser)"),
        ("redis-server", version),
        ("transport", "Unix socket, persistence off, every client on it"),
        ("load average", f"{load} (at start)"),
    ]


# -- main ----------------------------------------------------------------------------------


def pin(server: RedisServer, args: argparse.Namespace) -> None:
    """redis-server (and the probe, which does little) on the first CPU, the simulated
    hosts on the others: Redis has a CPU to itself, as on a host of its own, and no
    burst of simulated hosts' threads delays it or the probe."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or server.process is None:
        log("fewer than 2 CPUs: not pinning")
        return
    os.sched_setaffinity(server.process.pid, cpus[:1])
    os.sched_setaffinity(0, cpus[:1])
    args.worker_cpus = cpus[1:]
    log(f"redis-server and the probe on CPU {cpus[0]}, the simulated hosts on {cpus[1:]}")


def run(args: argparse.Namespace, server: RedisServer, workers: Workers) -> None:
    began = time.monotonic()
    log(f"starting redis-server ({server.binary}) in {server.directory}")
    server.start()
    client = server.client()
    facts = machine_facts(server, client)
    if args.pin:
        pin(server, args)
    others.ours.append(server.process.pid if server.process else os.getpid())
    cpu0, idle0 = redis_cpu(client), time.monotonic()
    time.sleep(1 if args.quick else 5)
    idle = (redis_cpu(client) - cpu0) / (time.monotonic() - idle0)
    facts.append(("Redis idle", f"{idle:.2%} CPU (no client but this one, hz 10)"))
    results = []
    for n in args.sizes:
        results.append(run_size(n, args, server, workers))
    client.close()

    mode = "quick" if args.quick else "full"
    print(
        f"many hosts on one Redis ({mode} run, {time.monotonic() - began:.0f} s): "
        f"max_concurrent_builds {args.limit}, all held ({args.limit - 1} by hosts, 1 by the "
        f"probe); {args.waiters_per_host} waiting build(s) per host, one project group; "
        f"status every {args.status_every:g} s per host; lease {LEASE} s"
    )
    for key, value in facts:
        print(f"  {key + ':':14} {value}")
    print(
        f"  phases: warm-up {args.warmup:g} s, load {args.measure:g} s (A), load + probe "
        f"{args.probe_seconds:g} s (B); {args.threads} main-loop thread(s) per worker; "
        f"unit costs from {args.calls} calls each"
    )
    print()
    print("Load (phase A: the hosts' own traffic, nothing else)")
    print()
    print(load_table(results, args))
    print()
    print(
        "Acquire latency (phase B: the same load, plus the probe; quiet cycles: other "
        f"processes used under {args.quiet_cpus:g} CPU meanwhile)"
    )
    print()
    print(latency_table(results, args.quiet_cpus))
    print()
    print("Where Redis time goes (unit cost at each size x the rate achieved in phase A)")
    print()
    print(where_table(results, args.status_every))
    print()
    for line in findings(results, idle):
        print(f"* {line}")
    big = results[-1]
    print()
    print(f"Inside one script at {big.hosts:,} hosts (unit-cost runs)")
    print()
    print(inner_table(big.costs["check"], "COUNTS (health check)"))
    print()
    print(inner_table(big.costs["refresh"], "ACQUIRE (a waiter's refresh)"))
    print()
    print("Did the generator keep the cadence? (phase A)")
    print()
    print(cadence_table(results, args))
    problems = []
    for r in results:
        for p, label in ((r.a, "A"), (r.b, "B")):
            granted = p.counts.get("waiter granted", 0)
            if p.errors or granted:
                problems.append(
                    f"{r.hosts} hosts, phase {label}: {p.counts.get('errors', 0)} errors "
                    f"{p.errors[:3]}, {granted} simulated waiters granted"
                )
    print()
    print(f"  setup per size: {', '.join(f'{r.hosts}: {r.setup:.0f} s' for r in results)}")
    print(f"  parent (probe) CPU in B: {', '.join(f'{r.b.parent_cpu:.0%}' for r in results)}")
    for line in problems:
        print(f"  PROBLEM: {line}")
    record_figure(args, big)


def record_figure(args: argparse.Namespace, r: SizeResult) -> None:
    """Figure 2 for --figures: what the largest size's load cost Redis (phase A)."""
    cpu = r.a.redis_cpu / r.a.wall
    handover = [c.handover for c in r.cycles if c.quiet] or [c.handover for c in r.cycles]
    figures.record(
        args.figures,
        2,
        f"many hosts on one Redis: {r.hosts:,} hosts, each at reqpmd's cadence",
        [
            ("Redis CPU", 100 * cpu, "% of a CPU"),
            ("Redis per host", cpu / r.hosts * 1e6, "µs per host per second"),
            ("hand-over p99", pct(handover, 99) * 1000, "ms"),
        ],
        "no numeric goal: measured",
        None,
        bench="hosts",
        quick=args.quick,
        note=f"sizes {','.join(str(n) for n in args.sizes)}; phase A {r.a.wall:.0f} s",
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="10 and 100 hosts, short phases (~30 s)")
    ap.add_argument("--sizes", default="10,100,1000", help="host counts, comma-separated")
    ap.add_argument("--procs", type=int, default=2, help="worker processes for the hosts")
    ap.add_argument("--threads", type=int, default=4, help="main-loop threads per worker")
    ap.add_argument("--limit", type=int, default=20, help="max_concurrent_builds, all held")
    ap.add_argument("--waiters-per-host", type=int, default=1, help="builds waiting per host")
    ap.add_argument(
        "--status-every", type=float, default=60.0, help="seconds between a host's statuses"
    )
    ap.add_argument(
        "--warmup",
        type=float,
        default=5.0,
        help="seconds before measuring (over 2: the first checks)",
    )
    ap.add_argument(
        "--measure", type=float, default=20.0, help="seconds of phase A (load), kept if quiet"
    )
    ap.add_argument("--slice", type=float, default=5.0, help="seconds per slice of phase A")
    ap.add_argument(
        "--probe-seconds", type=float, default=25.0, help="seconds of quiet probe cycles (B)"
    )
    ap.add_argument("--probe-every", type=float, default=0.2, help="seconds per probe cycle")
    ap.add_argument("--calls", type=int, default=300, help="calls per unit-cost measurement")
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds a phase may wait, and go on, for other processes to leave the CPUs",
    )
    ap.add_argument(
        "--quiet-cpus", type=float, default=0.15, help="CPUs others may use on a quiet machine"
    )
    ap.add_argument("--nice", type=int, default=10, help="niceness of the worker processes")
    ap.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="leave every process on every CPU (default: redis-server and probe on one)",
    )
    ap.add_argument(
        "--queue-spread",
        type=float,
        default=0.0,
        help="seconds over which the waiting builds are queued (default: the waiters' "
        "safety poll, so their polls fall at evenly spread phases; shorter only to save time)",
    )
    ap.add_argument("--seed", type=int, default=1)
    figures.add_option(ap)
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.worker_cpus = []
    if args.quick:
        if args.sizes == [10, 100, 1000]:
            args.sizes = [10, 100]
        args.warmup, args.measure, args.probe_seconds, args.calls = 2.5, 4.0, 4.0, 30
        args.slice = 4.0
        args.quiet_wait = 0.0  # a smoke test: measure whatever else runs
    if not 2 <= args.limit <= 20:
        ap.error("--limit must be 2..20 (max_concurrent_builds allows 1..20; the probe holds 1)")

    return run_with_workers("rqh", lambda server, workers: run(args, server, workers), log)


if __name__ == "__main__":
    sys.exit(main())
