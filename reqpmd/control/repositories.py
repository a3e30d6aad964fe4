"""The ``repos.*`` operations: what the repositories hold, their health, a sync now, and
a dnf stanza to use one. Reading is open to every member of the socket group; a sync
(work for the host) is for admins."""

from __future__ import annotations

import re
import threading
import urllib.parse
from typing import Any

from reqpmd.checks import int_in_range
from reqpmd.control.args import bool_arg
from reqpmd.control.submission import check_chroot
from reqpmd.errors import NotFound
from reqpmd.repos.metadata import MetadataError, Package
from reqpmd.repos.publisher import Publisher
from reqpmd.repos.repository import Repository, package_json

SYNC_WAIT = 900.0  # seconds ``repos sync --wait`` waits for the publisher
SHOW_PAGE = 2000  # packages per repos.show reply (about 350 KB of JSON)


def repo_id(host: str, chroot: str) -> str:
    """A repository id dnf accepts (A-Z a-z 0-9 _ . : -): mock config names may hold '+'."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", f"reqpm-{host}-{chroot}")


class RepositoryOps:
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[int | None, list[Package]]] = {}

    def _repo(self, args: dict[str, Any]) -> Repository:
        repo = self.publisher.repository(check_chroot(args.get("chroot")))
        if not repo.layout.root.is_dir():
            known = ", ".join(r.chroot for r in self.publisher.repositories()) or "none yet"
            raise NotFound(f"no repository for chroot {repo.chroot} (repositories: {known})")
        return repo

    def _packages(self, repo: Repository) -> list[Package]:
        """The repository's packages, parsed again only when repomd.xml changed: users may
        list and show as often as they like without making the daemon re-read it."""
        try:
            stamp = repo.layout.repomd.stat().st_mtime_ns
        except OSError:
            stamp = None
        with self._lock:
            cached = self._cache.get(repo.chroot)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        pkgs = sorted(repo.packages(), key=lambda p: (p.name, p.href))
        with self._lock:
            self._cache[repo.chroot] = (stamp, pkgs)
        return pkgs

    def _describe(self, repo: Repository) -> tuple[dict[str, Any], list[Package]]:
        try:
            pkgs: list[Package] | None = self._packages(repo)
        except MetadataError:
            pkgs = None  # info() says why
        return {**repo.info(pkgs), **self.publisher.health(repo.chroot)}, pkgs or []

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._describe(repo)[0] for repo in self.publisher.repositories()]

    def show(self, args: dict[str, Any]) -> dict[str, Any]:
        """The repository, and a page of its packages (``offset``, ``limit``): a large
        repository's list does not fit one reply line."""
        repo = self._repo(args)
        offset = int_in_range("offset", args.get("offset", 0), 0, 10**9)
        limit = int_in_range("limit", args.get("limit", SHOW_PAGE), 1, SHOW_PAGE)
        out, pkgs = self._describe(repo)
        out["package_list"] = [package_json(p) for p in pkgs[offset : offset + limit]]
        out["offset"] = offset
        out["next"] = offset + limit if offset + limit < len(pkgs) else None
        return out

    def sync(self, args: dict[str, Any]) -> dict[str, Any]:
        chroot = args.get("chroot")
        if chroot is not None:
            chroot = self._repo(args).chroot
        wait, full = bool_arg(args, "wait"), bool_arg(args, "full")
        request = self.publisher.request_sync(chroot, full)
        if not wait:
            return {"requested": chroot or "all", "done": False, "results": {}}
        done = request.done.wait(SYNC_WAIT)
        return {"requested": chroot or "all", "done": done, "results": dict(request.results)}

    def dnf_config(self, args: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(args)
        host = self.publisher.host
        url = "file://" + urllib.parse.quote(str(repo.layout.root))
        text = "\n".join(
            [
                f"[{repo_id(host, repo.chroot)}]",
                f"name=reqpm builds for {repo.chroot} on {host}",
                f"baseurl={url}",
                "enabled=1",
                "gpgcheck=0",
                "metadata_expire=60",
                "",
            ]
        )
        return {"chroot": repo.chroot, "baseurl": url, "text": text}
