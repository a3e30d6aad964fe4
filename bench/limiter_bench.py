#!/usr/bin/env python3
"""Benchmark: reqpm's BuildConcurrencyLimiter against the seed's polling SET limiter.

Run from the repository root (``./dev bench`` does the same):

    python bench/limiter_bench.py [--quick] [--markdown]

One private redis-server (Unix socket, no persistence, in a short temp dir under /tmp)
serves every scenario of both implementations; it and every worker process are stopped
at the end, also on Ctrl-C, SIGTERM or an error. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as MPEvent
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.machine import cpu_model, redis_server_version  # noqa: E402
from bench.scratch import run_with_workers  # noqa: E402
from bench.workers import (  # noqa: E402
    Workers,
    child_init,
    expect,
    report_error,
)
from reqpmd.concurrency import BuildConcurrencyLimiter  # noqa: E402
from reqpmd.slots import keys  # noqa: E402
from reqpmd.slots.connection import connect  # noqa: E402
from reqpmd.slots.server import RedisServer  # noqa: E402

REQPM = "reqpm"
BASELINE = "baseline"
KINDS = (REQPM, BASELINE)
LEASE_TTL = 60


# -- the two implementations ---------------------------------------------------------


class SetLimiter:
    """The seed's limiter, rebuilt here for comparison only: do not use it elsewhere.

    A Redis SET holds the names of running builds. acquire checks SCARD and, when the
    count is under the limit, SADDs its name; otherwise it sleeps 0.5 s and checks again.
    The check and the add are separate commands (not atomic), so two acquirers can both
    see room and both get in. The whole set expires 7200 s after the last SADD, so a
    crashed holder pins its slot for up to two hours. release is SREM.
    """

    POLL_INTERVAL = 0.5
    SET_TTL = 7200

    def __init__(self, client: redis.Redis, max_concurrent: int, key: str) -> None:
        self.redis = client
        self.max_concurrent = max_concurrent
        self.key = key

    def try_acquire(self, name: str) -> bool:
        if int(self.redis.scard(self.key)) < self.max_concurrent:
            # SADD and EXPIRE share one round trip (a plain pipeline, not MULTI): the
            # cheapest faithful reading of the seed, so the comparison favours it.
            pipe = self.redis.pipeline(transaction=False)
            pipe.sadd(self.key, name)
            pipe.expire(self.key, self.SET_TTL)
            pipe.execute()
            return True
        return False

    def acquire(
        self, name: str, timeout: float = 300, on_wait: Callable[[], None] | None = None
    ) -> None:
        """Poll until admitted. ``on_wait`` (bench instrumentation) runs once, right
        after the first check found no room."""
        deadline = time.monotonic() + timeout
        while not self.try_acquire(name):
            if on_wait is not None:
                on_wait()
                on_wait = None
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no build slot for {name!r} after {timeout:g}s")
            time.sleep(self.POLL_INTERVAL)

    def release(self, name: str) -> None:
        self.redis.srem(self.key, name)


class Impl(Protocol):
    def try_acquire(self, name: str) -> bool: ...

    def acquire(self, name: str, on_wait: Callable[[], None] | None = None) -> None: ...

    def release(self, name: str) -> None: ...


class ReqpmImpl:
    def __init__(self, client: redis.Redis, max_concurrent: int, space: str) -> None:
        self.limiter = BuildConcurrencyLimiter(
            client, max_concurrent=max_concurrent, namespace=space, lease_ttl=LEASE_TTL
        )

    def try_acquire(self, name: str) -> bool:
        return self.limiter.try_acquire(name) is not None

    def acquire(self, name: str, on_wait: Callable[[], None] | None = None) -> None:
        self.limiter.wait_for_slot(name, timeout=120)

    def release(self, name: str) -> None:
        self.limiter.release(name)


class BaselineImpl:
    def __init__(self, client: redis.Redis, max_concurrent: int, space: str) -> None:
        self.limiter = SetLimiter(client, max_concurrent, space)

    def try_acquire(self, name: str) -> bool:
        return self.limiter.try_acquire(name)

    def acquire(self, name: str, on_wait: Callable[[], None] | None = None) -> None:
        self.limiter.acquire(name, timeout=120, on_wait=on_wait)

    def release(self, name: str) -> None:
        self.limiter.release(name)


def make_impl(kind: str, client: redis.Redis, max_concurrent: int, space: str) -> Impl:
    if kind == REQPM:
        return ReqpmImpl(client, max_concurrent, space)
    return BaselineImpl(client, max_concurrent, space)


def space_for(kind: str, scenario: str) -> str:
    """reqpm namespace or baseline SET key of one scenario (kept apart per scenario)."""
    if kind == REQPM:
        return f"bench-{scenario}"
    return f"bench:baseline:{scenario}:active_builds"


def prepare(kind: str, client: redis.Redis, space: str) -> None:
    """Fresh state for a scenario. reqpm: end the restart grace of the new namespace now
    (nothing can hold a slot on a server we just started), as tests/conftest.py does."""
    if kind == REQPM:
        BuildConcurrencyLimiter(client, namespace=space).declare_no_survivors()
    else:
        client.delete(space)


# -- worker processes (started with the 'spawn' method) -------------------------------


def _handover_waiter(kind: str, url: str, space: str, parent_pid: int, conn: Connection) -> None:
    """Scenario 1, waiter side: on ("go", name) block in acquire, then report
    ("granted", t_granted) with t_granted read right after acquire returned."""
    child_init(parent_pid)
    client = connect(url)
    try:
        impl = make_impl(kind, client, 1, space)

        def waiting() -> None:
            conn.send(("waiting",))

        conn.send(("ready",))
        while True:
            msg = conn.recv()
            if msg[0] != "go":
                break
            impl.acquire(msg[1], on_wait=waiting)
            t_granted = time.monotonic()
            impl.release(msg[1])
            conn.send(("granted", t_granted))
    except Exception as exc:
        report_error(conn, exc)
    finally:
        client.close()


def _churn_worker(
    kind: str,
    url: str,
    space: str,
    max_concurrent: int,
    count: int,
    hold: float,
    counter_key: str,
    index: int,
    start: MPEvent,
    parent_pid: int,
    conn: Connection,
) -> None:
    """Scenario 3: acquire -> INCR counter (note the max) -> hold -> DECR -> release."""
    child_init(parent_pid)
    client = connect(url)
    try:
        impl = make_impl(kind, client, max_concurrent, space)
        conn.send(("ready",))
        if not start.wait(120):
            raise RuntimeError("start signal never came")
        max_seen = over = 0
        waits: list[float] = []
        for k in range(count):
            name = f"w{index}-{k}"
            t_asked = time.monotonic()
            impl.acquire(name)
            waits.append(time.monotonic() - t_asked)
            holders = int(client.incr(counter_key))
            max_seen = max(max_seen, holders)
            over += holders > max_concurrent
            time.sleep(hold)
            client.decr(counter_key)
            impl.release(name)
        conn.send(("done", time.monotonic(), max_seen, over, waits))
    except Exception as exc:
        report_error(conn, exc)
    finally:
        client.close()


def _subscriber(url: str, channel: str, parent_pid: int, conn: Connection) -> None:
    """Scenario 4: report the monotonic time each message arrives, read the same way
    reqpm's waiter reads grants (PubSub.get_message with a timeout)."""
    child_init(parent_pid)
    client = connect(url)
    try:
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        pubsub.subscribe(channel)
        while pubsub.get_message(timeout=1.0) is None:
            pass
        conn.send(("ready",))
        while True:
            msg = pubsub.get_message(timeout=1.0)
            if msg is None or msg.get("type") != "message":
                continue
            t_received = time.monotonic()
            if msg["data"] == b"quit":
                break
            conn.send(("received", t_received))
        pubsub.close()
    except Exception as exc:
        report_error(conn, exc)
    finally:
        client.close()


