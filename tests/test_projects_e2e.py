"""Projects through a real reqpmd and reqpmctl, run as a command, with real git
repositories over file://: the first sync builds the head, a push is built at its commit,
bad input is a clear error, and users may look but not administer. The mock stand-in
builds real RPMs with rpmbuild."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reqpmd.control import protocol
from tests import rpms
from tests.daemon_harness import FINAL, Reqpmd, wait_for
from tests.gitrepos import Upstream, spec
from tests.test_reqpmctl import NOBODY, ctl

CHROOT = "fedora-42-x86_64"
# a tag rpm does not know: rpmbuild stops at parsing, with "error: line N: Unknown tag"
UNPARSABLE = spec(release="3").replace(
    "BuildArch: noarch\n", "BuildArch: noarch\nFrobnicate: yes\n"
)


@pytest.fixture(autouse=True)
def _tools() -> None:
    rpms.need_rpmbuild()


@pytest.fixture
def daemon(daemons: Callable[..., Reqpmd]) -> Reqpmd:
    d = daemons(mock_sleep=0.05, settings={"socket_group": "nogroup"})
    for path in (d.root.parent, d.root):
        os.chmod(path, 0o755)  # a user (nobody, in the socket's group) must reach the socket
    return d.start()


def run_json(d: Reqpmd, *args: str) -> Any:
    r = ctl(d, "--json", *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def project_builds(d: Reqpmd, name: str) -> list[dict[str, Any]]:
    return [b for b in d.call("build.list", {"limit": 1000}) if b["project"] == name][::-1]


def synced(d: Reqpmd, name: str) -> dict[str, Any]:
    """The project once its first sync has been recorded, whichever way it went."""
    return wait_for(lambda: (p := run_json(d, "projects", "show", name))["last_sync_at"] and p)


def test_a_project_is_built_at_each_new_commit_and_its_builds_say_which(
    daemon: Reqpmd, tmp_path: Path
) -> None:
    d = daemon
    up = Upstream(tmp_path / "git")
    head = up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"}, "first")

    added = ctl(d, "projects", "add", "greet", "--git", up.url)
    assert added.returncode == 0, added.stderr
    assert "project greet added" in added.stdout
    assert synced(d, "greet")["last_commit"] == head
    (first,) = project_builds(d, "greet")
    shown = run_json(d, "builds", "show", str(first["id"]))
    assert (shown["project"], shown["commit_id"], shown["chroot"]) == ("greet", head, CHROOT)
    assert d.wait_state(first["id"], FINAL, timeout=60)["state"] == "succeeded", d.log()
    wait_for(lambda: d.build(first["id"])["publish_state"] == "published", timeout=60)

    # a push: the sync asked for now builds exactly that commit
    pushed = up.commit({"greet.spec": spec(release="2")}, "release 2")
    r = ctl(d, "projects", "sync", "greet", "--wait")
    assert r.returncode == 0, r.stderr
    assert f"new commit {pushed[:12]}" in r.stdout
    (second,) = project_builds(d, "greet")[1:]
    assert second["commit_id"] == pushed and second["project"] == "greet"
    # nothing moved: nothing is built
    unchanged = run_json(d, "projects", "sync", "greet", "--wait")
    assert unchanged["ok"] and unchanged["builds"] == [] and unchanged["commit"] == pushed
    assert "unchanged" in ctl(d, "projects", "sync", "greet", "--wait").stdout
    assert len(project_builds(d, "greet")) == 2
    assert d.wait_state(second["id"], FINAL, timeout=60)["state"] == "succeeded"

    # a spec rpm cannot parse: a failed build, rpm's own message in mock's build.log
    # (rpmbuild writes there, as with the real mock; the daemon's log, mock's stderr,
    # points to it)
    broken = up.commit({"greet.spec": UNPARSABLE}, "a tag rpm does not know")
    result = run_json(d, "projects", "sync", "greet", "--wait")
    (third,) = result["builds"]
    assert d.wait_state(third, FINAL, timeout=60)["state"] == "failed"
    assert d.build(third)["commit_id"] == broken
    shown_log = ctl(d, "builds", "log", str(third)).stdout
    # rpm's own message, copied from mock's result/build.log into the build's log
    assert "error: line 7: Unknown tag: Frobnicate: yes" in shown_log, shown_log
    fetched = ctl(d, "builds", "fetch", str(third), "--dest", str(tmp_path / "third"))
    assert fetched.returncode == 0, fetched.stderr
    mock_log = (tmp_path / "third" / "build.log").read_text()
    assert "error: line 7: Unknown tag: Frobnicate: yes" in mock_log, mock_log

    # show: the last commit, and per chroot the last build of each state
    p = run_json(d, "projects", "show", "greet")
    assert p["last_commit"] == broken and p["last_sync_ok"] and p["sync_error"] is None
    assert p["builds"] == {CHROOT: {"succeeded": second["id"], "failed": third}}
    assert p["url"] == up.url and p["branch"] is None and p["chroots"] == [CHROOT]
    text = ctl(d, "projects", "show", "greet").stdout
    assert f"last commit: {broken}" in text
    assert f"{CHROOT}  succeeded  {second['id']}" in text
    assert f"{CHROOT}  failed     {third}" in text
    assert "next sync:   in 5h59m" in text  # sync_interval_hours: 6 by default
    listing = ctl(d, "projects", "list").stdout.splitlines()
    header = ["NAME", "ENABLED", "CAP", "WEIGHT", "BRANCH", "CHROOTS", "LAST SYNC", "RESULT"]
    assert listing[0].split() == " ".join([*header, "COMMIT"]).split()
    assert listing[1].split()[:6] == ["greet", "yes", "-", "1", "(default)", CHROOT]
    assert "share:       no cap, weight 1" in text
    assert listing[1].endswith(broken[:12])

    # a build now, of a commit of choice, even though nothing changed
    r = ctl(d, "projects", "build", "greet", "--commit", pushed)
    assert r.returncode == 0, r.stderr
    (again,) = map(int, r.stdout.split())
    assert d.build(again)["commit_id"] == pushed
    assert d.wait_state(again, FINAL, timeout=60)["state"] == "succeeded"


def test_bad_input_is_a_clear_error_that_changes_nothing(daemon: Reqpmd, tmp_path: Path) -> None:
    d = daemon
    up = Upstream(tmp_path / "git")
    up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"})

    # an unreachable URL is added; show says the first sync failed, and why
    r = ctl(d, "projects", "add", "lost", "--git", "file:///nonexistent")
    assert r.returncode == 0, r.stderr
    lost = synced(d, "lost")
    assert lost["last_sync_ok"] is False and lost["last_commit"] is None
    why = "git clone failed (128): fatal: '/nonexistent' does not appear to be a git repository"
    assert lost["sync_error"].startswith(why), lost
    text = ctl(d, "projects", "show", "lost").stdout
    assert "last sync:" in text and "FAILED" in text
    assert f"sync error:  {why}" in text
    assert "(retrying with backoff)" in text
    failed = ctl(d, "projects", "sync", "lost", "--wait")
    assert failed.returncode == protocol.EXIT_FAILED and "sync FAILED" in failed.stdout

    # a name that exists: the daemon's conflict, exit 1, nothing changed
    fields = ("url", "branch", "spec", "chroots", "priority", "enabled", "created_at")
    before = run_json(d, "projects", "show", "lost")
    r = ctl(d, "projects", "add", "lost", "--git", up.url, "--branch", "main", "--priority", "5")
    assert r.returncode == protocol.EXIT_FAILED
    assert r.stderr.strip() == "reqpmctl: a project named lost exists already"
    after = run_json(d, "projects", "show", "lost")
    assert {k: after[k] for k in fields} == {k: before[k] for k in fields}
    assert [p["name"] for p in run_json(d, "projects", "list")] == ["lost"]

    r = ctl(d, "projects", "show", "nosuch")
    assert r.returncode == protocol.EXIT_NOT_FOUND and "no project named nosuch" in r.stderr
    assert ctl(d, "projects", "sync", "nosuch").returncode == protocol.EXIT_NOT_FOUND
    assert ctl(d, "projects", "remove", "nosuch").returncode == protocol.EXIT_NOT_FOUND
    for usage in (
        ["projects", "add", "x"],  # no --git
        ["projects", "add", "bad/name", "--git", up.url],
        ["projects", "add", "x", "--git", "ext::sh -c id"],
        ["projects", "edit", "lost"],  # nothing to change
        ["projects", "edit", "lost", "--branch", "b", "--default-branch"],
    ):
        r = ctl(d, *usage)
        assert r.returncode == protocol.EXIT_USAGE, (usage, r.stderr)

    # an admin's edit, then the fix: the project syncs again
    r = ctl(d, "projects", "edit", "lost", "--git", up.url, "--disable")
    assert r.returncode == 0, r.stderr
    fixed = wait_for(lambda: (p := run_json(d, "projects", "show", "lost"))["last_sync_ok"] and p)
    assert fixed["enabled"] is False and fixed["sync_error"] is None and fixed["last_commit"]
    assert "the project is disabled" in ctl(d, "projects", "show", "lost").stdout

    r = ctl(d, "projects", "remove", "lost")
    assert r.returncode == 0 and "removed" in r.stdout
    assert ctl(d, "projects", "show", "lost").returncode == protocol.EXIT_NOT_FOUND
    assert "no projects yet" in ctl(d, "projects", "list").stdout
    assert len(project_builds(d, "lost")) == 1  # its build stays


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run reqpmctl as another uid")
def test_a_user_may_look_sync_and_build_but_not_administer(daemon: Reqpmd, tmp_path: Path) -> None:
    d = daemon
    up = Upstream(tmp_path / "git")
    head = up.commit({"greet.spec": spec(), "greet.sh": "echo hi\n"})
    assert ctl(d, "projects", "add", "greet", "--git", up.url).returncode == 0
    assert synced(d, "greet")["last_commit"] == head
    for args in (
        ["projects", "add", "mine", "--git", up.url],
        ["projects", "edit", "greet", "--disable"],
        ["projects", "remove", "greet"],
    ):
        r = ctl(d, *args, as_user=NOBODY)
        assert r.returncode == protocol.EXIT_PERMISSION, (args, r.stderr)
        assert "admin" in r.stderr
    listed = ctl(d, "--json", "projects", "list", as_user=NOBODY)
    assert listed.returncode == 0, listed.stderr
    assert [(p["name"], p["enabled"]) for p in json.loads(listed.stdout)] == [("greet", True)]
    shown = ctl(d, "projects", "show", "greet", as_user=NOBODY)
    assert shown.returncode == 0 and f"last commit: {head}" in shown.stdout
    synced_now = ctl(d, "projects", "sync", "greet", "--wait", as_user=NOBODY)
    assert synced_now.returncode == 0 and "unchanged" in synced_now.stdout
    built = ctl(d, "projects", "build", "greet", as_user=NOBODY)
    assert built.returncode == 0, built.stderr
    (build_id,) = map(int, built.stdout.split())
    assert d.build(build_id)["commit_id"] == head
