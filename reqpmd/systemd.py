"""What reqpmd says to systemd: sd_notify, socket activation, journal-friendly logs.

Logs go to stderr with syslog priority prefixes (``<3>`` ... ``<7>``), which journald
turns into real priorities. When stderr *is* the journal (JOURNAL_STREAM matches) and
the journal socket exists, records go there natively instead, so each build event also
carries a REQPM_BUILD_ID field (``journalctl REQPM_BUILD_ID=12``).
"""

from __future__ import annotations

import logging
import os
import socket
import sys

import sdnotify

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def priority(level: int) -> int:
    for lvl in sorted(_PRIORITY, reverse=True):
        if level >= lvl:
            return _PRIORITY[lvl]
    return 7


class PriorityFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines())


class JournalHandler(logging.Handler):
    """Native journal protocol over the journal's datagram socket."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "reqpmd") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
            }
            build_id = getattr(record, "build_id", None)
            if build_id is not None:
                fields["REQPM_BUILD_ID"] = str(build_id)
            payload = b""
            for key, value in fields.items():
                data = value.encode()
                if b"\n" in data:
                    payload += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
                else:
                    payload += key.encode() + b"=" + data + b"\n"
            self.sock.sendto(payload, self.path)
        except OSError:
            self.handleError(record)


def _stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or not os.path.exists(JOURNAL_SOCKET):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup_logging(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if _stderr_is_journal():
        handler = JournalHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PriorityFormatter("%(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


class Notifier:
    """sd_notify, sent only under systemd (NOTIFY_SOCKET set) and only when it changes."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd = sdnotify.SystemdNotifier() if self.enabled else None
        self._status = ""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_interval: float | None = None
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)

    def ready(self) -> None:
        self._send("READY=1")

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def stopping(self) -> None:
        self._send("STOPPING=1")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self._send(f"STATUS={text}")


def listen_fds() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS / LISTEN_PID), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return [socket.socket(fileno=3 + i) for i in range(count)]
