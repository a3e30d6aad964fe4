"""What the control socket can be asked, who may ask it, and the answers.

Each operation names the role it needs; the check happens here, once, before the
operation runs. Arguments are validated before anything changes. Operations use the
services they name in ``__init__`` and nothing else: no daemon object.
"""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reqpmd import __version__
from reqpmd.builds import results
from reqpmd.builds.events import build_event
from reqpmd.builds.gates import MB, disk_free_bytes
from reqpmd.builds.scheduler import Scheduler
from reqpmd.builds.states import State
from reqpmd.builds.store import Build, Store
from reqpmd.checks import int_in_range
from reqpmd.cluster import Cluster
from reqpmd.config.schema import BY_NAME, shown_setting, unknown_key_error
from reqpmd.config.transaction import SettingsService
from reqpmd.control import protocol
from reqpmd.control.args import bool_arg
from reqpmd.control.projects import ProjectOps
from reqpmd.control.quota import Quota, Uploads
from reqpmd.control.repositories import RepositoryOps
from reqpmd.control.server import Request
from reqpmd.control.stats import StatsOps
from reqpmd.control.submission import MAX_FILE_BYTES, check_chroot, check_submission
from reqpmd.errors import (
    BadRequest,
    Busy,
    DiskFull,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    disk_full,
)
from reqpmd.live import Live
from reqpmd.maintenance.job import Maintenance
from reqpmd.quoting import shown
from reqpmd.slots.limiter import BuildConcurrencyLimiter
from reqpmd.slots.scripts import MAX_PRIORITY
from reqpmd.status import ROWS, Status, build_json, slot_listing

log = logging.getLogger(__name__)

MAX_ID = 2**62
# Log bytes travel base64-encoded, byte-exact: 256 KiB become 342 KiB of the reply line,
# well under protocol.MAX_LINE whatever the bytes are (JSON escapes of invalid UTF-8
# used to grow a chunk past it).
LOG_CHUNK = 256 * 1024
# Result files listed per build.results reply: each entry is a few hundred bytes at most
# (a name of 255 bytes, JSON-escaped), so a page stays well under protocol.MAX_LINE.
RESULTS_PAGE = 256
# Result files passed per build.fetch reply: half of what one frame may carry.
FETCH_PAGE = protocol.MAX_FDS // 2
# build.fetch replies holding descriptors at once, daemon-wide: every one is an open file
# of the daemon until its reply is sent, and builds need descriptors too (logs, mock).
FETCHES_AT_ONCE = 4
FETCH_WAIT = 30.0  # seconds a fetch waits for its turn before it is told to try again
MAX_CURSOR = 4096  # characters of an 'after' cursor: a file name is at most 255 bytes


@dataclass(frozen=True)
class Op:
    run: Callable[[Request], Any]
    admin: bool = False


