#!/usr/bin/env python3
"""Benchmark (issue 15): what a grant costs as the queue grows, and how close contended
throughput comes to the physical maximum, with a profile of the hand-over gap.

Run from the repository root (``./dev bench queue`` does the same):

    python bench/queue_bench.py [--quick] [--only queue|churn] [--rounds R] [--churn-runs R]

1. Queue length. N builds (10, 100, 1 000, 10 000) wait in a namespace with one slot,
   queued through the limiter without blocking threads (the waiter's own first step, as
   tests/test_shares.py ``queue_in``), leases long enough to outlive the run. The bench
   process holds the slot. Another process blocks in ``wait_for_slot`` at priority 1,
   ahead of the N. The holder releases; the RELEASE script grants the blocked waiter and
   publishes the grant. Hand-over = the waiter's CLOCK_MONOTONIC right after
   ``wait_for_slot`` returned minus the holder's right before ``release()``. Redis time
   per grant = ``cmdstat_evalsha`` usec of INFO commandstats, reset before the release:
   the granting RELEASE and the waiter's ACQUIRE that confirms the grant message (since
   2026-11-29: a message is a reason to ask, not the answer); a sample in which anything
   else ran a script is dropped and counted. Every round
   measures every N in turn. The seed's design (a SET, SCARD+SADD, waiters polling every
   0.5 s) keeps no queue; its comparable figures are measured beside: the hand-over of a
   lone poller, the Redis time of its release, and what N waiting builds cost Redis per
   second (the seed: 2 SCARD each; reqpm: a waiter's safety poll, one ACQUIRE each 5 s).
2. Contended throughput, as bench/limiter_bench.py: 8 processes, limit 2, each looping
   acquire, INCR a counter, hold 5 ms, DECR, release; the maximum is limit / hold = 400
   grants/s. Each run also records, with CLOCK_MONOTONIC in every process: RELEASE sent,
   RELEASE reply, the grant's PUBLISH read by the waiter's listener thread, the waiting
   thread woken, ``wait_for_slot`` returned; per-thread CPU and run-queue delay
   (/proc/<pid>/task/<tid>/schedstat), redis-server's too, and the commands each grant
   cost (INFO commandstats). Hand-overs are matched to releases in order (steady state
   only: every release then grants the head waiter).

``QUEUE_BENCH_REQPMD=DIR`` imports the ``reqpmd`` package from DIR instead of the
repository's (prototype patches are measured that way); ``--switch-interval`` sets
``sys.setswitchinterval`` in the churn workers. One private redis-server (Unix socket, no
persistence) serves everything; it and every worker are stopped at the end, also on
Ctrl-C or an error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as MPEvent
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
_ALT = os.environ.get("QUEUE_BENCH_REQPMD", "")
if _ALT:  # a patched copy of the package, ahead of the repository's (workers inherit it)
    sys.path.insert(0, _ALT)

import redis  # noqa: E402

import reqpmd  # noqa: E402
from bench import figures  # noqa: E402
from bench.limiter_bench import SetLimiter, machine_facts, pct  # noqa: E402
from bench.scratch import run_with_workers  # noqa: E402
from bench.workers import (  # noqa: E402
    Workers,
    child_init,
    expect,
    report_error,
)
from reqpmd.concurrency import BuildConcurrencyLimiter  # noqa: E402
from reqpmd.slots.connection import connect  # noqa: E402
from reqpmd.slots.server import RedisServer  # noqa: E402
from reqpmd.slots.waiter import SAFETY_POLL  # noqa: E402 - a waiter asks Redis this often

GRANT_CALLS = 2  # scripts per measured grant: the granting RELEASE, the confirming ACQUIRE
SIZES = (10, 100, 1000, 10000)
LEASE_TTL = 3600  # queue scenario: no holder or waiter lease runs out during a run
CHURN_LEASE_TTL = 60  # as bench/limiter_bench.py


def log(msg: str) -> None:
    print(f"[queue-bench] {msg}", file=sys.stderr, flush=True)


def evalsha_stat(client: redis.Redis) -> tuple[int, int]:
    """(calls, usec) of EVALSHA since the last CONFIG RESETSTAT."""
    stat = client.info("commandstats").get("cmdstat_evalsha", {})
    return int(stat.get("calls", 0)), int(stat.get("usec", 0))


def redis_cpu(client: redis.Redis) -> float:
    """Seconds of CPU redis-server has used (user + system, every thread)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


# -- 1. grant cost against queue length ---------------------------------------------------


def _queue_waiter(url: str, parent_pid: int, conn: Connection) -> None:
    """The measured waiter: on ("go", namespace, name) block in wait_for_slot at priority
    1 (ahead of every queued build), report ("granted", t, token) right after it returns,
    release on ("release",). ("seed", key, name) does the same with the seed's limiter."""
    child_init(parent_pid)
    client = connect(url)
    limiters: dict[str, BuildConcurrencyLimiter] = {}
    try:
        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] == "go":
                _, space, name = msg
                lim = limiters.get(space)
                if lim is None:
                    lim = BuildConcurrencyLimiter(
                        client, max_concurrent=1, namespace=space, lease_ttl=LEASE_TTL
                    )
                    limiters[space] = lim
                slot = lim.wait_for_slot(name, timeout=60, priority=1)
                t_granted = time.monotonic()
                conn.send(("granted", t_granted, slot.token))
                expect(conn, "release", 60)
                lim.release(name)
                conn.send(("released",))
            elif msg[0] == "seed":
                _, key, name = msg
                seed = SetLimiter(client, 1, key)
                seed.acquire(name, timeout=60, on_wait=lambda: conn.send(("waiting",)))
                t_granted = time.monotonic()
                seed.release(name)
                conn.send(("granted", t_granted, 0))
            else:
                break
    except Exception as exc:
        report_error(conn, exc)
    finally:
        for lim in limiters.values():
            with contextlib.suppress(Exception):
                lim.close()
        client.close()


