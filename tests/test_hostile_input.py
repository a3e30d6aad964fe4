"""Hostile values at every door: names, numbers and races that used to get through."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reqpmd.builds.mock import check_executable
from reqpmd.config import parse, transaction
from reqpmd.config.schema import BY_NAME, SettingsInvalid, redact_url
from reqpmd.config.transaction import SettingsService
from reqpmd.control.submission import check_chroot, check_file_name
from reqpmd.errors import InvalidArgument
from reqpmd.slots.keys import validate_namespace
from tests.daemon_harness import Reqpmd, wait_for

HUGE = "9" * 5000


# -- full matches: "$" used to match before a trailing newline ----------------------------


@pytest.mark.parametrize("chroot", ["fedora-42-x86_64\n", "-r", "--scrub=all", "", "a b"])
def test_bad_chroot_names_are_refused(chroot: str) -> None:
    with pytest.raises(InvalidArgument, match="not starting with -"):
        check_chroot(chroot)
    with pytest.raises(SettingsInvalid, match="default_chroot"):
        parse.validate({"default_chroot": chroot}, environ={})


def test_good_chroot_names_pass() -> None:
    for chroot in ("fedora-42-x86_64", "epel-9-x86_64", "custom+local.cfg", "_x"):
        assert check_chroot(chroot) == chroot


@pytest.mark.parametrize("name", ["x\n", "hello.spec\n", "a/b", ".."])
def test_bad_file_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_file_name(name)


@pytest.mark.parametrize("key", ["namespace", "host_id", "socket_group", "admin_group"])
def test_names_with_a_trailing_newline_are_refused(key: str) -> None:
    with pytest.raises(SettingsInvalid, match=key):
        parse.validate({key: "good\n"}, environ={})


def test_a_namespace_with_a_trailing_newline_is_refused_by_the_keys_too() -> None:
    with pytest.raises(ValueError, match="namespace"):
        validate_namespace("reqpm\n")


def test_a_redis_url_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(SettingsInvalid, match="redis_url"):
        parse.validate({"redis_url": "redis://h:6379/0\n"}, environ={})


# -- numbers Python will not hold -----------------------------------------------------------


def test_a_5000_digit_integer_in_the_config_is_an_error_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "reqpmd.yaml"
    config.write_text(f"# limits\nmax_concurrent_builds: {HUGE}\nnamespace: ok\n")
    with pytest.raises(SettingsInvalid) as err:
        parse.load(config, environ={})
    [error] = err.value.errors
    assert (error.key, error.line) == ("max_concurrent_builds", 2)
    assert "an integer from 1 to 20" in error.message and len(str(error)) < 200


def test_check_config_reports_a_huge_integer_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "reqpmd.yaml"
    config.write_text(f"slot_wait_timeout: {HUGE}\n")
    r = subprocess.run(
        [sys.executable, "-m", "reqpmd.daemon", "--check-config", str(config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "line 1: slot_wait_timeout:" in r.stderr


def test_a_huge_integer_on_the_command_line_is_a_value_error_not_a_crash() -> None:
    key, value = parse.parse_assignment(f"max_concurrent_builds={HUGE}")
    with pytest.raises(SettingsInvalid) as err:
        parse.validate({key: value}, environ={})
    assert len(str(err.value)) < 300 and "max_concurrent_builds" in str(err.value)


# -- a reload racing `settings set` -----------------------------------------------------------


class Audit:
    def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
        pass


def test_a_reload_racing_settings_set_never_reverts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP reads the file; an admin's `settings set` writes it. A reload that read the
    file before the write and applied after it used to put the old value back in memory
    (and publish it to the cluster) while the file kept the new one."""
    config = tmp_path / "reqpmd.yaml"
    config.write_text("max_concurrent_builds: 1\n")
    service = SettingsService(config, parse.load(config, environ={}), Audit())
    real_load = transaction.load

    def slow_load(path: Path) -> Any:
        loaded = real_load(path)
        threading.Event().wait(0.002)  # widen the window between reading and applying
        return loaded

    monkeypatch.setattr(transaction, "load", slow_load)
    for i in range(30):
        value = 1 + (i % 19) + 1
        reloader = threading.Thread(target=service.reload)
        reloader.start()
        service.set({"max_concurrent_builds": value}, "root (uid 0)", 0)
        reloader.join()
        on_disk = parse.load(config, environ={}).max_concurrent_builds
        assert service.current().max_concurrent_builds == on_disk == value, f"try {i}"


