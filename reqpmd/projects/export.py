"""A build's inputs from a commit: the spec's directory as it is at that commit.

``git archive`` of that one directory, unpacked with tarfile's ``data`` filter (members
linking out of the tree, devices and absolute paths are left out), so a repository
cannot make the daemon write, or read, outside the export. The spec's sources must be in
that directory: one that is missing is found here, before mock starts, with its name.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from reqpmd.projects.git import Git, GitError

_TAG = re.compile(
    r"^(?P<tag>Name|Version|Release|Source\d*|Patch\d*)\s*:\s*(?P<value>\S+)", re.I | re.M
)
_DEFINE = re.compile(r"^%(?:global|define)\s+(?P<name>\w+)\s+(?P<value>\S+)", re.M)
_MACRO = re.compile(r"%\{?\??(?P<name>\w+)\}?")


class ExportError(Exception):
    """The commit does not hold a buildable spec (named in the message)."""


@dataclass(frozen=True)
class SpecPath:
    directory: str  # inside the repository, "" for the top level
    name: str  # the spec file's name

    @property
    def path(self) -> str:
        return f"{self.directory}/{self.name}" if self.directory else self.name


def choose_spec(git: Git, clone: Path, commit: str, spec: str | None) -> SpecPath:
    """The spec to build: the one given, or the one ``*.spec`` at the top level."""
    if spec is not None:
        pure = PurePosixPath(spec)
        if pure.is_absolute() or ".." in pure.parts or pure.suffix != ".spec":
            raise ExportError(f"spec path {spec!r}: a relative path to a .spec file")
        directory = "" if str(pure.parent) == "." else str(pure.parent)
        try:
            present = git.files_at(clone, commit, directory)
        except GitError:
            present = []
        if pure.name not in present:
            raise ExportError(f"{spec} does not exist at commit {commit[:12]}")
        return SpecPath(directory, pure.name)
    specs = sorted(n for n in git.files_at(clone, commit) if n.endswith(".spec"))
    if not specs:
        raise ExportError(f"no *.spec at the top level of commit {commit[:12]}; give --spec")
    if len(specs) > 1:
        raise ExportError(
            f"{len(specs)} spec files at the top level ({', '.join(specs)}); choose one with --spec"
        )
    return SpecPath("", specs[0])


def export(git: Git, clone: Path, commit: str, spec: SpecPath, into: Path) -> Path:
    """Unpack the spec's directory at ``commit`` into a new directory under ``into``;
    returns it. The caller removes it."""
    out = Path(tempfile.mkdtemp(prefix="export-", dir=into))
    try:
        tar = out / ".archive.tar"
        git.archive(clone, commit, spec.directory, tar)
        with tarfile.open(tar) as archive:
            archive.extractall(out / "tree", filter=_only_safe)
        tar.unlink()
        return out / "tree"
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise


def _only_safe(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """tarfile's ``data`` filter, but a member it refuses (a symlink out of the tree, a
    device) is left out rather than failing the whole export."""
    try:
        return tarfile.data_filter(member, dest)
    except tarfile.FilterError:
        return None


def missing_sources(spec_file: Path) -> list[str]:
    """Sources and patches the spec names that are not beside it. Macros defined in the
    spec itself (Name, Version, %global, ...) are expanded; a name that still holds a
    macro cannot be judged here and is left to mock."""
    text = spec_file.read_text(errors="replace")
    macros = {m["name"]: m["value"] for m in _DEFINE.finditer(text)}
    wanted = []
    for m in _TAG.finditer(text):
        tag = m["tag"].lower()
        if tag in ("name", "version", "release"):
            macros.setdefault(tag, m["value"])
        else:
            wanted.append(m["value"])
    missing = []
    for value in wanted:
        name = _expand(value, macros).rsplit("/", 1)[-1].split("#", 1)[0]
        if "%" in name or not name:
            continue
        if not (spec_file.parent / name).is_file():
            missing.append(name)
    return missing


def _expand(value: str, macros: dict[str, str]) -> str:
    for _ in range(5):  # nested macros, a few levels deep
        value = _MACRO.sub(lambda m: macros.get(m["name"], m[0]), value)
    return value
