"""Settings: the schema, loading a YAML file, and validating every key at once.

One flat mapping. Every problem is reported (not just the first) with its line, the
key, the value and what is allowed, so ``reqpmd --check-config`` reads like ``sshd -t``.
A Settings object is immutable: a reload builds a new one and swaps it in whole, so a
half-applied change cannot exist.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = "/etc/reqpm/reqpmd.yaml"
_URL_RE = re.compile(r"^(embedded|(redis|rediss|unix)://\S+)$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CHROOT_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,128}$")


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
        bad = ValueError(f"{value!r} is not allowed (allowed: {self.allowed()})")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            raise bad
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
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
                raise ValueError(f"{value!r} is out of range (allowed: {self.allowed()})")
            return self.kind(value)
        if not isinstance(value, str) or not value.strip():
            raise bad
        if self.pattern is not None and not self.pattern.match(value):
            raise bad
        return Path(value) if self.kind is Path else value


def _hostname() -> str:
    """The full hostname: short names repeat across sites (build01.dc1, build01.dc2), and
    two hosts with one host_id would share slot names."""
    name = socket.gethostname()
    if _NAME_RE.match(name):
        return name
    return name.split(".")[0][:64] or "localhost"


FIELDS: tuple[Field, ...] = (
    # The seed's settings: names, bounds and defaults are a contract.
    Field(
        "max_concurrent_builds",
        int,
        4,
        "builds running at once across every host sharing the Redis namespace",
        1,
        20,
    ),
    Field("cleanup_builds_after_days", int, 30, "days a finished build's files are kept", 1, 365),
    Field("cleanup_repos_after_days", int, 7, "days unused repository clones are kept", 1, 90),
    Field("auto_sync_projects", bool, True, "sync projects from git periodically"),
    Field("sync_interval_hours", int, 6, "hours between project syncs", 1, 24),
    Field(
        "repository_sync_interval_minutes",
        int,
        30,
        "minutes between repository metadata updates",
        5,
        1440,
    ),
    # The daemon's own settings.
    Field(
        "redis_url",
        str,
        "embedded",
        "'embedded' (a private redis-server in state_dir) or a "
        "redis://, rediss:// or unix:// URL shared by all hosts",
        pattern=_URL_RE,
        pattern_doc="'embedded' or a redis://, rediss:// or unix:// URL",
        restart=True,
    ),
    Field(
        "namespace",
        str,
        "reqpm",
        "Redis namespace; hosts sharing slots use the same one",
        pattern=_NAME_RE,
        pattern_doc="1-64 characters from A-Z a-z 0-9 _ . -",
        restart=True,
    ),
    Field(
        "host_id",
        str,
        "",
        "this daemon's name among the hosts (default: the hostname)",
        pattern=_NAME_RE,
        pattern_doc="1-64 characters from A-Z a-z 0-9 _ . -",
        restart=True,
    ),
    Field("socket_path", Path, Path("/run/reqpm/reqpmd.sock"), "control socket", restart=True),
    Field(
        "socket_group",
        str,
        "reqpm",
        "group owning the control socket (mode 0660)",
        pattern=_NAME_RE,
        pattern_doc="a group name",
        restart=True,
    ),
    Field(
        "admin_group",
        str,
        "reqpm-admin",
        "members may change settings and free slots",
        pattern=_NAME_RE,
        pattern_doc="a group name",
    ),
    Field(
        "state_dir",
        Path,
        Path("/var/lib/reqpm"),
        "queue database, build logs, results",
        restart=True,
    ),
    Field("mock_command", Path, Path("/usr/bin/mock"), "the mock executable"),
    Field(
        "mock_root_dir", Path, Path("/var/lib/mock"), "mock's basedir (checked by the disk gate)"
    ),
    Field(
        "default_chroot",
        str,
        "fedora-rawhide-x86_64",
        "mock config used when a submission names none",
        pattern=_CHROOT_RE,
        pattern_doc="a mock config name",
    ),
    Field(
        "slot_wait_timeout",
        int,
        300,
        "seconds a build may wait for a slot (0 = forever)",
        0,
        604800,
    ),
    Field(
        "slot_lease_seconds",
        int,
        60,
        "lease of a held slot; a dead holder's slot returns after this; the same on every host",
        5,
        3600,
        restart=True,
    ),
    Field(
        "host_max_builds", int, 0, "builds at once on this host (0 = only the cluster limit)", 0, 20
    ),
    Field(
        "min_free_disk_gb",
        float,
        10.0,
        "take no new slot while mock_root_dir has less free space (GB)",
        0,
        100000,
    ),
    Field(
        "max_load_per_cpu",
        float,
        0.0,
        "take no new slot while the 1-minute load per CPU is above this (0 = no load gate)",
        0,
        1000,
    ),
    Field(
        "build_timeout_minutes", float, 480.0, "cancel builds running longer (0 = never)", 0, 10080
    ),
    Field(
        "max_build_retries",
        int,
        3,
        "re-runs of a build interrupted by a crash or a locked root before it fails",
        0,
        20,
    ),
    Field("keep_failed_roots", bool, False, "keep a failed build's mock root for debugging"),
    Field(
        "cancel_grace_seconds",
        int,
        5,
        "seconds between SIGINT, SIGTERM and SIGKILL when stopping mock",
        1,
        120,
    ),
)
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


class Settings:
    """Validated, immutable settings. Read them as attributes: ``s.max_concurrent_builds``."""

    def __init__(self, values: Mapping[str, Any], path: Path | None = None) -> None:
        self._values = dict(values)
        self.path = path

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def as_dict(self, redact: bool = False) -> dict[str, Any]:
        """Plain values; with ``redact``, secrets (a password in redis_url) are masked."""
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self._values.items()}
        if redact:
            out["redis_url"] = redact_url(str(out["redis_url"]))
        return out

    def changed(self, other: Settings) -> dict[str, tuple[Any, Any]]:
        """{key: (old, new)} for every key whose value differs in ``other``."""
        return {
            k: (self._values[k], other._values[k])
            for k in self._values
            if self._values[k] != other._values[k]
        }

    def replace(self, **changes: Any) -> Settings:
        return Settings({**self._values, **changes}, self.path)


def redact_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: users may read settings
    and status, but a Redis password would let them bypass the admin role."""
    return re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", url)