# -- mock_command: what an admin may make the daemon run ---------------------------------------


def _script(path: Path, mode: int = 0o755) -> Path:
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(mode)
    return path


def test_mock_command_must_not_be_writable_by_others(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    ok = _script(tmp_path / "mock")
    assert check_executable(ok) is None
    writable = _script(tmp_path / "evil", 0o777)
    problem = check_executable(writable)
    assert problem is not None and "writable by others (mode 0777" in problem


def test_mock_command_in_a_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anybody could swap the file: no sticky bit
    problem = check_executable(_script(shared / "mock"))
    assert problem is not None and f"its directory {shared} is writable by others" in problem


def test_mock_command_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file to another user")
    tmp_path.chmod(0o755)
    theirs = _script(tmp_path / "mock")
    os.chown(theirs, 65534, 65534)
    problem = check_executable(theirs)
    assert problem is not None and "owned by uid 65534" in problem


def test_a_symlinked_mock_command_is_judged_by_its_target(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    target = _script(tmp_path / "consolehelper", 0o777)
    link = tmp_path / "mock"
    link.symlink_to(target)
    problem = check_executable(link)
    assert problem is not None and "writable by others" in problem


def test_mock_command_is_restart_only() -> None:
    assert BY_NAME["mock_command"].restart


# -- secrets in Redis URLs --------------------------------------------------------------------

_PLAIN = st.text(alphabet="abcdefghijklmnop0123456789.-", min_size=1, max_size=12)
# a password may hold what URL parsers split on; it is marked by a Z no other part has
_PASSWORD = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters="Z&#"),
    min_size=0,
    max_size=16,
).map(lambda s: "Z" + s + "Z")


@given(
    scheme=st.sampled_from(["redis", "rediss", "unix"]),
    user=st.one_of(st.just(""), _PLAIN),
    password=_PASSWORD,
    host=_PLAIN,
    where=st.sampled_from(["userinfo", "password", "sentinel_password", "token"]),
    extra=st.one_of(st.just(""), st.just("&db=2"), st.just("&socket_timeout=5")),
)
@settings(max_examples=400, deadline=None)
def test_no_password_survives_redaction(
    scheme: str, user: str, password: str, host: str, where: str, extra: str
) -> None:
    if where == "userinfo":
        url = f"{scheme}://{user}:{password}@{host}:6379/0{'?x=1' + extra if extra else ''}"
    else:
        url = f"{scheme}://{user + '@' if user else ''}{host}:6379/0?{where}={password}{extra}"
    redacted = redact_url(url)
    assert "Z" not in redacted, (url, redacted)
    assert redacted.startswith(f"{scheme}://") and host in redacted


def test_redaction_keeps_what_is_not_secret() -> None:
    assert redact_url("redis://redis.example:6379/0") == "redis://redis.example:6379/0"
    assert redact_url("embedded") == "embedded"
    assert (
        redact_url("rediss://ci:s3cr/t@r.example:6380/1?db=2")
        == "rediss://ci:***@r.example:6380/1?db=2"
    )
    assert redact_url("redis://r:6379/0?password=pw&db=2") == "redis://r:6379/0?password=***&db=2"


def test_a_query_password_never_reaches_users_or_the_log(short_tmp: Path) -> None:
    secret = "S3cr/t?pw"
    url = f"unix://{short_tmp}/nowhere.sock?db=0&password={secret}"
    d = Reqpmd(short_tmp / "d", redis_url=url)
    try:
        d.start()
        status = wait_for(lambda: (s := d.call("status"))["redis"]["detail"] != "ok" and s)
        shown = [
            json.dumps(status),
            json.dumps(d.call("settings.show")),
            json.dumps(d.call("settings.get", {"key": "redis_url"})),
            d.log(),
        ]
        for text in shown:
            for part in (secret, "S3cr", "t?pw"):
                assert part not in text
        assert "password=***" in json.dumps(d.call("settings.get", {"key": "redis_url"}))
    finally:
        d.kill_all()


# -- the config holds secrets -------------------------------------------------------------------


