"""Durable writes: what "on disk" means for reqpm's files.

A rename is only durable once the directory holding it is fsynced, so every place that
promises "on disk before we answer" (a submission's inputs, the config file) goes
through these two functions.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, private: bool = False) -> None:
    """Replace ``path`` with ``data``: temp file in the same directory with the old
    file's owner and mode, fsync, rename, fsync of the directory. ``private`` keeps
    group and others out whatever the old mode was (a file that may hold secrets)."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if st is not None:  # a new file is 0600 already (mkstemp)
                mode = st.st_mode & 0o7777
                os.fchmod(f.fileno(), mode & ~0o077 if private else mode)
                with contextlib.suppress(PermissionError):
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
