"""What reqpmd tells systemd (sd_notify on our own NOTIFY_SOCKET), socket activation
(LISTEN_FDS), and journal-friendly logging. The real systemd is in test_systemd_units.py."""

from __future__ import annotations

import logging
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reqpmd.systemd import JournalHandler, PriorityFormatter
from tests.daemon_harness import FINAL, Reqpmd, wait_for


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                return self.messages

    def seen(self, text: str) -> bool:
        return any(text in m for m in self.drain())


@pytest.fixture
def notify(short_tmp: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(short_tmp / "notify.sock")
    yield listener
    listener.sock.close()


def test_sd_notify_ready_status_watchdog_reload_stopping(
    short_tmp: Path, notify: NotifyListener
) -> None:
    d = Reqpmd(short_tmp / "d", env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
    d.start(wait=False)
    try:
        wait_for(lambda: notify.seen("READY=1"))
        assert d.socket.exists()  # READY only once the socket is bound
        wait_for(
            lambda: notify.seen("STATUS=0/4 slots busy cluster-wide, 0 building here, 0 queued")
        )
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in notify.drain()) >= 3)
        build_id = d.submit()
        d.wait_state(build_id, FINAL)
        d.signal(signal.SIGHUP)
        wait_for(lambda: "RELOADING=1" in notify.drain())
        # READY=1 again after the reload
        wait_for(lambda: "READY=1" in notify.drain()[notify.messages.index("RELOADING=1") :])
        assert d.stop() == 0
        assert "STOPPING=1" in notify.drain()
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()


def test_socket_activation_uses_the_inherited_socket(short_tmp: Path) -> None:
    d = Reqpmd(short_tmp / "d")
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(d.socket))
    listening.listen(16)
    fd = listening.fileno()
    launcher = [
        sys.executable,
        "-c",
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.environ['LISTEN_FDS'] = '1'\n"
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n",
        *d.argv()[1:],
    ]
    try:
        d.start(argv=launcher, pass_fds=(fd,))
        listening.close()
        assert d.call("ping")["version"]
        # logged once the server is started: a client of the inherited socket may come first
        wait_for(lambda: "(socket activation)" in d.log())
        assert d.stop() == 0
        assert d.socket.exists()  # systemd's socket: the daemon does not remove it
    finally:
        if d.proc and d.proc.poll() is None:
            d.proc.kill()


def test_stale_socket_is_replaced_but_a_live_one_is_not(short_tmp: Path) -> None:
    d = Reqpmd(short_tmp / "d")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(d.socket))
    stale.close()  # a socket file nobody listens on, as after kill -9
    d.start()
    try:
        second = Reqpmd(short_tmp / "d2")
        second.config.write_text(
            second.config.read_text().replace(str(second.socket), str(d.socket))
        )
        second.start(wait=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 1
        assert "another reqpmd is listening" in second.log()
        assert d.call("ping")
    finally:
        d.stop()


def test_log_lines_carry_syslog_priorities() -> None:
    fmt = PriorityFormatter("%(message)s")
    record = logging.LogRecord("reqpmd", logging.WARNING, __file__, 1, "build 3: a\nb", (), None)
    assert fmt.format(record) == "<4>build 3: a\n<4>b"
    for level, prefix in (
        (logging.ERROR, "<3>"),
        (logging.INFO, "<6>"),
        (logging.DEBUG, "<7>"),
        (logging.CRITICAL, "<2>"),
    ):
        rec = logging.LogRecord("reqpmd", level, __file__, 1, "x", (), None)
        assert fmt.format(rec).startswith(prefix)


def test_journal_records_carry_the_build_id_field(short_tmp: Path) -> None:
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(short_tmp / "journal.sock"))
    journal.settimeout(5)
    handler = JournalHandler(str(short_tmp / "journal.sock"))
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("reqpmd.test.journal")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("build %d: failed\nsecond line", 12, extra={"build_id": 12})
        payload = journal.recv(65536)
    finally:
        logger.removeHandler(handler)
        journal.close()
    assert b"PRIORITY=4\n" in payload
    assert b"REQPM_BUILD_ID=12\n" in payload
    assert b"SYSLOG_IDENTIFIER=reqpmd\n" in payload
    # a multi-line message uses the binary-safe length-prefixed form
    assert b"MESSAGE\n" in payload and b"build 12: failed\nsecond line" in payload


def test_daemon_logs_to_stderr_with_priorities(short_tmp: Path) -> None:
    d = Reqpmd(short_tmp / "d", settings={"mock_command": "/nonexistent/mock"})
    d.start()
    try:
        build_id = d.submit()
        d.wait_state(build_id, FINAL)
        log = d.log()
        assert f"<6>build {build_id}: submitted by" in log
        assert f"<4>build {build_id}: failed" in log
    finally:
        d.stop()
