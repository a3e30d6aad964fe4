"""The settings schema: every key, its type, default, bounds and doc, in one place.

``Settings`` is a frozen dataclass whose fields *are* the schema: each field carries its
rule (bounds, pattern, restart-only) as metadata, and ``FIELDS`` is derived from it, so
a new setting is one line here and is typed at every call site (no casts). A reload
builds a new object and swaps it in whole, so a half-applied change cannot exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reqpmd.checks import is_int
from reqpmd.config import redis_url
from reqpmd.quoting import shown

DEFAULT_CONFIG = "/etc/reqpm/reqpmd.yaml"
# Every pattern is used with fullmatch(): "$" also matches before a trailing newline.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# not starting with "-" (a chroot name goes into mock's argv) nor "." (it names a
# directory under repo_dir: ".", ".." and ".reqpm" must never be one)
CHROOT_RE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127}")
CHROOT_DOC = (
    "a mock config name: 1-128 characters from A-Z a-z 0-9 _ . + -, not starting with - or ."
)
_NAME_DOC = "1-64 characters from A-Z a-z 0-9 _ . -"
# host:port (port 1-65535), or "off"; the host may be an IPv6 address in brackets
LISTEN_RE = re.compile(
    r"off|(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9.-]*):"
    r"(?P<port>[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)


@dataclass(frozen=True)
class Field:
    name: str
    kind: type  # int, float, bool, str, Path
    default: Any
    doc: str
    lo: float | None = None
    hi: float | None = None
    pattern: re.Pattern[str] | None = None
    pattern_doc: str = ""
    restart: bool = False  # a change only takes effect at the next start
    secret: bool = False  # may hold a credential: shown only through shown_setting()
    # a further check of a value the pattern accepts: raises ValueError saying why not
    check: Callable[[str], object] | None = None

    def allowed(self) -> str:
        if self.kind is bool:
            return "true or false"
        if self.lo is not None and self.hi is not None:
            what = "an integer" if self.kind is int else "a number"
            return f"{what} from {self.lo:g} to {self.hi:g}"
        if self.pattern_doc:
            return self.pattern_doc
        if self.kind is Path:
            return "an absolute path, or one relative to the config file"
        return "a string"

    def convert(self, value: Any) -> Any:
        """The value as this field's type, or raise ValueError saying what is allowed."""
        # a secret's value is not repeated: the error goes to logs and to whoever tried,
        # and a value too broken to parse cannot be masked reliably
        said = "the value given" if self.secret else shown(value, 60)
        bad = ValueError(f"{said} is not allowed (allowed: {self.allowed()})")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise bad
        if self.kind in (int, float):
            if not (is_int(value) or isinstance(value, float)):
                raise bad
            # .nan compares false with everything, so it would pass the range check
            if isinstance(value, float) and not math.isfinite(value):
                raise bad
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise bad
            # compare before converting: float() of a huge int raises OverflowError
            if (self.lo is not None and value < self.lo) or (
                self.hi is not None and value > self.hi
            ):
                raise ValueError(f"{shown(value, 60)} is out of range (allowed: {self.allowed()})")
            return self.kind(value)
        if not isinstance(value, str) or not value.strip():
            raise bad
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise bad
        if self.check is not None:
            try:
                self.check(value)
            except ValueError as exc:
                raise ValueError(f"{said} is not allowed: {exc}") from exc
        return Path(value) if self.kind is Path else value


def _setting(
    default: Any,
    doc: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    pattern: re.Pattern[str] | None = None,
    pattern_doc: str = "",
    restart: bool = False,
    secret: bool = False,
    check: Callable[[str], object] | None = None,
) -> Any:
    rule = {
        "doc": doc,
        "lo": lo,
        "hi": hi,
        "pattern": pattern,
        "pattern_doc": pattern_doc,
        "restart": restart,
        "secret": secret,
        "check": check,
    }
    return dataclasses.field(default=default, metadata=rule)


