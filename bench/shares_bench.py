#!/usr/bin/env python3
"""Benchmark: the cost of one slot grant against the number of waiting builds and of
groups (projects), reqpm's fair-share grant beside a naive per-group-cap grant.

Run from the repository root (``./dev bench shares`` does the same):

    python bench/shares_bench.py [--quick] [--rounds R] [--cycles C] [--limit L]

One private redis-server (Unix socket, no persistence, in a temp dir under /tmp) serves
both implementations, each in its own namespace; it is stopped at the end. For every
size (N waiters over P groups; every 3rd group capped at 1, weights 1-3) both start from
the same burst: the capped groups' waiters first, each group's batch together, then the
other groups'. The first L arrivals the caps allow are granted as they come, so the
cluster limit L is held and N wait. Up to L/2 of the holders are long builds of capped
groups, held for the whole run: those groups stay at their cap (parked, for reqpm) with
their backlog at the head of the queue. Each grant cycle releases the oldest of the
other holders (timed: the release runs the grant) and, untimed, queues one new waiter
in the group just granted, so N and every group's backlog stay constant. Every row is
set up first; each round then runs every row in turn. Client times are the release's
round trip; server times are the script's own run time from INFO commandstats (no
socket, no client). See bench/README.md.
"""

from __future__ import annotations

import argparse
import collections
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.figures import nearest_rank  # noqa: E402
from bench.scratch import scratch_redis  # noqa: E402
from reqpmd.concurrency import BuildConcurrencyLimiter  # noqa: E402
from reqpmd.slots import keys  # noqa: E402
from reqpmd.slots.connection import text  # noqa: E402
from reqpmd.slots.limiter import Share  # noqa: E402
from reqpmd.slots.server import RedisServer  # noqa: E402

SIZES = ((100, 1), (1000, 10), (10000, 1), (10000, 10), (10000, 100), (10000, 1000))
LEASE_TTL = 3600  # seconds: no holder or waiter lease runs out during a run
BATCH = 100  # waiters the baseline reads per ZRANGE

# BASELINE, for comparison only: the obvious per-group caps without reqpm's design (no
# per-group queues, no ready/parked sets, no weights). One FIFO queue for everyone; a
# free slot goes to the first waiter from the head whose group is under its cap. The
# queue is read BATCH waiters at a time (not ZRANGE 0 -1, which would cost O(N) even
# when the head waiter is granted) and a group found at its cap is remembered for the
# rest of the scan, so a grant costs what the waiters skipped at the head cost.
BASELINE_GRANT = f"""
-- KEYS: 1 waiters ZSET name -> arrival, 2 waiter_group HASH name -> group,
--       3 holders HASH name -> group, 4 held HASH group -> holders,
--       5 caps HASH group -> cap (absent: none), 6 seq counter, 7 grants channel
-- ARGV: 1 limit, 2 holder to release ('' none), 3 waiter to queue ('' none), 4 its group
-- Returns {{first name granted or '', waiters skipped at the head}}
local W, WG, H, HELD, CAPS, SEQ, CHAN = unpack(KEYS)
local limit, gone, name, group = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
if gone ~= '' then
  local g = redis.call('HGET', H, gone)
  if g then
    redis.call('HDEL', H, gone)
    redis.call('HINCRBY', HELD, g, -1)
  end
end
if name ~= '' then
  redis.call('ZADD', W, redis.call('INCR', SEQ), name)
  redis.call('HSET', WG, name, group)
end
local granted, skipped = '', 0
while redis.call('HLEN', H) < limit do
  local found, at_cap, pos = nil, {{}}, 0
  while not found do
    local batch = redis.call('ZRANGE', W, pos, pos + {BATCH - 1:d})
    if #batch == 0 then break end
    for _, w in ipairs(batch) do
      local g = redis.call('HGET', WG, w)
      if not at_cap[g] then
        local cap = tonumber(redis.call('HGET', CAPS, g))
        if cap and (tonumber(redis.call('HGET', HELD, g)) or 0) >= cap then
          at_cap[g] = true
        else
          found = w
          break
        end
      end
      skipped = skipped + 1
    end
    pos = pos + {BATCH:d}
  end
  if not found then break end
  local g = redis.call('HGET', WG, found)
  redis.call('ZREM', W, found)
  redis.call('HDEL', WG, found)
  redis.call('HSET', H, found, g)
  redis.call('HINCRBY', HELD, g, 1)
  redis.call('PUBLISH', CHAN, found)
  if granted == '' then granted = found end
end
return {{granted, skipped}}
"""


