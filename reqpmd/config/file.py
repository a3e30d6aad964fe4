"""Changing the config file the way an admin would: only the changed values, in place.

Comments and key order stay as the admin wrote them; a key that is only present as a
commented-out default (``# key: value``) is set on that line; a key that is absent is
appended. The write is atomic: temp file in the same directory, same owner and mode,
fsync, rename, fsync of the directory. The result is parsed back before it replaces
the file, so a write can never leave a config that means something else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from reqpmd.config.parse import parse_text
from reqpmd.fsutil import atomic_write


def render(value: Any) -> str:
    """A value as a YAML scalar (``true``, ``6``, ``'0755'``...)."""
    if isinstance(value, Path):
        value = str(value)
    # an unbounded width: a long value must stay on its key's line
    dumped = yaml.safe_dump([value], default_flow_style=True, width=2**31 - 1)
    return str(dumped.strip()[1:-1])


def edit_text(text: str, changes: Mapping[str, Any]) -> str:
    lines = text.splitlines(keepends=True)
    for key, value in changes.items():
        rendered = render(value)
        # the value: a quoted scalar (may hold " # "), or a plain one (a '#' only starts
        # a comment after a blank, so "/srv/mock#1" is one value)
        active = re.compile(
            rf"^{re.escape(key)}[ \t]*:[ \t]*"
            r"(?P<value>'(?:[^'\n]|'')*'|\"(?:[^\"\\\n]|\\.)*\"|[^\n]*?)"
            r"(?P<comment>[ \t]+#.*)?(?P<eol>\r?\n?)$"
        )
        # "#key: value" is a commented-out setting; "# key: text" is documentation
        commented = re.compile(rf"^#{re.escape(key)}[ \t]*:.*?(?P<eol>\r?\n?)$")
        for i, line in enumerate(lines):
            m = active.match(line)
            if m:
                lines[i] = f"{key}: {rendered}{m.group('comment') or ''}{m.group('eol')}"
                break
        else:
            for i, line in enumerate(lines):
                m = commented.match(line)
                if m:
                    lines[i] = f"{key}: {rendered}{m.group('eol') or chr(10)}"
                    break
            else:
                if lines and not lines[-1].endswith("\n"):
                    lines[-1] += "\n"
                lines.append(f"{key}: {rendered}\n")
    return "".join(lines)


def write_changes(path: Path, changes: Mapping[str, Any]) -> None:
    text = path.read_text() if path.exists() else ""
    new_text = edit_text(text, changes)
    raw, _ = parse_text(new_text, str(path))
    for key, value in changes.items():
        want = str(value) if isinstance(value, Path) else value
        if raw.get(key) != want:
            raise RuntimeError(
                f"refusing to write {path}: {key} would read back as {raw.get(key)!r}, not {want!r}"
            )
    atomic_write(path, new_text.encode(), private=True)  # it may hold a Redis password
