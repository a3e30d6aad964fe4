"""The control socket: accept, read one request at a time, check who asks, answer.

Identity comes from the kernel (SO_PEERCRED and SO_PEERGROUPS), never from the
request. A client that sends garbage, too much, too slowly, or hangs up gets an error
reply or a closed connection; it never holds up other clients (one thread per
connection, a deadline per request, and caps on connections).

The caps are applied as a connection is accepted, once its peer is known: a non-admin
uid may hold MAX_CLIENTS_PER_UID connections, all non-admins together MAX_USER_CLIENTS,
and everyone MAX_CLIENTS; the difference is kept for root and admin_group, so one user
(or a few) cannot lock admins out. A refused client gets one "unavailable" error saying
which cap it hit, then a clean end of stream (not a reset, see ControlServer._refuse).

A handler may answer with ``protocol.WithFds``: its descriptors go with the reply line,
and the server closes its own copies once sent, or once the send failed.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reqpmd.control import protocol
from reqpmd.errors import BadRequest, ReqpmError

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
REQUEST_TIMEOUT = 10.0  # seconds a client may take to send one request
MAX_CLIENTS = 64  # connections served at once, in all
MAX_USER_CLIENTS = 48  # of which non-admins may hold; the rest are kept for admins
MAX_CLIENTS_PER_UID = 8  # of which one non-admin uid may hold
REFUSAL_LINGER = 1.0  # seconds a refused client gets to finish sending before we close
MAX_REFUSING = 16  # refused connections lingering at once; past that they close at once
REFUSAL_LOG_EVERY = 60.0  # seconds between warnings about one uid's refused connections


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    admin: bool

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def role(self) -> str:
        return "admin" if self.admin else "user"

    @property
    def who(self) -> str:
        """How logs and the audit trail name the peer."""
        return f"{self.user} (uid {self.uid})"


@dataclass
class Request:
    op: str
    args: dict[str, Any]
    peer: Peer
    fds: list[int]


Handler = Callable[[Request], Any]


def peer_of(conn: socket.socket, admin_group: str) -> Peer:
    pid, uid, gid = struct.unpack(
        "3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    )
    groups: set[int] = {gid} | _peer_groups(conn, pid)
    try:
        admin_gid: int | None = grp.getgrnam(admin_group).gr_gid
    except KeyError:
        admin_gid = None
    admin = uid == 0 or (admin_gid is not None and admin_gid in groups)
    return Peer(pid, uid, gid, frozenset(groups), admin)


def _peer_groups(conn: socket.socket, pid: int) -> set[int]:
    """Supplementary groups of the peer, from the kernel (SO_PEERGROUPS, Linux 4.13+).

    Python caps getsockopt buffers at 1024 bytes (256 groups); a peer with more, or an
    older kernel, falls back to /proc/PID/status, read at connect time.
    """
    try:
        raw = conn.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        return set(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


def bind_socket(path: Path, group: str) -> socket.socket:
    """Bind the control socket, replacing a stale one (but never a live daemon's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise RuntimeError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale: nobody listens
        else:
            raise RuntimeError(f"another reqpmd is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o117)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except KeyError:
        log.warning("socket_group %r does not exist; %s keeps group %d", group, path, os.getgid())
    except PermissionError as exc:
        log.warning("cannot give %s to group %r: %s", path, group, exc)
    os.chmod(path, 0o660)
    sock.listen(64)
    return sock


class Admission:
    """Counts the connections being served: in all, from non-admins, per non-admin uid."""

    def __init__(
        self,
        total: int = MAX_CLIENTS,
        users: int = MAX_USER_CLIENTS,
        per_uid: int = MAX_CLIENTS_PER_UID,
    ) -> None:
        self.total, self.users, self.per_uid = total, users, per_uid
        self._lock = threading.Lock()
        self._all = 0
        self._users = 0
        self._by_uid: dict[int, int] = {}

    def admit(self, peer: Peer) -> str | None:
        """Count the connection in and return None, or return why it is refused."""
        with self._lock:
            if not peer.admin:
                if self._by_uid.get(peer.uid, 0) >= self.per_uid:
                    return (
                        f"too many connections from uid {peer.uid} ({self.per_uid} at "
                        "once); close some and try again"
                    )
                if self._users >= self.users:
                    return (
                        f"too many connections from users ({self.users} at once; the "
                        f"other {self.total - self.users} are kept for admins); try again "
                        "in a moment"
                    )
            if self._all >= self.total:
                return f"too many connections ({self.total} at once); try again in a moment"
            self._all += 1
            if not peer.admin:
                self._users += 1
                self._by_uid[peer.uid] = self._by_uid.get(peer.uid, 0) + 1
            return None

    def release(self, peer: Peer) -> None:
        with self._lock:
            self._all -= 1
            if not peer.admin:
                self._users -= 1
                left = self._by_uid.pop(peer.uid) - 1
                if left:
                    self._by_uid[peer.uid] = left


class ControlServer:
    def __init__(
        self, sock: socket.socket, handler: Handler, admin_group: Callable[[], str]
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.admin_group = admin_group
        self.admission = Admission()
        self._refusing = threading.BoundedSemaphore(MAX_REFUSING)
        self._refusals_logged: dict[int, tuple[float, int]] = {}  # uid -> (when, since)
        self._closing = threading.Event()
        # close() writes here to wake the accept loop: no polling while nobody connects
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._thread = threading.Thread(
            target=self._accept_loop, name="control-accept", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop accepting. Never shutdown() the listening socket: under socket activation
        systemd shares it, and a shut-down socket fails reqpmd.socket for good."""
        self._closing.set()
        os.write(self._wakeup_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        self.sock.close()
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)

    def _accept_loop(self) -> None:
        # non-blocking accept after poll() says a connection (or close()) is there
        self.sock.setblocking(False)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wakeup_r, select.POLLIN)
        while not self._closing.is_set():
            try:
                poller.poll()
                if self._closing.is_set():
                    return
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                continue  # another accept took it, or a signal
            except OSError:
                if self._closing.is_set():
                    return
                time.sleep(0.1)  # EMFILE and friends: do not spin
                continue
            try:
                self._admit(conn)
            except Exception:
                log.exception("control connection not served")
                conn.close()

    def _admit(self, conn: socket.socket) -> None:
        """Identify the peer (SO_PEERCRED is there as soon as it connected), count it in,
        and serve it in a thread of its own; or refuse it."""
        conn.settimeout(None)
        try:
            peer = peer_of(conn, self.admin_group())
        except OSError:
            conn.close()
            return
        refused = self.admission.admit(peer)
        if refused is not None:
            self._refuse(conn, peer, refused)
            return
        try:
            threading.Thread(
                target=self._serve, args=(conn, peer), name="control-client", daemon=True
            ).start()
        except BaseException:
            self.admission.release(peer)
            raise

    def _refuse(self, conn: socket.socket, peer: Peer, message: str) -> None:
        """Say why, then end the stream. Closing a Unix socket whose request is still
        unread resets the connection: the client would see "connection reset" or
        "broken pipe" instead of this message. So a thread reads and drops what the
        client sends until it hangs up (at most REFUSAL_LINGER), then closes."""
        self._log_refusal(peer, message)
        try:
            conn.setblocking(False)  # a few hundred bytes into an empty buffer: never waits
            conn.sendall(_error("unavailable", message))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if not self._refusing.acquire(blocking=False):
            conn.close()  # a flood of refusals: do not pile up threads
            return
        try:
            threading.Thread(
                target=self._linger, args=(conn,), name="control-refuse", daemon=True
            ).start()
        except BaseException:
            self._refusing.release()
            conn.close()
            raise

    def _linger(self, conn: socket.socket) -> None:
        try:
            deadline = time.monotonic() + REFUSAL_LINGER
            while (left := deadline - time.monotonic()) > 0:
                conn.settimeout(left)
                if not conn.recv(65536):  # passed descriptors are dropped by the kernel
                    break
        except OSError:
            pass
        finally:
            conn.close()
            self._refusing.release()

    def _log_refusal(self, peer: Peer, message: str) -> None:
        """One warning per uid per REFUSAL_LOG_EVERY, counting the ones left out (only
        the accept thread calls this)."""
        now = time.monotonic()
        last, since = self._refusals_logged.get(peer.uid, (now - REFUSAL_LOG_EVERY, 0))
        if now - last < REFUSAL_LOG_EVERY:
            self._refusals_logged[peer.uid] = (last, since + 1)
            return
        self._refusals_logged[peer.uid] = (now, 0)
        more = f" ({since} more refused since the last warning)" if since else ""
        log.warning("refused a connection from %s: %s%s", peer.who, message, more)

    def _serve(self, conn: socket.socket, peer: Peer) -> None:
        reader = protocol.LineReader(conn)
        try:
            while not self._closing.is_set():
                try:
                    # one deadline for the whole request, however slowly it trickles in
                    frame = reader.read(deadline=time.monotonic() + REQUEST_TIMEOUT)
                except protocol.FrameError as exc:
                    conn.sendall(_error("bad_request", str(exc)))
                    return
                if frame is None:
                    return
                line, fds = frame
                try:
                    reply, attached = self._answer(line, fds, peer)
                finally:
                    protocol.close_all(fds)
                self._send(conn, reply, attached)
        except (OSError, TimeoutError):
            pass  # slow, vanished or half-closed client: just drop it
        finally:
            reader.close_fds()
            conn.close()
            self.admission.release(peer)

    @staticmethod
    def _send(conn: socket.socket, reply: bytes, attached: protocol.WithFds | None) -> None:
        """The reply line with its descriptors; our copies are closed however it went
        (the client's are its own once the kernel has queued them)."""
        try:
            protocol.send_with_fds(conn, reply, attached.fds if attached else [])
        finally:
            if attached is not None:
                attached.close()

    def _answer(
        self, line: bytes, fds: list[int], peer: Peer
    ) -> tuple[bytes, protocol.WithFds | None]:
        """The reply line, and the descriptors to send with it, if the handler gave any."""
        try:
            obj = protocol.decode(line)
            if obj.get("v") != protocol.VERSION:
                raise BadRequest(
                    f"unsupported protocol version {obj.get('v')!r}; this daemon "
                    f"speaks {protocol.VERSION}"
                )
            op, args = obj.get("op"), obj.get("args", {})
            if not isinstance(op, str) or not isinstance(args, dict):
                raise BadRequest("a request needs a string 'op' and an object 'args'")
            return _success(self.handler(Request(op, args, peer, fds)))
        except protocol.FrameError as exc:
            return _error("bad_request", str(exc)), None
        except ReqpmError as exc:
            return _error(exc.code, str(exc)), None
        except Exception as exc:
            log.exception("control request failed")
            return _error("failed", f"internal error: {type(exc).__name__}: {exc}"), None


def _success(result: Any) -> tuple[bytes, protocol.WithFds | None]:
    """An ok reply; a WithFds result is closed here if its reply cannot be made."""
    if not isinstance(result, protocol.WithFds):
        return protocol.encode({"v": protocol.VERSION, "ok": True, "result": result}), None
    try:
        if len(result.fds) > protocol.MAX_FDS:
            raise RuntimeError(
                f"a reply with {len(result.fds)} descriptors; at most {protocol.MAX_FDS} fit"
            )
        line = protocol.encode({"v": protocol.VERSION, "ok": True, "result": result.result})
    except BaseException:
        result.close()
        raise
    return line, result


def _error(code: str, message: str) -> bytes:
    return protocol.encode(
        {"v": protocol.VERSION, "ok": False, "error": {"code": code, "message": message}}
    )
