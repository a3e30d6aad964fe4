"""Carrying out the planned faults on a farm, and the workload that runs meanwhile:
submissions on every host (some failing, some cancelled, a few urgent, and mocks that
hang, exit 60 or crash), a supervisor that restarts what died on its own, and a sampler
of the slots Redis holds.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from typing import Any

from reqpmctl.client import ClientError
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from tests.chaos.farm import LEASE, Farm, submit
from tests.chaos.history import History
from tests.chaos.plan import HOSTS, Fault
from tests.redis_topologies import Node

HOSTILE_ANSWER = 5.0  # seconds a daemon has to answer a ping after a hostile burst
START_TRIES = 3.0  # seconds of tries to start a daemon, the injector's lock held


def _sleep_until(deadline: float, stop: threading.Event) -> bool:
    """False when stopped first."""
    return not stop.wait(max(0.0, deadline - time.monotonic()))


class Injector:
    def __init__(self, farm: Farm, history: History, faults: list[Fault], t0: float) -> None:
        self.farm, self.history, self.faults, self.t0 = farm, history, faults, t0
        self.lock = threading.Lock()  # the supervisor leaves a host alone while held
        self.killed: dict[float, Node] = {}  # a failover's dead master, by its fault's time

    def run(self, stop: threading.Event) -> None:
        steps = sorted(
            [(f.at, 0, i, f) for i, f in enumerate(self.faults)]
            + [(f.at + f.hold, 1, i, f) for i, f in enumerate(self.faults)]
        )
        for at, heal, _, fault in steps:
            if not _sleep_until(self.t0 + at, stop):
                return
            action = getattr(self, ("heal_" if heal else "inject_") + fault.kind)
            try:
                action(fault)
            except Exception as exc:  # the harness's own trouble: shown, never hidden
                self.history.add("harness_error", fault=fault.as_dict(), error=repr(exc))

    def _mark(self, fault: Fault, phase: str, **extra: Any) -> None:
        self.history.add(
            "fault",
            phase=phase,
            fault=fault.kind,
            target=fault.target,
            at=fault.at,
            hold=fault.hold,
            value=fault.value,
            **extra,
        )

    # -- daemons --------------------------------------------------------------------------

    def inject_kill9(self, f: Fault) -> None:
        with self.lock:
            self.farm.down.add(f.target)
            self._mark(f, "start")
            self.farm.kill9(f.target)

    def heal_kill9(self, f: Fault) -> None:
        with self.lock:  # briefly: a start the full disk refuses is the supervisor's then
            ok = self.farm.start_daemon(f.target, deadline=START_TRIES)
            self.farm.down.discard(f.target)
            self._mark(f, "end", started=ok)

    def inject_term(self, f: Fault) -> None:
        with self.lock:
            self.farm.down.add(f.target)
            self._mark(f, "start")
            code = self.farm.term(f.target)
            self.history.add("term_exit", host=f.target, code=code)

    heal_term = heal_kill9

    def inject_pause(self, f: Fault, alone: bool = False) -> None:
        with self.lock:
            pids = self.farm.freeze(f.target, alone)
            self._mark(f, "start", pids=pids, t=self.farm.frozen_at[f.target])

    def heal_pause(self, f: Fault) -> None:
        with self.lock:
            self._mark(f, "end", t=self.farm.thaw(f.target))

    def inject_stop_alone(self, f: Fault) -> None:
        self.inject_pause(f, alone=True)

    heal_stop_alone = heal_pause

    # -- Redis and the disk -----------------------------------------------------------

    def inject_redis_keep(self, f: Fault) -> None:
        self._mark(f, "start")
        self.farm.redis_kill9()

    def heal_redis_keep(self, f: Fault) -> None:
        self.farm.redis_restart(wipe=False)
        self._mark(f, "end")

    inject_redis_wipe = inject_redis_keep

    def heal_redis_wipe(self, f: Fault) -> None:
        self.farm.redis_restart(wipe=True)
        self._mark(f, "end")

    def inject_failover(self, f: Fault) -> None:
        node = self.farm.master_kill9()
        self.killed[f.at] = node
        self._mark(f, "start", master=node.port)

    def heal_failover(self, f: Fault) -> None:
        self.farm.node_restart(self.killed.pop(f.at))
        self._mark(f, "end", master=self.farm.master_port())

    def inject_switchover(self, f: Fault) -> None:
        before = self.farm.master_port()
        self._mark(f, "start", master=before, reply=self.farm.switchover())

    def heal_switchover(self, f: Fault) -> None:
        self._mark(f, "end", master=self.farm.master_port())

    def inject_disk_full(self, f: Fault) -> None:
        if not self.farm.small_disk:
            self._mark(f, "skipped", why="no tmpfs here")
            return
        self._mark(f, "start", bytes=self.farm.fill_disk())

    def heal_disk_full(self, f: Fault) -> None:
        self.farm.free_disk()
        self._mark(f, "end")

    # -- clients ------------------------------------------------------------------------

    def inject_hostile(self, f: Fault) -> None:
        self._mark(f, "start")
        hostile_burst(self.farm.daemons[f.target].socket, f.hold)

    def heal_hostile(self, f: Fault) -> None:
        """The daemon must still answer at once, unless another fault holds it down or it
        is not running (a start refused on the full disk). Had the burst killed it, the
        supervisor records a death with no fault on it."""
        host = f.target
        end = time.monotonic() + HOSTILE_ANSWER
        while time.monotonic() < end:
            if host in self.farm.down or host in self.farm.frozen or not self.farm.alive(host):
                self._mark(f, "end", answered=None)
                return
            try:
                self.farm.call(host, "ping")
                self._mark(f, "end", answered=True)
                return
            except ClientError:
                time.sleep(0.1)
        self._mark(f, "end", answered=False)

    def inject_limit(self, f: Fault) -> None:
        """Every host, as config management would; the token counter before and after
        tells grants under the old limit from grants under the new."""
        before = self.farm.token()
        self._mark(f, "start", token=before)
        results = {}
        for host in HOSTS:
            try:
                self.farm.call(
                    host, "settings.set", {"changes": {"max_concurrent_builds": f.value}}
                )
                results[host] = "ok"
            except ClientError as exc:
                results[host] = f"{exc.code}: {exc.message}"
        self._mark(f, "end", token=self.farm.token(), results=results)

    def heal_limit(self, f: Fault) -> None:
        pass


def hostile_burst(path: Any, seconds: float) -> None:
    """What a hostile local user can throw at the socket: garbage, a line past the limit,
    a frame cut off, requests of the wrong shape, and connections that say nothing."""
    payloads = [
        b"\x00\xff garbage \xfe\n",
        b"[1,2,3]\n",
        b'{"v": 1, "op": "submit", "args": {"files": "nope"}}\n',
        b'{"v": 1, "op": "build.show", "args": {"id": -1}}\n',
        b'{"v": 1, "op": "settings.set", "args": {"changes": {"max_concurrent_builds": 10000}}}\n',
        b'{"v": 1, "op": "build.list", "args": {"limit": "all"}}\n',
        b'{"v": 1, "op": "status"',  # cut off
        b"x" * (1024 * 1024 + 10),  # past MAX_LINE, no newline
    ]
    idle: list[socket.socket] = []
    end = time.monotonic() + seconds
    try:
        for _ in range(8):  # silent connections, held through the burst
            s = socket.socket(socket.AF_UNIX)
            with contextlib.suppress(OSError):
                s.connect(str(path))
            idle.append(s)
        while time.monotonic() < end:
            for payload in payloads:
                with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(2)
                    s.connect(str(path))
                    s.sendall(payload)
                    s.shutdown(socket.SHUT_WR)
                    with contextlib.suppress(OSError):
                        s.recv(65536)
    finally:
        for s in idle:
            s.close()


class Workload:
    """A submitter per host (a paused host stalls only its own), and the cancels they
    planned. Names ask the stand-in to misbehave: fail (exit 30), exit60, crash, hang."""

    MIX = (("ok", 60), ("fail", 8), ("exit60", 3), ("crash", 4), ("hang", 3))

    def __init__(self, farm: Farm, history: History, seed: int, backlog: int) -> None:
        self.farm, self.history = farm, history
        # a host's builds not yet running, past which its submitter waits: a stream the
        # farm can drain, as a farm's producers are (unbounded, a long run only grows it)
        self.backlog = backlog
        self.rngs = {h: random.Random(f"{seed}-{h}") for h in HOSTS}
        self.cancels: list[tuple[float, str, int]] = []  # (monotonic due, host, id)
        self._lock = threading.Lock()
        self._n = 0

    def run(self, host: str, stop: threading.Event) -> None:
        rng = self.rngs[host]
        while not stop.wait(rng.uniform(0.4, 1.6)):
            self._due_cancels(host)
            if self._backlog(host) >= self.backlog:
                continue
            with self._lock:
                self._n += 1
                n = self._n
            what = rng.choices([m for m, _ in self.MIX], [w for _, w in self.MIX])[0]
            kind = "spec" if what == "ok" and rng.random() < 0.3 else "srpm"
            name = f"{what}{n}-1-1.src.rpm" if kind == "srpm" else "hello.spec"
            priority = 5 if rng.random() < 0.1 else 0
            try:
                build_id = submit(self.farm, host, name, kind, priority)
            except ClientError as exc:
                self.history.add(
                    "submit",
                    host=host,
                    name=name,
                    source=kind,
                    ok=False,
                    code=exc.code,
                    error=exc.message[:300],
                )
                continue
            self.history.add(
                "submit", host=host, id=build_id, name=name, source=kind, priority=priority, ok=True
            )
            if what == "hang" or rng.random() < 0.08:
                delay = rng.uniform(2.0, 6.0) if what == "hang" else rng.uniform(0.0, 4.0)
                with self._lock:
                    self.cancels.append((time.monotonic() + delay, host, build_id))

    def _backlog(self, host: str) -> int:
        try:
            status = self.farm.call(host, "status")
        except ClientError:
            return 0  # down or busy: the submission says so itself
        return int(status.get("queued") or 0) + int(status.get("waiting_here") or 0)

    def _due_cancels(self, host: str, everything: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            due = [c for c in self.cancels if c[1] == host and (everything or c[0] <= now)]
        for c in due:
            _, _, build_id = c
            try:
                reply = self.farm.call(host, "build.cancel", {"id": build_id})
                self.history.add("cancel", host=host, id=build_id, ok=True, reply=reply)
            except ClientError as exc:
                self.history.add("cancel", host=host, id=build_id, ok=False, code=exc.code)
                if exc.code == "unreachable":
                    continue  # down or busy: tried again later
            with self._lock:
                self.cancels.remove(c)

    def flush_cancels(self) -> None:
        for host in HOSTS:
            self._due_cancels(host, everything=True)


def supervise(farm: Farm, history: History, injector: Injector, stop: threading.Event) -> None:
    """A daemon that died with no fault on it crashed by itself: recorded, then restarted."""
    while not stop.wait(0.2):
        for host in HOSTS:
            with injector.lock:
                if host in farm.down or host in farm.frozen or farm.alive(host):
                    continue
                proc = farm.daemons[host].proc
                full = farm.on_full_disk(host) or host in farm.started_on_full_disk
                history.add(
                    "daemon_exit_on_full_disk" if full else "daemon_died",
                    host=host,
                    code=proc.returncode if proc else None,
                    log=farm.daemons[host].log()[-1500:],
                )
                farm.start_daemon(host, deadline=START_TRIES)


def sample_slots(farm: Farm, history: History, stop: threading.Event) -> None:
    """What Redis says is held, twice a second, read as `reqpmctl slots list` reads it."""
    limiter: BuildConcurrencyLimiter | None = None
    while not stop.wait(0.5):
        try:
            if limiter is None:
                # the daemons' lease: the first script after a restart starts the grace
                # with its caller's, and the library's default (60 s) would stall the farm
                limiter = BuildConcurrencyLimiter(
                    farm.redis_client(), lease_ttl=LEASE, auto_renew=False
                )
            holders, _ = limiter.snapshot()
        except Exception:
            limiter = None  # down or restarting: no sample
            continue
        history.add("slots", holders=[h.name for h in holders])
