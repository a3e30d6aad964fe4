"""Reading a repository's metadata as a client would: repomd.xml, the files it names
and their checksums, and the packages primary.xml lists.

Used to check a repository (the sync), to list it (``repos show``) and to know which
metadata files a swap may delete. Plain ElementTree: the daemon needs no binding to
read what createrepo_c wrote, and a broken file is an error to report, not a crash.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from reqpmd.repos.layout import RepoLayout

_REPO = "{http://linux.duke.edu/metadata/repo}"
_COMMON = "{http://linux.duke.edu/metadata/common}"
_RPM = "{http://linux.duke.edu/metadata/rpm}"
_OPENERS: dict[str, Callable[[Path, str], IO[bytes]]] = {
    ".gz": gzip.open,  # type: ignore[dict-item]
    ".xz": lzma.open,  # type: ignore[dict-item]
    ".bz2": bz2.open,  # type: ignore[dict-item]
}


class MetadataError(Exception):
    """The repository's metadata is missing, unreadable or does not match its files."""


@dataclass(frozen=True)
class DataFile:
    kind: str  # primary, filelists, other, ...
    href: str  # relative to the repository root
    checksum_type: str
    checksum: str


@dataclass(frozen=True)
class Package:
    name: str
    epoch: str
    version: str
    release: str
    arch: str
    href: str
    size: int
    mtime: int  # of the file, as createrepo_c saw it (--update compares size and mtime)
    sourcerpm: str = ""  # the source RPM it was built from (name-version-release.src.rpm)

    @property
    def nvr(self) -> str:
        return f"{self.name}-{self.version}-{self.release}"


def data_files(repomd: Path) -> list[DataFile]:
    """The metadata files a repomd.xml names; MetadataError if it cannot be read."""
    try:
        root = ET.parse(repomd).getroot()
    except FileNotFoundError:
        raise MetadataError(f"{repomd} is missing") from None
    except (OSError, ET.ParseError) as exc:
        raise MetadataError(f"{repomd} cannot be read: {exc}") from None
    found = []
    for data in root.iter(f"{_REPO}data"):
        location = data.find(f"{_REPO}location")
        checksum = data.find(f"{_REPO}checksum")
        href = location.get("href") if location is not None else None
        if not href or checksum is None or not checksum.text:
            raise MetadataError(f"{repomd}: a <data> entry lacks its location or checksum")
        found.append(
            DataFile(
                kind=data.get("type", "?"),
                href=href,
                checksum_type=checksum.get("type", "sha256"),
                checksum=checksum.text.strip(),
            )
        )
    if not any(d.kind == "primary" for d in found):
        raise MetadataError(f"{repomd} names no primary metadata")
    return found


def verify(repo: RepoLayout) -> None:
    """Check every file repomd.xml names exists inside the repository and has the
    checksum it claims; raise MetadataError saying what is wrong."""
    for data in data_files(repo.repomd):
        path = _inside(repo, data.href)
        try:
            digest = hashlib.new(data.checksum_type)
        except ValueError:
            raise MetadataError(
                f"{data.href}: unknown checksum type {data.checksum_type}"
            ) from None
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1024 * 1024):
                    digest.update(chunk)
        except OSError as exc:
            raise MetadataError(f"{data.href} named by repomd.xml: {exc.strerror}") from None
        if digest.hexdigest() != data.checksum:
            raise MetadataError(f"{data.href} does not match the checksum in repomd.xml")


def packages(repo: RepoLayout) -> list[Package]:
    """The packages the repository's primary metadata lists."""
    primary = next(d for d in data_files(repo.repomd) if d.kind == "primary")
    path = _inside(repo, primary.href)
    try:
        with _open(path) as f:
            return list(_parse_primary(f))
    except (OSError, EOFError, lzma.LZMAError, ET.ParseError) as exc:
        raise MetadataError(f"{primary.href} cannot be read: {exc}") from None


def _parse_primary(f: IO[bytes]) -> Iterator[Package]:
    for _, elem in ET.iterparse(f):
        if elem.tag != f"{_COMMON}package":
            continue
        version = elem.find(f"{_COMMON}version")
        location = elem.find(f"{_COMMON}location")
        size = elem.find(f"{_COMMON}size")
        times = elem.find(f"{_COMMON}time")
        yield Package(
            name=elem.findtext(f"{_COMMON}name", ""),
            epoch=version.get("epoch", "0") if version is not None else "0",
            version=version.get("ver", "") if version is not None else "",
            release=version.get("rel", "") if version is not None else "",
            arch=elem.findtext(f"{_COMMON}arch", ""),
            href=location.get("href", "") if location is not None else "",
            size=int(size.get("package", "0")) if size is not None else 0,
            mtime=int(times.get("file", "0")) if times is not None else 0,
            sourcerpm=elem.findtext(f"{_COMMON}format/{_RPM}sourcerpm", ""),
        )
        elem.clear()


def _open(path: Path) -> IO[bytes]:
    opener = _OPENERS.get(path.suffix)
    if opener is None:
        if path.suffix == ".xml":
            return open(path, "rb")
        raise MetadataError(f"{path.name}: compression this daemon cannot read")
    return opener(path, "rb")


def _inside(repo: RepoLayout, href: str) -> Path:
    """A path repomd.xml names, refused if it leads out of the repository."""
    path = (repo.root / href).resolve()
    if not path.is_relative_to(repo.root.resolve()):
        raise MetadataError(f"repomd.xml names a file outside the repository: {href}")
    return path
