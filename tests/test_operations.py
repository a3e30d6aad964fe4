"""The control operations table, in process: roles, argument checks, and what each
operation changes, on real services (store, settings, limiter on a real redis-server,
cluster, status, scheduler). Nothing ticks the scheduler, so no build ever runs."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.states import State
from reqpmd.builds.store import Store
from reqpmd.cluster import Cluster
from reqpmd.config.parse import load
from reqpmd.config.transaction import SettingsService
from reqpmd.control import operations
from reqpmd.control.operations import Operations
from reqpmd.control.projects import ProjectOps
from reqpmd.control.repositories import RepositoryOps
from reqpmd.control.server import Peer, Request
from reqpmd.control.stats import StatsOps
from reqpmd.errors import (
    BadRequest,
    DiskFull,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    QuotaExceeded,
)
from reqpmd.live import Farm, Live
from reqpmd.maintenance.job import Maintenance
from reqpmd.maintenance.orphans import Orphans
from reqpmd.maintenance.retention import Retention
from reqpmd.projects.registry import Projects
from reqpmd.projects.syncer import ProjectSyncer
from reqpmd.repos.publisher import Publisher
from reqpmd.slots import keys
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.server import RedisServer
from reqpmd.status import Status
from tests.conftest import MakeLimiter

USER = Peer(pid=1001, uid=4242, gid=4242, groups=frozenset({4242}), admin=False)
OTHER = Peer(pid=1002, uid=4343, gid=4343, groups=frozenset({4343}), admin=False)
ADMIN = Peer(pid=1003, uid=0, gid=0, groups=frozenset({0}), admin=True)

CONFIG = """\
# a test config; this comment must survive settings.set
state_dir: state
max_concurrent_builds: 2
admin_group: reqpm-admin
default_chroot: fedora-40-x86_64
"""

ADMIN_OPS = {
    "settings.set",
    "settings.file",
    "settings.replace",
    "slots.release",
    "slots.clear",
    "slots.end_grace",
    "repos.sync",
    "projects.add",
    "projects.edit",
    "projects.remove",
    "cleanup.run",
}


def never_run(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("no build may run in these tests")


@dataclass
class Env:
    ops: Operations
    settings: SettingsService
    store: Store
    limiter: BuildConcurrencyLimiter
    cluster: Cluster
    scheduler: Scheduler
    status: Status
    config: Path
    wakes: list[int] = field(default_factory=list)

    def call(self, op: str, peer: Peer, fds: list[int] | None = None, **args: Any) -> Any:
        return self.ops(Request(op, args, peer, fds=fds or []))


@pytest.fixture
def make_env(tmp_path: Path, make_limiter: MakeLimiter) -> Iterator[Callable[..., Env]]:
    stores: list[Store] = []

    def make(client: redis.Redis, name: str = "ops") -> Env:
        root = tmp_path / name
        root.mkdir()
        config = root / "reqpmd.yaml"
        config.write_text(CONFIG)
        initial = load(config, environ={})
        store = Store(initial.state_dir)
        stores.append(store)
        settings = SettingsService(config, initial, audit=store)
        current = settings.current
        limiter = make_limiter(
            client,
            max_concurrent=lambda: current().max_concurrent_builds,
            namespace=name,
            host="testhost",
        )
        clock = [1000.0]
        cluster = Cluster(client, limiter, current, store, clock=lambda: clock[0])
        scheduler = Scheduler(store, limiter, current, never_run)
        publisher = Publisher(store, current)
        projects = Projects(store)
        syncer = ProjectSyncer(store, projects, scheduler, current)
        maintenance = Maintenance(
            Retention(store, publisher, current),
            Orphans(scheduler, limiter, current, never_run),
            current,
            disk_short=lambda: None,
        )
        status = Status(current, cluster, scheduler, store, limiter, publisher, syncer, maintenance)
        settings.subscribe(cluster.on_settings_change)
        wakes: list[int] = []
        ops = Operations(
            settings,
            status,
            scheduler,
            store,
            limiter,
            cluster,
            RepositoryOps(publisher),
            ProjectOps(projects, syncer, current, limiter),
            maintenance,
            StatsOps(store, cluster, current, lambda: "# metrics\n"),
            Live(Farm(status, cluster, store).snapshot),
            lambda: wakes.append(1),
        )
        return Env(ops, settings, store, limiter, cluster, scheduler, status, config, wakes)

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def env(rclient: redis.Redis, make_env: Callable[..., Env]) -> Env:
    e = make_env(rclient)
    e.limiter.declare_no_survivors()  # a fresh namespace: no holder can be missing
    return e


def srpm_fd(tmp_path: Path, name: str = "x.src.rpm", data: bytes = b"an srpm") -> int:
    path = tmp_path / name
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


def submit(env: Env, tmp_path: Path, peer: Peer = USER) -> int:
    fd = srpm_fd(tmp_path)
    try:
        reply = env.call("submit", peer, [fd], files=[{"name": "x.src.rpm", "role": "srpm"}])
    finally:
        os.close(fd)
    return int(reply["id"])


# -- the table and roles -------------------------------------------------------------


def test_the_admin_operations_are_the_expected_ones(env: Env) -> None:
    assert {name for name, op in env.ops.ops.items() if op.admin} == ADMIN_OPS


def test_every_admin_operation_refuses_a_user_and_changes_nothing(
    env: Env, rclient: redis.Redis
) -> None:
    slot = env.limiter.try_acquire("held")
    assert slot is not None
    # a restart of Redis, as the scripts see one: a new run_id starts a grace period
    rclient.hdel(keys.slot_keys("ops").meta, "run_id")
    assert env.limiter.in_restart_grace() > 0
    text_before = env.config.read_text()
    valid_args: dict[str, dict[str, Any]] = {
        "settings.set": {"changes": {"max_concurrent_builds": 7}},
        "settings.file": {},
        "settings.replace": {"text": "max_concurrent_builds: 9\n"},
        "slots.release": {"names": ["held"]},
        "slots.clear": {"yes": True},
        "slots.end_grace": {"yes": True},
        "repos.sync": {"wait": False},
        "projects.add": {"name": "p", "url": "file:///nonexistent"},
        "projects.edit": {"name": "p", "priority": 1},
        "projects.remove": {"name": "p"},
        "cleanup.run": {},
    }
    admin_ops = [name for name, op in env.ops.ops.items() if op.admin]
    assert set(admin_ops) == set(valid_args)
    for name in admin_ops:
        with pytest.raises(PermissionDenied) as info:
            env.call(name, USER, **valid_args[name])
        message = str(info.value)
        assert name in message
        assert "admin role" in message
        assert "reqpm-admin" in message
        assert USER.user in message
    assert env.config.read_text() == text_before
    assert env.settings.current().max_concurrent_builds == 2
    assert env.store.settings_history() == []
    assert env.limiter.get_active_builds() == ["held"]
    assert env.limiter.in_restart_grace() > 0
    assert env.wakes == []
    assert env.status.status()["publish"]["failing_repos"] == {}


def test_unknown_operation_is_a_bad_request_listing_the_known_ones(env: Env) -> None:
    with pytest.raises(BadRequest) as info:
        env.call("frobnicate", ADMIN)
    message = str(info.value)
    assert "'frobnicate'" in message
    for name in env.ops.ops:
        assert name in message


def test_ping_names_the_role(env: Env) -> None:
    assert env.call("ping", USER)["role"] == "user"
    assert env.call("ping", ADMIN)["role"] == "admin"


# -- settings -------------------------------------------------------------------------


def test_settings_set_by_an_admin_writes_applies_and_audits(env: Env) -> None:
    reply = env.call("settings.set", ADMIN, changes={"max_concurrent_builds": 5})
    assert reply["changed"] == {"max_concurrent_builds": ["2", "5"]}
    assert reply["restart_required"] == []
    text = env.config.read_text()
    assert "# a test config; this comment must survive settings.set" in text
    assert load(env.config, environ={}).max_concurrent_builds == 5
    assert env.settings.current().max_concurrent_builds == 5
    # the cluster subscriber published it at once
    assert env.limiter.get_cluster_limit() == 5
    history = env.store.settings_history()
    assert len(history) == 1
    entry = history[0]
    assert re.fullmatch(r".+ \(uid 0\)", entry["user"])
    assert entry["user"] == ADMIN.who
    assert (entry["uid"], entry["key"], entry["old"], entry["new"]) == (
        0,
        "max_concurrent_builds",
        "2",
        "5",
    )
    assert env.call("settings.history", USER) == history


def test_settings_set_out_of_range_names_key_value_range_and_changes_nothing(
    env: Env,
) -> None:
    text_before = env.config.read_text()
    with pytest.raises(InvalidArgument) as info:
        env.call("settings.set", ADMIN, changes={"max_concurrent_builds": 99})
    message = str(info.value)
    assert "max_concurrent_builds" in message
    assert "99" in message
    assert "1 to 20" in message
    assert env.config.read_text() == text_before
    assert env.settings.current().max_concurrent_builds == 2
    assert env.store.settings_history() == []


def test_settings_set_is_all_or_nothing(env: Env) -> None:
    text_before = env.config.read_text()
    with pytest.raises(InvalidArgument):
        env.call(
            "settings.set",
            ADMIN,
            changes={"host_max_builds": 3, "max_concurrent_builds": 0},
        )
    assert env.config.read_text() == text_before
    assert env.settings.current().host_max_builds == 0


def test_settings_set_without_changes_is_a_bad_request(env: Env) -> None:
    bad: list[dict[str, Any]] = [{}, {"changes": {}}, {"changes": ["max_concurrent_builds", 3]}]
    for args in bad:
        with pytest.raises(BadRequest):
            env.call("settings.set", ADMIN, **args)


def test_settings_get(env: Env) -> None:
    assert env.call("settings.get", USER, key="max_concurrent_builds") == 2
    with pytest.raises(NotFound) as info:
        env.call("settings.get", USER, key="max_concurent_builds")
    assert "max_concurent_builds" in str(info.value)
    assert "max_concurrent_builds" in str(info.value)  # the guess
    with pytest.raises(NotFound):
        env.call("settings.get", USER)


def test_settings_file_shows_the_file_to_an_admin(env: Env) -> None:
    reply = env.call("settings.file", ADMIN)
    assert reply == {"path": str(env.config), "text": CONFIG}


def test_settings_set_of_a_restart_only_key_is_written_but_waits(env: Env) -> None:
    before = env.settings.current().namespace
    reply = env.call("settings.set", ADMIN, changes={"namespace": "elsewhere"})
    assert reply["changed"] == {"namespace": [before, "elsewhere"]}
    assert reply["restart_required"] == ["namespace"]
    assert load(env.config, environ={}).namespace == "elsewhere"
    assert env.settings.current().namespace == before  # until the next start


def test_settings_replace_by_an_admin(env: Env) -> None:
    text_before = env.config.read_text()
    with pytest.raises(InvalidArgument) as info:
        env.call("settings.replace", ADMIN, text="max_concurrent_builds: 0\n")
    assert "max_concurrent_builds" in str(info.value)
    assert env.config.read_text() == text_before
    with pytest.raises(BadRequest):
        env.call("settings.replace", ADMIN)
    new_text = CONFIG.replace("max_concurrent_builds: 2", "max_concurrent_builds: 4")
    reply = env.call("settings.replace", ADMIN, text=new_text)
    assert reply["changed"] == {"max_concurrent_builds": ["2", "4"]}
    assert env.config.read_text() == new_text
    assert env.settings.current().max_concurrent_builds == 4
    assert env.store.settings_history()[0]["user"] == ADMIN.who


# -- builds -----------------------------------------------------------------------------


def test_submit_queues_the_build_for_its_submitter(env: Env, tmp_path: Path) -> None:
    build_id = submit(env, tmp_path)
    build = env.store.get(build_id)
    assert build.state == State.QUEUED
    assert build.submitted_by == USER.uid
    assert build.submitted_name == USER.user
    assert (build.kind, build.source) == ("srpm", "x.src.rpm")
    assert build.chroot == "fedora-40-x86_64"  # the default_chroot
    assert (env.store.files(build_id).input / "x.src.rpm").read_bytes() == b"an srpm"
    assert env.wakes == [1]
    shown = env.call("build.show", USER, id=build_id)
    assert shown["id"] == build_id
    assert shown["state"] == "queued"
    assert [b["id"] for b in env.call("build.list", USER, state="queued")] == [build_id]


def test_submit_with_a_bad_chroot_names_it_and_the_rule(env: Env, tmp_path: Path) -> None:
    fd = srpm_fd(tmp_path)
    try:
        with pytest.raises(InvalidArgument) as info:
            env.call(
                "submit",
                USER,
                [fd],
                chroot="bad name!",
                files=[{"name": "x.src.rpm", "role": "srpm"}],
            )
    finally:
        os.close(fd)
    message = str(info.value)
    assert "'bad name!'" in message
    assert "A-Z a-z 0-9 _ . + -" in message
    assert env.store.recent() == []
    assert env.wakes == []


@pytest.mark.parametrize(
    "files",
    [
        ["x.src.rpm"],
        [["x.src.rpm", "srpm"]],
        [None],
        [42],
        "x.src.rpm",
        {"name": "x.src.rpm", "role": "srpm"},
        None,
    ],
)
def test_submit_with_malformed_files_is_refused_not_a_crash(
    env: Env, tmp_path: Path, files: Any
) -> None:
    fd = srpm_fd(tmp_path)
    try:
        with pytest.raises((BadRequest, InvalidArgument)):
            env.call("submit", USER, [fd], files=files)
    finally:
        os.close(fd)
    assert env.store.recent() == []


def test_submit_of_a_directory_descriptor_is_invalid(env: Env, tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        with pytest.raises(InvalidArgument) as info:
            env.call("submit", USER, [fd], files=[{"name": "x.src.rpm", "role": "srpm"}])
    finally:
        os.close(fd)
    assert "not a regular file" in str(info.value)
    assert env.store.recent() == []


def test_submit_with_files_not_matching_the_descriptors_is_a_bad_request(
    env: Env, tmp_path: Path
) -> None:
    with pytest.raises(BadRequest):
        env.call("submit", USER, [], files=[{"name": "x.src.rpm", "role": "srpm"}])


@pytest.mark.parametrize(
    ("op", "args"),
    [
        ("build.show", {"id": True}),
        ("build.show", {"id": 0}),
        ("build.show", {"id": "1"}),
        ("build.show", {}),
        ("build.list", {"limit": -1}),
        ("build.list", {"limit": True}),
        ("build.list", {"state": "nope"}),
        ("build.list", {"state": 3}),
    ],
)
def test_build_reads_refuse_bad_arguments(env: Env, op: str, args: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        env.call(op, USER, **args)


def test_build_list_unknown_state_lists_the_states(env: Env) -> None:
    with pytest.raises(InvalidArgument) as info:
        env.call("build.list", USER, state="nope")
    for state in State:
        assert state.value in str(info.value)


def test_build_show_of_a_missing_build_is_not_found(env: Env) -> None:
    with pytest.raises(NotFound):
        env.call("build.show", USER, id=12345)


def test_cancel_only_by_the_submitter_or_an_admin(env: Env, tmp_path: Path) -> None:
    first = submit(env, tmp_path)
    second = submit(env, tmp_path)
    with pytest.raises(PermissionDenied) as info:
        env.call("build.cancel", OTHER, id=first)
    assert "only the submitter or an admin" in str(info.value)
    assert env.store.get(first).state == State.QUEUED
    assert env.call("build.cancel", USER, id=first)["state"] == "cancelled"
    assert env.call("build.cancel", ADMIN, id=second)["state"] == "cancelled"
    assert env.store.get(first).state == State.CANCELLED
    assert env.store.get(second).state == State.CANCELLED


def test_retry_only_by_the_submitter_or_an_admin(env: Env, tmp_path: Path) -> None:
    build_id = submit(env, tmp_path)
    env.call("build.cancel", USER, id=build_id)
    wakes = len(env.wakes)
    with pytest.raises(PermissionDenied) as info:
        env.call("build.retry", OTHER, id=build_id)
    assert "only the submitter or an admin" in str(info.value)
    assert env.store.get(build_id).state == State.CANCELLED
    assert len(env.wakes) == wakes
    assert env.call("build.retry", USER, id=build_id)["state"] == "queued"
    env.call("build.cancel", USER, id=build_id)
    assert env.call("build.retry", ADMIN, id=build_id)["state"] == "queued"
    assert len(env.wakes) == wakes + 2


def test_cancel_of_an_ended_build_is_invalid(env: Env, tmp_path: Path) -> None:
    build_id = submit(env, tmp_path)
    env.call("build.cancel", USER, id=build_id)
    with pytest.raises(InvalidArgument):
        env.call("build.cancel", USER, id=build_id)


def test_build_log_of_a_build_without_a_log(env: Env, tmp_path: Path) -> None:
    build_id = submit(env, tmp_path)
    reply = env.call("build.log", USER, id=build_id)
    assert reply == {"data_b64": "", "offset": 0, "state": "queued", "done": False}
    with pytest.raises(InvalidArgument):
        env.call("build.log", USER, id=build_id, offset=-1)


# -- slots ------------------------------------------------------------------------------


def test_slots_release_frees_a_slot_and_an_unknown_name_is_not_found(env: Env) -> None:
    assert env.limiter.try_acquire("stuck") is not None
    with pytest.raises(NotFound) as info:
        env.call("slots.release", ADMIN, names=["no-such-slot"])
    assert "no-such-slot" in str(info.value)
    assert env.limiter.get_active_builds() == ["stuck"]
    reply = env.call("slots.release", ADMIN, names=["stuck", "no-such-slot"])
    assert reply == {"released": ["stuck"], "missing": ["no-such-slot"]}
    assert env.limiter.get_active_builds() == []


def test_slots_release_needs_a_list_of_names(env: Env) -> None:
    bad: list[dict[str, Any]] = [{}, {"names": []}, {"names": "stuck"}, {"names": [1]}]
    for args in bad:
        with pytest.raises(BadRequest):
            env.call("slots.release", ADMIN, **args)


def test_slots_clear_needs_yes(env: Env) -> None:
    assert env.limiter.try_acquire("a") is not None
    for args in ({}, {"yes": "yes"}, {"yes": 1}):
        with pytest.raises(BadRequest):
            env.call("slots.clear", ADMIN, **args)
    assert env.limiter.get_active_builds() == ["a"]
    assert env.call("slots.clear", ADMIN, yes=True) == {"cleared": 1}
    assert env.limiter.get_active_builds() == []


def test_slots_list_shows_holders(env: Env) -> None:
    assert env.limiter.try_acquire("a", labels={"build_id": 7}) is not None
    listing = env.call("slots.list", USER)
    assert [(h["name"], h["build"]) for h in listing["holders"]] == [("a", 7)]
    assert listing["max_concurrent"] == 2


@pytest.fixture
def fresh_client(short_tmp: Path) -> Iterator[redis.Redis]:
    """A client of a redis-server nobody declared free of survivors: it is in a restart
    grace until someone does."""
    server = RedisServer(short_tmp / "fresh", persist=False)
    server.start()
    client = server.client(socket_timeout=5)
    yield client
    client.close()
    server.kill()


def test_slots_end_grace_by_an_admin_ends_a_restart_grace(
    fresh_client: redis.Redis, make_env: Callable[..., Env]
) -> None:
    env = make_env(fresh_client)
    assert env.limiter.in_restart_grace() > 0
    assert env.limiter.try_acquire("a") is None  # the grace holds grants back
    with pytest.raises(BadRequest):
        env.call("slots.end_grace", ADMIN)
    assert env.limiter.in_restart_grace() > 0
    reply = env.call("slots.end_grace", ADMIN, yes=True)
    assert reply["ended"] is True
    assert reply["grace_left"] > 0
    assert env.limiter.in_restart_grace() == 0
    assert env.wakes == [1]
    assert env.limiter.try_acquire("a") is not None
    # a second call finds no grace to end
    assert env.call("slots.end_grace", ADMIN, yes=True)["ended"] is False


# -- reading the cluster ------------------------------------------------------------------


def test_status_and_hosts(env: Env) -> None:
    env.cluster.check(force=True)
    status = env.call("status", USER)
    assert status["max_concurrent"] == 2
    assert status["redis"]["ok"] is True
    assert status["queued"] == 0
    env.cluster.heartbeat(env.status.host_record)
    assert [h["host_id"] for h in env.call("hosts", USER)] == [env.settings.current().host_id]


def _submit_at(env: Env, tmp_path: Path, peer: Peer, priority: int) -> Any:
    fd = srpm_fd(tmp_path)
    try:
        return env.call(
            "submit", peer, [fd], files=[{"name": "x.src.rpm", "role": "srpm"}], priority=priority
        )
    finally:
        os.close(fd)


def test_priorities_above_max_user_priority_are_for_admins(env: Env, tmp_path: Path) -> None:
    """The queue is cluster-wide: a user at priority 1000 would jump every host's queue."""
    with pytest.raises(PermissionDenied) as err:
        _submit_at(env, tmp_path, USER, 1000)
    assert "priority 1000 is above max_user_priority=0" in str(err.value)
    assert "only admins" in str(err.value)
    assert env.store.recent() == []  # nothing queued
    assert _submit_at(env, tmp_path, USER, 0)["id"]
    assert _submit_at(env, tmp_path, USER, -5)["id"]  # lower is always fine
    assert _submit_at(env, tmp_path, ADMIN, 1000)["id"]
    env.call("settings.set", ADMIN, changes={"max_user_priority": 10})
    assert _submit_at(env, tmp_path, USER, 10)["id"]
    with pytest.raises(PermissionDenied):
        _submit_at(env, tmp_path, USER, 11)


