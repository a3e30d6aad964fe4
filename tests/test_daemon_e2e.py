"""reqpmd end to end: real daemons, a real redis-server, the mock stand-in, real signals."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from reqpmctl.client import ClientError
from reqpmd.slots.server import RedisServer
from tests.conftest import MakeDaemon
from tests.daemon_harness import FINAL, Reqpmd, max_overlap, wait_for


def two_hosts(
    daemons: MakeDaemon, redis_server: RedisServer, short_tmp: Path, mock_sleep: float, limit: int
) -> tuple[Reqpmd, Reqpmd]:
    """Two daemons sharing one Redis and one mock log (to measure overlap across them)."""
    common = {
        "redis_url": redis_server.url,
        "mock_sleep": mock_sleep,
        "mock_log": short_tmp / "all-mock.jsonl",
        "settings": {"max_concurrent_builds": limit},
    }
    return (
        daemons("a", host_id="host-a", **common).start(),
        daemons("b", host_id="host-b", **common).start(),
    )


def _rebuilds(d: Reqpmd, build_id: int) -> list[dict[str, object]]:
    return [r for r in d.mock_runs() if f"build{build_id}" in r["argv"]]


def test_spec_build_runs_both_steps_in_its_own_root_then_scrubs(daemons: MakeDaemon) -> None:
    d = daemons().start()
    build_id = d.submit()
    build = d.wait_state(build_id, FINAL)
    assert build["state"] == "succeeded", (build, d.log())
    assert build["exit_code"] == 0
    assert build["started_at"] <= build["finished_at"]
    runs = _rebuilds(d, build_id)
    modes = [r["mode"] for r in runs]
    assert modes == ["buildsrpm", "rebuild", "clean"]
    for r in runs:
        argv = r["argv"]
        assert argv[argv.index("--uniqueext") + 1] == f"build{build_id}"
        assert argv[argv.index("-r") + 1] == "fedora-42-x86_64"
    scrub = runs[-1]["argv"]
    assert "--scrub=chroot" in scrub and "--scrub=bootstrap" in scrub
    assert "--scrub=all" not in scrub
    result = Path(build["result_dir"])
    assert (result / "hello-1.0-1.src.rpm").exists()
    assert any(p.name.endswith(".x86_64.rpm") for p in result.iterdir())
    # the unique roots are gone; the cache shared by every build of the config is not
    assert not (d.mock_root / f"fedora-42-x86_64-build{build_id}").exists()
    assert not (d.mock_root / f"fedora-42-x86_64-bootstrap-build{build_id}").exists()
    assert (d.mock_root / "cache" / "fedora-42-x86_64").is_dir()
    assert (d.mock_root / "cache" / "fedora-42-x86_64-bootstrap").is_dir()
    log = Path(build["log_path"]).read_text()
    assert "--rebuild" in log and "Finish: rpmbuild" in log
    # the journal line follows the state change: wait for it, do not race it
    wait_for(lambda: "build 1: succeeded" in d.log())


def test_srpm_build_runs_only_the_rebuild_step(daemons: MakeDaemon) -> None:
    d = daemons().start()
    build_id = d.submit("foo-2.0-1.src.rpm")
    assert d.wait_state(build_id, FINAL)["state"] == "succeeded"
    assert [r["mode"] for r in _rebuilds(d, build_id)] == ["rebuild", "clean"]


def test_failed_build_is_failed_with_the_exit_code(daemons: MakeDaemon) -> None:
    d = daemons().start()
    build_id = d.submit("will-fail-1-1.src.rpm")
    build = d.wait_state(build_id, FINAL)
    assert build["state"] == "failed"
    assert build["exit_code"] == 30
    assert "exited with 30" in build["error"]


def test_parallel_builds_get_distinct_roots_and_never_hit_the_root_lock(
    daemons: MakeDaemon,
) -> None:
    d = daemons(settings={"max_concurrent_builds": 3}, mock_sleep=0.8).start()
    ids = [d.submit() for _ in range(3)]
    for i in ids:
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded"
    runs = d.mock_runs()
    assert max_overlap(runs) == 3  # really in parallel
    assert not any(r["exit"] == 60 for r in runs)
    roots = {r["root"] for r in runs if r["mode"] == "rebuild"}
    assert roots == {f"fedora-42-x86_64-build{i}" for i in ids}


def test_limit_holds_across_daemons_sharing_one_redis(
    daemons: MakeDaemon, redis_server: RedisServer, short_tmp: Path
) -> None:
    a, b = two_hosts(daemons, redis_server, short_tmp, mock_sleep=0.6, limit=2)
    ids = [(a, a.submit()) for _ in range(3)] + [(b, b.submit()) for _ in range(3)]
    seen_max = 0
    deadline = time.monotonic() + 90
    while not all(d.build(i)["state"] in FINAL for d, i in ids):
        assert time.monotonic() < deadline
        seen_max = max(seen_max, a.call("status")["active_count"])
        time.sleep(0.05)
    assert all(d.build(i)["state"] == "succeeded" for d, i in ids)
    assert max_overlap([r for r in Reqpmd.mock_runs(a)]) == 2
    assert seen_max <= 2
    hosts = {h["host_id"] for h in a.call("hosts")}
    assert hosts == {"host-a", "host-b"}


def test_cancel_stops_mock_with_sigint_scrubs_and_frees_the_slot(daemons: MakeDaemon) -> None:
    d = daemons(mock_sleep=30).start()
    build_id = d.submit()
    d.wait_state(build_id, "building")
    wait_for(lambda: _mock_running(d, build_id))
    d.call("build.cancel", {"id": build_id})
    build = d.wait_state(build_id, FINAL, timeout=20)
    assert build["state"] == "cancelled"
    runs = _rebuilds(d, build_id)
    assert runs[0]["exit"] == 7  # mock's exit on SIGINT (KeyboardInterrupt)
    assert runs[-1]["mode"] == "clean"
    assert wait_for(lambda: d.call("status")["active_count"] == 0)


def _ticks_pass(d: Reqpmd, passes: int = 3) -> None:
    """Wait until the scheduler has made ``passes`` more passes: the positive event
    that proves a "must not start" window was really observed."""
    start = d.call("status")["scheduler_ticks"]
    wait_for(lambda: d.call("status")["scheduler_ticks"] >= start + passes)


def _cmdline(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) + " "
    except psutil.Error:
        return ""  # gone meanwhile


def _mock_running(d: Reqpmd, build_id: int) -> bool:
    return (d.mock_root / f"fedora-42-x86_64-build{build_id}").exists()


def test_cancel_of_queued_and_waiting_builds(daemons: MakeDaemon) -> None:
    d = daemons(settings={"max_concurrent_builds": 1}, mock_sleep=30).start()
    first = d.submit()
    d.wait_state(first, "building")
    waiting = d.submit()
    d.wait_state(waiting, "waiting")
    d.call("build.cancel", {"id": waiting})
    assert d.wait_state(waiting, FINAL)["state"] == "cancelled"
    d.call("settings.set", {"changes": {"host_max_builds": 1}})
    queued = d.submit()
    _ticks_pass(d)  # the scheduler looked again: with the host at its cap it stays queued
    assert d.build(queued)["state"] == "queued"
    d.call("build.cancel", {"id": queued})
    assert d.build(queued)["state"] == "cancelled"
    assert _rebuilds(d, waiting) == [] and _rebuilds(d, queued) == []
    with pytest.raises(ClientError) as err:
        d.call("build.cancel", {"id": queued})
    assert "already ended" in err.value.message
    assert d.build(first)["state"] == "building"


def test_build_timeout_marks_timed_out(daemons: MakeDaemon) -> None:
    d = daemons(mock_sleep=120, settings={"build_timeout_minutes": 0.02}).start()  # 1.2 s
    build_id = d.submit("slow-1-1.src.rpm")
    build = d.wait_state(build_id, FINAL, timeout=30)
    assert build["state"] == "timed_out"
    assert "build_timeout_minutes" in build["error"]


def test_slot_wait_timeout_ends_timed_out_with_the_limiter_message(
    daemons: MakeDaemon,
) -> None:
    d = daemons(
        mock_sleep=30, settings={"max_concurrent_builds": 1, "slot_wait_timeout": 1}
    ).start()
    first = d.submit()
    d.wait_state(first, "building")
    second = d.submit()
    build = d.wait_state(second, FINAL, timeout=20)
    assert build["state"] == "timed_out"
    assert build["error"].startswith("Could not acquire build slot after")
    assert "1/1 slots busy (max_concurrent_builds=1)" in build["error"]


def test_missing_mock_fails_builds_at_once_and_the_daemon_stays_up(
    daemons: MakeDaemon,
) -> None:
    d = daemons(settings={"mock_command": "/nonexistent/mock"}).start()
    build = d.wait_state(d.submit(), FINAL)
    assert build["state"] == "failed"
    assert "/nonexistent/mock does not exist" in build["error"]
    assert d.call("ping")["version"]


def test_disk_gate_closed_takes_no_slot_and_says_why(daemons: MakeDaemon) -> None:
    d = daemons(settings={"min_free_disk_gb": 100000}).start()
    build_id = d.submit()
    status = wait_for(lambda: (s := d.call("status"))["gates"] and s)
    disk = next(g for g in status["gates"] if g["name"] == "disk")
    assert not disk["open"] and "GB free <" in disk["detail"]
    assert "disk gate closed" in status["summary"]
    _ticks_pass(d)  # the scheduler looked again: the build must stay queued
    assert d.build(build_id)["state"] == "queued"
    assert d.mock_runs() == []


def test_sighup_with_a_broken_file_keeps_the_running_settings(daemons: MakeDaemon) -> None:
    d = daemons(settings={"max_concurrent_builds": 3}).start()
    good = d.config.read_text()
    d.config.write_text(good.replace("max_concurrent_builds: 3", "max_concurrent_builds: 99"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: "reload of" in d.log())
    assert "max_concurrent_builds: 99 is out of range" in d.log()
    assert d.call("status")["max_concurrent"] == 3
    d.config.write_text(good.replace("max_concurrent_builds: 3", "max_concurrent_builds: 5"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.call("status")["max_concurrent"] == 5)


def test_sigterm_stops_builds_cleanly_and_the_next_start_runs_them_again(
    daemons: MakeDaemon,
) -> None:
    d = daemons(mock_sleep=30).start()
    build_id = d.submit()
    d.wait_state(build_id, "building")
    wait_for(lambda: _mock_running(d, build_id))
    assert d.stop(timeout=30) == 0
    assert not _mock_running(d, build_id)  # mock was stopped and the root scrubbed
    d.env["FAKEMOCK_SLEEP"] = "0.2"
    d.start()
    build = d.wait_state(build_id, FINAL, timeout=30)
    assert build["state"] == "succeeded"
    assert build["retries"] == 0  # a clean stop costs no retry


def test_kill9_mid_build_then_restart_loses_nothing_and_never_over_admits(
    daemons: MakeDaemon,
) -> None:
    d = daemons(mock_sleep=60, settings={"max_concurrent_builds": 1}).start()
    first = d.submit()
    d.wait_state(first, "building")
    wait_for(lambda: _mock_running(d, first))
    queued = d.submit()
    old_mock = [p for p in d.processes() if f"build{first} " in " ".join(p.cmdline()) + " "]
    assert old_mock
    d.kill9()
    d.env["FAKEMOCK_SLEEP"] = "0.3"
    d.start()
    # the orphaned mock from the old instance is gone before anything new runs
    wait_for(
        lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in old_mock)
    )
    for build_id in (first, queued):
        assert d.wait_state(build_id, FINAL, timeout=60)["state"] == "succeeded"
    assert d.build(first)["retries"] == 1
    assert max_overlap(d.mock_runs()) <= 1
    wait_for(lambda: "left running by an earlier instance" in d.log())


def test_kill9_of_reqpmd_ends_its_mock_at_once_without_systemd(daemons: MakeDaemon) -> None:
    """No systemd control group here: were mock left running, its slot's lease would run out
    and another host would start a build while this one still builds."""
    d = daemons(mock_sleep=60).start()
    build_id = d.submit("orphan-1-1.src.rpm")
    d.wait_state(build_id, "building")
    wait_for(lambda: _mock_running(d, build_id))
    d.kill9()
    wait_for(lambda: [r for r in d.mock_runs() if r["mode"] == "rebuild"], timeout=10)
    wait_for(lambda: not [p for p in d.processes() if f"build{build_id} " in _cmdline(p)])
    [run] = [r for r in d.mock_runs() if r["mode"] == "rebuild"]
    assert run["signal"] == "SIGTERM"  # mock's own clean-up ran (its chroot's processes)


def test_a_reqpmd_stopped_alone_has_its_mock_stopped_when_the_lease_runs_out(
    daemons: MakeDaemon,
) -> None:
    """kill -STOP of reqpmd alone: it renews nothing and stops nothing, while its mock
    builds on past the lease, when another host may be granted the slot. The lease guard
    stops that mock when the lease runs out; woken, reqpmd runs the build again."""
    d = daemons(mock_sleep=8).start()  # lease 5 s
    build_id = d.submit("stopped-1-1.src.rpm")
    d.wait_state(build_id, "building")
    wait_for(lambda: _mock_running(d, build_id))
    assert d.proc is not None
    os.kill(d.proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        wait_for(lambda: [r for r in d.mock_runs() if r["mode"] == "rebuild"], timeout=5 + 3)
        took = time.monotonic() - stopped_at
        assert psutil.Process(d.proc.pid).status() == psutil.STATUS_STOPPED  # not reqpmd's doing
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    [first] = [r for r in d.mock_runs() if r["mode"] == "rebuild"]
    assert first["exit"] == 7 and took <= 5 + 2, (first, took)  # SIGINT: mock's exit 7
    assert "lease ran out unrenewed" in d.log()
    done = d.wait_state(build_id, FINAL, timeout=60)
    assert done["state"] == "succeeded", done  # run again, not failed for the signal
    assert len([r for r in d.mock_runs() if r["mode"] == "rebuild"]) == 2


def test_redis_down_keeps_builds_running_and_accepts_submissions(
    daemons: MakeDaemon, redis_server: RedisServer
) -> None:
    d = daemons(redis_url=redis_server.url, mock_sleep=1).start()  # lease 5 s > the build
    running = d.submit()
    d.wait_state(running, "building")
    redis_server.kill()
    wait_for(lambda: "waiting for Redis" in d.call("status")["summary"])
    queued = d.submit()  # accepted while Redis is down
    assert d.wait_state(running, FINAL, timeout=30)["state"] == "succeeded"
    _ticks_pass(d)  # the scheduler looked again, with the slot free but Redis gone
    assert d.build(queued)["state"] == "queued", d.log()  # no new slot without Redis
    redis_server.start()
    assert d.wait_state(queued, FINAL, timeout=60)["state"] == "succeeded"
    assert d.log().count("unreachable (") == 1  # said once per change, not per retry


def test_bad_requests_get_errors_and_the_daemon_stays_up(daemons: MakeDaemon) -> None:
    import socket

    d = daemons().start()
    for frame in (
        b"not json\n",
        b"[1,2]\n",
        b'{"v": 99, "op": "status"}\n',
        b'{"v": 1, "op": "nope"}\n',
        b'{"v": 1, "op": "build.show", "args": {"id": "x"}}\n',
    ):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(d.socket))
        s.sendall(frame)
        reply = s.recv(65536)
        s.close()
        assert b'"ok":false' in reply, (frame, reply)
    assert d.call("ping")
    assert os.path.exists(d.socket)


def test_locked_root_exit_60_is_retried_not_failed(daemons: MakeDaemon) -> None:
    d = daemons(env={"FAKEMOCK_EXIT": "60"}, settings={"max_build_retries": 2}).start()
    build_id = d.submit("locked-1-1.src.rpm")
    build = d.wait_state(build_id, FINAL, timeout=60)
    rebuilds = [r for r in _rebuilds(d, build_id) if r["mode"] == "rebuild"]
    assert len(rebuilds) == 3  # the first run and two retries
    assert build["state"] == "failed"
    assert build["error"].startswith("gave up after 2 retries")
    assert "locked" in build["error"]


def test_keep_failed_roots_skips_the_scrub_of_a_failed_build(daemons: MakeDaemon) -> None:
    d = daemons(settings={"keep_failed_roots": True}).start()
    failed = d.submit("keep-fail-1-1.src.rpm")
    assert d.wait_state(failed, FINAL)["state"] == "failed"
    assert [r["mode"] for r in _rebuilds(d, failed)] == ["rebuild"]  # no scrub
    good = d.submit()
    assert d.wait_state(good, FINAL)["state"] == "succeeded"
    assert _rebuilds(d, good)[-1]["mode"] == "clean"  # successful builds are still scrubbed


def test_crash_recovery_respects_the_retry_limit(daemons: MakeDaemon) -> None:
    d = daemons(mock_sleep=60, settings={"max_build_retries": 0}).start()
    build_id = d.submit()
    d.wait_state(build_id, "building")
    d.kill9()
    d.start()
    build = d.wait_state(build_id, FINAL, timeout=30)
    assert build["state"] == "failed"
    assert "interrupted by a daemon crash" in build["error"]


def test_embedded_redis_is_supervised(daemons: MakeDaemon) -> None:
    """A crashed embedded redis-server is restarted; the running build re-registers its
    slot at once, so the usual restart grace (one lease, 30 s here) is not needed."""
    d = daemons(
        mock_sleep=4, settings={"slot_lease_seconds": 30, "max_concurrent_builds": 2}
    ).start()
    running = d.submit()
    d.wait_state(running, "building")
    [redis_proc] = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "redis-server" in " ".join(p.info["cmdline"] or [])
        and str(d.root) in " ".join(p.info["cmdline"] or [])
    ]
    redis_proc.kill()
    wait_for(lambda: "embedded redis-server had stopped; restarted it" in d.log())
    status = wait_for(lambda: (s := d.call("status"))["redis"]["ok"] and s)
    assert status["restart_grace_left"] == 0
    assert [h["build"] for h in status["active_builds"]] == [running]  # re-registered
    second = d.submit()
    d.wait_state(second, "building", timeout=5)  # a new slot well within the 30 s lease
    assert d.build(running)["state"] == "building"  # and the first kept its slot
    for build_id in (running, second):
        assert d.wait_state(build_id, FINAL, timeout=30)["state"] == "succeeded"


def test_many_clients_at_once(daemons: MakeDaemon) -> None:
    import concurrent.futures

    d = daemons().start()
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda _: d.call("status")["max_concurrent"], range(200)))
    assert results == [4] * 200


def test_hosts_warns_when_daemons_disagree_on_the_limit(
    daemons: MakeDaemon, redis_server: RedisServer
) -> None:
    import subprocess
    import sys

    a = daemons(
        "a", host_id="host-a", redis_url=redis_server.url, settings={"max_concurrent_builds": 3}
    ).start()
    b = daemons(
        "b", host_id="host-b", redis_url=redis_server.url, settings={"max_concurrent_builds": 5}
    ).start()
    wait_for(lambda: len(a.call("hosts")) == 2)
    r = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", "--socket", str(a.socket), "hosts"],
        capture_output=True,
        text=True,
        check=False,
        env=a.env,
    )
    assert r.returncode == 0, r.stderr
    assert "host-a" in r.stdout and "host-b" in r.stdout
    assert "disagree on max_concurrent_builds (3, 5)" in r.stderr
    # the warning tells the truth: one value for the cluster, not the granting host's
    assert "the cluster obeys one value" in r.stderr and "granting host" not in r.stderr
    # one limit for the cluster: the first host's, until an admin changes it
    assert b.call("status")["max_concurrent"] == 3
    assert b.call("status")["configured_limit"] == 5
    assert "max_concurrent_builds is 3 cluster-wide" in b.log()


def test_changing_the_limit_on_one_host_changes_it_for_all(
    daemons: MakeDaemon, redis_server: RedisServer, short_tmp: Path
) -> None:
    a, b = two_hosts(daemons, redis_server, short_tmp, mock_sleep=0.4, limit=3)
    a.call("settings.set", {"changes": {"max_concurrent_builds": 1}})
    wait_for(lambda: b.call("status")["max_concurrent"] == 1, timeout=20)
    started = time.time()
    ids = [(a, a.submit()) for _ in range(2)] + [(b, b.submit()) for _ in range(2)]
    for d, i in ids:
        assert d.wait_state(i, FINAL, timeout=60)["state"] == "succeeded"
    runs = [r for r in a.mock_runs() if r["start"] >= started]
    assert max_overlap(runs) == 1  # b obeyed the limit set on a


def test_an_edited_file_wins_at_the_next_start(daemons: MakeDaemon) -> None:
    """The embedded Redis persists the cluster limit; a file edited while reqpmd was
    stopped is still the admin's latest word and is published at start."""
    d = daemons(settings={"max_concurrent_builds": 2}).start()
    d.call("settings.set", {"changes": {"max_concurrent_builds": 6}})
    assert d.stop() == 0
    d.config.write_text(
        d.config.read_text().replace("max_concurrent_builds: 6", "max_concurrent_builds: 3")
    )
    d.start()
    assert d.call("status")["max_concurrent"] == 3
    assert d.stop() == 0
    d.start()  # unchanged file: nothing to publish, the value stays
    assert d.call("status")["max_concurrent"] == 3


