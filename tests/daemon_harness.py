"""Real reqpmd processes for end-to-end tests: own config, state, socket and mock roots."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from reqpmctl.client import Client, ClientError
from reqpmd.builds import states
from tests.workers import wait_until

HERE = Path(__file__).resolve().parent
FAKEMOCK = HERE / "fakemock" / "mock"
HELLO = HERE / "data" / "hello"
FINAL = {s.value for s in states.FINAL}  # as wire strings


class Reqpmd:
    # run in the child before reqpmd starts (the benchmarks: die with the bench)
    preexec: Callable[[], Any] | None = None

    def __init__(
        self,
        root: Path,
        *,
        redis_url: str = "embedded",
        host_id: str = "h1",
        settings: dict[str, Any] | None = None,
        mock_sleep: float = 0.3,
        mock_log: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "ctl.sock"
        self.config = root / "reqpmd.yaml"
        self.mock_root = root / "mock"
        self.mock_log = mock_log or root / "mock.jsonl"
        self.stderr_path = root / "reqpmd.log"
        values: dict[str, Any] = {
            "redis_url": redis_url,
            "host_id": host_id,
            "socket_path": str(self.socket),
            "state_dir": str(root / "state"),
            "mock_command": str(FAKEMOCK),
            "mock_root_dir": str(self.mock_root),
            "min_free_disk_gb": 0,
            "slot_lease_seconds": 5,
            "cancel_grace_seconds": 1,
            "default_chroot": "fedora-42-x86_64",
        }
        values.update(settings or {})
        self.state_dir = Path(values["state_dir"])  # maybe outside root (a small tmpfs)
        self.config.write_text(yaml.safe_dump(values))
        self.env = dict(
            os.environ,
            PYTHONPATH=str(HERE.parent),
            FAKEMOCK_ROOT_DIR=str(self.mock_root),
            FAKEMOCK_SLEEP=str(mock_sleep),
            FAKEMOCK_LOG=str(self.mock_log),
        )
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def configure(self, **values: Any) -> None:
        """Settings changed in the file, for the next start."""
        self.config.write_text(
            yaml.safe_dump({**yaml.safe_load(self.config.read_text()), **values})
        )

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "reqpmd.daemon", "--config", str(self.config)]

    def start(
        self, wait: bool = True, argv: list[str] | None = None, pass_fds: tuple[int, ...] = ()
    ) -> Reqpmd:
        with open(self.stderr_path, "ab") as out:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                argv or self.argv(),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=pass_fds,
                preexec_fn=self.preexec,
            )
        if wait:
            wait_until(self._answers, timeout=30, interval=0.05)
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"reqpmd exited with {self.proc.returncode}:\n{self.log()}")
        try:
            with Client(self.socket, timeout=5) as c:
                c.call("ping")
            return True
        except ClientError:
            return False

    def client(self) -> Client:
        return Client(self.socket, timeout=15)

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        with self.client() as c:
            return c.call(op, args)

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def submit(self, name: str = "hello", **kwargs: Any) -> int:
        with self.client() as c:
            if name.endswith(".src.rpm"):
                return (
                    c.submit(srpm=self.root / name, **kwargs)
                    if (self.root / name).exists()
                    else c.submit(srpm=_make_srpm(self.root, name), **kwargs)
                )
            return c.submit(spec=HELLO / "hello.spec", sources=HELLO, **kwargs)

    def build(self, build_id: int) -> dict[str, Any]:
        return dict(self.call("build.show", {"id": build_id}))

    def wait_state(
        self, build_id: int, states: set[str] | str, timeout: float = 30
    ) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else states
        return wait_until(
            lambda: (b := self.build(build_id))["state"] in wanted and b,
            timeout=timeout,
            interval=0.05,
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def processes(self) -> list[psutil.Process]:
        """Processes of this daemon's own: mock and its scrubs name paths under root, the
        embedded redis-server its socket in state_dir."""
        mine = []
        marks = (str(self.root), str(self.state_dir))
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                line = " ".join(p.info["cmdline"] or [])
                if any(m in line for m in marks) and p.pid != os.getpid():
                    mine.append(p)
        return mine

    def kill_all(self) -> None:
        """The end of a test: the daemon and whatever mock it left, so no test's sleeping
        mock outlives it (and is taken for another test's)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                p.kill()

    def mock_runs(self) -> list[dict[str, Any]]:
        if not self.mock_log.exists():
            return []
        return [json.loads(line) for line in self.mock_log.read_text().splitlines() if line]


def _make_srpm(root: Path, name: str) -> Path:
    path = root / name
    path.write_bytes(b"\xed\xab\xee\xdb fake srpm for " + name.encode())
    return path


def max_overlap(runs: list[dict[str, Any]], mode: str = "rebuild") -> int:
    """Most mock runs of ``mode`` that were running at the same instant."""
    events = []
    for r in runs:
        if r.get("mode") == mode:
            events += [(r["start"], 1), (r["end"], -1)]
    events.sort(key=lambda e: (e[0], e[1]))
    best = cur = 0
    for _, delta in events:
        cur += delta
        best = max(best, cur)
    return best


def wait_for(predicate: Any, timeout: float = 30) -> Any:
    return wait_until(predicate, timeout=timeout, interval=0.05)


__all__ = ["FINAL", "Reqpmd", "max_overlap", "wait_for"]