@dataclass
class Queue:
    """One namespace with ``size`` builds queued behind the measured waiter."""

    size: int
    space: str
    lim: BuildConcurrencyLimiter
    holding: str = ""
    round: int = 0
    handover: list[float] = field(default_factory=list)  # seconds
    server_us: list[int] = field(default_factory=list)  # Redis time of a grant's scripts
    release_rtt: list[float] = field(default_factory=list)  # the holder's release() call
    dropped: int = 0  # samples in which another script ran between reset and read
    refresh_us: list[int] = field(default_factory=list)  # one waiter's safety poll, Redis
    refresh_cpu: float = 0.0  # redis-server CPU seconds per safety poll, all included
    probe: tuple[str, str, str] = ("", "", "")  # a queued build: name, owner, info
    tokens: list[int] = field(default_factory=list)


def setup_queue(client: redis.Redis, size: int) -> Queue:
    space = f"queue-{size}"
    lim = BuildConcurrencyLimiter(client, max_concurrent=1, namespace=space, lease_ttl=LEASE_TTL)
    lim.declare_no_survivors()
    q = Queue(size, space, lim, holding="holder-0")
    if lim.try_acquire(q.holding) is None:
        raise RuntimeError(f"{space}: the first holder found the slot taken")
    info = lim._info_json({}, 0, "@default")
    for k in range(size):
        name, owner = f"queued-{k}", uuid.uuid4().hex
        # the waiter's own first step, without a thread blocking on it (queue_in)
        if lim._attempt(name, owner, 0, info, try_only=False).token is not None:
            raise RuntimeError(f"{space}: queued build {name} was granted")
        if k == size // 2:
            q.probe = (name, owner, info)
    check_queue(client, q)
    return q


def check_queue(client: redis.Redis, q: Queue) -> None:
    waiting = int(client.zcard(q.lim._keys.waiters))
    if waiting != q.size:
        raise RuntimeError(f"{q.space}: {waiting} builds wait, expected {q.size}")


def _until(what: str, ok: Callable[[], bool], conn: Connection | None = None) -> None:
    deadline = time.monotonic() + 30
    while not ok():
        if conn is not None and conn.poll():
            expect(conn, "nothing", 0)  # raises: the worker failed or was granted early
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within 30 s")
        time.sleep(0.0005)


def handover_round(
    client: redis.Redis, q: Queue, conn: Connection, rng: random.Random, sample: bool
) -> None:
    """The holder releases; the waiter blocked at the head of the queue is granted.
    Then the bench process queues for the slot again (priority 2) and the waiter releases."""
    lim, k = q.lim, q.round
    q.round += 1
    waiter = f"measured-{k}"
    waiters = lim._keys.waiters
    channel = lim._keys.grants
    conn.send(("go", q.space, waiter))
    _until(
        f"{waiter} queued and subscribed",
        lambda: (
            client.zscore(waiters, waiter) is not None
            and int(client.pubsub_numsub(channel)[0][1]) >= 1
        ),
        conn,
    )
    time.sleep(rng.uniform(0.005, 0.025))  # it sits in its wait
    client.config_resetstat()
    t_release = time.monotonic()
    if not lim.release(q.holding):
        raise RuntimeError(f"{q.space}: {q.holding} was not held")
    t_reply = time.monotonic()
    _, t_granted, token = expect(conn, "granted", 30)
    calls, usec = evalsha_stat(client)
    if sample:
        q.handover.append(t_granted - t_release)
        q.release_rtt.append(t_reply - t_release)
        if calls == GRANT_CALLS:
            q.server_us.append(usec)
        else:
            q.dropped += 1
    q.tokens.append(int(token))
    # take the slot back: a real wait in a thread here, released to by the waiter
    nxt = f"holder-{k + 1}"
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(lim.wait_for_slot(nxt, timeout=60, priority=2)), daemon=True
    )
    thread.start()
    _until(f"{nxt} queued", lambda: client.zscore(waiters, nxt) is not None)
    conn.send(("release",))
    expect(conn, "released", 30)
    thread.join(30)
    if not got:
        raise RuntimeError(f"{q.space}: the holder did not get the slot back")
    q.holding = nxt


def refresh_cost(client: redis.Redis, q: Queue, calls: int) -> None:
    """A waiting build's safety poll (ACQUIRE again, every 5 s): Redis time per call from
    commandstats, and redis-server's CPU per call with its I/O from INFO cpu."""
    name, owner, info = q.probe
    for _ in range(20):
        q.lim._attempt(name, owner, 0, info, try_only=False)
    for _ in range(min(200, calls)):
        client.config_resetstat()
        q.lim._attempt(name, owner, 0, info, try_only=False)
        n, usec = evalsha_stat(client)
        if n == 1:
            q.refresh_us.append(usec)
    cpu = redis_cpu(client)
    for _ in range(calls):
        q.lim._attempt(name, owner, 0, info, try_only=False)
    q.refresh_cpu = (redis_cpu(client) - cpu) / calls


@dataclass
class Seed:
    handover: list[float] = field(default_factory=list)
    srem_us: list[int] = field(default_factory=list)
    scard_cpu: float = 0.0  # redis-server CPU seconds per SCARD round trip


