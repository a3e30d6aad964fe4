"""Talking to reqpmd over its Unix socket (no click here: scripts can use this too)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from reqpmd.control import protocol

DEFAULT_SOCKET = "/run/reqpm/reqpmd.sock"
SUBMIT_TIMEOUT = 900.0


def default_socket() -> str:
    return os.environ.get("REQPM_SOCKET") or DEFAULT_SOCKET


class ClientError(Exception):
    """The daemon said no (code from its error vocabulary), or could not be reached."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        return protocol.ERROR_EXIT.get(self.code, protocol.EXIT_FAILED)


class Client:
    def __init__(self, path: str | Path | None = None, timeout: float = 30.0) -> None:
        self.path = str(path or default_socket())
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: protocol.LineReader | None = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.path)
            except FileNotFoundError:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"no socket at {self.path}: is reqpmd "
                    "running? (systemctl status reqpmd; --socket PATH or "
                    "$REQPM_SOCKET to use another)",
                ) from None
            except PermissionError:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"permission denied on {self.path}: are you "
                    "in the socket's group (reqpm)? (id -Gn)",
                ) from None
            except (ConnectionRefusedError, OSError) as exc:
                sock.close()
                raise ClientError(
                    "unreachable",
                    f"cannot connect to {self.path}: "
                    f"{exc.strerror or exc}; is reqpmd running? "
                    "(systemctl status reqpmd)",
                ) from None
            self._sock = sock
            self._reader = protocol.LineReader(sock)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, op: str, args: dict[str, Any] | None = None, fds: list[int] | None = None
    ) -> Any:
        sock = self._connect()
        assert self._reader is not None
        request = protocol.encode({"v": protocol.VERSION, "op": op, "args": args or {}})
        try:
            protocol.send_with_fds(sock, request, fds or [])
        except ConnectionError as exc:
            # It hung up before we sent: a refusal (too many connections) says why first.
            said = self._last_words()
            self.close()
            raise said or self._lost(exc) from None
        except OSError as exc:
            self.close()
            raise self._lost(exc) from None
        try:
            frame = self._reader.read()
            reply = protocol.decode(frame[0]) if frame is not None else None
        except (OSError, protocol.FrameError) as exc:
            self.close()
            raise self._lost(exc) from None
        if reply is None:
            self.close()
            raise self._lost(EOFError())
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise ClientError(str(error.get("code", "failed")), str(error.get("message", reply)))

    def _last_words(self) -> ClientError | None:
        """The error the daemon sent before it hung up, if it sent one."""
        assert self._reader is not None
        try:
            frame = self._reader.read(deadline=time.monotonic() + 1.0)
            reply = protocol.decode(frame[0]) if frame is not None else {}
        except (OSError, protocol.FrameError):
            return None
        error = reply.get("error")
        if reply.get("ok") is not False or not isinstance(error, dict):
            return None
        return ClientError(str(error.get("code", "failed")), str(error.get("message", "")))

    def _lost(self, exc: BaseException) -> ClientError:
        """What to tell the user when the connection failed mid-call, without errno text
        like "Broken pipe"."""
        if isinstance(exc, ConnectionError | EOFError):
            return ClientError(
                "unreachable",
                f"reqpmd at {self.path} hung up before answering; try again "
                "(if it keeps happening: systemctl status reqpmd)",
            )
        if isinstance(exc, TimeoutError):
            return ClientError(
                "unreachable",
                f"reqpmd at {self.path} did not answer in time; is it stuck? "
                "(systemctl status reqpmd)",
            )
        if isinstance(exc, protocol.FrameError):
            return ClientError("unreachable", f"reqpmd at {self.path} sent a bad reply: {exc}")
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ClientError("unreachable", f"connection to reqpmd at {self.path} failed: {text}")

    def submit(
        self,
        *,
        srpm: Path | None = None,
        spec: Path | None = None,
        sources: Path | None = None,
        chroot: str | None = None,
        priority: int = 0,
    ) -> int:
        """Open the files with our own rights and hand the daemon the descriptors."""
        entries: list[tuple[str, str, Path]] = []
        if srpm is not None:
            entries.append((srpm.name, "srpm", srpm))
        if spec is not None:
            entries.append((spec.name, "spec", spec))
            if sources is not None:
                for path in sorted(sources.iterdir()):
                    if path.is_file() and path.resolve() != spec.resolve():
                        entries.append((path.name, "source", path))
        fds: list[int] = []
        try:
            for _, _, path in entries:
                fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
            args: dict[str, Any] = {
                "files": [{"name": name, "role": role} for name, role, _ in entries],
                "priority": priority,
            }
            if chroot:
                args["chroot"] = chroot
            # the daemon copies the files before it answers: allow for large uploads, so a
            # slow disk is not reported as "unreachable" for a build that was accepted
            sock = self._connect()
            sock.settimeout(max(self.timeout, SUBMIT_TIMEOUT))
            try:
                result = self.call("submit", args, fds)
            finally:
                if self._sock is not None:
                    self._sock.settimeout(self.timeout)
        finally:
            for fd in fds:
                os.close(fd)
        return int(result["id"])