def test_restart_grace_is_shown_explained_and_can_be_ended(
    daemons: MakeDaemon, short_tmp: Path
) -> None:
    """A new shared Redis grants nothing for one lease. status and the timeout say why and
    until when (not "raise max_concurrent_builds"), and an admin can end it."""
    server = RedisServer(short_tmp / "new", persist=False)
    server.start()  # no fresh_start(): the grace of a brand-new server is in force
    try:
        d = daemons(
            redis_url=server.url,
            settings={"slot_wait_timeout": 1, "slot_lease_seconds": 300},
        ).start()
        status = wait_for(lambda: (s := d.call("status"))["restart_grace_left"] > 0 and s)
        assert "grants are paused until" in status["summary"]
        assert "reqpmctl slots end-grace --yes" in status["restart_grace"]
        build = d.wait_state(d.submit(), FINAL, timeout=20)
        assert build["state"] == "timed_out"
        assert "grants are paused until" in build["error"]
        assert "reqpmctl slots end-grace --yes" in build["error"]
        assert "Raise max_concurrent_builds" not in build["error"]
        assert d.log().count("namespace reqpm: grants are paused until") == 1  # warned once
        assert d.call("slots.end_grace", {"yes": True})["ended"] is True
        after = d.call("status")  # read at once, not at the next Redis check
        assert after["restart_grace_left"] == 0 and after["restart_grace"] is None
        assert "grants are paused" not in after["summary"]
        assert d.wait_state(d.submit(), FINAL, timeout=30)["state"] == "succeeded"
    finally:
        server.kill()


