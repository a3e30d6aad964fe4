"""reqpmctl against a real daemon over the real socket, run as a real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reqpmd.control import protocol
from tests.daemon_harness import FINAL, HELLO, Reqpmd, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def daemon(short_tmp: Path) -> Iterator[Reqpmd]:
    os.chmod(short_tmp, 0o755)  # the unprivileged tests must reach the socket
    d = Reqpmd(short_tmp / "d", settings={"socket_group": "nogroup", "max_concurrent_builds": 2})
    os.chmod(d.root, 0o755)
    d.start()
    yield d
    d.kill_all()


def ctl(
    d: Reqpmd,
    *args: str,
    as_user: tuple[int, int] | None = None,
    groups: tuple[int, ...] = (),
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run reqpmctl as a command; as another uid it runs in a forked child (see _as_user)."""
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), REQPM_SOCKET=str(d.socket), **(env or {}))
    if as_user is not None:
        return _as_user(as_user, list(args), full_env, groups)
    return subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli", *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd="/",
    )


def _as_user(
    ids: tuple[int, int], args: list[str], env: dict[str, str], groups: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """reqpmctl's main in a child that dropped to ``ids``: a real second identity for
    SO_PEERCRED. Forked, not exec'd, because the interpreter lives under /root (0700)."""
    from reqpmctl import cli

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                os.setgroups(list(groups))
                os.setgid(ids[1])
                os.setuid(ids[0])
                os.environ.clear()
                os.environ.update(env)
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = os.fdopen(1, "w", closefd=False)
                sys.stderr = os.fdopen(2, "w", closefd=False)
                cli.main(args, prog_name="reqpmctl")
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            args, os.waitstatus_to_exitcode(status), out.read(), err.read()
        )


