"""Connection caps on the control socket: one user cannot lock everyone else out.

A non-admin uid may hold MAX_CLIENTS_PER_UID connections at once, and all non-admin uids
together MAX_USER_CLIENTS of the daemon's MAX_CLIENTS: the rest are kept for root and
admin_group. A refused client gets one clear error frame and a clean end of stream, and
reqpmctl prints that message (exit 1), never "Broken pipe".

Other uids are real: a forked child drops to them before it connects, so SO_PEERCRED
names them (the tests run as root).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reqpmctl.client import Client, ClientError
from reqpmd.control import protocol
from reqpmd.control.server import MAX_CLIENTS, MAX_CLIENTS_PER_UID, MAX_USER_CLIENTS
from tests.daemon_harness import Reqpmd, wait_for
from tests.test_reqpmctl import ctl

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as other uids")

NOGROUP = 65534  # the socket's group in these tests
USERS = 100  # admin_group in these tests
NOBODY = (65534, NOGROUP)
OTHER = (65532, NOGROUP)  # a second unprivileged uid, in the socket's group by its gid
ADMIN = (65531, NOGROUP)  # not root; an admin through supplementary group USERS
PING = b'{"v":1,"op":"ping","args":{}}\n'
STATUS = b'{"v":1,"op":"status","args":{}}\n'


def per_uid_refusal(uid: int) -> str:
    return (
        f"too many connections from uid {uid} ({MAX_CLIENTS_PER_UID} at once); "
        "close some and try again"
    )


USERS_REFUSAL = (
    f"too many connections from users ({MAX_USER_CLIENTS} at once; the other "
    f"{MAX_CLIENTS - MAX_USER_CLIENTS} are kept for admins); try again in a moment"
)
TOTAL_REFUSAL = f"too many connections ({MAX_CLIENTS} at once); try again in a moment"


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Reqpmd]:
    os.chmod(short_tmp, 0o755)  # the unprivileged uids must reach the socket
    d = Reqpmd(short_tmp / "d", settings={"socket_group": "nogroup", "admin_group": "users"})
    os.chmod(d.root, 0o755)
    d.start()
    yield d
    d.kill_all()


def _drop_to(ids: tuple[int, int], groups: tuple[int, ...]) -> None:
    os.setgroups(list(groups))
    os.setgid(ids[1])
    os.setuid(ids[0])


def connect_as(d: Reqpmd, ids: tuple[int, int], groups: tuple[int, ...] = ()) -> socket.socket:
    """A connection the daemon sees as ``ids`` (SO_PEERCRED is taken at connect): a child
    drops to them, connects, and hands the socket back over a socketpair."""
    mine, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            mine.close()
            _drop_to(ids, groups)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))
            socket.send_fds(theirs, [b"s"], [s.fileno()])
            code = 0
        finally:
            os._exit(code)
    theirs.close()
    try:
        mine.settimeout(10)
        _, fds, _, _ = socket.recv_fds(mine, 1, 1)
    finally:
        mine.close()
        os.waitpid(pid, 0)
    assert fds, "the child could not connect"
    s = socket.socket(fileno=fds[0])
    s.settimeout(10)
    return s


def read_to_end(s: socket.socket) -> list[dict[str, Any]]:
    """Every frame until the daemon closes; a reset instead of a clean close fails."""
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            raise AssertionError(f"connection reset after {data!r}") from None
        if not chunk:
            break
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


def refusal(message: str) -> dict[str, Any]:
    return {
        "v": protocol.VERSION,
        "ok": False,
        "error": {"code": "unavailable", "message": message},
    }


def served(s: socket.socket) -> bool:
    """Ping on ``s``: True if answered, False if refused."""
    with s:
        s.sendall(PING)
        frame = protocol.LineReader(s).read(time.monotonic() + 10)
        assert frame is not None, "hung up without an answer"
        return bool(json.loads(frame[0])["ok"])


def _hog(path: str, n: int, report: int) -> None:
    """Keep ``n`` connections: each pings once (so we learn the daemon took it), then sits
    idle; one refused or dropped is reopened at once, as a hostile client would."""

    def say(line: str) -> None:
        os.write(report, line.encode() + b"\n")

    def dial() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(path)
        with contextlib.suppress(OSError):
            s.sendall(PING)
        s.setblocking(False)
        return s

    conns: dict[socket.socket, list[Any]] = {dial(): [b"", False] for _ in range(n)}
    while True:
        ready, _, _ = select.select(list(conns), [], [], 1.0)
        for s in ready:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            state = conns[s]
            if data:
                state[0] += data
                while b"\n" in state[0]:
                    line, _, state[0] = state[0].partition(b"\n")
                    reply = json.loads(line)
                    if reply["ok"]:
                        state[1] = True
                        say("held")
                    else:
                        say(f"refused {reply['error']['code']} {reply['error']['message']}")
                continue
            if state[1]:
                say("dropped")
            del conns[s]
            s.close()
            conns[dial()] = [b"", False]


class Hog:
    """A child, dropped to ``ids``, holding ``n`` connections to the daemon (see _hog)."""

    def __init__(
        self, d: Reqpmd, ids: tuple[int, int], n: int, groups: tuple[int, ...] = ()
    ) -> None:
        self.n = n
        self.held = 0
        self.max_held = 0
        self.refused = 0
        self.messages: set[str] = set()
        self._lock = threading.Lock()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                _drop_to(ids, groups)
                _hog(str(d.socket), n, w)
            finally:
                os._exit(1)
        os.close(w)
        self.pid = pid
        self._reader = threading.Thread(target=self._read, args=(r,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        with os.fdopen(fd, "rb") as f:
            for raw in f:
                kind, _, rest = raw.decode().rstrip("\n").partition(" ")
                with self._lock:
                    if kind == "held":
                        self.held += 1
                        self.max_held = max(self.max_held, self.held)
                    elif kind == "dropped":
                        self.held -= 1
                    else:
                        self.refused += 1
                        self.messages.add(rest)

    def settled(self, held: int) -> bool:
        """At least ``held`` connections taken, and every one of the n answered once."""
        with self._lock:
            return self.held >= held and self.held + self.refused >= self.n

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)
        self._reader.join(timeout=5)


@pytest.fixture
def hogs() -> Iterator[list[Hog]]:
    made: list[Hog] = []
    yield made
    for hog in made:
        hog.stop()


def test_root_and_admins_are_served_while_one_uid_floods_the_socket(
    daemon: Reqpmd, hogs: list[Hog]
) -> None:
    hog = Hog(daemon, NOBODY, MAX_CLIENTS)  # as many as the whole daemon serves
    hogs.append(hog)
    wait_for(lambda: hog.settled(min(MAX_CLIENTS, MAX_CLIENTS_PER_UID)), timeout=10)
    refused_before = hog.refused
    for _ in range(25):
        with Client(daemon.socket, timeout=10) as c:
            assert c.call("status")["redis"]["ok"]
    r = ctl(daemon, "status")
    assert r.returncode == 0, r.stderr
    r = ctl(daemon, "status", as_user=ADMIN, groups=(USERS,))  # an admin, not root
    assert r.returncode == 0, r.stderr
    # all the while the hog kept knocking, and never held more than its share
    assert hog.refused > refused_before
    assert hog.max_held == MAX_CLIENTS_PER_UID
    assert hog.messages == {f"unavailable {per_uid_refusal(NOBODY[0])}"}


def test_another_uid_is_served_while_one_is_at_its_cap(daemon: Reqpmd, hogs: list[Hog]) -> None:
    hog = Hog(daemon, NOBODY, MAX_CLIENTS)
    hogs.append(hog)
    wait_for(lambda: hog.settled(min(MAX_CLIENTS, MAX_CLIENTS_PER_UID)), timeout=10)
    for _ in range(3):
        r = ctl(daemon, "--json", "status", as_user=OTHER)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["redis"]["ok"]


def test_a_uid_at_its_cap_gets_a_clear_refusal_then_is_served_again(
    daemon: Reqpmd, hogs: list[Hog]
) -> None:
    hog = Hog(daemon, NOBODY, MAX_CLIENTS_PER_UID)
    hogs.append(hog)
    wait_for(lambda: hog.settled(MAX_CLIENTS_PER_UID), timeout=10)
    message = per_uid_refusal(NOBODY[0])
    # reqpmctl: the daemon's words, one line, exit 1
    r = ctl(daemon, "status", as_user=NOBODY)
    assert (r.returncode, r.stderr) == (protocol.EXIT_FAILED, f"reqpmctl: {message}\n")
    # on the wire: one error frame and a clean end of stream, never a reset, whether the
    # client is silent or has already sent its request
    with connect_as(daemon, NOBODY) as s:
        assert read_to_end(s) == [refusal(message)]
    assert daemon.proc is not None
    fds_before = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    for _ in range(5):  # descriptors sent with a refused request are not kept either
        r, w = os.pipe()
        with connect_as(daemon, NOBODY) as s:
            protocol.send_with_fds(s, STATUS, [r, w])
            assert read_to_end(s) == [refusal(message)]
        os.close(r)
        os.close(w)
    wait_for(lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd")) <= fds_before, timeout=10)
    # the count goes down as connections end: the uid is served again
    hog.stop()
    wait_for(lambda: served(connect_as(daemon, NOBODY)), timeout=10)


def test_users_together_leave_a_reserve_for_admins(daemon: Reqpmd, hogs: list[Hog]) -> None:
    assert MAX_USER_CLIENTS % MAX_CLIENTS_PER_UID == 0  # whole hogs fill the users' share
    for i in range(MAX_USER_CLIENTS // MAX_CLIENTS_PER_UID):
        hogs.append(Hog(daemon, (60000 + i, NOGROUP), MAX_CLIENTS_PER_UID))
    for hog in hogs:
        wait_for(lambda hog=hog: hog.settled(MAX_CLIENTS_PER_UID), timeout=10)
    with connect_as(daemon, OTHER) as s:
        assert read_to_end(s) == [refusal(USERS_REFUSAL)]
    r = ctl(daemon, "status", as_user=OTHER)
    assert (r.returncode, r.stderr) == (protocol.EXIT_FAILED, f"reqpmctl: {USERS_REFUSAL}\n")
    assert served(connect_as(daemon, ADMIN, groups=(USERS,)))  # the reserve
    assert daemon.call("status")["redis"]["ok"]


def test_the_overall_cap_is_a_clear_refusal_too(daemon: Reqpmd) -> None:
    def held_connection() -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(daemon.socket))
        s.sendall(PING)
        if b'"ok":true' in s.recv(65536):
            return s
        s.close()  # the harness's start-up ping may not be counted out yet
        return None

    held = []
    try:
        for _ in range(MAX_CLIENTS):  # root may use the reserve, but no more than the total
            held.append(wait_for(held_connection, timeout=10))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(daemon.socket))
            assert read_to_end(s) == [refusal(TOTAL_REFUSAL)]
    finally:
        for s in held:
            s.close()
    wait_for(lambda: daemon.call("ping"), timeout=10)


class _Fake:
    """A stand-in daemon that answers every connection with ``reply`` then hangs up."""

    def __init__(self, path: Path, reply: bytes, read_first: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.reply = reply
        self.read_first = read_first
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                if self.read_first:  # wait for the request, leave it unread: a reset
                    select.select([conn], [], [], 5)
                conn.sendall(self.reply)
                conn.close()


class _LateClient(Client):
    """Sends only once the daemon has hung up: the send fails with EPIPE."""

    def _connect(self) -> socket.socket:
        sock = super()._connect()
        poller = select.poll()
        poller.register(sock, select.POLLHUP)
        assert poller.poll(5000), "the fake daemon did not hang up"
        return sock


def test_client_surfaces_the_daemons_message_not_a_broken_pipe(short_tmp: Path) -> None:
    path = short_tmp / "fake.sock"
    _Fake(path, protocol.encode(refusal("too many connections from uid 7 (8 at once)")))
    with _LateClient(path) as c, pytest.raises(ClientError) as err:
        c.call("status")
    assert (err.value.code, err.value.message) == (
        "unavailable",
        "too many connections from uid 7 (8 at once)",
    )
    assert err.value.exit_code == protocol.EXIT_FAILED


@pytest.mark.parametrize("late", [True, False], ids=["broken-pipe", "reset"])
def test_client_names_a_hang_up_without_errno_text(short_tmp: Path, late: bool) -> None:
    path = short_tmp / "fake.sock"
    _Fake(path, b"", read_first=not late)
    with (_LateClient if late else Client)(path) as c, pytest.raises(ClientError) as err:
        c.call("status")
    assert err.value.code == "unreachable"
    assert err.value.message == (
        f"reqpmd at {path} hung up before answering; try again "
        "(if it keeps happening: systemctl status reqpmd)"
    )
