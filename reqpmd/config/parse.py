"""Reading settings: YAML text to a validated ``Settings``, every problem reported at once.

Every problem is reported (not just the first) with its line, the key, the value and
what is allowed, so ``reqpmd --check-config`` reads like ``sshd -t``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from reqpmd.config.schema import (
    BY_NAME,
    FIELDS,
    NAME_RE,
    SettingError,
    Settings,
    SettingsInvalid,
    unknown_key_error,
)
from reqpmd.config.secrets import relation_errors


def _hostname() -> str:
    """The full hostname: short names repeat across sites (build01.dc1, build01.dc2), and
    two hosts with one host_id would share slot names."""
    name = socket.gethostname()
    if NAME_RE.fullmatch(name):
        return name
    return name.split(".")[0][:64] or "localhost"


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
    except ValueError:  # a value YAML reads but Python will not hold (a 5000-digit integer)
        raise SettingsInvalid(_unconstructable(text), source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsInvalid(
            [SettingError("(file)", "must be a mapping of key: value", _root_line(text))], source
        )
    return data, _key_lines(text)


def _unconstructable(text: str) -> list[SettingError]:
    """One error per top-level value that safe_load cannot turn into a Python value."""
    errors = []
    node = yaml.compose(text)  # composing builds no values: it cannot fail the same way
    pairs = node.value if isinstance(node, yaml.MappingNode) else []
    for key_node, value_node in pairs:
        try:
            yaml.SafeLoader(text).construct_object(value_node, deep=True)
        except ValueError:
            key = str(key_node.value)
            field = BY_NAME.get(key)
            allowed = f" (allowed: {field.allowed()})" if field else ""
            shown = str(value_node.value)
            errors.append(
                SettingError(
                    key,
                    f"{shown[:20]}... ({len(shown)} characters) is not allowed{allowed}",
                    key_node.start_mark.line + 1,
                )
            )
    return errors or [SettingError("(file)", "holds a value that cannot be read")]


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
) -> Settings:
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
    unset_repo_dir = "repo_dir" not in values
    for field in FIELDS:
        values.setdefault(field.name, field.default)
    if unset_repo_dir:  # follows state_dir wherever that is
        values["repo_dir"] = values["state_dir"] / "repos"
    if not values["host_id"]:
        values["host_id"] = _hostname()
    for field in FIELDS:
        path = values[field.name]
        if field.kind is Path and path == Path("") and field.default == Path(""):
            continue  # a file the setting leaves unnamed (redis_password_file ...)
        if field.kind is Path and base_dir is not None and not path.is_absolute():
            # lexically, not with resolve(): a symlinked mock_command (Fedora's
            # /usr/bin/mock -> consolehelper) must be run by the name it was given
            values[field.name] = Path(os.path.normpath(base_dir / values[field.name]))
    settings = Settings(**values)
    related = relation_errors(settings)
    if related:
        raise SettingsInvalid(
            [SettingError(e.key, e.message, lines.get(e.key)) for e in related], source
        )
    return settings


def _scalar(text: str) -> Any:
    """A command-line or environment value, typed the way YAML would type it."""
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, ValueError):  # ValueError: an integer of thousands of digits
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
    return validate(raw, lines, base_dir=path.parent.resolve(), environ=environ, source=str(path))