def _int_arg(args: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    return int_in_range(key, args.get(key, default), lo, hi)


def _cursor_arg(args: dict[str, Any]) -> str | None:
    """The 'after' cursor of a paged reply: the last name of the previous page."""
    after = args.get("after")
    if after is not None and (not isinstance(after, str) or len(after) > MAX_CURSOR):
        raise InvalidArgument(
            f"after must be a file name (the 'next' of the previous reply) or null, "
            f"not {shown(after)}"
        )
    return after


class Operations:
    def __init__(
        self,
        settings: SettingsService,
        status: Status,
        scheduler: Scheduler,
        store: Store,
        limiter: BuildConcurrencyLimiter,
        cluster: Cluster,
        repos: RepositoryOps,
        projects: ProjectOps,
        maintenance: Maintenance,
        stats: StatsOps,
        live: Live,
        wake: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.status_view = status
        self.scheduler = scheduler
        self.store = store
        self.limiter = limiter
        self.cluster = cluster
        self.wake = wake
        self._uploads = Uploads()
        self._quota = Quota(store, settings.current)
        self._fetching = threading.BoundedSemaphore(FETCHES_AT_ONCE)
        self.live = live  # the daemon's main loop keeps it fresh
        self.ops: dict[str, Op] = {
            "ping": Op(self.ping),
            "status": Op(self.status),
            "submit": Op(self.submit),
            "build.show": Op(self.build_show),
            "build.list": Op(self.build_list),
            "build.cancel": Op(self.build_cancel),
            "build.retry": Op(self.build_retry),
            "build.log": Op(self.build_log),
            "build.results": Op(self.build_results),
            "build.fetch": Op(self.build_fetch),
            "settings.show": Op(self.settings_show),
            "settings.get": Op(self.settings_get),
            "settings.set": Op(self.settings_set, admin=True),
            # the file may hold a Redis password: admins only
            "settings.file": Op(self.settings_file, admin=True),
            "settings.replace": Op(self.settings_replace, admin=True),
            "settings.history": Op(self.settings_history),
            "slots.list": Op(self.slots_list),
            "slots.release": Op(self.slots_release, admin=True),
            "slots.clear": Op(self.slots_clear, admin=True),
            "slots.end_grace": Op(self.slots_end_grace, admin=True),
            "hosts": Op(self.hosts),
            # reqpmctl top's long poll: one shared snapshot, however many watch
            "top.watch": Op(lambda req: self.live.request(req.args)),
            "stats": Op(lambda req: stats.stats(req.args)),
            "metrics": Op(lambda req: stats.metrics(req.args)),
            "repos.list": Op(lambda req: repos.list(req.args)),
            "repos.show": Op(lambda req: repos.show(req.args)),
            "repos.dnf_config": Op(lambda req: repos.dnf_config(req.args)),
            # work for the host (a full metadata run may take minutes): admins
            "repos.sync": Op(lambda req: repos.sync(req.args), admin=True),
            "projects.list": Op(lambda req: projects.list(req.args)),
            "projects.show": Op(lambda req: projects.show(req.args)),
            "projects.sync": Op(lambda req: projects.sync(req.args)),
            "projects.build": Op(lambda req: projects.build(req.args, req.peer.who)),
            # each makes the daemon fetch a URL of the caller's choosing: admins
            "projects.add": Op(lambda req: projects.add(req.args, req.peer.who), admin=True),
            "projects.edit": Op(lambda req: projects.edit(req.args), admin=True),
            "projects.remove": Op(lambda req: projects.remove(req.args), admin=True),
            "cleanup.plan": Op(lambda req: maintenance.plan()),
            # deletes files (by the configured policy only): admins
            "cleanup.run": Op(lambda req: maintenance.run(f"asked by {req.peer.who}"), admin=True),
        }

    def __call__(self, req: Request) -> Any:
        op = self.ops.get(req.op)
        if op is None:
            raise BadRequest(f"unknown operation {req.op!r}; known: {', '.join(sorted(self.ops))}")
        if op.admin and not req.peer.admin:
            raise PermissionDenied(
                f"{req.op} needs the admin role (root or group "
                f"{self.settings.current().admin_group}); {req.peer.user} is a user"
            )
        try:
            return op.run(req)
        except OSError as exc:
            if not disk_full(exc):
                raise
            raise DiskFull(
                f"state_dir {self.settings.current().state_dir} is full ({exc}); {req.op} "
                "changed nothing: free space and try again"
            ) from exc

    def _json(self, build: Build) -> dict[str, Any]:
        return build_json(build, self.store)

    # -- reading ---------------------------------------------------------------------

    def ping(self, req: Request) -> dict[str, Any]:
        return {"version": __version__, "role": req.peer.role, "uid": req.peer.uid}

    def status(self, req: Request) -> dict[str, Any]:
        return self.status_view.status(None if bool_arg(req.args, "all") else ROWS)

    def build_show(self, req: Request) -> dict[str, Any]:
        return self._json(self.store.get(_int_arg(req.args, "id", 1, MAX_ID)))

    def build_list(self, req: Request) -> list[dict[str, Any]]:
        state = req.args.get("state")
        if state is not None:
            try:
                state = State(state)
            except ValueError:
                raise InvalidArgument(
                    f"state {state!r} is not one of: {', '.join(s.value for s in State)}"
                ) from None
        limit = _int_arg(req.args, "limit", 1, 10000, 50)
        return [self._json(b) for b in self.store.recent(state, limit)]

    def build_log(self, req: Request) -> dict[str, Any]:
        build = self.store.get(_int_arg(req.args, "id", 1, MAX_ID))
        offset = _int_arg(req.args, "offset", 0, MAX_ID, 0)
        data = b""
        try:
            with open(self.store.files(build.id).log, "rb") as f:
                f.seek(offset)
                data = f.read(LOG_CHUNK)
        except FileNotFoundError:
            pass
        return {
            "data_b64": base64.b64encode(data).decode("ascii"),
            "offset": offset + len(data),
            "state": str(build.state),
            "done": build.state.final and len(data) < LOG_CHUNK,
        }

    def build_results(self, req: Request) -> dict[str, Any]:
        """What a build has left in its result directory so far, a page at a time; a build
        still running lists what exists (mock's logs grow there as it builds)."""
        build_id = _int_arg(req.args, "id", 1, MAX_ID)
        after = _cursor_arg(req.args)
        build = self.store.get(build_id)
        result_dir = self.store.files(build.id).result
        page, following = results.page_after(results.list_names(result_dir), after, RESULTS_PAGE)
        self._take_fetch_turn()  # hashing reads whole files: as few at once as fetches
        try:
            files = results.list_results(result_dir, page)
        finally:
            self._fetching.release()
        return {
            "id": build.id,
            "state": str(build.state),
            "files": [f.as_dict() for f in files],
            "next": following,
        }

    def _take_fetch_turn(self) -> None:
        """One of FETCHES_AT_ONCE turns to read result files, or Busy after FETCH_WAIT;
        the caller releases it."""
        if not self._fetching.acquire(timeout=FETCH_WAIT):
            raise Busy(
                f"{FETCHES_AT_ONCE} listings and fetches are being answered and yours "
                f"waited {FETCH_WAIT:.0f}s; try again in a moment"
            )

    def build_fetch(self, req: Request) -> protocol.WithFds:
        """Descriptors of a finished build's result files, FETCH_PAGE per reply, in the
        order of the reply's ``files``. Descriptors, not paths: the client needs no
        access to state_dir, and reads exactly the file that was described."""
        build_id = _int_arg(req.args, "id", 1, MAX_ID)
        rpms_only = bool_arg(req.args, "rpms_only")
        after = _cursor_arg(req.args)
        build = self.store.get(build_id)
        if not build.state.final:
            raise InvalidArgument(
                f"build {build.id} is still building (it is {build.state}): its results "
                "can be fetched once it has ended"
            )
        result_dir = self.store.files(build.id).result
        names = [
            n
            for n in results.list_names(result_dir)
            if not rpms_only or results.kind_of(n) in results.RPM_KINDS
        ]
        page, following = results.page_after(names, after, FETCH_PAGE)
        self._take_fetch_turn()
        try:
            opened = results.open_described(result_dir, page)
        except BaseException:
            self._fetching.release()
            raise
        reply = {
            "id": build.id,
            "state": str(build.state),
            "files": [f.as_dict() for f, _ in opened],
            "next": following,
        }
        return protocol.WithFds(reply, [fd for _, fd in opened], self._fetching.release)

    def settings_show(self, req: Request) -> dict[str, Any]:
        return self.settings.current().as_dict(redact=True)

    def settings_get(self, req: Request) -> Any:
        key = req.args.get("key")
        if not isinstance(key, str) or key not in BY_NAME:
            raise NotFound(str(unknown_key_error(str(key))))
        return self.settings.current().as_dict(redact=True)[key]

    def settings_history(self, req: Request) -> list[dict[str, Any]]:
        rows = self.store.settings_history(_int_arg(req.args, "limit", 1, 10000, 100))
        for row in rows:  # rows written before secrets were masked on the way in, too
            row["old"] = shown_setting(row["key"], row["old"])
            row["new"] = shown_setting(row["key"], row["new"])
        return rows

    def slots_list(self, req: Request) -> dict[str, Any]:
        rows = None if bool_arg(req.args, "all") else ROWS
        return slot_listing(self.limiter, self.cluster.limit(), rows)

    def hosts(self, req: Request) -> list[dict[str, Any]]:
        return self.cluster.hosts()

    # -- changing ---------------------------------------------------------------------

    def submit(self, req: Request) -> dict[str, Any]:
        args = req.args
        chroot = check_chroot(args.get("chroot") or self.settings.current().default_chroot)
        priority = _int_arg(args, "priority", -MAX_PRIORITY, MAX_PRIORITY, 0)
        bound = self.settings.current().max_user_priority
        if priority > bound and not req.peer.admin:
            raise PermissionDenied(
                f"priority {priority} is above max_user_priority={bound}: only admins "
                f"(root or group {self.settings.current().admin_group}) may submit above it"
            )
        publish = bool_arg(args, "publish", default=True)
        sub = check_submission(args.get("files"), req.fds)
        self._check_room(sub.size)
        with self._uploads.storing(req.peer), self._quota.reserve(req.peer, sub.size):
            staged = self.store.stage(dict(sub.files), max_file_bytes=MAX_FILE_BYTES)
            build_id = self.store.submit(
                chroot=chroot,
                kind=sub.kind,
                source=sub.main,
                inputs=staged,
                priority=priority,
                uid=req.peer.uid,
                user=req.peer.user,
                input_bytes=sub.size,
                publish=publish,
            )
        build_event(
            build_id,
            f"submitted by {req.peer.who}: {sub.main} for {chroot}, priority {priority}"
            + ("" if publish else ", not to be published"),
        )
        self.wake()
        return {"id": build_id}

    def _check_room(self, size: int) -> None:
        """Refuse an upload that would leave state_dir with less than min_free_state_mb:
        a full state_dir stops every build of the host (their logs and the queue)."""
        s = self.settings.current()
        free = disk_free_bytes(s.state_dir)
        want = s.min_free_state_mb * MB + size
        if free < want:
            raise DiskFull(
                f"state_dir {s.state_dir} has {free // MB} MB free; this upload needs "
                f"{-(-size // MB)} MB plus min_free_state_mb={s.min_free_state_mb}: nothing "
                "was stored; try again when space is freed"
            )

    def _own_build(self, req: Request, verb: str) -> Build:
        build = self.store.get(_int_arg(req.args, "id", 1, MAX_ID))
        if build.submitted_by != req.peer.uid and not req.peer.admin:
            raise PermissionDenied(
                f"only the submitter or an admin may {verb} build "
                f"{build.id}; {req.peer.user} is neither"
            )
        return build

    def build_cancel(self, req: Request) -> dict[str, Any]:
        build = self._own_build(req, "cancel")
        build_event(build.id, f"cancel requested by {req.peer.user}")
        return self._json(self.scheduler.cancel(build.id, f"cancelled by {req.peer.user}"))

    def build_retry(self, req: Request) -> dict[str, Any]:
        build = self._own_build(req, "retry")
        with self._quota.reserve(req.peer, build.input_bytes):  # a retry queues it again
            result = self._json(self.scheduler.retry(build.id))
        build_event(build.id, f"retry requested by {req.peer.user}")
        self.wake()
        return result

    def settings_set(self, req: Request) -> dict[str, Any]:
        changes = req.args.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise BadRequest("settings.set needs 'changes': {key: value, ...}")
        return self.settings.set(changes, req.peer.who, req.peer.uid).reply()

    def settings_file(self, req: Request) -> dict[str, Any]:
        return {"path": str(self.settings.path), "text": self.settings.file_text()}

    def settings_replace(self, req: Request) -> dict[str, Any]:
        text = req.args.get("text")
        if not isinstance(text, str):
            raise BadRequest("settings.replace needs 'text': the whole config file")
        return self.settings.replace_text(text, req.peer.who, req.peer.uid).reply()

    def slots_release(self, req: Request) -> dict[str, Any]:
        names = req.args.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BadRequest("slots.release needs 'names': [slot name, ...]")
        released = {}
        for name in names:
            released[name] = self.limiter.force_release(name)
            if released[name]:
                log.warning("slot %s force-released by %s", name, req.peer.who)
        missing = [n for n, ok in released.items() if not ok]
        if missing and len(missing) == len(names):
            raise NotFound(f"no slot named {', '.join(missing)}")
        return {"released": [n for n, ok in released.items() if ok], "missing": missing}

    def slots_clear(self, req: Request) -> dict[str, Any]:
        if req.args.get("yes") is not True:
            raise BadRequest("slots.clear frees every slot; it needs 'yes': true")
        count = self.limiter.clear_all()
        log.warning("all %d slots cleared by %s", count, req.peer.who)
        return {"cleared": count}

    def slots_end_grace(self, req: Request) -> dict[str, Any]:
        """End a Redis restart grace: the admin vouches that no holder survives unseen."""
        if req.args.get("yes") is not True:
            raise BadRequest(
                "slots.end_grace grants slots at once even if a holder from before the "
                "Redis restart is still running; it needs 'yes': true"
            )
        left = self.limiter.in_restart_grace()
        self.limiter.declare_no_survivors()
        log.warning("restart grace (%.0fs left) ended by %s", left, req.peer.who)
        self.wake()
        return {"ended": left > 0, "grace_left": left}