# -- the parent's side ------------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass
class Env:
    url: str
    client: redis.Redis
    workers: Workers
    rng: random.Random


def bench_handover(env: Env, kind: str, rounds: int) -> list[float]:
    """Scenario 1: seconds from the holder's release() call to the waiter's grant."""
    space = space_for(kind, "handover")
    prepare(kind, env.client, space)
    conn, proc = env.workers.spawn(_handover_waiter, kind, env.url, space)
    expect(conn, "ready", 60)
    holder = make_impl(kind, env.client, 1, space)
    channel = keys.slot_keys(space).grants if kind == REQPM else ""
    latencies: list[float] = []
    for i in range(rounds):
        holder_name, waiter_name = f"holder-{i}", f"waiter-{i}"
        if not holder.try_acquire(holder_name):
            raise RuntimeError(f"{kind}: holder found the slot taken in round {i}")
        conn.send(("go", waiter_name))
        if isinstance(holder, ReqpmImpl):
            _wait_queued(env.client, holder.limiter, conn, waiter_name, channel)
            # Queued and subscribed; a few ms more so it sits in get_message().
            time.sleep(env.rng.uniform(0.005, 0.025))
        else:
            expect(conn, "waiting", 30)
            # Anywhere within the waiter's 0.5 s sleep: a random polling phase.
            time.sleep(env.rng.uniform(0.0, SetLimiter.POLL_INTERVAL))
        t_release = time.monotonic()
        holder.release(holder_name)
        _, t_granted = expect(conn, "granted", 30)
        latencies.append(t_granted - t_release)
    conn.send(("quit",))
    env.workers.finish(proc)
    return latencies


