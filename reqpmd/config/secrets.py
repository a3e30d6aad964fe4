"""Secrets kept in files of their own (``redis_password_file``, ``redis_tls_key_file``).

The config file is readable through ``settings show`` by every member of the socket
group (redacted, but the file itself is the admin's to protect); a secret in a file of
its own that only reqpmd's user can read stays out of both. A file that others could
read is refused rather than used: the daemon says so at start, naming the setting and
the fix, instead of quietly spreading the secret.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from reqpmd.config.schema import SettingError, SettingsInvalid

MAX_SECRET_BYTES = 4096  # a password or a key; anything bigger is the wrong file


def _refuse(setting: str, message: str) -> SettingsInvalid:
    return SettingsInvalid([SettingError(setting, message)])


def check_private(path: Path, setting: str) -> os.stat_result:
    """The file's status when only reqpmd's user (or root) owns and can read it; else
    SettingsInvalid naming ``setting``, the file and the fix."""
    try:
        st = path.stat()
    except OSError as exc:
        raise _refuse(setting, f"cannot read {path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(setting, f"{path} is not a regular file")
    if st.st_mode & 0o077:
        raise _refuse(
            setting,
            f"{path} is readable or writable by others than its owner (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}",
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise _refuse(setting, f"{path} is owned by uid {st.st_uid}, not by reqpmd's user or root")
    return st


def read_secret(path: Path, setting: str) -> str:
    """The secret in ``path``, without the line end an editor adds."""
    check_private(path, setting)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise _refuse(setting, f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > MAX_SECRET_BYTES:
        raise _refuse(setting, f"{path} holds over {MAX_SECRET_BYTES} bytes: not a password")
    try:
        secret = data.decode().strip("\r\n")
    except UnicodeDecodeError as exc:
        raise _refuse(setting, f"{path} is not UTF-8 text") from exc
    if not secret or "\n" in secret:
        raise _refuse(setting, f"{path} must hold the password on one line")
    return secret
