"""Checking what a submitter sends before anything is stored: names, roles, descriptors.

The client opens the files with its own rights and sends descriptors; here each must
be a regular file within the caps, named safely, and the set must be one SRPM or one
spec file with its sources.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import Any

from reqpmd.builds.layout import input_name
from reqpmd.config.schema import CHROOT_DOC, CHROOT_RE
from reqpmd.errors import BadRequest, InvalidArgument

MAX_FILE_BYTES = 2 * 1024**3
MAX_TOTAL_BYTES = 4 * 1024**3
_FILE_NAME = re.compile(r"[A-Za-z0-9_+~@=,-][A-Za-z0-9._+~@=,-]{0,254}")  # fullmatch


@dataclass(frozen=True)
class Submission:
    kind: str  # "srpm" or "spec"
    main: str  # the SRPM's or the spec file's name
    files: dict[str, int]  # name under input/ -> descriptor to copy from
    size: int  # bytes, all files together (as fstat says: a sparse file counts whole)


def check_chroot(chroot: Any) -> str:
    if not isinstance(chroot, str) or not CHROOT_RE.fullmatch(chroot):
        raise InvalidArgument(f"chroot {chroot!r} is not allowed: {CHROOT_DOC}")
    return chroot


def check_file_name(name: Any) -> str:
    if not isinstance(name, str) or name in (".", "..") or not _FILE_NAME.fullmatch(name):
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


def check_submission(files: Any, fds: list[int]) -> Submission:
    if not isinstance(files, list) or len(files) != len(fds) or not files:
        raise BadRequest(
            "submit needs 'files' [{name, role}] matching the descriptors "
            f"sent ({len(fds)} received)"
        )
    roles = [f.get("role") if isinstance(f, dict) else None for f in files]
    names = [check_file_name(f.get("name") if isinstance(f, dict) else None) for f in files]
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
    staged: dict[str, int] = {}
    for name, role, fd in zip(names, roles, fds, strict=True):
        check_fd(fd, name, budget)
        staged[input_name(name, role == "source")] = fd
    return Submission(kind, main, staged, MAX_TOTAL_BYTES - budget[0])
