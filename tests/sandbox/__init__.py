"""A real systemd to test units against: PID 1 of fresh namespaces, over an overlay of /.

``start``/``stop``/``inner`` beside this file do the work (see ``start``); this class
drives them from Python. Commands run inside with ``nsenter``, files are written in
from outside through ``/proc/PID/root``, and nothing written reaches the host's disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# inside, commands get a clean environment: nothing of the test runner's leaks in
INNER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "TERM": "dumb",
}


class SandboxRefused(RuntimeError):
    """This machine will not boot the sandbox (not root, unshare refused, no systemd...)."""


def why_not() -> str | None:
    """Why no sandbox can be booted here, or None if it may be tried."""
    if os.geteuid() != 0:
        return "the systemd sandbox needs root"
    for tool in ("unshare", "nsenter", "setpriv"):
        if shutil.which(tool) is None:
            return f"the systemd sandbox needs {tool} (util-linux)"
    if not os.access("/lib/systemd/systemd", os.X_OK):
        return "the systemd sandbox needs systemd installed (/lib/systemd/systemd)"
    return None


class Sandbox:
    def __init__(self, scratch: Path, pid: int) -> None:
        self.scratch = scratch
        self.pid = pid
        self.root = Path(f"/proc/{pid}/root")

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def boot(cls, binds: Iterable[str] = (), unit: str = "basic.target") -> Sandbox:
        """Boot one; raises SandboxRefused (with the reason) if this machine will not."""
        reason = why_not()
        if reason:
            raise SandboxRefused(reason)
        scratch = Path(tempfile.mkdtemp(prefix="sbx", dir="/tmp"))
        env = dict(os.environ, SD_UNIT=unit, SANDBOX_BIND=" ".join(binds))
        try:
            r = subprocess.run(
                [str(HERE / "start"), str(scratch)],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            cls._stop(scratch)
            raise SandboxRefused("the systemd sandbox did not boot within 60 s") from None
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            console = scratch / "console.log"
            tail = console.read_text(errors="replace")[-600:] if console.exists() else ""
            cls._stop(scratch)
            why = r.stderr.strip()
            if tail.strip() and tail.strip() not in why:
                why += f" (console: {tail.strip()})"
            raise SandboxRefused(f"the systemd sandbox did not boot: {why}")
        return cls(scratch, int(r.stdout.strip()))

    @staticmethod
    def _stop(scratch: Path) -> None:
        subprocess.run([str(HERE / "stop"), str(scratch)], timeout=60, check=False)
        shutil.rmtree(scratch, ignore_errors=True)

    def stop(self) -> None:
        self._stop(self.scratch)

    # -- inside ----------------------------------------------------------------------------

    def path(self, inner: str | Path) -> Path:
        """The host's view of a path inside the sandbox."""
        return self.root / str(inner).lstrip("/")

    def write(self, inner: str | Path, text: str, mode: int = 0o644) -> Path:
        p = self.path(inner)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        p.chmod(mode)
        return p

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside (all namespaces, root, clean environment)."""
        envs = [f"{k}={v}" for k, v in {**INNER_ENV, **(env or {})}.items()]
        cmd = ["nsenter", "-t", str(self.pid), "-a", "env", "-i", *envs, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and r.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
            )
        return r

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", "--no-pager", *args, check=check)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal_cursor(self) -> str:
        """A cursor at the journal's end now: pass it as ``after`` to see only what follows."""
        out = self.run("journalctl", "--no-pager", "--show-cursor", "-n", "0").stdout
        for line in out.splitlines():
            if line.startswith("-- cursor: "):
                return line.removeprefix("-- cursor: ").strip()
        return ""

    def journal_entries(self, *args: str, after: str | None = None) -> list[dict[str, Any]]:
        """Journal entries (journalctl -o json) matching ``args``, after the cursor ``after``.

        Not --after-cursor: with matches, journalctl 252 skips the first matching entry
        after the cursor whenever the cursor's own entry does not match. --cursor starts at
        the cursor's entry (or the first match after it); that entry itself is dropped here.
        """
        extra = ["--cursor", after] if after else []
        out = self.run("journalctl", "--no-pager", "-q", "-o", "json", *extra, *args, check=False)
        entries = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        return [e for e in entries if not after or e.get("__CURSOR") != after]

    def journal(self, *args: str, after: str | None = None) -> str:
        """The messages of journal_entries(), one a line."""
        return "\n".join(str(e.get("MESSAGE")) for e in self.journal_entries(*args, after=after))


def poll(what: str, predicate: Callable[[], Any], timeout: float = 20, every: float = 0.1) -> Any:
    """predicate() until it is truthy (returned), or fail naming ``what`` after timeout."""
    from tests.workers import wait_until

    return wait_until(predicate, timeout=timeout, interval=every, what=what)
