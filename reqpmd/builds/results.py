"""A build's result files: what mock left directly in its --resultdir (packages, logs).

The result directory is written by a build, so nothing in it is trusted: a symlink there
could point at any file the daemon (root) may read, and a FIFO or device could block or
act on open. So only regular files count, every open is relative to the directory opened
once without following symlinks, and each file is opened O_NOFOLLOW|O_NONBLOCK and
checked with fstat before it is read or passed on.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RPM = "rpm"
SRPM = "srpm"
LOG = "log"
OTHER = "other"
RPM_KINDS = frozenset({RPM, SRPM})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the race between lstat and open must not hang;
# on the regular file it turns out to be, the flag changes nothing.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_CHUNK = 1024 * 1024
# gone, or swapped for something that is not a regular file, between listing and opening
_VANISHED = {errno.ENOENT, errno.ELOOP, errno.ENXIO, errno.ENOTDIR, errno.EISDIR}


@dataclass(frozen=True)
class ResultFile:
    name: str
    size: int
    sha256: str
    kind: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "sha256": self.sha256, "kind": self.kind}


def kind_of(name: str) -> str:
    """What a result is, by mock's naming (a .nosrc.rpm is a source package too)."""
    if name.endswith((".src.rpm", ".nosrc.rpm")):
        return SRPM
    if name.endswith(".rpm"):
        return RPM
    if name.endswith(".log"):
        return LOG
    return OTHER


def is_plain_name(name: object) -> bool:
    """A name that can only mean a file directly in one directory: a client writes files
    under these names, so '..', a slash or a NUL would let a listing write elsewhere."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
    )


@contextlib.contextmanager
def _opened_dir(result_dir: Path) -> Iterator[int | None]:
    """The result directory's descriptor, or None when there is none (a build that never
    ran, or a result path that is not a plain directory)."""
    try:
        fd = os.open(result_dir, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in _VANISHED:
            yield None
            return
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def list_names(result_dir: Path) -> list[str]:
    """Sorted names of the regular files directly in ``result_dir``, by lstat: symlinks,
    directories, FIFOs and devices are left out, and never opened."""
    with _opened_dir(result_dir) as dir_fd:
        if dir_fd is None:
            return []
        names = []
        with os.scandir(dir_fd) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode):
                        names.append(entry.name)
    return sorted(names)


def _open_in(dir_fd: int, name: str) -> int | None:
    """A read-only descriptor of the regular file ``name``, or None when it is not one
    (any more): the lstat of the listing may be stale by now."""
    if not is_plain_name(name):
        return None
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _VANISHED:
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def open_result(result_dir: Path, name: str) -> int | None:
    """A descriptor of one result file, fit to pass to a client; None if ``name`` is not a
    regular file directly in ``result_dir``. The caller closes it."""
    with _opened_dir(result_dir) as dir_fd:
        return None if dir_fd is None else _open_in(dir_fd, name)


def describe(fd: int, name: str) -> ResultFile:
    """Size and SHA-256 of what the descriptor holds now. pread leaves the file offset
    alone: a passed descriptor shares it with the client, which reads from 0."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return ResultFile(name, offset, digest.hexdigest(), kind_of(name))


def open_described(result_dir: Path, names: Sequence[str]) -> list[tuple[ResultFile, int]]:
    """The named result files, opened and described, in order; names that are not regular
    files any more are left out. The caller closes the descriptors; on an error none is
    left open."""
    opened: list[tuple[ResultFile, int]] = []
    with _opened_dir(result_dir) as dir_fd:
        if dir_fd is None:
            return []
        try:
            for name in names:
                fd = _open_in(dir_fd, name)
                if fd is None:
                    continue
                try:
                    opened.append((describe(fd, name), fd))
                except BaseException:
                    os.close(fd)
                    raise
        except BaseException:
            for _, fd in opened:
                os.close(fd)
            raise
    return opened


def list_results(result_dir: Path, names: Sequence[str] | None = None) -> list[ResultFile]:
    """The result files (all, or those of ``names``) described, one open at a time."""
    wanted = list_names(result_dir) if names is None else names
    described = []
    with _opened_dir(result_dir) as dir_fd:
        if dir_fd is None:
            return []
        for name in wanted:
            fd = _open_in(dir_fd, name)
            if fd is None:
                continue
            try:
                described.append(describe(fd, name))
            finally:
                os.close(fd)
    return described


def page_after(names: Sequence[str], after: str | None, size: int) -> tuple[list[str], str | None]:
    """Up to ``size`` of the sorted ``names`` that come after the cursor ``after``, and the
    cursor for the next page (None when this page is the last). A name cursor, not an
    index: a file that appears or vanishes between pages shifts nothing."""
    rest = [n for n in names if after is None or n > after]
    page = rest[:size]
    return page, (page[-1] if len(rest) > size else None)


def package_name(srpm: str) -> str | None:
    """The source package name in a ``name-version-release.src.rpm`` file name."""
    if not srpm.endswith(".src.rpm"):
        return None
    parts = srpm[: -len(".src.rpm")].rsplit("-", 2)
    return parts[0] if len(parts) == 3 and parts[0] else None


_SPEC_NAME = re.compile(rb"^Name:\s*(\S+)\s*$", re.MULTILINE | re.IGNORECASE)


def source_package(result_dir: Path, submitted: Path) -> str | None:
    """The build's source package name, for its history record: from the source RPM it
    made or was given, else from the spec's Name tag (as written, macros and all)."""
    for name in list_names(result_dir):
        if (found := package_name(name)) is not None:
            return found
    if (found := package_name(submitted.name)) is not None:
        return found
    if submitted.suffix == ".spec":
        with contextlib.suppress(OSError):
            with open(submitted, "rb") as f:
                match = _SPEC_NAME.search(f.read(256 * 1024))
            if match:
                return match[1].decode("utf-8", "replace")[:128]
    return None
