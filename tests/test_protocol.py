"""The wire format's reader: one deadline per request, a cap on lines and descriptors."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from reqpmd.config.parse import validate
from reqpmd.config.schema import redact_url
from reqpmd.control import protocol


def test_a_line_and_its_descriptors() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        protocol.send_with_fds(a, protocol.encode({"v": 1, "op": "x"}), [r])
        line, fds = protocol.LineReader(b).read(deadline=time.monotonic() + 5) or (b"", [])
        assert protocol.decode(line) == {"v": 1, "op": "x"}
        assert len(fds) == 1 and os.fstat(fds[0]).st_ino == os.fstat(r).st_ino
        os.close(fds[0])
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_request_that_trickles_in_past_its_deadline_is_cut_off() -> None:
    """Each byte arrives quickly (no single recv times out); the whole request is slow."""
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.1):
            try:
                a.send(b"x")
            except OSError:
                return

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            protocol.LineReader(b).read(deadline=started + 0.5)
        assert 0.5 <= time.monotonic() - started < 1.5
    finally:
        stop.set()
        sender.join()
        a.close()
        b.close()


def test_descriptors_are_capped_across_the_pieces_of_one_line() -> None:
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(40)]
    try:
        ends = [fd for p in pipes for fd in p]  # 80 descriptors
        protocol.send_with_fds(a, b'{"v": 1', ends[:40])
        protocol.send_with_fds(a, b', "op": "x"', ends[40:])
        a.send(b"}\n")
        reader = protocol.LineReader(b)
        with pytest.raises(protocol.FrameError, match="more than 64 file descriptors"):
            reader.read(deadline=time.monotonic() + 5)
        assert reader.fds == []  # the ones received were closed
    finally:
        for p in pipes:
            for fd in p:
                os.close(fd)
        a.close()
        b.close()


def test_oversized_line() -> None:
    a, b = socket.socketpair()
    try:
        a.sendall(b"x" * 2000)
        with pytest.raises(protocol.FrameError, match="longer than"):
            protocol.LineReader(b, max_line=1000).read(deadline=time.monotonic() + 5)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@redis.example:6379/0", "redis://:***@redis.example:6379/0"),
        ("rediss://reqpm:s3cret@redis.example/1", "rediss://reqpm:***@redis.example/1"),
        ("redis://redis.example:6379/0", "redis://redis.example:6379/0"),
        ("unix:///run/redis/redis.sock", "unix:///run/redis/redis.sock"),
        ("embedded", "embedded"),
    ],
)
def test_redis_passwords_are_not_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    s = validate({"redis_url": url}, environ={})
    assert s.as_dict(redact=True)["redis_url"] == shown
    assert s.as_dict()["redis_url"] == url