@dataclass(frozen=True)
class Settings:
    """Validated, immutable settings (build them with ``config.parse.validate``)."""

    # The seed's settings: names, bounds and defaults are a contract.
    max_concurrent_builds: int = _setting(
        4, "builds running at once across every host sharing the Redis namespace", 1, 20
    )
    cleanup_builds_after_days: int = _setting(30, "days a finished build's files are kept", 1, 365)
    cleanup_repos_after_days: int = _setting(7, "days unused repository clones are kept", 1, 90)
    auto_sync_projects: bool = _setting(True, "sync projects from git periodically")
    sync_interval_hours: int = _setting(6, "hours between project syncs", 1, 24)
    repository_sync_interval_minutes: int = _setting(
        30,
        "minutes between syncs of every repository (picks up RPMs added or removed by "
        "hand, checks and repairs repodata, retries failed publishes)",
        5,
        1440,
    )
    # The daemon's own settings.
    redis_url: str = _setting(
        "embedded",
        "'embedded' (a private redis-server in state_dir), or the Redis shared by all hosts: "
        "one server, the master a set of Sentinels names, or a Redis Cluster",
        pattern=redis_url.URL_RE,
        pattern_doc=redis_url.URL_DOC,
        check=redis_url.parse,
        restart=True,
        secret=True,
    )
    redis_password_file: Path = _setting(
        Path(""),
        "file holding the password of redis_url's user (ACL user, or the default one), so "
        "no secret sits in this file; readable by reqpmd's user only",
        restart=True,
    )
    redis_sentinel_password_file: Path = _setting(
        Path(""),
        "file holding the Sentinels' own password, when they require one (redis+sentinel)",
        restart=True,
    )
    redis_tls_ca_file: Path = _setting(
        Path(""),
        "CA certificates that verify the Redis servers (rediss URLs; default: the system's)",
        restart=True,
    )
    redis_tls_cert_file: Path = _setting(
        Path(""), "client certificate for servers that ask for one (rediss URLs)", restart=True
    )
    redis_tls_key_file: Path = _setting(
        Path(""),
        "the client certificate's private key; readable by reqpmd's user only",
        restart=True,
    )
    namespace: str = _setting(
        "reqpm",
        "Redis namespace; hosts sharing slots use the same one",
        pattern=NAME_RE,
        pattern_doc=_NAME_DOC,
        restart=True,
    )
    host_id: str = _setting(
        "",
        "this daemon's name among the hosts (default: the hostname)",
        pattern=NAME_RE,
        pattern_doc=_NAME_DOC,
        restart=True,
    )
    socket_path: Path = _setting(Path("/run/reqpm/reqpmd.sock"), "control socket", restart=True)
    socket_group: str = _setting(
        "reqpm",
        "group owning the control socket (mode 0660)",
        pattern=NAME_RE,
        pattern_doc="a group name",
        restart=True,
    )
    admin_group: str = _setting(
        "reqpm-admin",
        "members may change settings and free slots",
        pattern=NAME_RE,
        pattern_doc="a group name",
    )
    state_dir: Path = _setting(
        Path("/var/lib/reqpm"), "queue database, build logs, results", restart=True
    )
    repo_dir: Path = _setting(
        Path(""),
        "dnf repositories of succeeded builds, one per chroot (default: <state_dir>/repos)",
        restart=True,
    )
    publish: bool = _setting(
        True, "publish each succeeded build into <repo_dir>/<chroot> (submit --no-publish opts out)"
    )
    mock_command: Path = _setting(
        Path("/usr/bin/mock"),
        "the mock executable; owned by root and writable only by root, or builds fail",
        restart=True,
    )
    mock_root_dir: Path = _setting(
        Path("/var/lib/mock"), "mock's basedir (checked by the disk gate)"
    )
    default_chroot: str = _setting(
        "fedora-rawhide-x86_64",
        "mock config used when a submission names none",
        pattern=CHROOT_RE,
        pattern_doc=CHROOT_DOC,
    )
    slot_wait_timeout: int = _setting(
        300, "seconds a build may wait for a slot (0 = forever)", 0, 604800
    )
    slot_lease_seconds: int = _setting(
        60,
        "lease of a held slot; a dead holder's slot returns after this; the same on every host",
        5,
        3600,
        restart=True,
    )
    host_max_builds: int = _setting(
        0, "builds at once on this host (0 = only the cluster limit)", 0, 20
    )
    min_free_disk_gb: float = _setting(
        10.0, "take no new slot while mock_root_dir has less free space (GB)", 0, 100000
    )
    max_load_per_cpu: float = _setting(
        0.0,
        "take no new slot while the 1-minute load per CPU is above this (0 = no load gate)",
        0,
        1000,
    )
    build_timeout_minutes: float = _setting(
        480.0, "cancel builds running longer (0 = never)", 0, 10080
    )
    max_build_retries: int = _setting(
        3, "re-runs of a build interrupted by a crash or a locked root before it fails", 0, 20
    )
    min_free_state_mb: int = _setting(
        1024,
        "refuse uploads, and take no new slot, while state_dir has less free space (MB)",
        0,
        10_000_000,
    )
    max_queued_per_user: int = _setting(
        100, "unfinished builds (queued to building) a non-admin user may have at once", 1, 100_000
    )
    max_staged_mb_per_user: int = _setting(
        4096,
        "MB of submitted files a non-admin user's unfinished builds may hold in state_dir",
        1,
        10_000_000,
    )
    max_user_priority: int = _setting(
        0,
        "highest priority a non-admin may submit at (the queue is cluster-wide: a higher "
        "priority jumps every host's queue)",
        0,
        1000,
    )
    metrics_listen: str = _setting(
        "",
        "serve Prometheus metrics at http://HOST:PORT/metrics, for example 127.0.0.1:9464 "
        "(empty, the default, or 'off': no endpoint; reqpmctl metrics works either way)",
        pattern=LISTEN_RE,
        pattern_doc="'off' or HOST:PORT with a port from 1 to 65535",
        restart=True,
    )
    auto_scale: bool = _setting(
        False,
        "let this host's load decide how many builds it runs, from 1 up to host_max_builds "
        "(or the cluster limit when that is 0), never above the cluster limit",
    )
    auto_scale_load_per_cpu: float = _setting(
        0.8, "auto_scale adds a build only while the 1-minute load per CPU is under this", 0.05, 64
    )
    auto_scale_min_free_memory_mb: int = _setting(
        2048, "auto_scale adds a build only while this much memory (MB) is available", 0, 10_000_000
    )
    auto_scale_max_pressure: float = _setting(
        10.0,
        "auto_scale adds a build only while CPU and memory pressure (/proc/pressure, avg10 %) "
        "are under this",
        0,
        100,
    )
    auto_scale_interval_seconds: int = _setting(
        60, "seconds of headroom before auto_scale adds one more build", 5, 3600
    )
    keep_failed_roots: bool = _setting(False, "keep a failed build's mock root for debugging")
    cancel_grace_seconds: int = _setting(
        5, "seconds between SIGINT, SIGTERM and SIGKILL when stopping mock", 1, 120
    )

    def as_dict(self, redact: bool = False) -> dict[str, Any]:
        """Plain values; with ``redact``, secrets (a password in redis_url) are masked."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if redact:
            out = {k: shown_setting(k, v) if BY_NAME[k].secret else v for k, v in out.items()}
        return out

    def changed(self, other: Settings) -> dict[str, tuple[Any, Any]]:
        """{key: (old, new)} for every key whose value differs in ``other``."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        }

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _plain(value: Any) -> Any:
    """A setting's value as shown and stored: a path as text, an unset one as ''."""
    if isinstance(value, Path):
        return "" if value == Path("") else str(value)
    return value


