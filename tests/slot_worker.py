"""A limiter client in its own process, driven line by line over stdin by the tests.

Commands (one per line), each answered with one JSON line on stdout:
  acquire NAME [PRIORITY [TIMEOUT]]  -> {"ok": true, "name", "token", "t"} or {"ok": false, "error"}
  try NAME                           -> {"ok": bool, "token"}
  release NAME                       -> {"ok": bool}
  renew NAME                         -> {"ok": bool, "error"?}
  limit N                            -> {"ok": true}   (changes max_concurrent at run time)
  churn N HOLD_S COUNTER             -> acquires/releases N times; while holding INCRs COUNTER,
                                        records the highest value seen: {"ok", "max_seen"}
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
from reqpmd.slots.connection import connect

out_lock = threading.Lock()


def say(**obj: object) -> None:
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True)
    ap.add_argument("--max", type=int, default=1)
    ap.add_argument("--lease", type=float, default=60)
    ap.add_argument("--host", default=None)
    ap.add_argument("--namespace", default="reqpm")
    args = ap.parse_args()
    client = connect(f"unix://{args.socket}")
    limit = {"n": args.max}
    lim = BuildConcurrencyLimiter(
        client,
        max_concurrent=lambda: limit["n"],
        namespace=args.namespace,
        lease_ttl=args.lease,
        host=args.host,
    )

    def acquire(name: str, priority: int, timeout: float | None) -> None:
        try:
            slot = lim.wait_for_slot(name, timeout=timeout, priority=priority)
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

    say(cmd="ready", ok=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        cmd, rest = parts[0], parts[1:]
        try:
            if cmd == "acquire":
                priority = int(rest[1]) if len(rest) > 1 else 0
                timeout = float(rest[2]) if len(rest) > 2 else None
                threading.Thread(
                    target=acquire, args=(rest[0], priority, timeout), daemon=True
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
            elif cmd == "quit":
                break
        except ReqpmError as exc:
            say(cmd=cmd, ok=False, error=f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