# -- quotas and a full state_dir ---------------------------------------------------------------


def test_a_user_may_have_max_queued_per_user_unfinished_builds(env: Env, tmp_path: Path) -> None:
    env.call("settings.set", ADMIN, changes={"max_queued_per_user": 2})
    first = submit(env, tmp_path)
    submit(env, tmp_path)
    with pytest.raises(QuotaExceeded) as err:
        submit(env, tmp_path)
    assert "2 unfinished builds, the most max_queued_per_user=2 allows" in str(err.value)
    assert err.value.code == "quota"
    assert len(env.store.recent()) == 2  # nothing stored
    assert submit(env, tmp_path, ADMIN)  # admins have no quota
    env.call("build.cancel", USER, id=first)
    assert submit(env, tmp_path)  # an ended build frees its place


def test_submitted_bytes_count_whole_even_when_sparse(env: Env, tmp_path: Path) -> None:
    """A sparse file costs nothing on the client's disk but its whole size on ours."""
    env.call("settings.set", ADMIN, changes={"max_staged_mb_per_user": 1})
    sparse = tmp_path / "big.src.rpm"
    with open(sparse, "wb") as f:
        f.truncate(2 * 1000**2)
    fd = os.open(sparse, os.O_RDONLY)
    try:
        with pytest.raises(QuotaExceeded, match="over max_staged_mb_per_user=1"):
            env.call("submit", USER, [fd], files=[{"name": "big.src.rpm", "role": "srpm"}])
    finally:
        os.close(fd)
    assert env.store.recent() == []
    assert list(env.store.layout.incoming.iterdir()) == []  # nothing half-written
    build_id = submit(env, tmp_path)
    assert env.store.get(build_id).input_bytes == len(b"an srpm")


