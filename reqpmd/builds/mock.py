"""mock command lines: what reqpm asks mock to do, and how mock answers.

Every build runs in a root of its own, ``--uniqueext build<id>``: mock names it
``<chroot>-build<id>`` (and ``<chroot>-bootstrap-build<id>``), so two reqpm builds never
share a root lock. argv lists only, never a shell.

Scrubbing: ``--scrub=chroot`` deletes this build's root. ``--scrub=bootstrap`` deletes
this build's bootstrap root *and* rmtree's the bootstrap cache under ``cache_topdir``,
which every uniqueext of the config shares (mock backend.py, Commands.scrub); ``all``
wipes the package cache too. So the scrub run points ``cache_topdir`` at a private,
empty directory: mock deletes the unique roots and an empty throwaway cache, and the
shared caches stay untouched.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

BUILD_ROOT_LOCKED = 60  # mock's BuildRootLocked exit code


def uniqueext(build_id: int) -> str:
    return f"build{build_id}"


def mock_env(build_id: int, slot_token: int) -> dict[str, str]:
    """Added to the environment of a build's mock steps: which build, and the fencing token
    of the slot it runs under (tokens only grow, cluster-wide), so a wrapper around mock or
    an audit of what ran can tell a run from a paused one's stale twin. mock itself ignores
    them, and its chroot gets a clean environment."""
    return {"REQPM_BUILD_ID": str(build_id), "REQPM_SLOT_TOKEN": str(slot_token)}


def _base(mock: Path, chroot: str, build_id: int) -> list[str]:
    return [str(mock), "-r", chroot, "--uniqueext", uniqueext(build_id)]


def buildsrpm_argv(
    mock: Path, chroot: str, build_id: int, result_dir: Path, spec: Path, sources: Path
) -> list[str]:
    return [
        *_base(mock, chroot, build_id),
        "--resultdir",
        str(result_dir),
        "--buildsrpm",
        "--spec",
        str(spec),
        "--sources",
        str(sources),
    ]


def rebuild_argv(mock: Path, chroot: str, build_id: int, result_dir: Path, srpm: Path) -> list[str]:
    return [*_base(mock, chroot, build_id), "--resultdir", str(result_dir), "--rebuild", str(srpm)]


def result_dir_of(argv: list[str]) -> str | None:
    """The --resultdir of a mock command line (as `ps` shows it), or None: how the lease
    guard knows a build's mock among the host's processes."""
    for i, arg in enumerate(argv):
        if arg == "--resultdir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--resultdir="):
            return arg.partition("=")[2]
    return None


def scrub_argv(mock: Path, chroot: str, build_id: int, private_cache: Path) -> list[str]:
    return [
        *_base(mock, chroot, build_id),
        "--config-opts",
        f"cache_topdir={private_cache}",
        "--scrub=chroot",
        "--scrub=bootstrap",
    ]


def check_executable(mock: Path) -> str | None:
    """Why mock cannot be run, or None if it can.

    Like sudo, refuse a command somebody other than root (or the daemon's own user) could
    have replaced: the file and every directory above it must be owned by root or by us,
    and writable by nobody else (a sticky directory such as /tmp counts as safe: only a
    file's owner may replace it there)."""
    if not mock.exists():
        return f"mock_command {mock} does not exist (is mock installed?)"
    if not mock.is_file() or not os.access(mock, os.X_OK):
        return f"mock_command {mock} is not an executable file"
    real = mock.resolve()
    trusted = {0, os.geteuid()}
    # the path as given (a symlink and the directories holding it: whoever may change
    # them may point mock_command elsewhere) and the file it resolves to, with its own
    given = Path(os.path.abspath(mock))
    paths = dict.fromkeys([given, *given.parents, real, *real.parents])
    for path in paths:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            if st.st_uid not in trusted:
                return (
                    f"mock_command {mock} is not safe to run: the symlink {path} is owned by "
                    f"uid {st.st_uid}, not by root"
                )
            continue
        what = "it" if path == real else f"its directory {path}"
        if st.st_uid not in trusted:
            return (
                f"mock_command {mock} is not safe to run: {what} is owned by uid {st.st_uid}, "
                "not by root (mock_command must be owned by root and writable only by root)"
            )
        sticky_dir = path != real and st.st_mode & stat.S_ISVTX
        if st.st_mode & 0o022 and not sticky_dir:
            return (
                f"mock_command {mock} is not safe to run: {what} is writable by others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}; mock_command must be owned by root and "
                "writable only by root)"
            )
    return None