def ok_json(d: Reqpmd, *args: str) -> Any:
    r = ctl(d, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_human_and_json(daemon: Reqpmd) -> None:
    r = ctl(daemon, "status")
    assert r.returncode == 0, r.stderr
    assert "slots busy cluster-wide" in r.stdout and "redis:   ok" in r.stdout
    st = ok_json(daemon, "status")
    for key in (
        "active_count",
        "max_concurrent",
        "active_builds",
        "waiting",
        "queued",
        "gates",
        "redis",
    ):
        assert key in st
    assert st["max_concurrent"] == 2 and st["active_count"] == 0


def test_submit_wait_builds_and_log(daemon: Reqpmd, short_tmp: Path) -> None:
    r = ctl(
        daemon, "submit", "--spec", str(HELLO / "hello.spec"), "--sources", str(HELLO), "--wait"
    )
    assert r.returncode == 0, r.stderr
    assert "succeeded" in r.stdout
    assert "Finish: rpmbuild" in r.stderr + r.stdout  # the log was streamed
    submitted = ok_json(
        daemon,
        "submit",
        "--chroot",
        "epel-9-x86_64",
        "--priority",
        "5",
        "--spec",
        str(HELLO / "hello.spec"),
        "--sources",
        str(HELLO),
    )
    build_id = submitted["id"]
    assert set(submitted) == {"id"}
    build = daemon.wait_state(build_id, FINAL)
    assert build["chroot"] == "epel-9-x86_64" and build["priority"] == 5
    rows = ok_json(daemon, "builds", "list")
    assert [b["id"] for b in rows] == [build_id, build_id - 1]
    for key in (
        "id",
        "state",
        "chroot",
        "priority",
        "submitted_by",
        "submitted_at",
        "started_at",
        "finished_at",
        "result_dir",
        "error",
    ):
        assert key in rows[0]
    assert (
        ok_json(daemon, "builds", "list", "--state", "succeeded", "--limit", "1")[0]["id"]
        == build_id
    )
    human = ctl(daemon, "builds", "list").stdout
    assert "succeeded" in human and "epel-9-x86_64" in human
    assert ok_json(daemon, "builds", "show", str(build_id))["state"] == "succeeded"
    log = ctl(daemon, "builds", "log", str(build_id))
    assert "--rebuild" in log.stdout
    follow = ctl(daemon, "builds", "log", "--follow", str(build_id))
    assert follow.returncode == 0 and "--rebuild" in follow.stdout
    retry = ctl(daemon, "builds", "retry", str(build_id))
    assert retry.returncode == 0, retry.stderr
    assert daemon.wait_state(build_id, FINAL)["runs"] == 2


def test_submit_wait_exits_1_when_the_build_fails(daemon: Reqpmd, short_tmp: Path) -> None:
    srpm = short_tmp / "broken-fail-1-1.src.rpm"
    srpm.write_bytes(b"fake")
    r = ctl(daemon, "submit", str(srpm), "--wait")
    assert r.returncode == protocol.EXIT_FAILED
    assert "failed" in r.stdout


def test_usage_errors_exit_2(daemon: Reqpmd) -> None:
    assert ctl(daemon, "submit").returncode == 2
    assert ctl(daemon, "submit", "--spec", str(HELLO / "hello.spec")).returncode == 2
    assert ctl(daemon, "slots", "clear").returncode == 2
    assert ctl(daemon, "builds", "show", "x").returncode == 2


def test_not_found_and_unreachable_exit_codes(daemon: Reqpmd, short_tmp: Path) -> None:
    r = ctl(daemon, "builds", "show", "999")
    assert r.returncode == protocol.EXIT_NOT_FOUND
    assert r.stderr.strip() == "reqpmctl: no build 999"  # one line, no traceback
    r = ctl(daemon, "--socket", str(short_tmp / "nope.sock"), "status")
    assert r.returncode == protocol.EXIT_UNREACHABLE
    assert "is reqpmd running?" in r.stderr and "Traceback" not in r.stderr


def test_settings_set_validates_all_and_changes_nothing_on_error(daemon: Reqpmd) -> None:
    daemon.config.write_text(
        "# the admin's comment\n" + daemon.config.read_text() + "# trailing comment\n"
    )
    before = daemon.config.read_text()
    for bad, words in (
        (["max_concurrent_builds=25"], ["max_concurrent_builds", "25", "1 to 20"]),
        (["max_concurrent_builds=four"], ["max_concurrent_builds", "four", "1 to 20"]),
        (["max_concurent_builds=3"], ["did you mean 'max_concurrent_builds'"]),
        (["max_concurrent_builds=3", "sync_interval_hours=0"], ["sync_interval_hours", "1 to 24"]),
    ):
        r = ctl(daemon, "settings", "set", *bad)
        assert r.returncode == protocol.EXIT_USAGE, r
        for word in words:
            assert word in r.stderr
        assert daemon.config.read_text() == before  # all or nothing
    assert ok_json(daemon, "settings", "get", "max_concurrent_builds") == {
        "max_concurrent_builds": 2
    }
    r = ctl(daemon, "settings", "set", "max_concurrent_builds=7", "sync_interval_hours=12")
    assert r.returncode == 0, r.stderr
    assert "max_concurrent_builds: 2 -> 7" in r.stdout
    text = daemon.config.read_text()
    assert "max_concurrent_builds: 7" in text and "sync_interval_hours: 12" in text
    assert text.startswith("# the admin's comment\n") and "# trailing comment" in text
    assert ctl(daemon, "settings", "get", "max_concurrent_builds").stdout.strip() == "7"
    assert ok_json(daemon, "status")["max_concurrent"] == 7
    history = ok_json(daemon, "settings", "history")
    assert {(h["key"], h["old"], h["new"]) for h in history} >= {
        ("max_concurrent_builds", "2", "7"),
        ("sync_interval_hours", "6", "12"),
    }
    assert all(h["uid"] == 0 and h["user"].startswith("root") for h in history)
    assert "setting max_concurrent_builds: 2 -> 7 by root" in daemon.log()
    shown = ok_json(daemon, "settings", "show")
    assert shown["max_concurrent_builds"] == 7


def test_settings_edit_reopens_on_error_like_visudo(daemon: Reqpmd, short_tmp: Path) -> None:
    # A scripted "editor": first writes a bad value, then a good one.
    editor = short_tmp / "editor.py"
    state = short_tmp / "edits"
    editor.write_text(
        "import sys, pathlib\n"
        f"state = pathlib.Path({str(state)!r})\n"
        "n = int(state.read_text()) if state.exists() else 0\n"
        "state.write_text(str(n + 1))\n"
        "p = pathlib.Path(sys.argv[1])\n"
        "value = '99' if n == 0 else '9'\n"
        "p.write_text(p.read_text().replace('max_concurrent_builds: 2',"
        " 'max_concurrent_builds: ' + value))\n"
    )
    r = ctl(daemon, "settings", "edit", env={"EDITOR": f"{sys.executable} {editor}"})
    # no TTY: a bad edit is reported and nothing changes
    assert r.returncode == protocol.EXIT_USAGE and "99" in r.stderr
    assert "max_concurrent_builds: 2" in daemon.config.read_text()
    r = ctl(daemon, "settings", "edit", env={"EDITOR": f"{sys.executable} {editor}"})
    assert r.returncode == 0, r.stderr
    assert ok_json(daemon, "status")["max_concurrent"] == 9


def test_slots_list_release_and_clear(daemon: Reqpmd) -> None:
    daemon.env["FAKEMOCK_SLEEP"] = "30"
    daemon.stop()
    daemon.start()
    build_id = daemon.submit()
    daemon.wait_state(build_id, "building")
    listing = ok_json(daemon, "slots", "list")
    [holder] = listing["holders"]
    assert holder["name"] == f"build_{build_id}@h1" and holder["build"] == build_id
    assert "LEASE LEFT" in ctl(daemon, "slots", "list").stdout
    assert ok_json(daemon, "status")["active_builds"][0]["name"] == holder["name"]
    r = ctl(daemon, "slots", "release", holder["name"])
    assert r.returncode == 0 and f"released {holder['name']}" in r.stdout
    # the build learns at its next renewal that it lost the slot, and goes back to the queue
    wait_for(
        lambda: (
            "lost its build slot" in (daemon.build(build_id)["error"] or "")
            or daemon.build(build_id)["runs"] >= 2
        ),
        timeout=20,
    )
    assert ctl(daemon, "slots", "release", "nope").returncode == protocol.EXIT_NOT_FOUND
    # the re-queued build takes a slot again; clearing frees exactly that one
    wait_for(lambda: len(ok_json(daemon, "slots", "list")["holders"]) == 1, timeout=20)
    assert ok_json(daemon, "slots", "clear", "--yes")["cleared"] == 1


def test_hosts_lists_this_daemon(daemon: Reqpmd) -> None:
    rows = wait_for(lambda: ok_json(daemon, "hosts"))
    assert rows[0]["host_id"] == "h1" and rows[0]["max_concurrent_builds"] == 2
    assert "h1" in ctl(daemon, "hosts").stdout


NOBODY = (65534, 65534)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_a_user_can_read_and_submit_but_not_administer(daemon: Reqpmd, short_tmp: Path) -> None:
    root_build = daemon.submit()
    daemon.wait_state(root_build, FINAL)
    user = ctl(daemon, "--json", "status", as_user=NOBODY)
    assert user.returncode == 0, user.stderr
    srcs = short_tmp / "src"
    srcs.mkdir(mode=0o755)
    for f in HELLO.iterdir():
        (srcs / f.name).write_bytes(f.read_bytes())
    r = ctl(
        daemon,
        "--json",
        "submit",
        "--spec",
        str(srcs / "hello.spec"),
        "--sources",
        str(srcs),
        as_user=NOBODY,
    )
    assert r.returncode == 0, r.stderr
    own = json.loads(r.stdout)["id"]
    assert daemon.build(own)["submitted_by"] == 65534
    for args in (
        ["settings", "set", "max_concurrent_builds=3"],
        ["slots", "release", "build_1@h1"],
        ["slots", "clear", "--yes"],
        ["builds", "cancel", str(root_build)],
        ["builds", "retry", str(root_build)],
    ):
        r = ctl(daemon, *args, as_user=NOBODY)
        assert r.returncode == protocol.EXIT_PERMISSION, (args, r.stderr)
        assert "admin" in r.stderr
    assert ok_json(daemon, "settings", "show")["max_concurrent_builds"] == 2
    daemon.wait_state(own, FINAL)
    r = ctl(daemon, "builds", "retry", str(own), as_user=NOBODY)  # their own build: allowed
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_socket_refuses_a_user_outside_its_group(daemon: Reqpmd) -> None:
    assert oct(daemon.socket.stat().st_mode & 0o777) == "0o660"
    r = ctl(daemon, "status", as_user=(65533, 65533))
    assert r.returncode == protocol.EXIT_UNREACHABLE
    assert "permission denied" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another uid")
def test_a_member_of_admin_group_is_an_admin(short_tmp: Path) -> None:
    """Supplementary groups come from the kernel (SO_PEERGROUPS): a non-root member of
    admin_group may change settings and free slots."""
    os.chmod(short_tmp, 0o755)
    d = Reqpmd(short_tmp / "d", settings={"socket_group": "nogroup", "admin_group": "users"})
    os.chmod(d.root, 0o755)
    d.start()
    try:
        users_gid = 100
        r = ctl(
            d, "settings", "set", "max_concurrent_builds=3", as_user=NOBODY, groups=(users_gid,)
        )
        assert r.returncode == 0, r.stderr
        assert ok_json(d, "settings", "get", "max_concurrent_builds") == {
            "max_concurrent_builds": 3
        }
        history = ok_json(d, "settings", "history")
        assert history[0]["uid"] == 65534
        r = ctl(d, "settings", "set", "max_concurrent_builds=4", as_user=NOBODY)
        assert r.returncode == protocol.EXIT_PERMISSION  # the same uid without the group
    finally:
        d.stop()


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_shell_completion_scripts(shell: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT), _REQPMCTL_COMPLETE=f"{shell}_source"),
    )
    assert r.returncode == 0, r.stderr
    assert "_REQPMCTL_COMPLETE" in r.stdout


