"""The processes a chaos run drives: one redis-server it owns (TCP on loopback, appendonly
so a restart "with its data" has some) or, with ``sentinel``, a master, two replicas and
three Sentinels; three reqpmd daemons with the mock stand-in, and a small tmpfs as one
daemon's state_dir. Like systemd's Restart=, a daemon that exits is
started again; unlike it, the farm says so in the history, since nothing here should die
on its own.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from reqpmctl.client import Client
from reqpmd.config.schema import Settings
from reqpmd.slots.connection import open_redis
from reqpmd.slots.keys import slot_keys
from tests.chaos.history import History, events_file
from tests.chaos.plan import HOSTS, SMALL_DISK_HOST
from tests.daemon_harness import HELLO, Reqpmd
from tests.redis_topologies import MASTER, Node, SentinelSet, free_port

LEASE = 5
SMALL_DISK_MB = 48
SETTINGS: dict[str, Any] = {
    "max_concurrent_builds": 2,
    "slot_lease_seconds": LEASE,
    "cancel_grace_seconds": 1,
    "build_timeout_minutes": 0.5,  # the backstop for a hung build nobody cancels
    "max_build_retries": 6,  # an exit-60 build ends failed after 7 runs, not 21
    "min_free_state_mb": 4,
}


def mount_tmpfs(where: Path, size_mb: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def real_srpm(out: Path) -> Path | None:
    """hello's real source RPM (the stand-in then builds real binary RPMs from it, so
    repositories get real metadata), or None without rpmbuild."""
    rpmbuild = shutil.which("rpmbuild")
    if rpmbuild is None:
        return None
    top = out / ".rpmbuild"
    subprocess.run(
        [
            rpmbuild,
            "-bs",
            "--define",
            f"_topdir {top}",
            "--define",
            f"_sourcedir {HELLO}",
            str(HELLO / "hello.spec"),
        ],
        capture_output=True,
        check=True,
    )
    [made] = top.rglob("*.src.rpm")
    return Path(shutil.copy2(made, out / "real.src.rpm"))


class Farm:
    def __init__(
        self,
        root: Path,
        history: History,
        mock_sleep: float = 1.0,
        sabotage: str | None = None,
        sentinel: bool = False,
    ) -> None:
        self.root = root
        self.history = history
        self.mock_sleep = mock_sleep  # seconds each mock step builds
        self.redis = Node(root / "redis", free_port(), ["appendonly yes", "appendfsync always"])
        self.sentinels = SentinelSet(parent=root) if sentinel else None
        # redis-server dies with the thread that started it (PR_SET_PDEATHSIG follows the
        # thread): every start happens on this one, which lives as long as the farm
        self._keeper = ThreadPoolExecutor(1, thread_name_prefix="redis-keeper")
        self.small = root / "small"
        self.small_disk = mount_tmpfs(self.small, SMALL_DISK_MB)
        self.repo_dir = root / "repos"
        self.srpm = real_srpm(root)
        self.daemons: dict[str, Reqpmd] = {}
        for host in HOSTS:
            settings = {**SETTINGS, "repo_dir": str(self.repo_dir)}
            if host == SMALL_DISK_HOST and self.small_disk:
                settings["state_dir"] = str(self.small / "state")
            self.daemons[host] = Reqpmd(
                root / host,
                redis_url="",  # set at start(): a Sentinel set's ports are chosen then
                host_id=host,
                settings=settings,
                mock_sleep=mock_sleep,
                env={"FAKEMOCK_EVENTS": str(events_file(root, host))},
            )
        # the daemons' command: reqpmd itself, or reqpmd broken on purpose (sabotage.py)
        self.argv = {
            h: [sys.executable, "-m", "tests.chaos.sabotage", sabotage, "--config", str(d.config)]
            if sabotage
            else None
            for h, d in self.daemons.items()
        }
        self.down: set[str] = set()  # hosts a fault took down on purpose
        self.disk_is_full = False  # the small disk, filled by a fault now
        # hosts whose last start was tried on the full disk: a daemon that cannot open its
        # queue there exits, and the disk may be freed before that exit is seen
        self.started_on_full_disk: set[str] = set()
        self.frozen: dict[str, list[psutil.Process]] = {}
        self.frozen_at: dict[str, float] = {}

    # -- Redis ------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        if self.sentinels is not None:
            return self.sentinels.url()
        return f"redis://127.0.0.1:{self.redis.port}/0"

    def redis_client(self) -> Any:
        """A client of the master now (a Sentinel set's, followed across failovers)."""
        return open_redis(self.redis_url)

    def start(self) -> None:
        if self.sentinels is not None:
            self._keeper.submit(self.sentinels.__enter__).result()
        else:
            self._keeper.submit(self.redis.start).result()
        for host, d in self.daemons.items():
            d.configure(redis_url=self.redis_url)
            d.start(argv=self.argv[host])

    def redis_kill9(self) -> None:
        self.redis.kill9()

    def redis_restart(self, wipe: bool) -> None:
        if wipe:
            for entry in self.redis.directory.iterdir():
                if entry.name not in ("redis.conf", "log.txt"):
                    if entry.is_dir():
                        shutil.rmtree(entry)
                    else:
                        entry.unlink()
        self._keeper.submit(self.redis.start).result()

    def master_kill9(self) -> Node:
        """kill -9 of the server the Sentinels name as master now: they promote a replica
        after down-after (1 s), unless it is back first."""
        assert self.sentinels is not None
        node = self.sentinels.master()
        node.kill9()
        return node

    def node_restart(self, node: Node) -> None:
        """Back with no data (no persistence): a replica again if a failover happened
        meanwhile (the Sentinels demote it), else an empty master, which its replicas copy."""
        self._keeper.submit(node.start).result()

    def switchover(self) -> str:
        """SENTINEL FAILOVER: the operator's failover, with no server lost."""
        assert self.sentinels is not None
        with self.sentinels.sentinels[0].client(socket_timeout=2) as c:
            return str(c.execute_command("SENTINEL", "FAILOVER", MASTER))

    def master_port(self) -> int | None:
        if self.sentinels is None:
            return self.redis.port
        try:
            return self.sentinels.master().port
        except Exception:  # no Sentinel answers now
            return None

    def token(self) -> int | None:
        """The namespace's fencing-token counter (grants only ever raise it)."""
        try:
            with self.redis_client() as c:
                value = c.hget(slot_keys(Settings().namespace).meta, "token")
        except Exception:  # a Redis fault meanwhile: the checks widen the window
            return None
        return int(value) if value is not None else 0

    # -- daemons ----------------------------------------------------------------------

    def start_daemon(self, host: str, deadline: float = 60.0) -> bool:
        """Started again as systemd would (Restart=): a start that fails is retried."""
        d = self.daemons[host]
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.on_full_disk(host):
                self.started_on_full_disk.add(host)
            else:
                self.started_on_full_disk.discard(host)
            try:
                d.start(argv=self.argv[host])
                return True
            except AssertionError as exc:  # exited at start: say it, then try again
                self.history.add("daemon_start_failed", host=host, error=str(exc)[-600:])
                time.sleep(1.0)
        return False

    def kill9(self, host: str) -> None:
        self.daemons[host].kill9()

    def term(self, host: str) -> int | None:
        d = self.daemons[host]
        try:
            return d.stop(timeout=60)
        except subprocess.TimeoutExpired:
            self.history.add("violation_hint", host=host, what="SIGTERM did not stop it in 60 s")
            d.kill9()
            return None

    def freeze(self, host: str, alone: bool = False) -> list[int]:
        """SIGSTOP the daemon, then everything under it (mock, rpmbuild): a paused host;
        or the daemon ``alone`` (kill -STOP of its pid), its mock building on."""
        proc = self.daemons[host].proc
        assert proc is not None
        daemon = psutil.Process(proc.pid)
        daemon.suspend()
        self.frozen_at[host] = time.time()  # surely stopped from here (the history's start)
        tree = [daemon]
        with contextlib.suppress(psutil.Error):
            for child in [] if alone else daemon.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.suspend()
                    tree.append(child)
        self.frozen[host] = tree
        return [p.pid for p in tree]

    def thaw(self, host: str) -> float:
        """When the daemon was still surely stopped: the end the history records (it may
        fork a mock the moment it resumes, before the history hears of it)."""
        last_stopped = time.time()
        for p in self.frozen.pop(host, []):  # the daemon first: it fences its woken mock
            with contextlib.suppress(psutil.Error):
                p.resume()
        return last_stopped

    def alive(self, host: str) -> bool:
        proc = self.daemons[host].proc
        return proc is not None and proc.poll() is None

    def client(self, host: str, timeout: float = 10) -> Client:
        return Client(self.daemons[host].socket, timeout=timeout)

    def call(self, host: str, op: str, args: dict[str, Any] | None = None) -> Any:
        with self.client(host) as c:
            return c.call(op, args)

    # -- the small disk -----------------------------------------------------------------

    def on_full_disk(self, host: str) -> bool:
        """The host's state_dir is on the small disk, and a fault has filled it now."""
        return host == SMALL_DISK_HOST and self.disk_is_full

    def fill_disk(self) -> int:
        """Fill the tmpfs to the last byte; how many bytes it took."""
        self.disk_is_full = True
        filler = self.small / "filler"
        written = 0
        with contextlib.suppress(OSError), open(filler, "ab") as f:
            chunk = b"\0" * (1 << 20)
            while True:
                written += f.write(chunk)
                f.flush()
        with contextlib.suppress(OSError), open(self.small / "filler2", "ab") as f:
            while True:  # the last partial megabyte
                f.write(b"\0" * 4096)
                f.flush()
        return written

    def free_disk(self) -> None:
        for name in ("filler", "filler2"):
            with contextlib.suppress(FileNotFoundError):
                (self.small / name).unlink()
        self.disk_is_full = False

    # -- the end --------------------------------------------------------------------------

    def stop(self) -> None:
        for host in list(self.frozen):
            self.thaw(host)
        for d in self.daemons.values():
            with contextlib.suppress(Exception):
                d.stop(timeout=30)
            d.kill_all()
        self.redis.kill9()
        if self.sentinels is not None:
            for node in self.sentinels.all_nodes():
                node.kill9()  # the files stay with the run's
        self._keeper.shutdown()

    def unmount(self) -> None:
        """The tmpfs goes; its state_dir is kept beside the host's files, to judge again."""
        if self.small_disk:
            with contextlib.suppress(OSError):
                shutil.copytree(self.small / "state", self.root / SMALL_DISK_HOST / "state-kept")
            subprocess.run(["umount", "-l", str(self.small)], check=False)


def submit(farm: Farm, host: str, name: str, kind: str, priority: int) -> int:
    """One submission as reqpmctl makes it; ClientError when the daemon says no or the
    reply is lost."""
    d = farm.daemons[host]
    with farm.client(host, timeout=15) as c:
        if kind == "spec":
            return c.submit(spec=HELLO / "hello.spec", sources=HELLO, priority=priority)
        path = d.root / name
        if not path.exists():
            if farm.srpm is not None:
                shutil.copy2(farm.srpm, path)
            else:
                path.write_bytes(b"\xed\xab\xee\xdb fake srpm for " + name.encode())
        return c.submit(srpm=path, priority=priority)
