"""Redis deployments the tests start and own, on loopback: a Sentinel-managed master with
replicas (and later a Cluster). Sentinels reach the servers by address, so these listen
on 127.0.0.1 TCP ports (chosen free at start), not on Unix sockets; every process gets
its own directory and dies with the test process (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reqpmd.errors import RedisUnavailable
from reqpmd.lifeline import die_with_parent
from reqpmd.slots.limiter import BuildConcurrencyLimiter, Counts
from reqpmd.slots.server import find_redis_server
from tests.workers import wait_until

MASTER = "reqpm-master"


def counts_or_none(lim: BuildConcurrencyLimiter) -> Counts | None:
    """The limiter's counts, or None while its Redis does not answer (a failover)."""
    try:
        return lim.counts()
    except RedisUnavailable:
        return None


class PortTaken(RuntimeError):
    """A port chosen free was taken before the server bound it (another test's)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10 000 higher) is free too."""
    while True:
        port = free_port()
        if port > 55535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@dataclass
class Node:
    """One redis-server (or sentinel) process with its config file."""

    directory: Path
    port: int
    lines: list[str]
    sentinel: bool = False
    binary: str = field(default_factory=find_redis_server)
    # TLS only (the port is the TLS port, no plain one): how a client connects to it
    tls: dict[str, object] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "redis.conf"
        if not conf.exists():  # a sentinel rewrites its own: keep what it learned
            conf.write_text(
                "\n".join(
                    [
                        *(
                            [f"port {self.port}"]
                            if self.tls is None
                            else ["port 0", f"tls-port {self.port}"]
                        ),
                        "bind 127.0.0.1",
                        f"dir {self.directory}",
                        "daemonize no",
                        f"logfile {self.directory / 'log.txt'}",
                        "save ''",
                        "appendonly no",
                        *self.lines,
                    ]
                )
                + "\n"
            )
        argv = [self.binary, str(conf), *(["--sentinel"] if self.sentinel else [])]
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        wait_until(self._answers, timeout=10, interval=0.02)

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = (self.directory / "log.txt").read_text(errors="replace")[-2000:]
            error = PortTaken if "Address already in use" in log else RuntimeError
            raise error(f"redis-server on port {self.port} exited: {log}")
        try:
            # no retries: redis-py's own back off for seconds while the server starts
            with self.client(socket_timeout=0.5, retry=Retry(NoBackoff(), 0)) as c:
                return bool(c.ping())
        except redis.AuthenticationError:
            return True  # it answers: the test's own user is another one
        except redis.RedisError:
            return False

    def client(self, **kw: object) -> redis.Redis:
        tls = {"ssl": True, **self.tls} if self.tls is not None else {}
        return redis.Redis(host="127.0.0.1", port=self.port, **tls, **kw)  # type: ignore[arg-type]

    def kill9(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Topology:
    """Redis processes started together on ports chosen free, stopped together."""

    PREFIX = "rq"
    parent: Path | str = "/tmp"  # where each start's new directory is made

    def _reset(self) -> None:
        """A new directory and no nodes: where start() begins."""
        self.root = Path(tempfile.mkdtemp(prefix=self.PREFIX, dir=self.parent))

    def all_nodes(self) -> list[Node]:
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        for node in self.all_nodes():
            node.kill9()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except PortTaken:  # another test took a port we chose: once more, other ports
            self.stop()
            self._reset()
            return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SentinelSet(Topology):
    """One master, two replicas, three sentinels (quorum 2) that fail over within about
    two seconds of the master's death (down-after 1 s)."""

    PREFIX = "rqsen"

    def __init__(
        self,
        data_lines: list[str] | None = None,
        sentinel_lines: list[str] | None = None,
        parent: Path | None = None,
    ):
        self._data_lines = data_lines or []
        self._sentinel_lines = sentinel_lines or []
        if parent is not None:
            self.parent = parent
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.servers: list[Node] = []
        self.sentinels: list[Node] = []

    def all_nodes(self) -> list[Node]:
        return self.sentinels + self.servers

    def start(self) -> Self:
        ports = [free_port() for _ in range(6)]
        master = ports[0]
        for i, port in enumerate(ports[:3]):
            lines = [*self._data_lines]
            if i:
                lines.append(f"replicaof 127.0.0.1 {master}")
            node = Node(self.root / f"r{port}", port, lines)
            node.start()
            self.servers.append(node)
        for port in ports[3:]:
            lines = [
                f"sentinel monitor {MASTER} 127.0.0.1 {master} 2",
                f"sentinel down-after-milliseconds {MASTER} 1000",
                f"sentinel failover-timeout {MASTER} 3000",
                f"sentinel parallel-syncs {MASTER} 2",
                *self._sentinel_lines,
            ]
            node = Node(self.root / f"s{port}", port, lines, sentinel=True)
            node.start()
            self.sentinels.append(node)
        wait_until(self._converged, timeout=30, interval=0.1)
        return self

    def _converged(self) -> bool:
        for s in self.sentinels:
            try:
                with s.client(socket_timeout=1, password=self._sentinel_password()) as c:
                    m = c.sentinel_master(MASTER)
            except redis.RedisError:
                return False
            if m["num-slaves"] < 2 or m["num-other-sentinels"] < 2:
                return False
        return True

    def _sentinel_password(self) -> str | None:
        for line in self._sentinel_lines:
            if line.startswith("requirepass "):
                return line.split(" ", 1)[1]
        return None

    def url(self, userinfo: str = "", scheme: str = "redis+sentinel", master: str = MASTER) -> str:
        hosts = ",".join(s.address for s in self.sentinels)
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{hosts}/{master}"

    def master(self, sentinel: int = 0) -> Node:
        """The server a sentinel names as master now."""
        with self.sentinels[sentinel].client(
            socket_timeout=1, password=self._sentinel_password()
        ) as c:
            _, port = c.sentinel_get_master_addr_by_name(MASTER)
        return next(n for n in self.servers if n.port == int(port))

    def wait_failover(self, old: Node, timeout: float = 30) -> Node:
        """The new master once every sentinel names one other than ``old`` and it
        takes writes."""

        def promoted() -> Node | None:
            try:
                named = {self.master(i).port for i in range(len(self.sentinels))}
            except (redis.RedisError, StopIteration):
                return None
            if len(named) != 1 or old.port in named:
                return None
            new = self.master()
            try:
                with new.client(socket_timeout=1) as c:
                    role = c.info("replication")["role"]
            except redis.RedisError:
                return None
            return new if role == "master" else None

        found: Node = wait_until(promoted, timeout=timeout, interval=0.05)
        return found


class ClusterSet(Topology):
    """A Redis Cluster of three masters, each with one replica, that fails a dead master
    over within a few seconds (cluster-node-timeout 2 s)."""

    PREFIX = "rqclu"

    def __init__(self, data_lines: list[str] | None = None, binary: str | None = None) -> None:
        self._data_lines = data_lines or []
        self.binary = binary or find_redis_server()
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self.nodes: list[Node] = []

    def all_nodes(self) -> list[Node]:
        return self.nodes

    def start(self) -> Self:
        lines = [
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",
            "cluster-node-timeout 2000",
            "repl-diskless-sync-delay 0",  # Redis 7 waits 5 s for more replicas by default
            *self._data_lines,
        ]
        for port in [free_cluster_port() for _ in range(6)]:
            node = Node(self.root / f"c{port}", port, lines, binary=self.binary)
            node.start()
            self.nodes.append(node)
        cli = str(Path(self.nodes[0].binary).with_name("redis-cli"))
        subprocess.run(
            [
                *(cli, "--cluster", "create"),
                *(n.address for n in self.nodes),
                *("--cluster-replicas", "1", "--cluster-yes"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        wait_until(self.formed, timeout=30, interval=0.1, what="the cluster forms")
        return self

    def formed(self) -> bool:
        """Every live node serves every slot. (Redis 7 lists a replica only once it has
        synced, some seconds later: a test that fails a master over waits for that.)"""
        return self.converged(replicas=False)

    def converged(self, replicas: bool = True) -> bool:
        """Every live node sees the cluster whole, each master with a replica."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                with node.client(socket_timeout=1) as c:
                    info = c.cluster("info")
                    slots = c.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok":
                return False
            if len(slots) < 3 or (replicas and any(len(s) < 4 for s in slots)):
                return False
        return True

    def url(self, userinfo: str = "", scheme: str = "redis+cluster") -> str:
        hosts = ",".join(n.address for n in self.nodes[:3])
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{hosts}"

    def owner(self, key: str) -> Node:
        """The master that holds ``key``'s slot now."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            with node.client(socket_timeout=1) as c:
                slot = c.execute_command("CLUSTER", "KEYSLOT", key)
                for start, end, master, *_ in c.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError("no live node answers")

    def replica_of(self, master: Node) -> Node:
        with master.client(socket_timeout=1) as c:
            for _, _, owner, *replicas in c.execute_command("CLUSTER", "SLOTS"):
                if int(owner[1]) == master.port and replicas:
                    return next(n for n in self.nodes if n.port == int(replicas[0][1]))
        raise AssertionError(f"{master.address} has no replica")

    def masters(self) -> list[Node]:
        live = next(n for n in self.nodes if n.process and n.process.poll() is None)
        with live.client(socket_timeout=1) as c:
            ports = {int(owner[1]) for _, _, owner, *_ in c.execute_command("CLUSTER", "SLOTS")}
        return [n for n in self.nodes if n.port in ports]

    def move_slot_of(self, key: str, src: Node, dst: Node) -> int:
        """Move ``key``'s slot from ``src`` to ``dst`` the way redis-cli reshards: one
        key at a time, so clients meet ASK and then MOVED. Returns the keys moved."""
        with src.client(socket_timeout=5) as s, dst.client(socket_timeout=5) as d:
            slot = s.execute_command("CLUSTER", "KEYSLOT", key)
            src_id, dst_id = (
                s.execute_command("CLUSTER", "MYID"),
                d.execute_command("CLUSTER", "MYID"),
            )
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            moved = 0
            while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1):
                s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *keys)
                moved += len(keys)
                time.sleep(0.05)  # one key at a time, with traffic in between
            for node in self.masters():
                with node.client(socket_timeout=5) as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        wait_until(lambda: self.owner(key).port == dst.port, timeout=10, what="slot moved")
        return moved