def _wait_queued(
    client: redis.Redis,
    limiter: BuildConcurrencyLimiter,
    conn: Connection,
    name: str,
    channel: str,
) -> None:
    """Until ``name`` is in reqpm's queue and someone listens on the grants channel."""
    deadline = time.monotonic() + 30
    while True:
        if conn.poll():
            expect(conn, "waiting", 0)  # raises: an error, or a grant before release
        if any(w.name == name for w in limiter.get_waiting()):
            subscribed = client.pubsub_numsub(channel)
            if subscribed and int(subscribed[0][1]) >= 1:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"waiter {name!r} never showed up in the queue")
        time.sleep(0.0005)


def bench_roundtrip(env: Env, kind: str, iterations: int) -> list[float]:
    """Scenario 2: seconds per uncontended try_acquire + release, in one process."""
    space = space_for(kind, "roundtrip")
    prepare(kind, env.client, space)
    impl = make_impl(kind, env.client, 1, space)
    for _ in range(min(50, iterations)):  # warm-up: script cache, connections
        impl.try_acquire("warm")
        impl.release("warm")
    samples: list[float] = []
    for i in range(iterations):
        t0 = time.perf_counter()
        ok = impl.try_acquire(f"rt-{i}")
        impl.release(f"rt-{i}")
        samples.append(time.perf_counter() - t0)
        if not ok:
            raise RuntimeError(f"{kind}: uncontended try_acquire failed")
    return samples


@dataclass
class Churn:
    processes: int
    limit: int
    per_process: int
    hold: float
    wall: float = 0.0
    max_holders: int = 0
    over_limit: int = 0  # grants that found more than `limit` holders (itself included)
    waits: list[float] = field(default_factory=list)  # seconds each acquire blocked

    @property
    def grants(self) -> int:
        return self.processes * self.per_process

    @property
    def rate(self) -> float:
        return self.grants / self.wall if self.wall > 0 else 0.0


