"""A full state_dir, for real: a small tmpfs under a real reqpmd, filled to the last byte.

ENOSPC anywhere is an error the daemon survives: the request or build it hits fails with
a clear message, nothing is left half-written, the loop keeps running, status says the
disk is full, and the start after a crash works on the full disk too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reqpmctl.client import ClientError
from reqpmd.slots.server import RedisServer
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.mounts import tmpfs


@pytest.fixture
def small_disk(short_tmp: Path) -> Iterator[Path]:
    with tmpfs(short_tmp / "state", "size=12m") as mount:
        yield mount


def fill(mount: Path) -> Path:
    """Write until the disk refuses; returns the filler (delete it to make room)."""
    filler = mount / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):  # big writes, then the last few bytes
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    probe = mount / "probe"
    with pytest.raises(OSError) as err:
        pfd = os.open(probe, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.write(pfd, b"x" * 8192)
        finally:
            os.close(pfd)
    assert err.value.errno == errno.ENOSPC
    with contextlib.suppress(FileNotFoundError):
        probe.unlink()
    return filler


@pytest.mark.parametrize("redis", ["shared", "embedded"])
def test_a_full_state_dir_is_survived_and_recovered_from(
    short_tmp: Path, small_disk: Path, redis_server: RedisServer, redis: str
) -> None:
    """The embedded Redis keeps its data in state_dir too: on the full disk it must go on
    granting and renewing (with an append-only file it refused every write)."""
    d = Reqpmd(
        short_tmp / "d",
        redis_url=redis_server.url if redis == "shared" else "embedded",
        mock_sleep=0.8,
        settings={
            "state_dir": str(small_disk),
            "max_concurrent_builds": 1,
            "min_free_state_mb": 0,  # let the writes themselves hit ENOSPC
            "slot_lease_seconds": 10,
        },
    )
    try:
        d.start()
        running = d.submit()
        d.wait_state(running, "building")
        queued = d.submit()
        filler = fill(small_disk)

        # a request that needs room is refused with a clear message and stores nothing
        with pytest.raises(ClientError) as err:
            d.submit()
        assert err.value.code == "unavailable" and "has 0 MB free" in err.value.message
        assert "nothing was stored" in err.value.message
        assert not list((small_disk / "incoming").iterdir())

        # the running build ends (its end waits for room); the loop and the socket live on
        status = wait_for(lambda: (s := d.call("status"))["write_error"] and s, timeout=30)
        assert "state_dir is full" in status["summary"]
        assert d.proc is not None and d.proc.poll() is None

        # a crash on the full disk, and a start on it: the socket comes up, recovery waits
        d.kill9()
        d.start()
        assert d.call("ping")["version"]
        assert d.build(queued)["state"] in ("queued", "waiting")

        filler.unlink()  # room again: everything ends, each build exactly once
        for build_id in (running, queued):
            try:
                assert d.wait_state(build_id, FINAL, timeout=60)["state"] in FINAL
            except AssertionError as exc:
                raise AssertionError(f"{exc}; status {d.call('status')}\n{d.log()}") from None
        assert d.wait_state(d.submit(), FINAL, timeout=60)["state"] == "succeeded"
        wait_for(lambda: d.call("status")["write_error"] is None)
        assert "Traceback" not in d.log(), d.log()
    finally:
        d.kill_all()


def test_check_config_and_reqpmctl_need_no_disk(tmp_path: Path) -> None:
    """Sanity: the tools that diagnose a full disk do not write themselves."""
    config = tmp_path / "c.yaml"
    config.write_text("max_concurrent_builds: 2\n")
    r = subprocess.run(
        [sys.executable, "-m", "reqpmd.daemon", "--check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