def unknown_key_error(key: str, line: int | None = None) -> SettingError:
    guess = difflib.get_close_matches(key, BY_NAME, n=1)
    hint = f" (did you mean {guess[0]!r}?)" if guess else ""
    return SettingError(key, f"unknown setting{hint}", line)


def _key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return lines


def parse_text(text: str, source: str = "") -> tuple[dict[str, Any], dict[str, int]]:
    """The raw mapping and key lines of a YAML config; SettingsInvalid if it is no mapping."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SettingsInvalid(
            [SettingError("(file)", f"not valid YAML: {exc}", _error_line(exc, text))], source
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsInvalid(
            [SettingError("(file)", "must be a mapping of key: value", _root_line(text))], source
        )
    return data, _key_lines(text)


def _error_line(exc: yaml.YAMLError, text: str) -> int | None:
    """The line (1-based) a YAML error points at, if it says."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is not None:
        return int(mark.line) + 1
    position = getattr(exc, "position", None)  # ReaderError: a character YAML forbids
    if isinstance(position, int):
        return text.count("\n", 0, position) + 1
    return None


def _root_line(text: str) -> int:
    """The line (1-based) where the document's top-level value starts."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return 1
    return int(node.start_mark.line) + 1 if node is not None else 1


def validate(
    raw: Mapping[str, Any],
    lines: Mapping[str, int] | None = None,
    base_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
    source: str = "",
) -> dict[str, Any]:
    """Every value converted and checked, defaults filled in; raises with all errors."""
    lines = lines or {}
    environ = os.environ if environ is None else environ
    errors: list[SettingError] = []
    values: dict[str, Any] = {}
    for key, value in raw.items():
        field = BY_NAME.get(str(key))
        if field is None:
            errors.append(unknown_key_error(str(key), lines.get(str(key))))
            continue
        try:
            values[field.name] = field.convert(value)
        except ValueError as exc:
            errors.append(SettingError(field.name, str(exc), lines.get(field.name)))
    env_max = environ.get("MAX_CONCURRENT_BUILDS")
    if "max_concurrent_builds" not in raw and env_max is not None:
        field = BY_NAME["max_concurrent_builds"]
        try:
            values[field.name] = field.convert(_scalar(env_max))
        except ValueError as exc:
            errors.append(SettingError(field.name, f"(from MAX_CONCURRENT_BUILDS) {exc}"))
    if errors:
        raise SettingsInvalid(errors, source)
    for field in FIELDS:
        values.setdefault(field.name, field.default)
    if not values["host_id"]:
        values["host_id"] = _hostname()
    for field in FIELDS:
        if field.kind is Path and base_dir is not None and not values[field.name].is_absolute():
            # lexically, not with resolve(): a symlinked mock_command (Fedora's
            # /usr/bin/mock -> consolehelper) must be run by the name it was given
            values[field.name] = Path(os.path.normpath(base_dir / values[field.name]))
    return values


def _scalar(text: str) -> Any:
    """A command-line or environment value, typed the way YAML would type it."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignment(pair: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from reqpmctl, the value typed as YAML would type it."""
    key, sep, text = pair.partition("=")
    if not sep or not key.strip():
        raise SettingsInvalid([SettingError(pair, "expected KEY=VALUE")])
    return key.strip(), _scalar(text.strip())


def load(path: Path | str, environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a config file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SettingsInvalid(
            [SettingError("(file)", f"cannot read: {exc.strerror}")], str(path)
        ) from exc
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise SettingsInvalid(
            [SettingError("(file)", f"not UTF-8 text (byte {exc.start})", line)], str(path)
        ) from exc
    raw, lines = parse_text(text, str(path))
    values = validate(raw, lines, base_dir=path.parent.resolve(), environ=environ, source=str(path))
    return Settings(values, path)