def bench_seed(client: redis.Redis, conn: Connection, rng: random.Random, rounds: int) -> Seed:
    """The seed's design beside it: a lone poller's hand-over and the release's Redis time
    (queue length does not apply: the SET holds holders only, waiters just poll)."""
    seed = Seed()
    key = "bench:seed:active_builds"
    holder = SetLimiter(client, 1, key)
    for i in range(rounds):
        if not holder.try_acquire(f"h{i}"):
            raise RuntimeError("seed: the holder found the slot taken")
        conn.send(("seed", key, f"w{i}"))
        expect(conn, "waiting", 30)
        time.sleep(rng.uniform(0.0, SetLimiter.POLL_INTERVAL))  # a random polling phase
        client.config_resetstat()
        t_release = time.monotonic()
        holder.release(f"h{i}")
        stat = client.info("commandstats").get("cmdstat_srem", {})
        _, t_granted, _ = expect(conn, "granted", 30)
        seed.handover.append(t_granted - t_release)
        if int(stat.get("calls", 0)) == 1:
            seed.srem_us.append(int(stat["usec"]))
    calls = 3000
    for _ in range(100):
        client.scard(key)
    cpu = redis_cpu(client)
    for _ in range(calls):
        client.scard(key)
    seed.scard_cpu = (redis_cpu(client) - cpu) / calls
    return seed


def bench_queue(env: Env, args: argparse.Namespace) -> tuple[list[Queue], Seed]:
    client = env.client
    queues = []
    for size in SIZES:
        began = time.monotonic()
        queues.append(setup_queue(client, size))
        log(f"N={size:,}: queued in {time.monotonic() - began:.1f}s")
    conn, proc = env.workers.spawn(_queue_waiter, env.url)
    expect(conn, "ready", 60)
    for q in queues:
        for _ in range(args.warmup):
            handover_round(client, q, conn, env.rng, sample=False)
    log(f"hand-over: {args.rounds} rounds, each over every N in turn")
    for _ in range(args.rounds):
        for q in queues:
            handover_round(client, q, conn, env.rng, sample=True)
    for q in queues:
        check_queue(client, q)
        if q.tokens != sorted(set(q.tokens)):
            raise RuntimeError(f"{q.space}: fencing tokens did not only grow")
        refresh_cost(client, q, args.refresh_calls)
    log(f"seed: {args.seed_rounds} hand-overs of a lone poller")
    seed = bench_seed(client, conn, env.rng, args.seed_rounds)
    conn.send(("quit",))
    env.workers.finish(proc)
    return queues, seed


def ms(seconds: float) -> str:
    v = seconds * 1000
    return f"{v:.2f}" if v < 10 else f"{v:.0f}"