def test_a_replaced_config_is_private_and_an_exposed_one_is_reported(tmp_path: Path) -> None:
    config = tmp_path / "reqpmd.yaml"
    config.write_text("redis_url: redis://:pw@r.example:6379/0\n")
    config.chmod(0o644)
    service = SettingsService(config, parse.load(config, environ={}), Audit())
    exposed = service.exposure()
    assert exposed is not None and "mode 0644" in exposed and "chmod 600" in exposed
    service.replace_text("redis_url: redis://:pw2@r.example:6379/0\n", "root (uid 0)", 0)
    assert config.stat().st_mode & 0o777 == 0o600
    assert service.exposure() is None


def test_a_percent_encoded_secret_parameter_is_masked() -> None:
    """redis-py decodes query names: "%70assword" is its password parameter."""
    assert redact_url("redis://h?%70assword=s3cret") == "redis://h?%70assword=***"
    assert "x" not in redact_url("redis://h/0?db=1&pass%77ord=x").split("?")[1].split("=")[2]


def test_a_symlinked_mock_command_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the link to another user")
    tmp_path.chmod(0o755)
    target = _script(tmp_path / "real-mock")
    link = tmp_path / "mock"
    link.symlink_to(target)
    os.lchown(link, 65534, 65534)  # its owner could point it anywhere between check and exec
    problem = check_executable(link)
    assert problem is not None and f"the symlink {link} is owned by uid 65534" in problem


def test_the_audit_trail_failing_on_a_full_disk_keeps_the_change_whole(tmp_path: Path) -> None:
    """The file is written and the change applied: subscribers (the cluster's limit) must
    still hear of it, and the caller must not be told nothing changed."""

    class FullAudit:
        def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
            raise OSError(errno.ENOSPC, "database or disk is full")  # as the Store raises it

    config = tmp_path / "reqpmd.yaml"
    config.write_text("max_concurrent_builds: 2\n")
    service = SettingsService(config, parse.load(config, environ={}), FullAudit())
    heard: list[int] = []
    service.subscribe(lambda s, change: heard.append(s.max_concurrent_builds))
    change = service.set({"max_concurrent_builds": 5}, "root (uid 0)", 0)
    assert change.diff == {"max_concurrent_builds": (2, 5)}
    assert heard == [5] and service.current().max_concurrent_builds == 5


def test_secrets_stay_masked_in_the_reply_the_log_and_the_audit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audited: list[tuple[str, str]] = []

    class Trail:
        def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None:
            audited.append((str(old), str(new)))

    config = tmp_path / "reqpmd.yaml"
    config.write_text("redis_url: redis://:old-secret@r.example:6379/0\n")
    service = SettingsService(config, parse.load(config, environ={}), Trail())
    reply = service.set({"redis_url": "redis://:new-secret@r.example:6379/0"}, "root", 0).reply()
    shown = [str(reply), str(audited), caplog.text]
    for text in shown:
        assert "old-secret" not in text and "new-secret" not in text
    assert audited == [("redis://:***@r.example:6379/0", "redis://:***@r.example:6379/0")]


def test_names_from_redis_reach_a_terminal_without_escape_sequences() -> None:
    from reqpmctl import output

    evil = "build_1@h\x1b]0;owned\x07\x1b[2J"
    table = output.table(["SLOT"], [[output.safe(evil)]])
    assert "\x1b" not in table and "\x07" not in table
    assert "\\x1b]0;owned\\x07" in table


# -- uploads being stored at once ----------------------------------------------------------------


def test_one_upload_per_user_at_a_time_and_a_place_kept_for_admins() -> None:
    """A user whose files read slowly must not make submit busy for everyone."""
    from contextlib import ExitStack

    from reqpmd.control.quota import Uploads
    from reqpmd.control.server import Peer
    from reqpmd.errors import Busy

    def user(uid: int) -> Peer:
        return Peer(pid=1, uid=uid, gid=uid, groups=frozenset({uid}), admin=False)

    admin = Peer(pid=1, uid=0, gid=0, groups=frozenset({0}), admin=True)
    uploads = Uploads(total=4)
    with ExitStack() as held:
        held.enter_context(uploads.storing(user(1000)))
        with pytest.raises(Busy, match="one at a time"), uploads.storing(user(1000)):
            pass
        held.enter_context(uploads.storing(user(1001)))
        held.enter_context(uploads.storing(user(1002)))
        with pytest.raises(Busy, match="already"), uploads.storing(user(1003)):
            pass  # the last place is kept for admins
        held.enter_context(uploads.storing(admin))
        with pytest.raises(Busy), uploads.storing(admin):
            pass  # all four taken
    with uploads.storing(user(1000)):  # every place was given back
        pass
