"""What the control socket can be asked, who may ask it, and the answers.

Each operation names the role it needs; the check happens here, once, before the
operation runs. Arguments are validated before anything changes.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reqpmd import __version__, settings
from reqpmd.concurrency import BuildConcurrencyLimiter
from reqpmd.control import Request
from reqpmd.errors import (
    BadRequest,
    Busy,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RedisUnavailable,
)
from reqpmd.slot_scripts import MAX_PRIORITY
from reqpmd.states import State
from reqpmd.store import Build

if TYPE_CHECKING:
    from reqpmd.daemon import Daemon

MAX_FILE_BYTES = 2 * 1024**3
MAX_UPLOADS = 4  # submissions copied to disk at once
MAX_TOTAL_BYTES = 4 * 1024**3
_FILE_NAME = re.compile(r"^[A-Za-z0-9_+~@=,-][A-Za-z0-9._+~@=,-]{0,254}$")
_LOG_CHUNK = 256 * 1024


@dataclass(frozen=True)
class Op:
    run: Callable[[Request], Any]
    admin: bool = False


def _int_arg(args: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    value = args.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{key} {value!r} is out of range: an integer from {lo} to {hi}")
    return value


def _build_json(b: Build) -> dict[str, Any]:
    return {
        "id": b.id,
        "state": str(b.state),
        "chroot": b.chroot,
        "kind": b.kind,
        "source": b.source,
        "priority": b.priority,
        "submitted_by": b.submitted_by,
        "submitted_name": b.submitted_name,
        "submitted_at": b.submitted_at,
        "waiting_at": b.waiting_at,
        "started_at": b.started_at,
        "finished_at": b.finished_at,
        "exit_code": b.exit_code,
        "error": b.error,
        "result_dir": b.result_dir,
        "log_path": b.log_path,
        "runs": b.runs,
        "retries": b.retries,
        "slot_token": b.slot_token,
    }


def check_file_name(name: Any) -> str:
    if not isinstance(name, str) or name in (".", "..") or not _FILE_NAME.match(name):
        raise InvalidArgument(
            f"file name {name!r} is not allowed: 1-255 characters from "
            "A-Z a-z 0-9 . _ + ~ @ = , - with no '/' and not '.' or '..'"
        )
    return name


def check_fd(fd: int, name: str, budget: list[int]) -> None:
    """A descriptor the client opened for us must be a regular file within the caps."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{name}: not a regular file")
    if st.st_size > MAX_FILE_BYTES:
        raise InvalidArgument(
            f"{name}: {st.st_size} bytes is over the cap of {MAX_FILE_BYTES} bytes"
        )
    budget[0] -= st.st_size
    if budget[0] < 0:
        raise InvalidArgument(f"the files of one submission are capped at {MAX_TOTAL_BYTES} bytes")


def slot_listing(lim: BuildConcurrencyLimiter, max_concurrent: int) -> dict[str, Any]:
    """Holders and waiters as the control socket shows them (ages in seconds)."""
    holders, waiters = lim.snapshot()
    now = time.time()
    return {
        "max_concurrent": max_concurrent,
        "holders": [
            {
                "name": s.name,
                "host": s.host,
                "pid": s.pid,
                "token": s.token,
                "build": s.labels.get("build_id"),
                "acquired_at": s.acquired_at,
                "age": max(0.0, now - s.acquired_at),
                "lease_expires_at": s.lease_expires_at,
                "lease_left": max(0.0, s.lease_expires_at - now),
            }
            for s in holders
        ],
        "waiting": [
            {
                "name": w.name,
                "host": w.host,
                "priority": w.priority,
                "position": w.position,
                "enqueued_at": w.enqueued_at,
                "build": w.labels.get("build_id"),
            }
            for w in waiters
        ],
    }


