"""Drive slot_worker.py processes from tests: real processes, real kill -9."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


class Worker:
    def __init__(
        self,
        url: str,
        *,
        max_concurrent: int = 1,
        lease: float = 60,
        host: str | None = None,
    ) -> None:
        argv = [
            sys.executable,
            str(HERE / "slot_worker.py"),
            "--url",
            url,
            "--max",
            str(max_concurrent),
            "--lease",
            str(lease),
        ]
        if host:
            argv += ["--host", host]
        env = dict(os.environ, PYTHONPATH=str(HERE.parent))
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda m: m["cmd"] == "ready", timeout=20)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.messages.put(json.loads(line))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The first message (seen before or arriving within timeout) that matches."""
        for i, msg in enumerate(self.seen):
            if match(msg):
                return self.seen.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message within {timeout}s; seen {self.seen}")
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if match(msg):
                return msg
            self.seen.append(msg)

    def poll(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        """A matching message if one has arrived, without waiting."""
        try:
            return self.expect(match, timeout=0.0001)
        except AssertionError:
            return None

    def call(self, line: str, timeout: float = 10) -> dict[str, Any]:
        cmd = line.split()[0]
        self.send(line)
        return self.expect(lambda m: m["cmd"] == cmd, timeout)

    def granted(self, name: str, timeout: float = 10) -> dict[str, Any]:
        msg = self.expect(lambda m: m["cmd"] == "acquire" and m["name"] == name, timeout)
        assert msg["ok"], msg
        return msg

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10,
    interval: float = 0.01,
    what: str = "condition",
) -> Any:
    """Poll predicate until it returns something truthy (returned), or fail naming ``what``
    after timeout. The one polling loop of the test suite."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(interval)