def queue_table(queues: list[Queue], seed: Seed) -> str:
    out = [
        "| builds waiting N | design | hand-over p50 ms | hand-over p99 ms | "
        "Redis µs per grant p50 | p99 | release round trip p50 ms | "
        "Redis CPU per s for the N waiting |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for q in queues:
        load = q.size / SAFETY_POLL * q.refresh_cpu
        out.append(
            f"| {q.size:,} | reqpm | {ms(pct(q.handover, 50))} | {ms(pct(q.handover, 99))} | "
            f"{pct(q.server_us, 50):.0f} | {pct(q.server_us, 99):.0f} | "
            f"{ms(pct(q.release_rtt, 50))} | {load * 1000:.1f} ms "
            f"({q.size / SAFETY_POLL:,.0f} ACQUIRE/s x {q.refresh_cpu * 1e6:.0f} µs) |"
        )
    for size in SIZES:
        load = size * 2 * seed.scard_cpu
        out.append(
            f"| {size:,} | seed | {ms(pct(seed.handover, 50))}* | {ms(pct(seed.handover, 99))}* "
            f"| {pct(seed.srem_us, 50):.0f} | {pct(seed.srem_us, 99):.0f} | - | "
            f"{load * 1000:.1f} ms ({size * 2:,} SCARD/s x {seed.scard_cpu * 1e6:.0f} µs) |"
        )
    return "\n".join(out)


def queue_verdict(queues: list[Queue]) -> list[str]:
    lo, hi = queues[0], queues[-1]
    lines = []
    pairs: list[tuple[str, Callable[[Queue], float]]] = [
        ("hand-over p50", lambda q: pct(q.handover, 50)),
        ("hand-over p99", lambda q: pct(q.handover, 99)),
        ("Redis time per grant p50", lambda q: pct(q.server_us, 50)),
    ]
    for what, get in pairs:
        r = get(hi) / get(lo)
        lines.append(
            f"{what}: N={hi.size:,} / N={lo.size:,} = x{r:.2f} -> target <= 2x: "
            f"{'MET' if r <= 2 else 'NOT MET'}"
        )
    dropped = sum(q.dropped for q in queues)
    if dropped:
        lines.append(f"({dropped} Redis-time samples dropped: another script ran meanwhile)")
    return lines


def record_queue_figure(args: argparse.Namespace, queues: list[Queue]) -> None:
    """Figure 1 for --figures: the hand-over p50 at the longest queue against the shortest."""
    lo, hi = queues[0], queues[-1]
    p50_lo, p50_hi = pct(lo.handover, 50), pct(hi.handover, 50)
    ratio = p50_hi / p50_lo
    figures.record(
        args.figures,
        1,
        f"grant cost against queue length: hand-over p50, {lo.size:,} → {hi.size:,} builds waiting",
        [
            (f"p50 at {hi.size:,} / p50 at {lo.size:,}", ratio, "x"),
            (f"hand-over p50 at {lo.size:,}", p50_lo * 1000, "ms"),
            (f"hand-over p50 at {hi.size:,}", p50_hi * 1000, "ms"),
            (
                "Redis time per grant p50 ratio",
                pct(hi.server_us, 50) / pct(lo.server_us, 50),
                "x",
            ),
        ],
        f"{hi.size:,}-waiting p50 within 2x of the {lo.size:,}-waiting p50",
        ratio <= 2,
        bench="queue",
        quick=args.quick,
        note=f"{args.rounds} hand-overs per queue length",
    )


# -- 2. contended throughput and the hand-over profile ------------------------------------


class Probe:
    """Timestamps inside one worker, by wrapping the limiter's own steps (no behaviour
    changes): RELEASE sent and answered, each grant message the listener thread reads, the
    waiting thread seeing its token. Parts a prototype lacks are simply not recorded."""

    def __init__(self, lim: BuildConcurrencyLimiter) -> None:
        self.releases: list[tuple[float, float]] = []
        self.heard: list[tuple[float, str]] = []
        self.woken: list[tuple[float, int]] = []
        release_name = lim._release_name

        def timed_release(name: str, owner: str) -> Any:
            t0 = time.monotonic()
            reply = release_name(name, owner)
            self.releases.append((t0, time.monotonic()))
            return reply

        lim._release_name = timed_release  # type: ignore[method-assign]
        grants = getattr(lim, "_grants", None)
        dispatch = getattr(grants, "_dispatch", None)
        if grants is not None and dispatch is not None:

            def timed_dispatch(data: str) -> None:
                self.heard.append((time.monotonic(), data))
                dispatch(data)

            grants._dispatch = timed_dispatch
        from reqpmd.slots import waiter

        wait = getattr(waiter.Waiter, "_wait_for_grant", None)
        if wait is not None:

            def timed_wait(w: Any, pending: Any, hint: float | None) -> int | None:
                token: int | None = wait(w, pending, hint)
                if token is not None:
                    self.woken.append((time.monotonic(), token))
                return token

            waiter.Waiter._wait_for_grant = timed_wait  # type: ignore[method-assign,assignment]


def thread_stats() -> dict[str, tuple[int, int, int]]:
    """CPU ns, run-queue wait ns and timeslices of each live thread of this process."""
    found = {}
    for t in threading.enumerate():
        with contextlib.suppress(OSError, ValueError, TypeError):
            with open(f"/proc/self/task/{t.native_id}/schedstat") as fh:
                cpu, delay, slices = (int(x) for x in fh.read().split()[:3])
            found[t.name] = (cpu, delay, slices)
    return found


def _churn_worker(
    url: str,
    space: str,
    count: int,
    hold: float,
    counter_key: str,
    switch_interval: float,
    pause: float,
    index: int,
    start: MPEvent,
    parent_pid: int,
    conn: Connection,
) -> None:
    """acquire -> INCR counter -> hold -> DECR -> release, ``count`` times, timestamped.
    Without ``counter_key`` the holders are checked from the timestamps alone."""
    child_init(parent_pid)
    if switch_interval > 0:
        sys.setswitchinterval(switch_interval)
    client = connect(url)
    try:
        lim = BuildConcurrencyLimiter(
            client, max_concurrent=2, namespace=space, lease_ttl=CHURN_LEASE_TTL
        )
        probe = Probe(lim)
        conn.send(("ready",))
        if not start.wait(120):
            raise RuntimeError("start signal never came")
        main_before = thread_stats().get("MainThread", (0, 0, 0))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        holds = []
        max_seen = over = 0
        for k in range(count):
            name = f"w{index}-{k}"
            t_ask = time.monotonic()
            slot = lim.wait_for_slot(name, timeout=120)
            t_got = time.monotonic()
            if counter_key:
                holders = int(client.incr(counter_key))
                max_seen = max(max_seen, holders)
                over += holders > 2
            time.sleep(hold)
            if counter_key:
                client.decr(counter_key)
            t_rel = time.monotonic()
            lim.release(name)
            holds.append((t_ask, t_got, t_rel, slot.token))
            if pause:
                time.sleep(pause)
        end = resource.getrusage(resource.RUSAGE_SELF)
        threads = thread_stats()
        if "MainThread" in threads:
            threads["MainThread"] = tuple(  # type: ignore[assignment]
                a - b for a, b in zip(threads["MainThread"], main_before, strict=True)
            )
        cpu = (end.ru_utime - usage.ru_utime) + (end.ru_stime - usage.ru_stime)
        conn.send(
            (
                "done",
                {
                    "holds": holds,
                    "releases": probe.releases,
                    "heard": probe.heard,
                    "woken": probe.woken,
                    "max_seen": max_seen,
                    "over": over,
                    "cpu": cpu,
                    "nivcsw": end.ru_nivcsw - usage.ru_nivcsw,
                    "nvcsw": end.ru_nvcsw - usage.ru_nvcsw,
                    "threads": threads,
                    "parser": "hiredis" if redis.utils.HIREDIS_AVAILABLE else "pure Python",
                    "reqpmd": str(Path(reqpmd.__file__).parent),
                },
            )
        )
        lim.close()
    except Exception as exc:
        report_error(conn, exc)
    finally:
        client.close()


def read_proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs."""
    with open("/proc/stat") as fh:
        parts = [int(x) for x in fh.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def read_schedstat(pid: int) -> tuple[int, int]:
    """CPU ns and run-queue wait ns of every thread of ``pid``."""
    cpu = wait = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as fh:
            a, b = fh.read().split()[:2]
            cpu, wait = cpu + int(a), wait + int(b)
    return cpu, wait


@dataclass
class Churn:
    processes: int
    limit: int
    per_process: int
    hold: float
    wall: float = 0.0
    max_holders: int = 0
    over_limit: int = 0
    reports: list[dict[str, Any]] = field(default_factory=list)
    commands: dict[str, int] = field(default_factory=dict)
    redis_cpu: float = 0.0  # seconds
    redis_wait: float = 0.0  # seconds runnable but not running
    machine_busy: float = 0.0  # share of all CPUs busy over the run
    others: float = 0.0  # share of all CPUs used by processes not of this run

    @property
    def grants(self) -> int:
        return self.processes * self.per_process

    @property
    def rate(self) -> float:
        return self.grants / self.wall if self.wall > 0 else 0.0

    @property
    def maximum(self) -> float:
        return self.limit / self.hold


def most_at_once(reports: list[dict[str, Any]], limit: int) -> tuple[int, int]:
    """From the timestamps: the most holds that overlapped, and how many holds began with
    ``limit`` others still running. A hold is [wait_for_slot returned, release() called]:
    inside the real one, so an overlap here is one in Redis too."""
    events = sorted(
        (t, step)
        for r in reports
        for _, got, rel, _ in r["holds"]
        for t, step in ((got, 1), (rel, -1))
    )
    now = most = over = 0
    for _, step in events:
        now += step
        most = max(most, now)
        over += step > 0 and now > limit
    return most, over


@dataclass(frozen=True)
class Variant:
    """What the churn workers run: the reqpmd package from ``path`` ('' the one this
    process imported), with a switch interval, a pause after each release, a check."""

    label: str
    path: str = _ALT
    switch_interval: float = 0.0
    pause: float = 0.0
    check: str = "redis"

    def describe(self) -> str:
        parts = [str(Path(reqpmd.__file__).parent) if not self.path else self.path]
        if self.switch_interval:
            parts.append(f"switch interval {self.switch_interval:g} s")
        if self.pause:
            parts.append(f"{self.pause * 1000:g} ms pause after each release")
        parts.append(
            "holders counted with INCR/DECR in the hold"
            if self.check == "redis"
            else "holders counted from timestamps, no Redis call in the hold"
        )
        return "; ".join(parts)


def parse_variant(spec: str, args: argparse.Namespace) -> Variant:
    """LABEL=key=value,... with keys dir, si (switch interval), pause, check."""
    label, _, rest = spec.partition("=")
    fields: dict[str, Any] = {
        "path": _ALT,
        "switch_interval": args.switch_interval,
        "pause": args.pause_after_release,
        "check": args.check,
    }
    names = {"dir": "path", "si": "switch_interval", "pause": "pause", "check": "check"}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in names:
            raise SystemExit(f"--variant {spec!r}: unknown key {key!r} (dir, si, pause, check)")
        fields[names[key]] = value if key in ("dir", "check") else float(value)
    if fields["path"] and not (Path(fields["path"]) / "reqpmd").is_dir():
        raise SystemExit(f"--variant {spec!r}: no reqpmd package in {fields['path']}")
    return Variant(label or "current", **fields)


def bench_churn(env: Env, run: int, v: Variant, per_process: int, processes: int = 8) -> Churn:
    result = Churn(processes=processes, limit=2, per_process=per_process, hold=0.005)
    space = "churn-" + "".join(c if c.isalnum() or c in "_.-" else "_" for c in v.label)
    space = f"{space[:50]}-{run}"
    counter = f"bench:{space}:holders" if v.check == "redis" else ""
    BuildConcurrencyLimiter(env.client, namespace=space).declare_no_survivors()
    start = env.workers.event()
    # the workers import reqpmd from the variant's path (spawned: they inherit this)
    if v.path:
        os.environ["QUEUE_BENCH_REQPMD"] = v.path
    else:
        os.environ.pop("QUEUE_BENCH_REQPMD", None)
    started = [
        env.workers.spawn(
            _churn_worker,
            env.url,
            space,
            per_process,
            result.hold,
            counter,
            v.switch_interval,
            v.pause,
            index,
            start,
        )
        for index in range(processes)
    ]
    for conn, _ in started:
        expect(conn, "ready", 60)
    time.sleep(0.2)  # let the workers settle in start.wait()
    env.client.config_resetstat()
    cpu0 = redis_cpu(env.client)
    sched0 = read_schedstat(env.server_pid)
    busy0 = read_proc_stat()
    t_start = time.monotonic()
    start.set()
    for conn, _ in started:
        _, report = expect(conn, "done", 120 + per_process * processes)
        result.reports.append(report)
    busy1 = read_proc_stat()
    sched1 = read_schedstat(env.server_pid)
    result.redis_cpu = redis_cpu(env.client) - cpu0
    result.redis_wait = (sched1[1] - sched0[1]) / 1e9
    result.machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    t_end = time.monotonic()
    stats = env.client.info("commandstats")
    result.commands = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    result.wall = max(r["holds"][-1][2] for r in result.reports) - t_start
    for r in result.reports:
        result.max_holders = max(result.max_holders, int(r["max_seen"]))
        result.over_limit += int(r["over"])
    if not counter:
        result.max_holders, result.over_limit = most_at_once(result.reports, result.limit)
    # CPU time of everything else on the machine meanwhile (another test suite...)
    ticks = os.sysconf("SC_CLK_TCK")
    busy = (busy1[0] - busy0[0]) / ticks
    mine = result.redis_cpu + sum(r["cpu"] for r in result.reports)
    result.others = max(0.0, busy - mine) / ((os.cpu_count() or 1) * (t_end - t_start))
    for _, proc in started:
        env.workers.finish(proc)
    return result


@dataclass
class Profile:
    """Per hand-over segments, in seconds, of the steady state of one or more runs."""

    sent_to_reply: list[float] = field(default_factory=list)  # releaser's RELEASE
    sent_to_heard: list[float] = field(default_factory=list)  # to the listener thread
    heard_to_woken: list[float] = field(default_factory=list)  # to the waiting thread
    woken_to_returned: list[float] = field(default_factory=list)  # to wait_for_slot's return
    gap: list[float] = field(default_factory=list)  # RELEASE sent -> next holder starts
    hold: list[float] = field(default_factory=list)  # returned -> release() (INCR/sleep/DECR)
    direct: int = 0  # grants answered by ACQUIRE itself (no hand-over)
    unmatched: int = 0  # hand-overs whose release could not be told (order mismatch)
    idle: list[float] = field(default_factory=list)  # slot time unheld per grant, per run
    dropped_runs: int = 0  # runs whose pairing disagreed with their idle time


def idle_per_grant(reports: list[dict[str, Any]], limit: int) -> tuple[float, float, float]:
    """Slot time nobody held, per grant, from the first release until the first process
    starts its last wait: exact, no pairing needed. Also that window's bounds."""
    holds = [(got, rel) for r in reports for _, got, rel, _ in r["holds"]]
    begin = min(rel for _, rel in holds)
    end = min(r["holds"][-1][0] for r in reports)
    events = sorted([(got, 1) for got, _ in holds] + [(rel, -1) for _, rel in holds])
    held = 0
    idle = 0.0
    prev = None
    for t, step in events:
        if prev is not None and begin <= prev and t <= end:
            idle += (limit - held) * (t - prev)
        held += step
        prev = t
    grants = sum(1 for got, _ in holds if begin < got <= end)
    return idle / max(1, grants), begin, end


def profile(runs: list[Churn]) -> Profile:
    """Hand-overs matched to the releases that made them. Redis runs scripts one at a
    time and numbers grants in that order, so walking the grants by token and the releases
    by the time they were sent pairs each hand-over with its release. A release that
    found the queue empty grants nobody; the slot it left goes to the next ACQUIRE (a
    grant that did not come through the waiting thread), so at such a grant the earliest
    release still unpaired that was sent before that ACQUIRE is set aside. Only the steady
    state counts: until the first process starts its last wait."""
    prof = Profile()
    for run in runs:
        last_start = min(r["holds"][-1][0] for r in run.reports)
        releases = []  # (sent, reply)
        grants = []  # (token, kind, asked, heard, woken, returned)
        for r in run.reports:
            heard: dict[int, float] = {}
            for t, data in r["heard"]:
                tok = data.rpartition(" ")[2]
                if tok.isdigit():
                    heard.setdefault(int(tok), t)
            woken = {tok: t for t, tok in r["woken"]}
            for (t_ask, t_got, t_rel, token), rel in zip(r["holds"], r["releases"], strict=True):
                prof.hold.append(t_rel - t_got)
                releases.append(rel)
                if token in woken:
                    grants.append((token, "handed", t_ask, heard.get(token), woken[token], t_got))
                else:
                    grants.append((token, "direct", t_ask, None, None, t_got))
                    prof.direct += 1
        releases.sort()
        grants.sort()
        unpaired = list(releases)
        pairs = []  # (sent, reply, heard, woken, returned)
        for _, kind, asked, heard_t, woken_t, got in grants:
            if kind == "direct":
                earlier = [rel for rel in unpaired if rel[0] < asked]
                if earlier:
                    unpaired.remove(earlier[0])  # it granted nobody
                continue
            if not unpaired:
                break
            sent, reply = unpaired.pop(0)
            if sent >= last_start:
                break  # the tail: releases may find the queue empty
            if not sent < got:
                prof.unmatched += 1
                continue
            pairs.append((sent, reply, heard_t, woken_t, got))
        idle, _, _ = idle_per_grant(run.reports, run.limit)
        prof.idle.append(idle)
        paired = statistics.fmean(p[4] - p[0] for p in pairs) if pairs else 0.0
        if abs(paired - idle) > 0.25 * idle:
            prof.dropped_runs += 1  # the pairing slipped: keep the exact idle time only
            continue
        for sent, reply, heard_t, woken_t, got in pairs:
            prof.sent_to_reply.append(reply - sent)
            prof.gap.append(got - sent)
            if heard_t is not None:
                prof.sent_to_heard.append(heard_t - sent)
                prof.heard_to_woken.append(woken_t - heard_t)
            prof.woken_to_returned.append(got - woken_t)
    return prof


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}"