def test_an_upload_that_would_fill_state_dir_is_refused(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operations, "disk_free_bytes", lambda path: 900 * 1000**2)
    with pytest.raises(DiskFull) as err:
        submit(env, tmp_path, ADMIN)  # admins too: a full state_dir stops every build
    assert "has 900 MB free" in str(err.value) and "min_free_state_mb=1024" in str(err.value)
    assert env.store.recent() == []


def test_a_full_disk_is_a_clear_error_that_changes_nothing(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_room(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(env.store, "stage", no_room)
    with pytest.raises(DiskFull) as err:
        submit(env, tmp_path)
    assert "is full" in str(err.value) and "submit changed nothing" in str(err.value)
    assert env.store.recent() == []


def test_the_settings_history_never_shows_a_secret(env: Env) -> None:
    """Every reqpmctl user may read the history: a Redis password must not be in it, also
    in rows written before secrets were masked on the way in."""
    env.call("settings.set", ADMIN, changes={"redis_url": "redis://:hunter2@db.example:6379/0"})
    env.store.audit_setting(0, "old row", "redis_url", "embedded", "redis://:hunter3@db:1/0")
    history = env.call("settings.history", USER)
    assert "hunter2" not in str(history) and "hunter3" not in str(history)
    assert history[0]["new"] == "redis://:***@db:1/0"


def test_a_retry_counts_against_the_quota(env: Env, tmp_path: Path) -> None:
    env.call("settings.set", ADMIN, changes={"max_queued_per_user": 1})
    first = submit(env, tmp_path)
    env.call("build.cancel", USER, id=first)
    submit(env, tmp_path)
    with pytest.raises(QuotaExceeded):
        env.call("build.retry", USER, id=first)  # cancel-and-retry is no way around it
    assert env.store.get(first).state == State.CANCELLED
