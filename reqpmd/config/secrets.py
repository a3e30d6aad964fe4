"""Secrets kept in files of their own (``redis_password_file``, ``redis_tls_key_file``),
and how the Redis files fit ``redis_url``.

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

from reqpmd.config import redis_url
from reqpmd.config.schema import SettingError, Settings, SettingsInvalid

MAX_SECRET_BYTES = 4096  # a password or a key; anything bigger is the wrong file
FILES = (
    "redis_password_file",
    "redis_sentinel_password_file",
    "redis_tls_ca_file",
    "redis_tls_cert_file",
    "redis_tls_key_file",
)


def named(path: Path) -> Path | None:
    """The file a path setting names, or None when it is left unset."""
    return None if path == Path("") else path


def relation_errors(s: Settings) -> list[SettingError]:
    """The Redis files that do not fit redis_url (checked with every change of the
    settings, so `settings set` refuses what the next start would)."""
    address = redis_url.parse(s.redis_url)
    given = {name for name in FILES if named(getattr(s, name)) is not None}
    errors = []
    for name in sorted(given):
        if address.kind == "embedded":
            errors.append(SettingError(name, "is for a shared Redis; redis_url is 'embedded'"))
        elif name.startswith("redis_tls_") and not address.tls:
            errors.append(SettingError(name, "is for TLS; redis_url is not a rediss URL"))
        elif name == "redis_sentinel_password_file" and address.kind != "sentinel":
            errors.append(SettingError(name, "is for Sentinel; redis_url is not redis+sentinel"))
    if "redis_password_file" in given and address.password is not None:
        errors.append(
            SettingError(
                "redis_password_file", "redis_url holds a password too: keep it in the file only"
            )
        )
    if ("redis_tls_cert_file" in given) != ("redis_tls_key_file" in given):
        errors.append(
            SettingError("redis_tls_cert_file", "and redis_tls_key_file go together: set both")
        )
    return errors


def _refuse(setting: str, message: str) -> SettingsInvalid:
    return SettingsInvalid([SettingError(setting, message)])


def _check(st: os.stat_result, path: Path, setting: str, private: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(setting, f"{path} is not a regular file")
    if not private:
        return
    if st.st_mode & 0o077:
        raise _refuse(
            setting,
            f"{path} is readable or writable by others than its owner (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}",
        )
    # root (reqpmd --check-config) checks on behalf of the service user, who owns it
    if os.geteuid() != 0 and st.st_uid not in (os.geteuid(), 0):
        raise _refuse(setting, f"{path} is owned by uid {st.st_uid}, not by reqpmd's user")


def open_checked(path: Path, setting: str, private: bool) -> int:
    """A descriptor of ``path`` once it is a regular file we can read (and, ``private``,
    only its owner's): checked on the descriptor, so nothing is swapped in between. The
    caller closes it."""
    try:
        # O_NONBLOCK: a FIFO put in its place must not hang the daemon's start
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise _refuse(setting, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        _check(os.fstat(fd), path, setting, private)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_file(path: Path, setting: str, private: bool) -> None:
    """Raise SettingsInvalid naming ``setting`` unless the file is fit for it."""
    os.close(open_checked(path, setting, private))


def read_secret(path: Path, setting: str) -> str:
    """The secret in ``path``: one line, its line end dropped (nothing else: spaces may
    belong to a password)."""
    fd = open_checked(path, setting, private=True)
    try:
        data = os.read(fd, MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise _refuse(setting, f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_BYTES:
        raise _refuse(setting, f"{path} holds over {MAX_SECRET_BYTES} bytes: not a password")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _refuse(setting, f"{path} is not UTF-8 text") from exc
    secret = text.removeprefix("\ufeff").removesuffix("\n").removesuffix("\r")
    if not secret or any(c in secret for c in "\r\n\0"):
        raise _refuse(setting, f"{path} must hold the password alone, on one line")
    return secret