def _fields() -> tuple[Field, ...]:
    kinds = typing.get_type_hints(Settings)
    return tuple(
        Field(f.name, kinds[f.name], f.default, **f.metadata) for f in dataclasses.fields(Settings)
    )


FIELDS: tuple[Field, ...] = _fields()
BY_NAME: Mapping[str, Field] = {f.name: f for f in FIELDS}


@dataclass(frozen=True)
class SettingError:
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line else ""
        return f"{where}{self.key}: {self.message}"


class SettingsInvalid(ValueError):
    """A config (or a change to it) has errors; nothing was applied."""

    def __init__(self, errors: list[SettingError], source: str = "") -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(e) for e in errors))


_SECRET_PARAM = re.compile(r"pass|secret|token|auth|cred|key", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with every credential masked: users may read settings and status, but a
    Redis password would let them bypass the admin role.

    Conservative by design, since a password may hold characters a URL parser splits on
    ('/', '@', '?', ':'): the secret regions of every reading are masked together: the
    userinfo after its first ':' up to the last '@' (all of it when it has no ':', as a
    lone token may be a password), and the value of each query parameter whose name
    suggests a secret, up to '&'.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    spans: list[tuple[int, int]] = []
    at = rest.rfind("@")
    if at >= 0:
        colon = rest.find(":", 0, at)
        spans.append((colon + 1 if colon >= 0 else 0, at))
    q = rest.find("?")
    if q >= 0:
        start = q + 1
        for param in rest[start:].split("&"):
            name, eq, _ = param.partition("=")
            # decoded as the client decodes it: "%70assword" is "password" to redis-py
            if eq and _SECRET_PARAM.search(urllib.parse.unquote_plus(name)):
                spans.append((start + len(name) + 1, start + len(param)))
            start += len(param) + 1
    out, pos = [], 0
    for begin, end in sorted(s for s in spans if s[1] > s[0]):
        if begin < pos:  # overlaps the previous mask: extend it
            if end > pos:
                pos = end
            continue
        out += [rest[pos:begin], "***"]
        pos = end
    out.append(rest[pos:])
    return f"{scheme}://{''.join(out)}"


def shown_setting(key: str, value: Any) -> str:
    """A setting's value as users may see it (status, settings, the audit trail, logs):
    the one place a secret setting is masked."""
    text = str(_plain(value))
    field = BY_NAME.get(key)
    return redact_url(text) if field is not None and field.secret else text


def unknown_key_error(key: str, line: int | None = None) -> SettingError:
    guess = difflib.get_close_matches(key, BY_NAME, n=1)
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    return SettingError(key, f"unknown setting{hint}", line)