def test_recovery_scrubs_in_the_background_after_the_socket_is_up(daemons: MakeDaemon) -> None:
    """Scrubbing what a crashed instance left (minutes each for real roots) must not keep
    the socket and READY waiting, or systemd's start timeout turns it into a restart loop."""
    d = daemons(mock_sleep=60, settings={"max_concurrent_builds": 3}).start()
    ids = [d.submit() for _ in range(3)]
    for build_id in ids:
        d.wait_state(build_id, "building")
        wait_for(lambda b=build_id: _mock_running(d, b))
    d.kill9()
    d.env["FAKEMOCK_SLEEP"] = "0.2"
    d.env["FAKEMOCK_SCRUB_SLEEP"] = "1.5"  # 4.5 s of scrubs, one after another
    started = time.monotonic()
    d.start()
    status = d.call("status")
    assert time.monotonic() - started < 6
    assert status["recovering"] == ids  # answered while the scrubs go on
    assert "recovering 3 build(s)" in status["summary"]
    for build_id in ids:
        assert d.wait_state(build_id, FINAL, timeout=60)["state"] == "succeeded"
    assert d.call("status")["recovering"] == []
    runs = d.mock_runs()
    # every old root was scrubbed before its build ran again
    for build_id in ids:
        root = f"fedora-42-x86_64-build{build_id}"
        modes = [r["mode"] for r in runs if r["root"] == root]
        assert "clean" in modes and modes.index("clean") < len(modes) - 1, modes