def bench_churn(env: Env, kind: str, per_process: int, processes: int = 8) -> Churn:
    """Scenario 3: 8 processes share 2 slots; grants per second and over-admission."""
    result = Churn(processes=processes, limit=2, per_process=per_process, hold=0.005)
    space = space_for(kind, "churn")
    counter = f"bench:{kind}:churn:holders"
    prepare(kind, env.client, space)
    env.client.delete(counter)
    start = env.workers.event()
    started = [
        env.workers.spawn(
            _churn_worker,
            kind,
            env.url,
            space,
            result.limit,
            per_process,
            result.hold,
            counter,
            index,
            start,
        )
        for index in range(processes)
    ]
    for conn, _ in started:
        expect(conn, "ready", 60)
    t_start = time.monotonic()
    start.set()
    ends: list[float] = []
    budget = 120 + per_process * processes * 1.0  # generous: the baseline polls
    for conn, _ in started:
        _, t_end, max_seen, over, waits = expect(
            conn, "done", max(1.0, t_start + budget - time.monotonic())
        )
        ends.append(t_end)
        result.max_holders = max(result.max_holders, int(max_seen))
        result.over_limit += int(over)
        result.waits.extend(waits)
    result.wall = max(ends) - t_start
    for _, proc in started:
        env.workers.finish(proc)
    return result


@dataclass
class Reference:
    delivery: list[float] = field(default_factory=list)  # PUBLISH call -> subscriber
    ping: list[float] = field(default_factory=list)  # PING round trips, back to back
    cold_ping: list[float] = field(default_factory=list)  # PING after 5-25 ms idle


def bench_reference(env: Env, deliveries: int, pings: int) -> Reference:
    """Scenario 4: one pub/sub delivery (process to process) and one PING round trip."""
    ref = Reference()
    channel = "bench:reference"
    conn, proc = env.workers.spawn(_subscriber, env.url, channel)
    expect(conn, "ready", 60)
    for _ in range(min(20, deliveries)):  # warm-up
        env.client.publish(channel, b"x")
        expect(conn, "received", 10)
    for _ in range(deliveries):
        time.sleep(env.rng.uniform(0.005, 0.025))  # the subscriber sits in get_message()
        t_sent = time.monotonic()
        env.client.publish(channel, b"x")
        _, t_received = expect(conn, "received", 10)
        ref.delivery.append(t_received - t_sent)
    env.client.publish(channel, b"quit")
    env.workers.finish(proc)
    for _ in range(min(100, pings)):
        env.client.ping()
    for _ in range(pings):
        t0 = time.perf_counter()
        env.client.ping()
        ref.ping.append(time.perf_counter() - t0)
    for _ in range(deliveries):  # as the deliveries: after an idle pause, like a hand-over
        time.sleep(env.rng.uniform(0.005, 0.025))
        t0 = time.perf_counter()
        env.client.ping()
        ref.cold_ping.append(time.perf_counter() - t0)
    return ref


# -- statistics and the report ----------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Percentile with linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def ms(seconds: float) -> str:
    value = seconds * 1000
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def ratio(num: float, den: float) -> str:
    if den <= 0:
        return "-"
    r = num / den
    return f"{r:.0f}x" if r >= 100 else f"{r:.1f}x"


