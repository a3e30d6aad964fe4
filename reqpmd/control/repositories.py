"""The ``repos.*`` operations: what the repositories hold, their health, a sync now, and
a dnf stanza to use one. Reading is open to every member of the socket group; a sync
(work for the host) is for admins."""

from __future__ import annotations

import urllib.parse
from typing import Any

from reqpmd.control.submission import check_chroot
from reqpmd.errors import InvalidArgument, NotFound
from reqpmd.repos.metadata import MetadataError
from reqpmd.repos.publisher import Publisher
from reqpmd.repos.repository import Repository, package_json

SYNC_WAIT = 900.0  # seconds ``repos sync --wait`` waits for the publisher


class RepositoryOps:
    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    def _repo(self, args: dict[str, Any]) -> Repository:
        repo = self.publisher.repository(check_chroot(args.get("chroot")))
        if not repo.layout.root.is_dir():
            known = ", ".join(r.chroot for r in self.publisher.repositories()) or "none yet"
            raise NotFound(f"no repository for chroot {repo.chroot} (repositories: {known})")
        return repo

    def _describe(self, repo: Repository) -> dict[str, Any]:
        return {**repo.info(), **self.publisher.health(repo.chroot)}

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._describe(repo) for repo in self.publisher.repositories()]

    def show(self, args: dict[str, Any]) -> dict[str, Any]:
        repo = self._repo(args)
        out = self._describe(repo)
        try:
            pkgs = sorted(repo.packages(), key=lambda p: (p.name, p.href))
            out["package_list"] = [package_json(p) for p in pkgs]
        except MetadataError:
            out["package_list"] = []  # metadata_error says why
        return out

    def sync(self, args: dict[str, Any]) -> dict[str, Any]:
        chroot = args.get("chroot")
        if chroot is not None:
            chroot = self._repo(args).chroot
        wait, full = args.get("wait", False), args.get("full", False)
        if not isinstance(wait, bool) or not isinstance(full, bool):
            raise InvalidArgument("wait and full must be true or false")
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
                f"[reqpm-{host}-{repo.chroot}]",
                f"name=reqpm builds for {repo.chroot} on {host}",
                f"baseurl={url}",
                "enabled=1",
                "gpgcheck=0",
                "metadata_expire=60",
                "",
            ]
        )
        return {"chroot": repo.chroot, "baseurl": url, "text": text}