DATA = Path(__file__).parent / "data"


def test_builds_make_real_packages_and_a_real_failed_log(daemons: MakeDaemon) -> None:
    """With rpmbuild on PATH the stand-in builds for real: results hold real RPMs, and a
    spec whose %build fails ends failed with rpmbuild's own words in the log."""
    import shutil
    import subprocess

    if not shutil.which("rpmbuild"):
        pytest.skip("rpmbuild is not on PATH (Debian: apt-get install rpm; ./dev test does)")
    d = daemons().start()
    with d.client() as c:
        good = c.submit(spec=DATA / "greet" / "greet.spec", sources=DATA / "greet")
        bad = c.submit(spec=DATA / "broken" / "broken.spec", sources=DATA / "broken")
    built = d.wait_state(good, FINAL, timeout=60)
    assert built["state"] == "succeeded", d.log()
    rpm = Path(built["result_dir"]) / "greet-2.1-3.noarch.rpm"
    query = subprocess.run(
        ["rpm", "-qp", "--qf", "%{NAME}-%{VERSION}-%{RELEASE}", str(rpm)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert query.stdout == "greet-2.1-3"
    failed = d.wait_state(bad, FINAL, timeout=60)
    assert (failed["state"], failed["exit_code"]) == ("failed", 30)
    mock_log = (Path(failed["result_dir"]) / "build.log").read_text()  # mock's, as mock writes it
    assert "this package is meant to fail" in mock_log and "Bad exit status" in mock_log
    assert "exited with 30" in failed["error"]


def test_a_queue_that_cannot_be_opened_stops_the_start_in_one_line(daemons: MakeDaemon) -> None:
    """A full or broken state_dir at start (the chaos suite's full disk): one line saying
    where and why, exit 1 for systemd to try again, no traceback."""
    d = daemons()
    (d.state_dir / "reqpm.db").mkdir(parents=True)  # SQLite cannot open a directory
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=30) == 1
    log = d.log()
    assert f"cannot open the build queue in {d.state_dir}" in log
    assert "Traceback" not in log
