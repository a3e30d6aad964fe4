"""The control socket's wire format, shared by reqpmd and reqpmctl.

One JSON object per line, each way. Request: ``{"v": 1, "op": "...", "args": {...}}``;
reply: ``{"v": 1, "ok": true, "result": ...}`` or ``{"v": 1, "ok": false, "error":
{"code": "...", "message": "..."}}``. Files travel as open file descriptors
(SCM_RIGHTS) sent with the request line, in the order of ``args["files"]``: the client
opens them with its own rights, the daemon never opens a path a client names. A reply
may carry descriptors the same way (``WithFds``), in the order of its result's
``files``: the client reads them and never needs the daemon's paths or rights.
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

VERSION = 1
MAX_LINE = 1024 * 1024  # a request line; file contents travel as descriptors
MAX_FDS = 64

# error codes -> reqpmctl exit codes (documented in README and `reqpmctl --help`)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMISSION = 3
EXIT_NOT_FOUND = 4
EXIT_UNREACHABLE = 5

ERROR_EXIT = {
    "failed": EXIT_FAILED,
    "timeout": EXIT_FAILED,
    "slot_lost": EXIT_FAILED,
    "conflict": EXIT_FAILED,
    "cancelled": EXIT_FAILED,
    "unavailable": EXIT_FAILED,
    "quota": EXIT_FAILED,
    "invalid": EXIT_USAGE,
    "bad_request": EXIT_USAGE,
    "permission": EXIT_PERMISSION,
    "not_found": EXIT_NOT_FOUND,
    "unreachable": EXIT_UNREACHABLE,
}


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    if fds:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
        sent = sock.sendmsg([data], ancillary)
        data = data[sent:]
    if data:
        sock.sendall(data)


class WithFds:
    """A handler's result that travels with open descriptors attached to the reply line.

    Whoever holds it owns the descriptors: the control server sends them and then calls
    ``close()``, whether the send worked or not. ``close()`` may be called more than once;
    it closes each descriptor once and then runs ``on_close`` once (a handler's count of
    descriptors in flight, say).
    """

    def __init__(
        self, result: Any, fds: list[int], on_close: Callable[[], None] | None = None
    ) -> None:
        self.result = result
        self.fds = list(fds)
        self._on_close = on_close
        self._closed = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close_all(self.fds)
        finally:
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> WithFds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all(fds: list[int]) -> None:
    """Close descriptors that may already be gone (the daemon's or a peer's)."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameError(ValueError):
    """A frame that is too long, not JSON, or carries too many descriptors."""


class LineReader:
    """Reads newline-terminated frames from a stream socket, collecting passed fds."""

    def __init__(self, sock: socket.socket, max_line: int = MAX_LINE) -> None:
        self.sock = sock
        self.max_line = max_line
        self.buf = b""
        self.fds: list[int] = []

    def read(self, deadline: float | None = None) -> tuple[bytes, list[int]] | None:
        """The next line and the descriptors that came with it; None at a clean EOF.
        Past ``deadline`` (monotonic) it raises TimeoutError."""
        while b"\n" not in self.buf:
            if len(self.buf) > self.max_line:
                raise FrameError(f"request longer than {self.max_line} bytes")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("request not complete in time")
                self.sock.settimeout(left)
            fd_size = array.array("i").itemsize * MAX_FDS
            data, ancdata, flags, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(fd_size))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    self.fds.extend(got)
            if len(self.fds) > MAX_FDS:
                self.close_fds()
                raise FrameError(f"more than {MAX_FDS} file descriptors")
            if flags & socket.MSG_CTRUNC:
                self.close_fds()
                raise FrameError(f"more than {MAX_FDS} file descriptors")
            if not data:
                if self.buf:
                    raise FrameError("connection closed in the middle of a request")
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        if len(line) > self.max_line:
            raise FrameError(f"request longer than {self.max_line} bytes")
        fds: list[int] = list(self.fds)
        self.fds = []
        return line, fds

    def close_fds(self) -> None:
        close_all(self.fds)
        self.fds = []


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except RecursionError:
        raise FrameError("not JSON this daemon accepts: nested too deeply") from None
    except ValueError as exc:  # bad UTF-8, bad JSON, an integer of thousands of digits
        raise FrameError(f"not JSON this daemon accepts: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise FrameError("a frame must be a JSON object")
    return obj
