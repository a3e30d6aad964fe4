"""One metadata run: createrepo_c writes a new revision beside the served one, then the
new files are moved in and repomd.xml is swapped last.

Readers never see a mix: metadata file names carry their checksum (createrepo_c's
default), so the new revision's files land beside the old ones without replacing any,
and repomd.xml, the one file a client reads first, is replaced by a single rename. What
the revision before named stays for a grace period after the swap (``retired``): a
client that read the old repomd.xml a moment ago still finds its files and packages.
createrepo_c's own in-place mode renames the whole ``repodata/`` away and back, which
leaves a moment with no repodata at all.

``--update`` reuses the metadata of every package whose size and mtime are unchanged, so
adding one build to a large repository reads that build's RPMs and no others.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reqpmd.fsutil import atomic_write, fsync_dir
from reqpmd.repos.layout import RepoLayout, public_dir
from reqpmd.repos.metadata import MetadataError, data_files
from reqpmd.repos.retired import METADATA, Retired

RUN_TIMEOUT = 3600.0  # seconds one createrepo_c run may take
_UNREADABLE = re.compile(r"Cannot read package: (?P<path>.+?): (?P<why>.*)$", re.MULTILINE)
# createrepo_c exits 2 when it skipped unreadable packages but wrote the rest
_SKIPPED_SOME = 2

# argv, timeout -> (exit code, combined output)
Tool = Callable[[list[str], float], tuple[int, str]]


def run_tool(argv: list[str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found (pip install createrepo-c, or dnf install createrepo_c)"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]} ran over {timeout:.0f} s and was killed"
    return done.returncode, done.stdout.decode("utf-8", "replace")


def command() -> str:
    """The createrepo_c binary: the one pip's wheel ships, else the distribution's on PATH.

    The wheel's ``bin/createrepo_c`` is a Python wrapper that imports the bindings and then
    runs the binary as a child: 60 ms of every publish. So the binary inside the package
    is found without importing it (find_spec does not import), and run directly."""
    spec = importlib.util.find_spec("createrepo_c")
    bases = (spec.submodule_search_locations or []) if spec is not None else []
    for base in bases:
        binary = Path(base) / "data" / "bin" / "createrepo_c"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return shutil.which("createrepo_c") or "createrepo_c"


@dataclass(frozen=True)
class RunResult:
    read: list[str]  # packages whose headers createrepo_c read (the rest were reused)
    skipped: list[str] = field(default_factory=list)  # "path: why" of unreadable packages
    seconds: float = 0.0


def metadata_argv(
    cmd: str, repo: RepoLayout, staging: Path, update: bool, excluded: Iterable[str] = ()
) -> list[str]:
    argv = [
        cmd,
        "--outputdir",
        str(staging),
        "--general-compress-type=gz",  # every dnf and yum reads gzip
        "--excludes",
        "*.src.rpm",  # as mock's own createrepo does: source RPMs sit beside, unlisted
        "--read-pkgs-list",
        str(staging / "read.txt"),
        "--workers",
        "2",
    ]
    for directory in sorted(excluded):  # retired build directories: out of the metadata
        argv += ["--excludes", f"{directory}/*"]
    if update:
        argv += ["--update", "--update-md-path", str(repo.root)]
    return [*argv, str(repo.root)]


def make_metadata(
    repo: RepoLayout, tool: Tool, full: bool = False, retire: Iterable[str] = ()
) -> RunResult:
    """Write a new metadata revision and swap it in. ``full`` re-reads every package (for
    metadata found broken); otherwise unchanged packages are reused. Build directories in
    ``retire`` (unpublished builds) and older attempts of a build leave the metadata; they
    are deleted a grace period after the swap. The caller holds the repository's lock.
    Raises MetadataError, leaving the served revision (and every file it names) as it was."""
    started = time.monotonic()
    repo.work.mkdir(parents=True, exist_ok=True)
    retired = Retired(repo)
    leaving = (set(repo.superseded()) | set(retire)) - retired.dirs()
    staging = Path(tempfile.mkdtemp(prefix="staging-", dir=repo.work))
    try:
        update = not full and repo.repomd.exists()
        argv = metadata_argv(command(), repo, staging, update, retired.dirs() | leaving)
        code, out = tool(argv, RUN_TIMEOUT)
        out = out.replace(str(staging), "<staging>")  # the same error reads the same
        new = staging / "repodata"
        skipped = [f"{_relative(repo, m['path'])}: {m['why']}" for m in _UNREADABLE.finditer(out)]
        # exit 2: some packages (or file names) were refused, the rest was written
        if not (new / "repomd.xml").is_file() or code not in (0, _SKIPPED_SOME):
            raise MetadataError(f"createrepo_c exited with {code}: {_tail(out)}")
        if code == _SKIPPED_SOME and not skipped:
            skipped = [f"(unnamed): {_tail(out, 2)}"]
        read = _read_list(staging / "read.txt", repo)
        unreferenced = install(new, repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    retired.add([f"{METADATA}{name}" for name in unreferenced] + sorted(leaving))
    retired.prune()
    retired.save()
    _remember_skipped(repo, [s.split(": ", 1)[0] for s in skipped])
    return RunResult(read, skipped, time.monotonic() - started)


def install(new: Path, repo: RepoLayout) -> list[str]:
    """Move a finished revision into ``repodata/``: data files first, repomd.xml last.
    Returns the metadata files that are no longer named by the served revision."""
    live = repo.repodata
    public_dir(live)
    for path in sorted(new.iterdir()):
        os.chmod(path, 0o644)  # served to every dnf user, whatever the daemon's umask
        if path.name != "repomd.xml":
            _fsync(path)
            os.replace(path, live / path.name)
    fsync_dir(live)
    _fsync(new / "repomd.xml")
    os.replace(new / "repomd.xml", repo.repomd)
    fsync_dir(live)
    served = referenced(repo)
    return sorted(p.name for p in live.iterdir() if p.name not in served)


def referenced(repo: RepoLayout) -> set[str]:
    """Names of the metadata files the served repomd.xml names (none if it is broken)."""
    try:
        return {"repomd.xml"} | {Path(d.href).name for d in data_files(repo.repomd)}
    except MetadataError:
        return {"repomd.xml"}


def scan(repo: RepoLayout) -> dict[str, tuple[int, int]]:
    """Every RPM the metadata should list (not source RPMs, not retired or superseded
    build directories): relative path -> (size, mtime in seconds), as primary.xml
    records them."""
    left_out = Retired(repo).dirs() | set(repo.superseded())
    found: dict[str, tuple[int, int]] = {}
    for top, dirs, files in os.walk(repo.root):
        if top == str(repo.root):
            dirs[:] = [
                d for d in dirs if d != "repodata" and not d.startswith(".") and d not in left_out
            ]
        for name in files:
            if name.endswith(".rpm") and not name.endswith(".src.rpm"):
                path = os.path.join(top, name)
                with contextlib.suppress(OSError):
                    st = os.stat(path)
                    found[os.path.relpath(path, repo.root)] = (st.st_size, int(st.st_mtime))
    return found


def skipped_before(repo: RepoLayout) -> dict[str, tuple[int, int]]:
    """RPMs the last run could not read, as they were then: a sync need not try them
    again until they change."""
    try:
        value = json.loads(repo.skipped.read_bytes())
        return {str(k): (int(v[0]), int(v[1])) for k, v in value.items()}
    except (OSError, ValueError, TypeError, AttributeError, IndexError):
        return {}


def _remember_skipped(repo: RepoLayout, paths: list[str]) -> None:
    now = scan(repo) if paths else {}
    skipped = {p: now[p] for p in paths if p in now}
    if skipped != skipped_before(repo):  # written only when it changes: usually never
        atomic_write(repo.skipped, json.dumps(skipped, sort_keys=True).encode())


def _read_list(path: Path, repo: RepoLayout) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [_relative(repo, line) for line in lines if line.strip()]


def _relative(repo: RepoLayout, path: str) -> str:
    with contextlib.suppress(ValueError):
        return os.path.relpath(path, repo.root) if os.path.isabs(path) else path
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tail(out: str, lines: int = 5) -> str:
    return " / ".join(line.strip() for line in out.strip().splitlines()[-lines:]) or "no output"
