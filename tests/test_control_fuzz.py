"""The control socket under hostile input: random and malformed frames, oversized,
slow and half-closed clients, while a build runs. The daemon must answer or hang up,
never crash, hang other clients or leak descriptors."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reqpmd.control import protocol
from tests.daemon_harness import FINAL, Reqpmd, wait_for


@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reqpmd]:
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rqf", dir="/tmp"))
    d = Reqpmd(root / "d", mock_sleep=4)
    d.start()
    yield d
    d.kill_all()
    shutil.rmtree(root, ignore_errors=True)


def exchange(d: Reqpmd, payload: bytes, timeout: float = 15) -> bytes:
    """Send payload (from a thread, so a reply sent mid-upload is still read), half-close,
    return whatever comes back before the daemon hangs up."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(d.socket))

    def send() -> None:
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon hung up on us: allowed

    sender = threading.Thread(target=send)
    sender.start()
    chunks = []
    try:
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    except ConnectionResetError:
        pass
    finally:
        sender.join()
        s.close()
    return b"".join(chunks)


def check_replies(raw: bytes) -> None:
    for line in raw.splitlines():
        reply = json.loads(line)
        assert reply["v"] == protocol.VERSION
        assert isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in protocol.ERROR_EXIT
            assert reply["error"]["message"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ops = st.sampled_from(
    [
        "status",
        "submit",
        "build.show",
        "build.cancel",
        "settings.set",
        "slots.release",
        "slots.clear",
        "build.log",
        "nope",
        "",
    ]
)
requests = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, "1", None]), "op": ops | st.integers(), "args": json_values}
)
frames = st.one_of(
    st.binary(max_size=300),
    requests.map(lambda r: json.dumps(r).encode() + b"\n"),
    st.lists(requests, min_size=1, max_size=3).map(
        lambda rs: b"".join(json.dumps(r).encode() + b"\n" for r in rs)
    ),
)


def test_fuzzed_frames_while_a_build_runs(busy_daemon: Reqpmd) -> None:
    d = busy_daemon
    build_id = d.submit()
    d.wait_state(build_id, "building")
    assert d.proc is not None
    fds_before = len(os.listdir(f"/proc/{d.proc.pid}/fd"))

    @settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(frames)
    def fuzz(frame: bytes) -> None:
        check_replies(exchange(d, frame))

    fuzz()
    # The build was never disturbed by any of it.
    assert d.wait_state(build_id, FINAL, timeout=60)["state"] == "succeeded"
    assert d.call("status")["redis"]["ok"]
    # Descriptors passed with junk are closed; connection threads are gone.
    wait_for(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) <= fds_before + 2, timeout=20)


def test_oversized_frame_is_refused(busy_daemon: Reqpmd) -> None:
    raw = exchange(busy_daemon, b"x" * (protocol.MAX_LINE + 70000))
    assert b"longer than" in raw


def test_slow_and_silent_clients_do_not_hold_up_others(busy_daemon: Reqpmd) -> None:
    d = busy_daemon
    silent = []
    for _ in range(10):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        s.sendall(b'{"v": 1, "op": "sta')  # never finished
        silent.append(s)
    started = time.monotonic()
    assert d.call("ping")["version"]
    assert time.monotonic() - started < 2  # not queued behind the silent ones
    for s in silent:
        s.close()


def test_descriptors_sent_with_a_bad_request_are_closed(busy_daemon: Reqpmd) -> None:
    d = busy_daemon
    assert d.proc is not None
    before = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
    for _ in range(20):
        r, w = os.pipe()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d.socket))
        protocol.send_with_fds(s, b'{"v": 1, "op": "status"}\n', [r, w])
        assert b'"ok":true' in s.recv(65536)
        s.close()
        os.close(r)
        os.close(w)
    wait_for(lambda: len(os.listdir(f"/proc/{d.proc.pid}/fd")) <= before + 2, timeout=10)


def test_submit_refuses_bad_names_and_non_regular_files(
    busy_daemon: Reqpmd, short_tmp: Path
) -> None:
    from reqpmctl.client import Client, ClientError

    spec = short_tmp / "x.spec"
    spec.write_text("Name: x\n")
    for name in ("../x.spec", "a/b.spec", "..", ".hidden.spec"):
        fd = os.open(spec, os.O_RDONLY)
        try:
            with Client(busy_daemon.socket) as c, pytest.raises(ClientError) as err:
                c.call("submit", {"files": [{"name": name, "role": "spec"}]}, [fd])
            assert err.value.code == "invalid" and "not allowed" in err.value.message
        finally:
            os.close(fd)
    r, w = os.pipe()
    try:
        with Client(busy_daemon.socket) as c, pytest.raises(ClientError) as err:
            c.call("submit", {"files": [{"name": "p.src.rpm", "role": "srpm"}]}, [r])
        assert "not a regular file" in err.value.message
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    "frame",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
        b'{"v": 1, "op": "build.show", "args": {"id": ' + b"9" * 5000 + b"}}",
    ],
    ids=["deeply nested", "5000-digit integer"],
)
def test_deep_nesting_and_huge_integers_are_bad_requests(busy_daemon: Reqpmd, frame: bytes) -> None:
    before = busy_daemon.log().count("Traceback")
    raw = exchange(busy_daemon, frame + b"\n")
    [line] = raw.splitlines()
    reply = json.loads(line)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request"
    assert reply["error"]["message"].startswith("not JSON this daemon accepts")
    assert busy_daemon.call("ping")["version"]
    assert busy_daemon.log().count("Traceback") == before  # answered, not logged as a crash