def log(msg: str) -> None:
    print(f"[shares-bench] {msg}", file=sys.stderr, flush=True)


# -- the two implementations -------------------------------------------------------------


class Side(Protocol):
    label: str
    client: redis.Redis
    state: str  # what ``stat`` counts

    def set_share(self, group: str, cap: int | None, weight: int) -> None: ...

    def queue(self, name: str, group: str) -> bool: ...

    def release(self, name: str) -> None: ...

    def granted(self, held: set[str]) -> list[str]: ...

    def stat(self) -> int: ...


class Reqpm:
    """BuildConcurrencyLimiter as reqpmd uses it; a release is ``force_release``."""

    label = "reqpm"
    state = "groups parked"

    def __init__(self, client: redis.Redis, space: str, limit: int) -> None:
        self.client = client
        self.lim = BuildConcurrencyLimiter(
            client, max_concurrent=limit, namespace=space, lease_ttl=LEASE_TTL, auto_renew=False
        )
        self.keys = keys.slot_keys(space)
        self.lim.declare_no_survivors()
        self.lim.set_cluster_limit(limit)
        client.script_load(self.lim._release.script)  # no NOSCRIPT retry in a timed call

    def set_share(self, group: str, cap: int | None, weight: int) -> None:
        self.lim.set_share(group, Share(max_concurrent=cap, weight=weight))

    def queue(self, name: str, group: str) -> bool:
        """Queue without blocking (a waiter's first step, as tests/test_shares.py does)."""
        info = self.lim._info_json({}, 0, group)
        attempt = self.lim._attempt(name, uuid.uuid4().hex, 0, info, try_only=False)
        return attempt.token is not None

    def release(self, name: str) -> None:
        if not self.lim.force_release(name):
            raise RuntimeError(f"reqpm: {name} was not held")

    def granted(self, held: set[str]) -> list[str]:
        now = {text(n) for n in self.client.zrange(self.keys.holders, 0, -1)}
        return sorted(now - held)

    def stat(self) -> int:
        return int(self.client.zcard(self.keys.parked))


class Baseline:
    """BASELINE_GRANT: one FIFO queue scanned from the head for a group under its cap."""

    label = "baseline"
    state = "waiters skipped"

    def __init__(self, client: redis.Redis, space: str, limit: int) -> None:
        self.limit = limit
        self.keys = [
            f"{{{space}}}:{k}" for k in ("waiters", "group", "holders", "held", "caps", "seq")
        ] + [f"{{{space}}}:grants"]
        self.script = client.register_script(BASELINE_GRANT)
        client.script_load(BASELINE_GRANT)
        self.client = client
        self.last: list[str] = []
        self.skipped = 0

    def _run(self, *args: Any) -> list[str]:
        reply = self.script(keys=self.keys, args=[self.limit, *args])
        self.skipped = int(reply[1])
        granted = text(reply[0])
        return [granted] if granted else []

    def set_share(self, group: str, cap: int | None, weight: int) -> None:
        if cap is not None:  # the baseline has no weights
            self.client.hset(self.keys[4], group, cap)

    def queue(self, name: str, group: str) -> bool:
        return bool(self._run("", name, group))

    def release(self, name: str) -> None:
        self.last = self._run(name, "", "")

    def granted(self, held: set[str]) -> list[str]:
        return self.last

    def stat(self) -> int:
        return self.skipped  # by the last release: read before the newcomer is queued


# -- one size --------------------------------------------------------------------------


def group_name(g: int) -> str:
    return f"p{g:04d}"


def group_of(waiter: str) -> str:
    return waiter.rsplit("-", 1)[0]