def machine_facts(server: RedisServer, client: redis.Redis) -> list[tuple[str, str]]:
    cpu = cpu_model()
    version = redis_server_version(server.binary, full=True)
    served = client.info("server").get("redis_version", "?")
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "pure Python"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return [
        ("nproc", f"{usable} usable of {os.cpu_count()} ({cpu})"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("redis-py", f"{redis.__version__} ({parser} parser)"),
        ("redis-server", f"{version} [running: {served}; {server.binary}]"),
        ("transport", f"Unix socket {server.socket_path}, persistence off"),
        ("load average", f"{load} (at start)"),
    ]


@dataclass
class Results:
    handover: dict[str, list[float]]
    roundtrip: dict[str, list[float]]
    churn: dict[str, Churn]
    ref: Reference


def build_rows(res: Results) -> tuple[list[tuple[str, ...]], list[str]]:
    """Table rows (a row of one cell is a section heading) and the verdict lines."""
    hr, hb = res.handover[REQPM], res.handover[BASELINE]
    rr, rb = res.roundtrip[REQPM], res.roundtrip[BASELINE]
    cr, cb = res.churn[REQPM], res.churn[BASELINE]
    rows: list[tuple[str, ...]] = [
        (f"1. Hand-over latency, max_concurrent=1 (rounds: reqpm {len(hr)}, baseline {len(hb)})",),
    ]
    for label, p in (("p50", 50.0), ("p95", 95.0), ("p99", 99.0)):
        a, b = pct(hr, p), pct(hb, p)
        rows.append((f"   {label} (ms)", ms(a), ms(b), ratio(b, a)))
    rows.append(("   mean (ms)", ms(mean(hr)), ms(mean(hb)), ratio(mean(hb), mean(hr))))
    rows.append(("   max (ms)", ms(max(hr)), ms(max(hb)), ""))
    rows.append((f"2. Uncontended try_acquire + release, one process ({len(rr)} iterations)",))
    rows.append(("   mean (us)", us(mean(rr)), us(mean(rb)), ratio(mean(rb), mean(rr))))
    rows.append(("   p50 (us)", us(pct(rr, 50)), us(pct(rb, 50)), ratio(pct(rb, 50), pct(rr, 50))))
    rows.append(("   p99 (us)", us(pct(rr, 99)), us(pct(rb, 99)), ratio(pct(rb, 99), pct(rr, 99))))
    rows.append(
        (
            f"3. Contended: {cr.processes} processes, max_concurrent={cr.limit}, "
            f"hold {cr.hold * 1000:g} ms",
        )
    )
    rows.append(("   grants", str(cr.grants), str(cb.grants), ""))
    rows.append(("   wall time (s)", f"{cr.wall:.2f}", f"{cb.wall:.2f}", ""))
    rows.append(("   grants per second", f"{cr.rate:.1f}", f"{cb.rate:.1f}", ""))
    rows.append(
        (
            f"   max holders observed (limit {cr.limit})",
            str(cr.max_holders),
            str(cb.max_holders),
            "",
        )
    )
    for label, p in (("p50", 50.0), ("p95", 95.0), ("max", 100.0)):
        rows.append(
            (
                f"   time blocked in acquire, {label} (ms)",
                ms(pct(cr.waits, p)),
                ms(pct(cb.waits, p)),
                "",
            )
        )
    rows.append(
        (
            "   grants that found > limit holders",
            str(cr.over_limit),
            str(cb.over_limit),
            "",
        )
    )
    ref = res.ref
    d50, ping = pct(ref.delivery, 50), mean(ref.ping)
    reference = d50 + ping
    rows.append((f"4. Reference ({len(ref.delivery)} deliveries, {len(ref.ping)} PINGs)",))
    rows.append(("   pub/sub delivery p50 (ms)", ms(d50), "", ""))
    rows.append(("   pub/sub delivery p95 (ms)", ms(pct(ref.delivery, 95)), "", ""))
    rows.append(("   PING round trip mean, back to back (ms)", ms(ping), "", ""))
    rows.append(
        ("   PING round trip p50 after 5-25 ms idle (ms)", ms(pct(ref.cold_ping, 50)), "", "")
    )
    rows.append(("   delivery p50 + PING mean (ms)", ms(reference), "", ""))
    rows.append(("   hand-over p50 / reference", ratio(pct(hr, 50), reference), "", ""))
    rows.append(("   hand-over p95 / reference", ratio(pct(hr, 95), reference), "", ""))

    fast = pct(hr, 50) / reference
    speedup50, speedup95 = pct(hb, 50) / pct(hr, 50), pct(hb, 95) / pct(hr, 95)
    verdicts = [
        f"reqpm hand-over p50 = {fast:.2f} x (one pub/sub delivery + one round trip) "
        f"-> target <= 2x: {'MET' if fast <= 2 else 'NOT MET'}",
        f"baseline/reqpm hand-over: p50 {speedup50:.0f}x, p95 {speedup95:.0f}x "
        f"-> target >= 50x: {'MET' if min(speedup50, speedup95) >= 50 else 'NOT MET'}",
        f"over-admission (limit {cr.limit}): reqpm max {cr.max_holders} holders, "
        f"{cr.over_limit}/{cr.grants} grants over; baseline max {cb.max_holders} holders, "
        f"{cb.over_limit}/{cb.grants} grants over",
        f"contended throughput: reqpm {ratio(cr.rate, cb.rate)} the baseline's grants/s; "
        f"longest block in acquire: reqpm {ms(max(cr.waits))} ms, "
        f"baseline {ms(max(cb.waits))} ms",
    ]
    return rows, verdicts


def text_table(rows: list[tuple[str, ...]]) -> str:
    header = ("metric", REQPM, "baseline (SET+poll)", "baseline/reqpm")
    full = [r for r in rows if len(r) > 1] + [header]
    widths = [max(len(r[i]) for r in full) for i in range(4)]

    def line(r: tuple[str, ...]) -> str:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 4)]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    out = [line(header), rule]
    for r in rows:
        out.append(r[0] if len(r) == 1 else line(r))
    out.append(rule)
    return "\n".join(out)


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    out = [
        "| metric | reqpm | baseline (SET+poll) | baseline/reqpm |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        if len(r) == 1:
            out.append(f"| **{r[0]}** | | | |")
        else:
            out.append(f"| {r[0].strip()} | {r[1]} | {r[2]} | {r[3]} |")
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    handover: dict[str, int]
    roundtrip: int
    churn: dict[str, int]
    deliveries: int
    pings: int


def plan_for(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan({REQPM: 30, BASELINE: 8}, 200, {REQPM: 10, BASELINE: 3}, 50, 200)
    else:
        plan = Plan({REQPM: 200, BASELINE: 40}, 1000, {REQPM: 50, BASELINE: 10}, 200, 1000)
    if args.rounds:
        plan.handover[REQPM] = args.rounds
    if args.baseline_rounds:
        plan.handover[BASELINE] = args.baseline_rounds
    return plan


def run(args: argparse.Namespace, server: RedisServer, workers: Workers) -> None:
    plan = plan_for(args)
    began = time.monotonic()
    log(f"starting redis-server ({server.binary}) in {server.directory}")
    server.start()
    client = server.client()
    env = Env(server.url, client, workers, random.Random(args.seed))
    facts = machine_facts(server, client)

    handover: dict[str, list[float]] = {}
    roundtrip: dict[str, list[float]] = {}
    churn: dict[str, Churn] = {}
    for kind in KINDS:
        log(f"[1/4] hand-over latency, {kind}: {plan.handover[kind]} rounds")
        handover[kind] = bench_handover(env, kind, plan.handover[kind])
    for kind in KINDS:
        log(f"[2/4] uncontended round trip, {kind}: {plan.roundtrip} iterations")
        roundtrip[kind] = bench_roundtrip(env, kind, plan.roundtrip)
    for kind in KINDS:
        log(f"[3/4] contended throughput, {kind}: 8 processes x {plan.churn[kind]} grants")
        churn[kind] = bench_churn(env, kind, plan.churn[kind])
    log(f"[4/4] reference: {plan.deliveries} pub/sub deliveries, {plan.pings} PINGs")
    ref = bench_reference(env, plan.deliveries, plan.pings)
    client.close()

    rows, verdicts = build_rows(Results(handover, roundtrip, churn, ref))
    mode = "quick" if args.quick else "full"
    print(
        f"reqpm limiter benchmark ({mode} run, {time.monotonic() - began:.0f} s, seed {args.seed})"
    )
    for key, value in facts:
        print(f"  {key + ':':14} {value}")
    print()
    print(text_table(rows))
    print("baseline/reqpm = the baseline's time divided by reqpm's (> 1: reqpm is faster)")
    print()
    for verdict in verdicts:
        print(verdict)
    if args.markdown:
        print()
        print(markdown_table(rows))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="few rounds: a smoke test (~30 s)")
    ap.add_argument("--markdown", action="store_true", help="also print a markdown table")
    ap.add_argument("--rounds", type=int, default=0, help="reqpm hand-over rounds")
    ap.add_argument("--baseline-rounds", type=int, default=0, help="baseline hand-over rounds")
    ap.add_argument("--seed", type=int, default=1, help="seed of the random delays")
    args = ap.parse_args(argv)

    return run_with_workers("rqb", lambda server, workers: run(args, server, workers), log)


if __name__ == "__main__":
    sys.exit(main())
