"""A limiter client in its own process, driven line by line over stdin by the tests.

Commands (one per line), each answered with one JSON line on stdout:
  acquire NAME [PRIORITY [TIMEOUT [GROUP]]]
                                     -> {"ok": true, "name", "token", "t"} or {"ok": false, "error"}
                                        (TIMEOUT "-": wait forever)
  try NAME                           -> {"ok": bool, "token"}
  release NAME                       -> {"ok": bool}
  renew NAME                         -> {"ok": bool, "error"?}
  limit N                            -> {"ok": true}   (changes max_concurrent at run time)
  churn N HOLD_S COUNTER             -> acquires/releases N times; while holding INCRs COUNTER,
                                        records the highest value seen: {"ok", "max_seen"}
  stream GROUP THREADS HOLD_S        -> THREADS threads each acquire in GROUP, hold HOLD_S,
                                        release, again, until "stop"; each grant says
                                        {"cmd": "grant", "group", "token", "held"} where "held"
                                        counts GROUP's holders of every process (a Redis
                                        counter, raised after the grant, lowered before the
                                        release: it never counts more than hold)
  stop                               -> ends the streams: {"ok", "grants"}
  quit
Acquires run in background threads so several can wait at once; "t" is time.monotonic()
at grant (CLOCK_MONOTONIC is shared by all processes of the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.errors import ReqpmError
from reqpmd.slots.connection import open_redis

out_lock = threading.Lock()


def say(**obj: object) -> None:
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True, help="redis_url: one server, Sentinel or Cluster")
    ap.add_argument("--max", type=int, default=1)
    ap.add_argument("--lease", type=float, default=60)
    ap.add_argument("--host", default=None)
    ap.add_argument("--namespace", default="reqpm")
    args = ap.parse_args()
    client = open_redis(args.url)
    limit = {"n": args.max}
    lim = BuildConcurrencyLimiter(
        client,
        max_concurrent=lambda: limit["n"],
        namespace=args.namespace,
        lease_ttl=args.lease,
        host=args.host,
    )

    def acquire(name: str, priority: int, timeout: float | None, group: str) -> None:
        try:
            slot = lim.wait_for_slot(name, timeout=timeout, priority=priority, group=group)
            say(cmd="acquire", ok=True, name=name, token=slot.token, t=time.monotonic())
        except ReqpmError as exc:
            say(cmd="acquire", ok=False, name=name, error=f"{type(exc).__name__}: {exc}")

    def churn(n: int, hold: float, counter: str) -> None:
        max_seen = 0
        try:
            for i in range(n):
                with lim.acquire(f"churn-{os.getpid()}-{i}", timeout=None):
                    max_seen = max(max_seen, int(client.incr(counter)))
                    time.sleep(hold)
                    client.decr(counter)
        except ReqpmError as exc:
            say(cmd="churn", ok=False, error=f"{type(exc).__name__}: {exc}")
            return
        say(cmd="churn", ok=True, max_seen=max_seen)

    streaming = threading.Event()
    stream_lock = threading.Lock()
    grants = {"n": 0}

    def stream(group: str, index: int, hold: float) -> None:
        i = 0
        while streaming.is_set():
            i += 1
            name = f"{group}-{os.getpid()}-{index}-{i}"
            try:
                slot = lim.wait_for_slot(name, timeout=None, group=group)
            except ReqpmError as exc:
                say(cmd="grant", ok=False, error=f"{type(exc).__name__}: {exc}")
                return
            held = int(client.incr(f"test:held:{group}"))
            with stream_lock:
                grants["n"] += 1
            say(cmd="grant", ok=True, group=group, token=slot.token, held=held)
            time.sleep(hold)
            client.decr(f"test:held:{group}")
            lim.release(name)

    say(cmd="ready", ok=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd, rest = parts[0], parts[1:]
        try:
            if cmd == "acquire":
                priority = int(rest[1]) if len(rest) > 1 else 0
                timeout = float(rest[2]) if len(rest) > 2 and rest[2] != "-" else None
                group = rest[3] if len(rest) > 3 else "@default"
                threading.Thread(
                    target=acquire, args=(rest[0], priority, timeout, group), daemon=True
                ).start()
            elif cmd == "try":
                slot = lim.try_acquire(rest[0])
                say(cmd="try", ok=slot is not None, token=slot.token if slot else None)
            elif cmd == "release":
                say(cmd="release", ok=lim.release(rest[0]))
            elif cmd == "renew":
                lim.renew(rest[0])
                say(cmd="renew", ok=True)
            elif cmd == "limit":
                limit["n"] = int(rest[0])
                say(cmd="limit", ok=True)
            elif cmd == "churn":
                threading.Thread(
                    target=churn, args=(int(rest[0]), float(rest[1]), rest[2]), daemon=True
                ).start()
            elif cmd == "stream":
                streaming.set()
                for index in range(int(rest[1])):
                    threading.Thread(
                        target=stream, args=(rest[0], index, float(rest[2])), daemon=True
                    ).start()
            elif cmd == "stop":
                streaming.clear()
                say(cmd="stop", ok=True, grants=grants["n"])
            elif cmd == "quit":
                break
        except ReqpmError as exc:
            say(cmd=cmd, ok=False, error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