def shares_of(groups: int) -> dict[str, tuple[int | None, int]]:
    """Every 3rd group capped at 1 (none when there is one group), weights 1..3."""
    return {group_name(g): (1 if g % 3 == 2 else None, 1 + (g // 3) % 3) for g in range(groups)}


@dataclass
class Samples:
    client_us: list[float] = field(default_factory=list)
    server_us: list[int] = field(default_factory=list)
    round_p50: list[float] = field(default_factory=list)  # client p50 of each round
    state: list[int] = field(default_factory=list)  # Side.stat after each release
    odd: int = 0  # releases that did not grant exactly one waiter


class Run:
    """One implementation at one size: its holders in grant order, its backlog."""

    def __init__(self, side: Side, waiters: int, groups: int, limit: int) -> None:
        self.side = side
        self.client = side.client
        self.holders: collections.deque[str] = collections.deque()
        self.next_id: dict[str, int] = {}
        self.samples = Samples()
        shares = shares_of(groups)
        for g, (cap, weight) in shares.items():
            if cap is not None or weight != 1:
                side.set_share(g, cap, weight)
        # the burst: capped groups' batches first, then the rest, each batch together
        per_group = (waiters + limit) // groups
        order = sorted(shares, key=lambda g: (shares[g][0] is None, g))
        extra = waiters + limit - per_group * groups
        for i, g in enumerate(order):
            for _ in range(per_group + (i < extra)):
                name = self.new_name(g)
                if side.queue(name, g):
                    self.holders.append(name)
        if len(self.holders) != limit:
            raise RuntimeError(f"{side.label}: {len(self.holders)} holders after the burst")
        # long builds: up to half the slots stay with capped groups (at their cap) for
        # the whole run; the other holders turn over
        capped = {g for g, (cap, _) in shares.items() if cap is not None}
        self.pinned = set([h for h in self.holders if group_of(h) in capped][: limit // 2])
        self.holders = collections.deque(h for h in self.holders if h not in self.pinned)

    def new_name(self, group: str) -> str:
        k = self.next_id.get(group, 0)
        self.next_id[group] = k + 1
        return f"{group}-{k}"

    def cycle(self, sample: bool) -> None:
        name = self.holders.popleft()
        held = self.pinned.union(self.holders)
        if sample:
            self.client.config_resetstat()
        start = time.perf_counter_ns()
        self.side.release(name)
        elapsed = time.perf_counter_ns() - start
        if sample:
            # the script's own run time: no socket, no client (commands it calls inside
            # are counted in it and under their own names)
            stat = self.client.info("commandstats").get("cmdstat_evalsha", {})
            if stat.get("calls") != 1:
                raise RuntimeError(f"{self.side.label}: commandstats {stat} after a release")
            self.samples.server_us.append(int(stat["usec"]))
        new = self.side.granted(held)
        self.holders.extend(new)
        if sample:
            self.samples.client_us.append(elapsed / 1000)
            self.samples.state.append(self.side.stat())
            self.samples.odd += len(new) != 1
        for granted in new:  # keep the backlog: one newcomer in each group granted
            g = group_of(granted)
            if self.side.queue(self.new_name(g), g):
                raise RuntimeError(f"{self.side.label}: a newcomer was granted at once")

    def round(self, cycles: int) -> None:
        first = len(self.samples.client_us)
        for _ in range(cycles):
            self.cycle(sample=True)
        self.samples.round_p50.append(statistics.median(self.samples.client_us[first:]))


# -- statistics and output --------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    waiters: int
    groups: int
    label: str
    samples: Samples
    note: str


def us(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def table(rows: list[Row]) -> str:
    out = [
        "| waiters N | groups P | grant by | client p50 µs | client p99 µs | "
        "server p50 µs | server p99 µs | round p50s µs | state at the grants |",
        "|---:|---:|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        s = r.samples
        spread = f"{us(min(s.round_p50))}-{us(max(s.round_p50))}"
        odd = f"; {s.odd} releases did not grant one" if s.odd else ""
        out.append(
            f"| {r.waiters:,} | {r.groups:,} | {r.label} | {us(statistics.median(s.client_us))} "
            f"| {us(nearest_rank(s.client_us, 99))} | {us(statistics.median(s.server_us))} "
            f"| {us(nearest_rank(s.server_us, 99))} | {spread} | {r.note}{odd} |"
        )
    return "\n".join(out)


def flatness(rows: list[Row], label: str) -> str:
    mine = [r for r in rows if r.label == label]
    p50 = [statistics.median(r.samples.server_us) for r in mine]
    lo, hi = min(p50), max(p50)
    worst = mine[p50.index(hi)]
    return (
        f"{label}: server p50 from {us(lo)} to {us(hi)} µs over every size "
        f"(x{hi / lo:.2f}; highest at N={worst.waiters:,}, P={worst.groups:,})"
    )


# -- main -------------------------------------------------------------------------------


def bench(client: redis.Redis, args: argparse.Namespace) -> list[Row]:
    """Every size of both implementations set up side by side, then measured in turns:
    each round runs every row once, so drift and noise (another process on the machine)
    fall on all rows alike."""
    runs: list[tuple[int, int, Run]] = []
    for waiters, groups in SIZES:
        began = time.monotonic()
        for side in (
            Reqpm(client, f"shares-{waiters}x{groups}", args.limit),
            Baseline(client, f"baseline-{waiters}x{groups}", args.limit),
        ):
            runs.append((waiters, groups, Run(side, waiters, groups, args.limit)))
        log(f"N={waiters} P={groups}: set up in {time.monotonic() - began:.1f}s")
    began = time.monotonic()
    for _, _, r in runs:
        for _ in range(args.warmup):
            r.cycle(sample=False)
    for i in range(args.rounds):
        log(f"round {i + 1} of {args.rounds}")
        for _, _, r in runs:
            r.round(args.cycles)
    log(f"measured in {time.monotonic() - began:.1f}s")
    return [
        Row(
            waiters,
            groups,
            r.side.label,
            r.samples,
            f"{statistics.mean(r.samples.state):,.0f} {r.side.state} "
            f"(max {max(r.samples.state):,})",
        )
        for waiters, groups, r in runs
    ]


def run(args: argparse.Namespace, server: RedisServer) -> None:
    began = time.monotonic()
    log(f"starting redis-server ({server.binary}) in {server.directory}")
    server.start()
    client = server.client()
    version = client.info("server")["redis_version"]
    pings = []
    for _ in range(1000):
        start = time.perf_counter_ns()
        client.ping()
        pings.append((time.perf_counter_ns() - start) / 1000)
    rows = bench(client, args)
    client.close()

    mode = "quick" if args.quick else "full"
    print(
        f"grant cost vs waiters and groups ({mode} run, {time.monotonic() - began:.0f} s): "
        f"cluster limit {args.limit} held, {args.rounds} rounds x {args.cycles} "
        f"release+grant cycles per row after {args.warmup} warm-up cycles"
    )
    print(
        f"  Redis {version} on a Unix socket, Python {platform.python_version()}, "
        f"{platform.machine()}, {len(os.sched_getaffinity(0))} CPUs"
    )
    print("  every 3rd group capped at 1, weights 1-3; capped groups' waiters queued first")
    print()
    print(table(rows))
    print()
    print(
        "client: the release's round trip seen by redis-py; "
        "server: the script's run time (INFO commandstats)"
    )
    print("round p50s: lowest and highest client p50 of the rounds")
    print(f"reference: a PING round trip takes {us(statistics.median(pings))} µs at p50")
    for label in (Reqpm.label, Baseline.label):
        print(flatness(rows, label))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 50 cycles: a smoke test")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per implementation and size")
    ap.add_argument("--cycles", type=int, default=300, help="release+grant cycles per round")
    ap.add_argument("--warmup", type=int, default=200, help="cycles before the first round")
    ap.add_argument("--limit", type=int, default=20, help="the cluster limit, all held")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.cycles, args.warmup = 2, 50, 50

    with scratch_redis("rqs") as server:
        try:
            run(args, server)
            return 0
        except KeyboardInterrupt:
            log("interrupted: stopping redis-server")
            return 130


if __name__ == "__main__":
    sys.exit(main())