def test_completion_offers_the_commands() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "reqpmctl.cli"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            _REQPMCTL_COMPLETE="bash_complete",
            COMP_WORDS="reqpmctl sl",
            COMP_CWORD="1",
        ),
    )
    assert r.returncode == 0, r.stderr
    assert "plain,slots" in r.stdout


def test_submit_with_a_bad_chroot_is_a_usage_error_naming_the_rule(daemon: Reqpmd) -> None:
    r = ctl(
        daemon,
        "submit",
        "--chroot",
        "bad name;rm",
        "--spec",
        str(HELLO / "hello.spec"),
        "--sources",
        str(HELLO),
    )
    assert r.returncode == protocol.EXIT_USAGE, r.stderr
    assert "'bad name;rm'" in r.stderr and "A-Z a-z 0-9 _ . + -" in r.stderr
    assert "internal error" not in r.stderr
    assert ok_json(daemon, "builds", "list") == []  # nothing was queued
    assert "Traceback" not in daemon.log()


def test_slots_end_grace_needs_yes_and_the_admin_role(daemon: Reqpmd) -> None:
    r = ctl(daemon, "slots", "end-grace")
    assert r.returncode == protocol.EXIT_USAGE and "--yes" in r.stderr
    r = ctl(daemon, "slots", "end-grace", "--yes", as_user=(65534, 65534))
    assert r.returncode == protocol.EXIT_PERMISSION, r.stderr
    # the embedded Redis is private: reqpmd ended its grace at start already
    result = ok_json(daemon, "slots", "end-grace", "--yes")
    assert result["ended"] is False and result["grace_left"] == 0


def test_build_logs_are_byte_exact_whatever_the_bytes(daemon: Reqpmd) -> None:
    """mock's output is not always UTF-8. Every byte comes back as written, and a log
    of invalid UTF-8 larger than a protocol line still streams (it used to fail with
    "request longer than 1048576 bytes": each bad byte grew to a JSON escape)."""
    build_id = daemon.submit()
    assert daemon.wait_state(build_id, FINAL)["state"] == "succeeded"
    log = daemon.root / "state" / "builds" / str(build_id) / "build.log"
    with open(log, "ab") as f:
        f.write(bytes(range(256)) * 4096 + b"\xff\xfe\x80 trailing \xc3(\n")  # ~1 MiB
    expected = log.read_bytes()
    for args in (("builds", "log", str(build_id)), ("builds", "log", "--follow", str(build_id))):
        r = subprocess.run(
            [sys.executable, "-m", "reqpmctl.cli", "--socket", str(daemon.socket), *args],
            capture_output=True,
            check=False,
            env={**os.environ, "REQPM_SOCKET": str(daemon.socket)},
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout == expected, args
    as_json = ok_json(daemon, "builds", "log", str(build_id))
    assert as_json["log"].startswith(expected[:64].decode(errors="replace"))
