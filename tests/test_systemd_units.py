"""The shipped units under a real systemd (252): tests/sandbox/ boots one as PID 1 of fresh
namespaces over a tmpfs overlay of /, and reqpm is installed into it the way a package
would be: /usr/bin/reqpmd and reqpmctl (wrappers around this checkout), the mock stand-in
as /usr/bin/mock, systemd/* in place, users from reqpm.sysusers, /etc/reqpm/reqpmd.yaml from
etc/reqpm/ and the directories with the owners and modes of reqpm.spec's %files, then
reqpm.tmpfiles applied. Test-only values (short watchdog, mock's sleep) go in a drop-in and
in the config, written into the installed file (its owner and mode kept); the shipped unit
files are used as they are.

One sandbox serves the whole module; each test sets up the daemon state it needs itself.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from reqpmd.control import protocol
from tests.sandbox import Sandbox, poll
from tests.test_packaging import fedora_expand, spec_file_attrs, spec_section

CHECKOUT = Path(__file__).resolve().parent.parent
HELLO = CHECKOUT / "tests" / "data" / "hello"
UNITS = CHECKOUT / "systemd"
VENV_PYTHON = CHECKOUT / ".venv" / "bin" / "python"
PYTHON = VENV_PYTHON if VENV_PYTHON.exists() else Path(sys.executable)
DROPIN = "/etc/systemd/system/reqpmd.service.d/test.conf"
CONFIG = "/etc/reqpm/reqpmd.yaml"
MOCK_LOG = "/var/lib/mock/fakemock.jsonl"
REDIS_SOCKET = "/var/lib/reqpm/redis/redis.sock"  # the embedded Redis's
FAIL_SRPM = "/srv/reqpm-test/broken-fail-1-1.src.rpm"
# what a fast test needs on top of the shipped config
TEST_CONFIG: dict[str, Any] = {
    "host_id": "sbx",
    "min_free_disk_gb": 0.1,
    "cancel_grace_seconds": 1,
    "slot_lease_seconds": 5,
    "default_chroot": "fedora-42-x86_64",
}
WATCHDOG_SEC = 3
TEST_USERS = """\
# test users: alice may use reqpmctl (group reqpm), mallory may not
u alice - "reqpm test user in group reqpm" /nonexistent /usr/sbin/nologin
m alice reqpm
u mallory - "reqpm test user outside group reqpm" /nonexistent /usr/sbin/nologin
"""


def _needed_paths() -> list[Path]:
    """What the service must see to run this checkout: the code, the venv, the interpreter."""
    paths = {CHECKOUT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    paths.add(PYTHON.resolve().parent.parent)
    return sorted(p for p in paths if not any(p != q and p.is_relative_to(q) for q in paths))


def _hidden_from_service(path: Path) -> bool:
    """ProtectHome= hides /root, /home and /run/user; PrivateTmp= gives a fresh /tmp."""
    tops = ("/root", "/home", "/run/user", "/tmp", "/var/tmp")
    return any(path.is_relative_to(top) for top in tops)


def containing(needle: str, text: str) -> str | None:
    return text if needle in text else None


class Reqpm:
    """reqpm installed in a sandbox, and the commands the tests use on it."""

    def __init__(self, sbx: Sandbox) -> None:
        self.sbx = sbx
        self.setup_output: dict[str, subprocess.CompletedProcess[str]] = {}

    # -- install ---------------------------------------------------------------------------

    def install(self) -> None:
        sbx = self.sbx
        # the overlay's own copy of /root (never the host's): the checkout's interpreter lives
        # under it, and users other than root run it too
        if sbx.path("/root").is_dir():
            sbx.path("/root").chmod(0o755)
        env = f"PYTHONPATH={shlex.quote(str(CHECKOUT))}"
        py = shlex.quote(str(PYTHON))
        for name, module in (("reqpmd", "reqpmd.daemon"), ("reqpmctl", "reqpmctl.cli")):
            sbx.write(f"/usr/bin/{name}", f'#!/bin/sh\n{env} exec {py} -m {module} "$@"\n', 0o755)
        # the mock stand-in, run by the checkout's interpreter (whatever python3 the host has)
        mock = (CHECKOUT / "tests" / "fakemock" / "mock").read_text()
        sbx.write("/usr/bin/mock", re.sub(r"\A#!.*", f"#!{PYTHON}", mock), 0o755)
        # where the reqpm package puts these
        sbx.write("/usr/lib/sysusers.d/reqpm.conf", (UNITS / "reqpm.sysusers").read_text())
        sbx.write("/usr/lib/tmpfiles.d/reqpm.conf", (UNITS / "reqpm.tmpfiles").read_text())
        sbx.write("/etc/sysusers.d/reqpm-test.conf", TEST_USERS)
        for unit in ("reqpmd.service", "reqpmd.socket"):
            sbx.write(f"/etc/systemd/system/{unit}", (UNITS / unit).read_text())
        self.setup_output = {
            "sysusers": sbx.run(
                "systemd-sysusers",
                "/usr/lib/sysusers.d/reqpm.conf",
                "/etc/sysusers.d/reqpm-test.conf",
            )
        }
        # what rpm installs after %pre (sysusers), with the spec's %attr; tmpfiles after it
        self.write_config()
        for path, (mode, user, group) in spec_file_attrs().items():
            if not sbx.path(path).exists():
                sbx.run("mkdir", "-p", path)
            sbx.run("chown", f"{user}:{group}", path)
            sbx.run("chmod", mode, path)
        self.setup_output["tmpfiles"] = sbx.run(
            "systemd-tmpfiles", "--create", "/usr/lib/tmpfiles.d/reqpm.conf"
        )
        # as the mock package has it: root:mock, setgid, group-writable
        sbx.run("install", "-d", "-m", "2775", "-g", "mock", "/var/lib/mock")
        sbx.write(FAIL_SRPM, "not an rpm: the mock stand-in fails builds named *fail*\n")
        self.write_dropin()

    def write_config(self, **values: Any) -> None:
        """The shipped, commented config, with the test values (and ``values``) set. Written
        into the file in place: it keeps the owner and mode it was installed (or left) with."""
        text = (CHECKOUT / "etc" / "reqpm" / "reqpmd.yaml").read_text()
        chosen = {**TEST_CONFIG, **values}
        text += "\n# --- set by tests/test_systemd_units.py ---\n" + yaml.safe_dump(chosen)
        path = self.sbx.path(CONFIG)
        if path.exists():
            path.write_text(text)
        else:
            self.sbx.write(CONFIG, text, 0o600)

    def write_dropin(self, mock_sleep: float = 0.2) -> None:
        """Test-only service values; the shipped unit file stays as it is."""
        lines = [
            "# test-only values (tests/test_systemd_units.py)",
            "[Unit]",
            "# the tests start and stop reqpmd more often than the default rate limit allows",
            "StartLimitIntervalSec=0",
            "[Service]",
            f"WatchdogSec={WATCHDOG_SEC}s",
            "RestartSec=200ms",
            f"Environment=FAKEMOCK_SLEEP={mock_sleep} FAKEMOCK_LOG={MOCK_LOG}",
        ]
        hidden = [p for p in _needed_paths() if _hidden_from_service(p)]
        if hidden:
            lines += [
                "# this checkout's interpreter (or the checkout) is where ProtectHome=/PrivateTmp=",
                "# hide it (a package installs reqpmd under /usr): bind just those paths back",
            ]
            in_tmp = [p for p in hidden if p.is_relative_to("/tmp") or p.is_relative_to("/var/tmp")]
            if len(in_tmp) < len(hidden):  # some under /root or /home: an empty tmpfs there
                lines.append("ProtectHome=tmpfs")
            lines.append("BindReadOnlyPaths=" + " ".join(str(p) for p in hidden))
        self.sbx.write(DROPIN, "\n".join(lines) + "\n")
        self.sbx.systemctl("daemon-reload")

    # -- the daemon --------------------------------------------------------------------------

    def restart(self, mock_sleep: float = 0.2, **config: Any) -> None:
        """reqpmd freshly started (socket unit stopped), on the test config plus ``config``."""
        self.sbx.systemctl("stop", "reqpmd.service", "reqpmd.socket")
        self.sbx.systemctl("reset-failed", "reqpmd.service", "reqpmd.socket", check=False)
        self.write_config(**config)
        self.write_dropin(mock_sleep)
        self.sbx.systemctl("start", "reqpmd.service")

    def ctl(self, *args: str, user: str | None = None) -> Any:
        prefix = ["runuser", "-u", user, "--"] if user else []
        return self.sbx.run(*prefix, "reqpmctl", *args, check=False)

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl("--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def build(self, build_id: int) -> dict[str, Any]:
        return dict(self.ctl_json("builds", "show", str(build_id)))

    def wait_state(self, build_id: int, *states: str, timeout: float = 30) -> dict[str, Any]:
        return dict(
            poll(
                f"build {build_id} in {states}",
                lambda: (b := self.build(build_id))["state"] in states and b,
                timeout=timeout,
            )
        )

    def submit_hello(self) -> int:
        spec, sources = str(HELLO / "hello.spec"), str(HELLO)
        return int(self.ctl_json("submit", "--spec", spec, "--sources", sources)["id"])

    def mock_pids(self) -> list[int]:
        r = self.sbx.run("pgrep", "-f", "/usr/bin/mock ", check=False)
        return [int(p) for p in r.stdout.split()]

    def mock_runs(self) -> list[dict[str, Any]]:
        log = self.sbx.path(MOCK_LOG)
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines() if line]


@pytest.fixture(scope="module")
def reqpm(systemd_sandbox: Sandbox) -> Iterator[Reqpm]:
    r = Reqpm(systemd_sandbox)
    r.install()
    yield r
    # the sandbox goes when the module ends; before it, show what reqpmd said (on failures)
    units = ["-u", "reqpmd", "-u", "reqpmd.socket"]
    print(systemd_sandbox.run("journalctl", "--no-pager", *units, "-n", "80", check=False).stdout)


# -- the files themselves -------------------------------------------------------------


def test_units_verify_without_warnings_and_sysusers_tmpfiles_apply(
    reqpm: Reqpm, capsys: pytest.CaptureFixture[str]
) -> None:
    sbx = reqpm.sbx
    for step, r in reqpm.setup_output.items():
        assert not re.search(r"(?i)warn|error|ignor|invalid|fail|unknown", r.stderr), (step, r)
    stat = sbx.run("stat", "-c", "%n %U:%G %a", "/var/lib/reqpm", "/etc/reqpm", "/run/reqpm")
    assert stat.stdout.split("\n")[:3] == [
        "/var/lib/reqpm reqpmd:reqpmd 750",
        "/etc/reqpm reqpmd:reqpmd 750",
        "/run/reqpm reqpmd:reqpmd 755",
    ]
    assert {"mock", "reqpm"} <= set(sbx.run("id", "-Gn", "reqpmd").stdout.split())
    units = ["/etc/systemd/system/reqpmd.service", "/etc/systemd/system/reqpmd.socket"]
    # with the test drop-in, then the shipped files alone
    r = sbx.run("systemd-analyze", "verify", *units, check=False)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    aside = sbx.path("/etc/systemd/system/reqpmd.service.d")
    aside.rename(aside.with_name("reqpmd.service.d.aside"))
    try:
        r = sbx.run("systemd-analyze", "verify", *units, check=False)
        assert (r.returncode, r.stderr) == (0, ""), r.stderr
    finally:
        aside.with_name("reqpmd.service.d.aside").rename(aside)
    # the shipped unit alone, in a root of its own (no drop-in)
    sbx.write(
        "/tmp/shipped/etc/systemd/system/reqpmd.service", (UNITS / "reqpmd.service").read_text()
    )
    r = sbx.run(
        "systemd-analyze",
        "security",
        "--offline=yes",
        "--root=/tmp/shipped",
        "reqpmd.service",
        check=False,
    )
    score = re.search(r"Overall exposure level for reqpmd\.service: ([0-9.]+ \w+)", r.stdout)
    assert score, r.stdout + r.stderr
    with capsys.disabled():
        print(f"\n[systemd-analyze security] reqpmd.service exposure level: {score.group(1)}")


# -- Type=notify ----------------------------------------------------------------------


def test_start_returns_after_ready_and_status_shows_the_status_line(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    sbx.systemctl("stop", "reqpmd.service")
    assert sbx.show("reqpmd.service", "Type") == "notify"
    started = time.monotonic()
    sbx.systemctl("start", "reqpmd.service")
    took = time.monotonic() - started
    # no polling: READY=1 came only once the socket and Redis were up
    assert sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "active"
    r = reqpm.ctl("status")
    assert r.returncode == 0, r.stderr
    assert "slots busy cluster-wide" in r.stdout and "redis:   ok" in r.stdout, r.stdout
    status = poll(
        "STATUS= in systemctl status",
        lambda: containing(
            "slots busy cluster-wide", sbx.systemctl("status", "reqpmd.service", check=False).stdout
        ),
    )
    assert re.search(
        r'Status: "\d+/4 slots busy cluster-wide, \d+ building here, \d+ queued"', status
    )
    print(f"systemctl start reqpmd took {took:.2f}s")


# -- who may use the socket -----------------------------------------------------------


def test_status_for_root_and_group_reqpm_refused_to_others(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    # reqpmd bound it and gave it to group reqpm (it is in that group for this)
    stat = sbx.run("stat", "-c", "%U:%G %a", "/run/reqpm/reqpmd.sock").stdout.strip()
    assert stat == "reqpmd:reqpm 660"
    assert "reqpm" in sbx.run("id", "-Gn", "alice").stdout.split()
    assert "reqpm" not in sbx.run("id", "-Gn", "mallory").stdout.split()
    for user in (None, "alice"):
        r = reqpm.ctl("status", user=user)
        assert r.returncode == 0, (user, r.stderr)
        assert "slots busy cluster-wide" in r.stdout
    r = reqpm.ctl("status", user="mallory")
    assert r.returncode == protocol.EXIT_UNREACHABLE == 5, r
    assert "permission denied" in r.stderr


# -- who may read the daemon's files --------------------------------------------------


def stat_of(sbx: Sandbox, *paths: str) -> list[str]:
    return sbx.run("stat", "-c", "%n %U:%G %a", *paths).stdout.splitlines()


def as_user(sbx: Sandbox, user: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return sbx.run("runuser", "-u", user, "--", *argv, check=False)


def test_as_installed_a_reqpmctl_user_cannot_read_the_config(reqpm: Reqpm) -> None:
    """Group reqpm (who may run reqpmctl) is not the daemon's group: the config, which may
    hold a Redis password, is 0600 reqpmd:reqpmd, and stays so when reqpmd rewrites it."""
    sbx = reqpm.sbx
    cursor = sbx.journal_cursor()
    reqpm.restart()
    assert "reqpm" in sbx.run("id", "-Gn", "alice").stdout.split()
    assert reqpm.ctl("status", user="alice").returncode == 0
    r = reqpm.ctl("settings", "show", user="alice")
    assert r.returncode == 0 and "max_concurrent_builds" in r.stdout, r
    r = as_user(sbx, "alice", "cat", CONFIG)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    r = as_user(sbx, "alice", "ls", "/var/lib/reqpm")
    assert r.returncode != 0 and "Permission denied" in r.stderr, r

    # the daemon: user reqpmd, its own group, and mock and reqpm besides
    assert sbx.run("id", "-gn", "reqpmd").stdout.split() == ["reqpmd"]
    assert sorted(sbx.run("id", "-Gn", "reqpmd").stdout.split()) == ["mock", "reqpm", "reqpmd"]
    uid, gid = sbx.run("id", "-u", "reqpmd").stdout.strip(), sbx.run("id", "-g", "reqpmd").stdout
    status = sbx.path(f"/proc/{sbx.show('reqpmd.service', 'MainPID')}/status").read_text()
    ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines() if ":" in line}
    assert ids["Uid"] == [uid] * 4 and ids["Gid"] == [gid.strip()] * 4, ids
    group_ids = {sbx.run("getent", "group", g).stdout.split(":")[2] for g in ("mock", "reqpm")}
    assert group_ids <= set(ids["Groups"]), ids

    paths = ("/etc/reqpm", CONFIG, "/var/lib/reqpm", "/var/lib/reqpm/redis", REDIS_SOCKET)
    assert stat_of(sbx, *paths) == [
        "/etc/reqpm reqpmd:reqpmd 750",
        f"{CONFIG} reqpmd:reqpmd 600",
        "/var/lib/reqpm reqpmd:reqpmd 750",
        "/var/lib/reqpm/redis reqpmd:reqpmd 750",
        f"{REDIS_SOCKET} reqpmd:reqpmd 700",
    ]
    assert stat_of(sbx, "/run/reqpm", "/run/reqpm/reqpmd.sock") == [
        "/run/reqpm reqpmd:reqpmd 755",
        "/run/reqpm/reqpmd.sock reqpmd:reqpm 660",
    ]
    assert CONFIG not in sbx.journal("-u", "reqpmd", "-p", "warning", after=cursor)
    # the unit's *DirectoryMode= agree with the directories as installed (else systemd says
    # "ConfigurationDirectory 'reqpm' already exists but the mode is different" at each start)
    assert "the mode is different" not in sbx.journal("-u", "reqpmd", after=cursor)

    # settings set makes reqpmd write a new file and rename it over the old one
    inode = sbx.path(CONFIG).stat().st_ino
    r = reqpm.ctl("settings", "set", "max_concurrent_builds=3")
    assert r.returncode == 0, r.stderr
    assert sbx.path(CONFIG).stat().st_ino != inode
    assert "max_concurrent_builds: 3" in sbx.path(CONFIG).read_text()
    assert stat_of(sbx, CONFIG) == [f"{CONFIG} reqpmd:reqpmd 600"]
    r = as_user(sbx, "alice", "cat", CONFIG)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r


# -- reload ---------------------------------------------------------------------------


def test_reload_rereads_the_config_and_a_broken_one_keeps_the_old(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    main_pid = sbx.show("reqpmd.service", "MainPID")
    assert reqpm.ctl_json("status")["max_concurrent"] == 4
    cursor = sbx.journal_cursor()
    reqpm.write_config(max_concurrent_builds=3)
    sbx.systemctl("reload", "reqpmd.service")
    # the SIGHUP is asynchronous: reqpmd re-reads the file right after reload returns
    poll("max_concurrent 3 after reload", lambda: reqpm.ctl_json("status")["max_concurrent"] == 3)
    assert "slots busy" in reqpm.ctl("status").stdout
    poll(
        "the reload in the journal",
        lambda: (
            "setting max_concurrent_builds: 4 -> 3 by SIGHUP reload"
            in sbx.journal("-u", "reqpmd", after=cursor)
        ),
    )

    # broken: `systemctl reload` fails, says why in the journal, and nothing changes
    cursor = sbx.journal_cursor()
    reqpm.write_config(max_concurrent_builds=99)
    r = sbx.systemctl("reload", "reqpmd.service", check=False)
    assert r.returncode != 0
    poll(
        "the reason for the failed reload in journalctl -u reqpmd",
        lambda: re.search(
            r"max_concurrent_builds.*99.*1 to 20", sbx.journal("-u", "reqpmd", after=cursor)
        ),
    )
    # the daemon itself keeps the running settings when a SIGHUP finds the file broken
    sbx.systemctl("kill", "-s", "HUP", "--kill-who=main", "reqpmd.service")
    poll(
        "reqpmd's own reload error in the journal, at priority err",
        lambda: (
            "keeping the running settings" in sbx.journal("-u", "reqpmd", "-p", "err", after=cursor)
        ),
    )
    assert sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "active"
    assert sbx.show("reqpmd.service", "MainPID") == main_pid
    assert reqpm.ctl_json("status")["max_concurrent"] == 3


def test_settings_set_persists_to_etc_reqpm(reqpm: Reqpm) -> None:
    """reqpmctl settings set rewrites /etc/reqpm/reqpmd.yaml from inside the hardened unit."""
    sbx = reqpm.sbx
    reqpm.restart()
    r = reqpm.ctl("settings", "set", "max_concurrent_builds=5")
    assert r.returncode == 0, r.stderr
    assert "max_concurrent_builds: 4 -> 5" in r.stdout
    assert "max_concurrent_builds: 5" in sbx.path(CONFIG).read_text()
    sbx.systemctl("restart", "reqpmd.service")
    assert reqpm.ctl_json("status")["max_concurrent"] == 5
    r = reqpm.ctl("settings", "set", "max_concurrent_builds=6", user="alice")
    assert r.returncode == protocol.EXIT_PERMISSION, r


# -- builds and the journal -----------------------------------------------------------


def test_build_runs_and_the_journal_has_its_events_priorities_and_id(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    cursor = sbx.journal_cursor()
    r = reqpm.ctl("submit", "--spec", str(HELLO / "hello.spec"), "--sources", str(HELLO), "--wait")
    assert r.returncode == 0, r.stderr
    ok = int(re.search(r"build (\d+): succeeded", r.stdout).group(1))  # type: ignore[union-attr]
    assert "Finish: rpmbuild" in r.stdout  # the log streamed from the build
    runs = [x for x in reqpm.mock_runs() if x["root"].endswith(f"-build{ok}")]
    assert runs and all(x["exit"] == 0 for x in runs)
    uid = int(sbx.run("id", "-u", "reqpmd").stdout)
    assert {x["uid"] for x in runs} == {uid}  # mock ran as User=reqpmd

    events = poll(
        f"build {ok}'s events under REQPM_BUILD_ID={ok}",
        lambda: containing(
            f"build {ok}: succeeded", sbx.journal("-u", "reqpmd", f"REQPM_BUILD_ID={ok}")
        ),
    )
    assert f"build {ok}: submitted by root" in events and f"build {ok}: building" in events

    r = reqpm.ctl("submit", FAIL_SRPM, "--wait")
    assert r.returncode == protocol.EXIT_FAILED, r
    bad = int(re.search(r"build (\d+): failed", r.stdout).group(1))  # type: ignore[union-attr]

    def warnings() -> list[dict[str, Any]]:
        return sbx.journal_entries("-u", "reqpmd", "-p", "warning", after=cursor)

    found = poll(
        f"build {bad}'s failure in journalctl -p warning",
        lambda: [e for e in warnings() if f"build {bad}: failed" in e["MESSAGE"]],
    )
    assert found[0]["REQPM_BUILD_ID"] == str(bad) and int(found[0]["PRIORITY"]) <= 4
    everything = warnings()
    assert all(int(e["PRIORITY"]) <= 4 for e in everything)
    assert not [e for e in everything if f"build {ok}:" in e["MESSAGE"]]  # info: filtered out
    assert f"build {bad}: failed" in sbx.journal("-u", "reqpmd", f"REQPM_BUILD_ID={bad}")


# -- watchdog -------------------------------------------------------------------------


def test_watchdog_kills_a_hung_main_loop_and_queued_builds_survive(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    # one slot: the second build waits while the first builds (mock sleeps long enough
    # that the first is surely still building when reqpmd hangs)
    reqpm.restart(mock_sleep=300, max_concurrent_builds=1)
    first = reqpm.submit_hello()
    reqpm.wait_state(first, "building")
    second = reqpm.submit_hello()
    reqpm.wait_state(second, "queued", "waiting")
    hung_mock = poll("mock running", reqpm.mock_pids)
    # for the instance systemd starts after the watchdog: a fast mock
    reqpm.write_dropin(mock_sleep=0.2)
    main_pid = sbx.show("reqpmd.service", "MainPID")
    restarts = int(sbx.show("reqpmd.service", "NRestarts"))
    cursor = sbx.journal_cursor()
    sbx.run("kill", "-STOP", main_pid)  # the main loop (and all of reqpmd) hangs
    stopped = time.monotonic()
    poll(
        "systemd's watchdog verdict",
        lambda: "Failed with result 'watchdog'" in sbx.journal("-u", "reqpmd", after=cursor),
        timeout=WATCHDOG_SEC + 10,
    )
    took = time.monotonic() - stopped
    assert took < WATCHDOG_SEC + 3, took
    log = sbx.journal("-u", "reqpmd", after=cursor)
    assert "Watchdog timeout" in log
    poll(
        "reqpmd restarted (Restart=on-failure)",
        lambda: (
            sbx.show("reqpmd.service", "MainPID") not in ("0", main_pid)
            and sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "active"
        ),
    )
    assert int(sbx.show("reqpmd.service", "NRestarts")) == restarts + 1
    for pid in hung_mock:  # KillMode=mixed: the rest of the cgroup went with reqpmd
        assert not sbx.path(f"/proc/{pid}").exists()
    for build_id in (first, second):
        done = reqpm.wait_state(build_id, "succeeded", "failed", "cancelled", "timed_out")
        assert done["state"] == "succeeded", done
    assert reqpm.build(first)["runs"] >= 2  # it was building when reqpmd hung: run again
    log = sbx.journal("-u", "reqpmd", after=cursor)
    assert f"build {first}: left running by an earlier instance; re-queued" in log


# -- stop while building --------------------------------------------------------------


def test_stop_cancels_a_running_build_cleanly_and_start_runs_it_again(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart(mock_sleep=300)
    build_id = reqpm.submit_hello()
    reqpm.wait_state(build_id, "building")
    pids = poll("mock running", reqpm.mock_pids)
    cursor = sbx.journal_cursor()
    started = time.monotonic()
    sbx.systemctl("stop", "reqpmd.service")
    took = time.monotonic() - started
    assert took < 15, took  # well inside TimeoutStopSec (180 s); cancel_grace_seconds is 1
    assert sbx.show("reqpmd.service", "Result") == "success"  # not 'timeout'
    assert sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "inactive"
    assert reqpm.mock_pids() == []
    for pid in pids:
        assert not sbx.path(f"/proc/{pid}").exists()
    log = sbx.journal("-u", "reqpmd", after=cursor)
    assert "SIGKILL" not in log and "timed out" not in log, log
    assert f"build {build_id}: queued (daemon stopping" in log
    runs = [x for x in reqpm.mock_runs() if x["root"] == f"fedora-42-x86_64-build{build_id}"]
    assert [(x["mode"], x["exit"]) for x in runs] == [("buildsrpm", 7), ("clean", 0)], runs
    # 7: mock's exit on SIGINT ("Exiting on user interrupt"), the first, gentlest step of the
    # cancel; no SIGTERM/SIGKILL needed. Then the scrub of its root, before reqpmd exited.

    reqpm.write_dropin(mock_sleep=0.2)
    sbx.systemctl("start", "reqpmd.service")
    done = reqpm.wait_state(build_id, "succeeded", "failed", "cancelled", "timed_out")
    assert done["state"] == "succeeded" and done["runs"] == 2, done


# -- socket activation ----------------------------------------------------------------


def test_socket_activation_starts_reqpmd_on_the_first_call(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    sbx.systemctl("stop", "reqpmd.service")
    cursor = sbx.journal_cursor()
    sbx.systemctl("start", "reqpmd.socket")
    assert sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "inactive"
    r = reqpm.ctl("status")
    assert r.returncode == 0, r.stderr
    assert "slots:" in r.stdout and "max_concurrent_builds=4" in r.stdout
    assert sbx.systemctl("is-active", "reqpmd.service", check=False).stdout.strip() == "active"
    log = sbx.journal("-u", "reqpmd", after=cursor)
    assert "(socket activation)" in log
    stat = sbx.run("stat", "-c", "%U:%G %a", "/run/reqpm/reqpmd.sock").stdout.strip()
    assert stat == "reqpmd:reqpm 660"
    r = reqpm.ctl("status", user="alice")  # the socket unit's SocketGroup=reqpm, 0660
    assert r.returncode == 0, r.stderr
    assert reqpm.ctl("status", user="mallory").returncode == protocol.EXIT_UNREACHABLE
    sbx.systemctl("stop", "reqpmd.service", "reqpmd.socket")


# Regression: reqpmd used to shutdown() the listening socket it inherited from systemd,
# which systemd shares; reqpmd.socket then failed for good ("Got POLLHUP on a listening
# socket") and every later reqpmctl call was refused.


def test_socket_activation_survives_a_stop_of_reqpmd(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    sbx.systemctl("stop", "reqpmd.service")
    sbx.systemctl("start", "reqpmd.socket")
    try:
        assert reqpm.ctl("status").returncode == 0  # activates reqpmd
        cursor = sbx.journal_cursor()
        sbx.systemctl("stop", "reqpmd.service")
        r = reqpm.ctl("status")  # activates it again
        assert r.returncode == 0, r.stderr
        assert "POLLHUP" not in sbx.journal("-u", "reqpmd.socket", after=cursor)
        assert sbx.systemctl("is-active", "reqpmd.socket", check=False).stdout.strip() == "active"
    finally:
        sbx.systemctl("stop", "reqpmd.service", "reqpmd.socket")
        sbx.systemctl("reset-failed", "reqpmd.socket", check=False)


def test_socket_activated_reqpmd_answers_after_a_restart(reqpm: Reqpm) -> None:
    sbx = reqpm.sbx
    reqpm.restart()
    sbx.systemctl("stop", "reqpmd.service")
    sbx.systemctl("start", "reqpmd.socket")
    try:
        assert reqpm.ctl("status").returncode == 0  # activates reqpmd
        sbx.systemctl("restart", "reqpmd.service")
        r = reqpm.ctl("status")
        assert r.returncode == 0, r.stderr
    finally:
        sbx.systemctl("stop", "reqpmd.service", "reqpmd.socket")
        sbx.systemctl("reset-failed", "reqpmd.socket", check=False)


# -- upgrade from the layout where the daemon ran as user reqpm --------------------------


def test_post_gives_an_install_of_the_old_reqpm_user_to_reqpmd(reqpm: Reqpm) -> None:
    """0.1.0-1's daemon ran as user reqpm, in group reqpm, with the config root:reqpm 0640.
    The spec's %post (run here without its systemd macros) gives it all to reqpmd, twice
    over without harm; reqpmd then starts on it and still has its builds."""
    sbx = reqpm.sbx
    reqpm.restart()
    build_id = reqpm.submit_hello()
    assert reqpm.wait_state(build_id, "succeeded", "failed")["state"] == "succeeded"
    sbx.systemctl("stop", "reqpmd.service")
    old_user = 'u reqpm -:reqpm "reqpm build daemon" /var/lib/reqpm /usr/sbin/nologin\n'
    sbx.write("/etc/sysusers.d/reqpm-0.1.0.conf", old_user)
    sbx.run("systemd-sysusers", "/etc/sysusers.d/reqpm-0.1.0.conf")
    sbx.run("chown", "-R", "reqpm:reqpm", "/var/lib/reqpm", "/etc/reqpm")
    sbx.run("chown", "root:reqpm", CONFIG)
    sbx.run("chmod", "640", CONFIG)
    sbx.run("chmod", "755", "/etc/reqpm")
    assert as_user(sbx, "alice", "cat", CONFIG).returncode == 0  # the finding, reproduced

    body = [line for line in spec_section("post").splitlines() if not line.startswith("%")]
    script = fedora_expand("\n".join(body))
    for _ in range(2):
        r = sbx.run("sh", "-c", script, "post", "2", check=False)  # $1 = 2: an upgrade
        assert (r.returncode, r.stderr) == (0, ""), r
        r = sbx.run(
            "find", "/var/lib/reqpm", "/etc/reqpm", "(", "!", "-user", "reqpmd", "-o", "!",
            "-group", "reqpmd", ")", "-printf", "%p %u:%g\n",
        )  # fmt: skip
        assert r.stdout == "", r.stdout
        assert stat_of(sbx, CONFIG) == [f"{CONFIG} reqpmd:reqpmd 600"]
    assert as_user(sbx, "alice", "cat", CONFIG).returncode != 0
    sbx.systemctl("start", "reqpmd.service")
    assert reqpm.build(build_id)["state"] == "succeeded"
    r = reqpm.ctl("builds", "log", str(build_id), user="alice")
    assert r.returncode == 0 and "Finish: rpmbuild" in r.stdout, r
