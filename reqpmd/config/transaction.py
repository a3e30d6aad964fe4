"""The settings transaction: the one way settings change while the daemon runs.

Whatever the source (``reqpmctl settings set``, ``settings edit``, a SIGHUP reload), a
change goes the same way, under one lock: validate everything, write the file
atomically (for a client's change), swap in the new Settings whole, audit each key, then
tell every subscriber (the cluster publishes a new limit, the daemon wakes its loop).
Nothing is applied unless all of it is valid. Restart-only keys are written and audited
but keep their running value until the next start.
"""

from __future__ import annotations

import logging
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reqpmd.config import file as config_file
from reqpmd.config.parse import load, parse_text, validate
from reqpmd.config.schema import (
    BY_NAME,
    Settings,
    SettingsInvalid,
    shown_setting,
    unknown_key_error,
)
from reqpmd.errors import InvalidArgument, ReqpmError, disk_full
from reqpmd.fsutil import atomic_write

log = logging.getLogger(__name__)

RELOAD_UID = -1  # the audit trail's uid for a change that came from a SIGHUP reload


class AuditLog(Protocol):
    def audit_setting(self, uid: int, user: str, key: str, old: Any, new: Any) -> None: ...


@dataclass(frozen=True)
class Change:
    """What one transaction changed: {key: (old, new)}, and which keys wait for a restart."""

    diff: dict[str, tuple[Any, Any]]
    restart_required: tuple[str, ...]

    def reply(self) -> dict[str, Any]:
        return {
            "changed": {
                k: [shown_setting(k, a), shown_setting(k, b)] for k, (a, b) in self.diff.items()
            },
            "restart_required": sorted(self.restart_required),
        }


OnChange = Callable[[Settings, Change], None]


class SettingsService:
    def __init__(self, path: Path, initial: Settings, audit: AuditLog) -> None:
        self.path = path
        self._current = initial
        self._audit = audit
        self._lock = threading.Lock()
        self._subscribers: list[OnChange] = []

    def current(self) -> Settings:
        """The settings in force (a frozen object: read it once per decision)."""
        return self._current

    def subscribe(self, hook: OnChange) -> None:
        """``hook(new_settings, change)`` after every applied change, under the lock, so
        hooks see changes in the order they were made."""
        self._subscribers.append(hook)

    # -- the three sources of a change ------------------------------------------------

    def set(self, changes: dict[str, Any], who: str, uid: int) -> Change:
        """Change some keys: validate all against the file, write, apply, audit."""
        with self._lock:
            try:
                raw, _ = parse_text(self._read(), str(self.path))
            except SettingsInvalid as exc:
                raise InvalidArgument(f"the config file is broken, fix it first: {exc}") from exc
            errors = [unknown_key_error(k) for k in changes if k not in BY_NAME]
            if errors:
                raise InvalidArgument("; ".join(str(e) for e in errors))
            try:
                new = validate({**raw, **changes}, base_dir=self._base_dir())
            except SettingsInvalid as exc:
                bad = [e for e in exc.errors if e.key in changes] or exc.errors
                raise InvalidArgument("; ".join(str(e) for e in bad)) from exc
            self._write(lambda: config_file.write_changes(self.path, changes))
            return self._apply(new, who, uid)

    def replace_text(self, text: str, who: str, uid: int) -> Change:
        """A whole new config (``reqpmctl settings edit``): valid, or nothing changes."""
        with self._lock:
            try:
                raw, lines = parse_text(text, str(self.path))
                new = validate(raw, lines, base_dir=self._base_dir())
            except SettingsInvalid as exc:
                raise InvalidArgument("; ".join(str(e) for e in exc.errors)) from exc
            self._write(lambda: atomic_write(self.path, text.encode(), private=True))
            return self._apply(new, who, uid)

    def reload(self) -> Change:
        """Re-read the file (SIGHUP). SettingsInvalid keeps the running settings.

        The read is under the lock too: a file read before a concurrent ``set`` wrote it
        and applied after would revert the admin's change in memory (and publish the old
        limit to the cluster) while the file says otherwise."""
        with self._lock:
            return self._apply(load(self.path), "SIGHUP reload", RELOAD_UID)

    def file_text(self) -> str:
        return self._read()

    def exposure(self) -> str | None:
        """Why the file is readable by more than its owner, if it is: it may hold a Redis
        password, which would let any reader bypass the admin role on every host."""
        try:
            mode = self.path.stat().st_mode
        except OSError:
            return None
        if not mode & 0o077:
            return None
        return (
            f"{self.path} is readable by others than its owner (mode "
            f"{stat.S_IMODE(mode):04o}); it may hold a Redis password: chmod 600 {self.path} "
            "(reqpmd drops those bits itself at its next rewrite of the file)"
        )

    # -- the steps ------------------------------------------------------------------------

    def _read(self) -> str:
        return self.path.read_text() if self.path.exists() else ""

    def _base_dir(self) -> Path:
        return self.path.parent.resolve()

    def _write(self, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as exc:
            raise ReqpmError(
                f"cannot write {self.path}: {exc.strerror or exc}; reqpmd's user needs "
                f"write access to {self.path.parent} (nothing was changed)"
            ) from exc

    def _apply(self, new: Settings, who: str, uid: int) -> Change:
        old = self._current
        diff = old.changed(new)
        pending = tuple(k for k in diff if BY_NAME[k].restart)
        self._current = new.replace(**{k: diff[k][0] for k in pending})
        change = Change(diff, pending)
        for key, (before, after) in diff.items():
            note = " (takes effect at the next restart)" if key in pending else ""
            shown_old, shown_new = shown_setting(key, before), shown_setting(key, after)
            log.warning("setting %s: %s -> %s by %s%s", key, shown_old, shown_new, who, note)
            try:  # the trail is readable by every reqpmctl user: secrets stay masked in it
                self._audit.audit_setting(uid, who, key, shown_old, shown_new)
            except OSError as exc:
                if not disk_full(exc):
                    raise
                # the file is written and the change applied: the trail misses one line
                log.error("setting %s: the audit trail could not record it: %s", key, exc)
        for hook in self._subscribers:
            try:
                hook(self._current, change)
            except Exception:  # the change is made; one subscriber must not undo it
                log.exception("a subscriber of settings changes failed")
        return change