def churn_table(runs: list[Churn]) -> str:
    out = [
        "| run | grants | wall s | grants/s | share of max | most holders seen | "
        "grants over the limit | CPU used by other processes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, c in enumerate(runs, 1):
        out.append(
            f"| {i} | {c.grants} | {c.wall:.2f} | {c.rate:.0f} | {c.rate / c.maximum:.1%} | "
            f"{c.max_holders} (limit {c.limit}) | {c.over_limit} | {c.others:.0%} |"
        )
    rates = [c.rate for c in runs]
    mx = runs[0].maximum
    out.append(
        f"| median | | | {statistics.median(rates):.0f} | {statistics.median(rates) / mx:.1%} "
        f"| | {sum(c.over_limit for c in runs)} | |"
    )
    return "\n".join(out)


def profile_table(runs: list[Churn], prof: Profile) -> str:
    grants = sum(c.grants for c in runs)
    wall = sum(c.wall for c in runs)
    cycle = 2 * wall / grants  # each slot turns over once per cycle
    rows = [
        ("slot cycle (2 x wall / grants)", [cycle]),
        ("hold: wait_for_slot returned → release() (sleep 5 ms; INCR, DECR)", prof.hold),
        ("slot unheld per grant (exact, from the holds; one value per run)", prof.idle),
        ("hand-over gap: RELEASE sent → next wait_for_slot returned", prof.gap),
        ("  RELEASE sent → its reply at the releaser", prof.sent_to_reply),
        ("  RELEASE sent → grant read by the waiter's listener thread", prof.sent_to_heard),
        ("  listener thread → waiting thread woken", prof.heard_to_woken),
        ("  waiting thread woken → wait_for_slot returned", prof.woken_to_returned),
    ]
    out = ["| segment | n | mean µs | p50 µs | p90 µs | p99 µs |", "|---|---:|---:|---:|---:|---:|"]
    for label, xs in rows:
        if not xs:
            out.append(f"| {label} | 0 | - | - | - | - |")
            continue
        out.append(
            f"| {label} | {len(xs)} | {us(statistics.fmean(xs))} | {us(pct(xs, 50))} "
            f"| {us(pct(xs, 90))} | {us(pct(xs, 99))} |"
        )
    return "\n".join(out)


def cpu_lines(runs: list[Churn]) -> list[str]:
    grants = sum(c.grants for c in runs)
    per: dict[str, list[int]] = {}
    for c in runs:
        for r in c.reports:
            for name, (cpu, wait, slices) in r["threads"].items():
                kind = name if name in ("MainThread", "slot-grants", "slot-heartbeat") else "other"
                acc = per.setdefault(kind, [0, 0, 0])
                acc[0] += cpu
                acc[1] += wait
                acc[2] += slices
    workers_cpu = sum(r["cpu"] for c in runs for r in c.reports)
    nivcsw = sum(r["nivcsw"] for c in runs for r in c.reports)
    nvcsw = sum(r["nvcsw"] for c in runs for r in c.reports)
    redis_cpu = sum(c.redis_cpu for c in runs)
    redis_wait = sum(c.redis_wait for c in runs)
    busy = statistics.fmean(c.machine_busy for c in runs)
    imported = sorted({f"{r['reqpmd']} ({r['parser']} parser)" for c in runs for r in c.reports})
    lines = [
        f"workers ran reqpmd from {', '.join(imported)}",
        f"machine: {busy:.0%} of all CPUs busy during the runs "
        f"({os.cpu_count()} CPUs; 8 workers + redis-server)",
        f"redis-server: {us(redis_cpu / grants)} µs CPU per grant, "
        f"{us(redis_wait / grants)} µs per grant runnable but waiting for a CPU",
        f"workers: {us(workers_cpu / grants)} µs CPU per grant in all 8 "
        f"(getrusage); context switches per grant: {nvcsw / grants:.1f} voluntary, "
        f"{nivcsw / grants:.2f} involuntary (preempted)",
    ]
    for kind, (cpu, wait, slices) in sorted(per.items()):
        lines.append(
            f"  {kind} threads: {us(cpu / 1e9 / grants)} µs CPU per grant, "
            f"{us(wait / 1e9 / grants)} µs per grant waiting for a CPU, "
            f"{slices / grants:.1f} runs per grant"
        )
    cmds: dict[str, int] = {}
    for c in runs:
        for k, v in c.commands.items():
            cmds[k] = cmds.get(k, 0) + v
    # the bench's own, at the edges of each run: CONFIG RESETSTAT and two INFO cpu
    cmds.pop("config", None)
    cmds["info"] = cmds.get("info", 0) - 2 * len(runs)
    total = sum(cmds.values())
    shown = ", ".join(f"{k} {v / grants:.2f}" for k, v in sorted(cmds.items(), key=lambda x: -x[1]))
    lines.append(f"Redis commands per grant: {total / grants:.2f} ({shown})")
    return lines


# -- main -------------------------------------------------------------------------------


def churn_section(env: Env, args: argparse.Namespace) -> list[str]:
    """Every variant's runs interleaved (run 1 of each, then run 2 of each...), so the
    load of anything else on the machine falls on all of them alike."""
    variants = [parse_variant(v, args) for v in args.variant] or [parse_variant("", args)]
    runs: dict[str, list[Churn]] = {v.label: [] for v in variants}
    for i in range(args.churn_runs):
        for v in variants:
            log(f"churn run {i + 1} of {args.churn_runs}, {v.label}: 8 x {args.per_process}")
            runs[v.label].append(bench_churn(env, i, v, args.per_process))
    mx = 2 / 0.005
    out = [
        f"2. Contended throughput: 8 processes, limit 2, hold 5 ms (maximum {mx:.0f} "
        f"grants/s), {args.churn_runs} runs of {8 * args.per_process} grants"
        + (" per variant, interleaved" if len(variants) > 1 else ""),
        "",
    ]
    if len(variants) > 1:
        out += [summary_table(variants, runs), ""]
    first = runs[variants[0].label]
    rate = statistics.median(c.rate for c in first)
    figures.record(
        args.figures,
        5,
        f"contended throughput: 8 processes, limit 2, hold 5 ms, as a share of the maximum "
        f"({mx:.0f} grants/s)",
        [("share of the maximum", 100 * rate / mx, "%"), ("grants", rate, "/s")],
        ">= 90 % of the physical maximum",
        rate / mx >= 0.9,
        bench="queue",
        quick=args.quick,
        note=f"median of {len(first)} run{'s' if len(first) != 1 else ''} of "
        f"{8 * args.per_process} grants" + (f" ({variants[0].label})" if len(variants) > 1 else ""),
    )
    for v in variants:
        rs = runs[v.label]
        prof = profile(rs)
        share = statistics.median(c.rate for c in rs) / mx
        out += [
            f"{v.label}: {v.describe()}",
            "",
            churn_table(rs),
            "",
            f"share of the maximum: {share:.1%} (median of the runs) -> target >= 90%: "
            f"{'MET' if share >= 0.9 else 'NOT MET'}",
            "",
            f"Where a slot's cycle goes ({len(prof.gap)} hand-overs matched in the steady "
            f"state; {prof.unmatched} not matched, {prof.direct} grants answered by ACQUIRE, "
            f"{prof.dropped_runs} runs left out whose pairing disagreed with their idle time):",
            "",
            profile_table(rs, prof),
            "",
            *cpu_lines(rs),
            "",
        ]
    return out


def summary_table(variants: list[Variant], runs: dict[str, list[Churn]]) -> str:
    out = [
        "| variant | grants/s median (runs) | share of max | slot unheld per grant µs | "
        "hand-over gap p50 µs | "
        "→ listener p50 | → woken p50 | → returned p50 | hold mean µs | "
        "CPU per grant µs: workers / redis | grants over limit | others' CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for v in variants:
        rs = runs[v.label]
        prof = profile(rs)
        rates = sorted(c.rate for c in rs)
        grants = sum(c.grants for c in rs)
        workers_cpu = sum(r["cpu"] for c in rs for r in c.reports) / grants
        redis_cpu = sum(c.redis_cpu for c in rs) / grants

        def p50(xs: list[float]) -> str:
            return us(pct(xs, 50)) if xs else "-"

        each = ", ".join(f"{r:.0f}" for r in rates)
        share = statistics.median(rates) / rs[0].maximum
        out.append(
            f"| {v.label} | {statistics.median(rates):.0f} ({each}) | {share:.1%} "
            f"| {us(statistics.fmean(prof.idle))} | {p50(prof.gap)} "
            f"| {p50(prof.sent_to_heard)} | {p50(prof.heard_to_woken)} "
            f"| {p50(prof.woken_to_returned)} | {us(statistics.fmean(prof.hold))} "
            f"| {us(workers_cpu)} / {us(redis_cpu)} | {sum(c.over_limit for c in rs)} "
            f"| {statistics.median(c.others for c in rs):.0%} |"
        )
    return "\n".join(out)


@dataclass
class Env:
    url: str
    client: redis.Redis
    workers: Workers
    rng: random.Random
    server_pid: int


def run(args: argparse.Namespace, server: RedisServer, workers: Workers) -> None:
    began = time.monotonic()
    log(f"starting redis-server ({server.binary}) in {server.directory}")
    server.start()
    assert server.process is not None
    client = server.client()
    env = Env(server.url, client, workers, random.Random(args.seed), server.process.pid)
    facts = machine_facts(server, client)
    facts.append(("reqpmd", str(Path(reqpmd.__file__).parent)))

    queue_out: list[str] = []
    if args.only in ("", "queue"):
        queues, seed = bench_queue(env, args)
        record_queue_figure(args, queues)
        queue_out = [
            f"1. Grant cost against queue length ({args.rounds} hand-overs per N after "
            f"{args.warmup} warm-up; seed: {args.seed_rounds} hand-overs of a lone poller)",
            "",
            queue_table(queues, seed),
            "",
            "* the seed keeps no queue: N pollers race for each free slot (any of them may "
            "win, none is next); its hand-over is a lone poller's, 0-500 ms, whatever N is.",
            *queue_verdict(queues),
        ]
    churn_out: list[str] = []
    if args.only in ("", "churn"):
        churn_out = churn_section(env, args)
    client.close()

    mode = "quick" if args.quick else "full"
    print(f"reqpm queue benchmark ({mode} run, {time.monotonic() - began:.0f} s)")
    print(f"  {'date:':14} {time.strftime('%Y-%m-%d %H:%M %Z')}")
    for key, value in facts:
        print(f"  {key + ':':14} {value}")
    for block in (queue_out, churn_out):
        if block:
            print()
            print("\n".join(block))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a smoke test (~30 s)")
    ap.add_argument("--only", choices=("queue", "churn"), default="", help="one figure only")
    ap.add_argument("--rounds", type=int, default=0, help="hand-overs per queue length")
    ap.add_argument("--warmup", type=int, default=0, help="unrecorded hand-overs per N first")
    ap.add_argument("--seed-rounds", type=int, default=0, help="hand-overs of the seed's poller")
    ap.add_argument("--refresh-calls", type=int, default=0, help="safety polls timed per N")
    ap.add_argument("--churn-runs", type=int, default=0, help="contended runs")
    ap.add_argument("--per-process", type=int, default=50, help="grants per process per run")
    ap.add_argument(
        "--switch-interval", type=float, default=0.0, help="sys.setswitchinterval in workers"
    )
    ap.add_argument(
        "--check",
        choices=("redis", "timestamps"),
        default="redis",
        help="churn holders counted with INCR/DECR while held (as limiter_bench), or "
        "afterwards from the timestamps (no Redis call in the hold)",
    )
    ap.add_argument(
        "--pause-after-release",
        type=float,
        default=0.0,
        help="diagnostic: churn workers wait this long before queueing again",
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=[dir=DIR][,si=S][,pause=S][,check=redis|timestamps]",
        help="churn: run this variant too (repeatable; runs interleaved); dir: a directory "
        "holding a patched reqpmd package",
    )
    ap.add_argument("--seed", type=int, default=1, help="seed of the random delays")
    figures.add_option(ap)
    args = ap.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (30 if quick else 200)
    args.warmup = args.warmup or (5 if quick else 20)
    args.seed_rounds = args.seed_rounds or (6 if quick else 30)
    args.refresh_calls = args.refresh_calls or (500 if quick else 3000)
    args.churn_runs = args.churn_runs or (2 if quick else 5)

    return run_with_workers("rqq", lambda server, workers: run(args, server, workers), log)


if __name__ == "__main__":
    sys.exit(main())