class Api:
    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon
        self._uploads = threading.BoundedSemaphore(MAX_UPLOADS)
        self.ops: dict[str, Op] = {
            "ping": Op(self.ping),
            "status": Op(self.status),
            "submit": Op(self.submit),
            "build.show": Op(self.build_show),
            "build.list": Op(self.build_list),
            "build.cancel": Op(self.build_cancel),
            "build.retry": Op(self.build_retry),
            "build.log": Op(self.build_log),
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
            "hosts": Op(self.hosts),
        }

    def __call__(self, req: Request) -> Any:
        op = self.ops.get(req.op)
        if op is None:
            raise BadRequest(f"unknown operation {req.op!r}; known: {', '.join(sorted(self.ops))}")
        if op.admin and not req.peer.admin:
            raise PermissionDenied(
                f"{req.op} needs the admin role (root or group "
                f"{self.d.settings.admin_group}); {req.peer.user} is a user"
            )
        return op.run(req)

    # -- reading ---------------------------------------------------------------------

    def ping(self, req: Request) -> dict[str, Any]:
        return {"version": __version__, "role": req.peer.role, "uid": req.peer.uid}

    def status(self, req: Request) -> dict[str, Any]:
        return self.d.status()

    def build_show(self, req: Request) -> dict[str, Any]:
        return _build_json(self.d.store.get(_int_arg(req.args, "id", 1, 2**62)))

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
        return [_build_json(b) for b in self.d.store.recent(state, limit)]

    def build_log(self, req: Request) -> dict[str, Any]:
        build = self.d.store.get(_int_arg(req.args, "id", 1, 2**62))
        offset = _int_arg(req.args, "offset", 0, 2**62, 0)
        path = self.d.store.build_dir(build.id) / "build.log"
        data = b""
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(_LOG_CHUNK)
        except FileNotFoundError:
            pass
        return {
            "data": data.decode(errors="replace"),
            "offset": offset + len(data),
            "state": str(build.state),
            "done": build.state.final and len(data) < _LOG_CHUNK,
        }

    def settings_show(self, req: Request) -> dict[str, Any]:
        return self.d.settings.as_dict(redact=True)

    def settings_get(self, req: Request) -> Any:
        key = req.args.get("key")
        if not isinstance(key, str) or key not in settings.BY_NAME:
            raise NotFound(str(settings.unknown_key_error(str(key))))
        return self.d.settings.as_dict(redact=True)[key]

    def settings_history(self, req: Request) -> list[dict[str, Any]]:
        return self.d.store.settings_history(_int_arg(req.args, "limit", 1, 10000, 100))

    def slots_list(self, req: Request) -> dict[str, Any]:
        return slot_listing(self.d.limiter, self.d.limit())

    def hosts(self, req: Request) -> list[dict[str, Any]]:
        return self.d.hosts()

    # -- changing ---------------------------------------------------------------------

    def submit(self, req: Request) -> dict[str, Any]:
        args, s = req.args, self.d.settings
        chroot = args.get("chroot") or s.default_chroot
        settings.BY_NAME["default_chroot"].convert(chroot)  # same rule for any chroot name
        priority = _int_arg(args, "priority", -MAX_PRIORITY, MAX_PRIORITY, 0)
        files = args.get("files")
        if not isinstance(files, list) or len(files) != len(req.fds) or not files:
            raise BadRequest(
                "submit needs 'files' [{name, role}] matching the descriptors "
                f"sent ({len(req.fds)} received)"
            )
        roles = [f.get("role") if isinstance(f, dict) else None for f in files]
        names = [check_file_name(f.get("name")) for f in files]
        if roles.count("srpm") == 1 and len(roles) == 1:
            kind, main = "srpm", names[0]
            if not main.endswith(".src.rpm"):
                raise InvalidArgument(f"{main}: an SRPM's name ends in .src.rpm")
        elif roles.count("spec") == 1 and set(roles) <= {"spec", "source"}:
            kind, main = "spec", names[roles.index("spec")]
            if not main.endswith(".spec"):
                raise InvalidArgument(f"{main}: a spec file's name ends in .spec")
        else:
            raise InvalidArgument("submit either one SRPM, or one spec file plus its sources")
        if len(set(names)) != len(names):
            raise InvalidArgument("file names must be unique")
        budget = [MAX_TOTAL_BYTES]
        sources: dict[str, bytes | int] = {}
        for name, role, fd in zip(names, roles, req.fds, strict=True):
            check_fd(fd, name, budget)
            sources[f"sources/{name}" if role == "source" else name] = fd
        if not self._uploads.acquire(blocking=False):
            raise Busy(f"{MAX_UPLOADS} submissions are being stored already; try again")
        try:
            staged = self.d.store.stage(sources, max_file_bytes=MAX_FILE_BYTES)
        finally:
            self._uploads.release()
        build_id = self.d.store.submit(
            chroot=chroot,
            kind=kind,
            source=main,
            inputs=staged,
            priority=priority,
            uid=req.peer.uid,
            user=req.peer.user,
        )
        self.d.log_event(
            build_id,
            f"submitted by {req.peer.user} (uid {req.peer.uid}): "
            f"{main} for {chroot}, priority {priority}",
        )
        self.d.wake()
        return {"id": build_id}

    def _own_build(self, req: Request, verb: str) -> Build:
        build = self.d.store.get(_int_arg(req.args, "id", 1, 2**62))
        if build.submitted_by != req.peer.uid and not req.peer.admin:
            raise PermissionDenied(
                f"only the submitter or an admin may {verb} build "
                f"{build.id}; {req.peer.user} is neither"
            )
        return build

    def build_cancel(self, req: Request) -> dict[str, Any]:
        build = self._own_build(req, "cancel")
        self.d.log_event(build.id, f"cancel requested by {req.peer.user}")
        return _build_json(self.d.scheduler.cancel(build.id, f"cancelled by {req.peer.user}"))

    def build_retry(self, req: Request) -> dict[str, Any]:
        build = self._own_build(req, "retry")
        result = _build_json(self.d.scheduler.retry(build.id))
        self.d.log_event(build.id, f"retry requested by {req.peer.user}")
        self.d.wake()
        return result

    def settings_set(self, req: Request) -> dict[str, Any]:
        changes = req.args.get("changes")
        if not isinstance(changes, dict) or not changes:
            raise BadRequest("settings.set needs 'changes': {key: value, ...}")
        return self.d.change_settings(changes, req.peer)

    def settings_file(self, req: Request) -> dict[str, Any]:
        path = self.d.config_path
        return {"path": str(path), "text": path.read_text() if path.exists() else ""}

    def settings_replace(self, req: Request) -> dict[str, Any]:
        text = req.args.get("text")
        if not isinstance(text, str):
            raise BadRequest("settings.replace needs 'text': the whole config file")
        return self.d.replace_settings_text(text, req.peer)

    def slots_release(self, req: Request) -> dict[str, Any]:
        names = req.args.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise BadRequest("slots.release needs 'names': [slot name, ...]")
        released = {}
        for name in names:
            try:
                released[name] = self.d.limiter.force_release(name)
            except RedisUnavailable:
                raise
            if released[name]:
                self.d.log.warning(
                    "slot %s force-released by %s (uid %d)", name, req.peer.user, req.peer.uid
                )
        missing = [n for n, ok in released.items() if not ok]
        if missing and len(missing) == len(names):
            raise NotFound(f"no slot named {', '.join(missing)}")
        return {"released": [n for n, ok in released.items() if ok], "missing": missing}

    def slots_clear(self, req: Request) -> dict[str, Any]:
        if req.args.get("yes") is not True:
            raise BadRequest("slots.clear frees every slot; it needs 'yes': true")
        count = self.d.limiter.clear_all()
        self.d.log.warning(
            "all %d slots cleared by %s (uid %d)", count, req.peer.user, req.peer.uid
        )
        return {"cleared": count}
