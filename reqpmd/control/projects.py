"""The ``projects.*`` operations. Adding, editing and removing a project is for admins
(it makes the daemon fetch a URL of their choosing); any member may look, sync now, or
build now.

A project's share of the cluster's slots (``max_concurrent``, ``weight``) lives in Redis
with the cluster limit, not in this host's database, so every host enforces the same one;
it belongs to the name, as a project's builds are grouped by name on every host."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from reqpmd.checks import int_in_range
from reqpmd.config.schema import Settings
from reqpmd.control.args import bool_arg
from reqpmd.control.submission import check_chroot
from reqpmd.errors import AlreadyExists, InvalidArgument, RedisUnavailable
from reqpmd.projects import git
from reqpmd.projects.export import ExportError
from reqpmd.projects.git import GitError
from reqpmd.projects.registry import EDITABLE, NAME_DOC, NAME_RE, Project, Projects
from reqpmd.projects.syncer import ProjectSyncer
from reqpmd.quoting import shown
from reqpmd.slots.limiter import BuildConcurrencyLimiter, Share, ShareChange
from reqpmd.slots.scripts import LIMIT_MAX, MAX_PRIORITY, WEIGHT_MAX

SYNC_WAIT = 600.0  # seconds ``projects sync --wait`` waits for the fetch
MAX_CHROOTS = 32
SHARE_FIELDS = ("max_concurrent", "weight")


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(f"project name {shown(name)} is not allowed: {NAME_DOC}")
    return name


class ProjectOps:
    def __init__(
        self,
        projects: Projects,
        syncer: ProjectSyncer,
        settings: Callable[[], Settings],
        limiter: BuildConcurrencyLimiter,
    ) -> None:
        self.projects = projects
        self.syncer = syncer
        self.settings = settings
        self.limiter = limiter

    @staticmethod
    def _share_change(args: dict[str, Any]) -> ShareChange | None:
        """The change of share ``args`` ask for (None: they name none), checked; what they
        leave out stays as it is, applied in one step in Redis."""
        if not any(f in args for f in SHARE_FIELDS):
            return None
        cap = weight = None
        if "max_concurrent" in args:
            try:
                cap = int_in_range("max_concurrent", args["max_concurrent"], 0, LIMIT_MAX)
            except InvalidArgument as exc:
                raise InvalidArgument(f"{exc} (0: no cap of its own)") from None
        if "weight" in args:
            weight = int_in_range("weight", args["weight"], 1, WEIGHT_MAX)
        return ShareChange(cap, weight)

    def _checked(self, args: dict[str, Any], defaults: Settings | None) -> dict[str, Any]:
        """The editable fields present in ``args``, validated; with ``defaults``, every
        field (a new project)."""
        out: dict[str, Any] = {}
        try:
            if "url" in args or defaults is not None:
                out["url"] = git.check_url(args.get("url"))
            if args.get("branch") is not None:
                out["branch"] = git.check_branch(args["branch"])
            elif "branch" in args or defaults is not None:
                out["branch"] = None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if args.get("spec") is not None:
            spec = args["spec"]
            if (
                not isinstance(spec, str)
                or not spec.endswith(".spec")
                or spec.startswith(("/", "-"))
                or ".." in spec.split("/")
            ):
                raise InvalidArgument(f"spec {shown(spec)}: a relative path to a .spec file")
            out["spec"] = spec
        elif "spec" in args or defaults is not None:
            out["spec"] = None
        if args.get("chroots"):
            chroots = args["chroots"]
            if not isinstance(chroots, list) or len(chroots) > MAX_CHROOTS:
                raise InvalidArgument(f"chroots: a list of at most {MAX_CHROOTS} mock configs")
            out["chroots"] = tuple(dict.fromkeys(check_chroot(c) for c in chroots))
        elif defaults is not None:
            out["chroots"] = (defaults.default_chroot,)
        if "priority" in args or defaults is not None:
            out["priority"] = int_in_range(
                "priority", args.get("priority", 0), -MAX_PRIORITY, MAX_PRIORITY
            )
        if "enabled" in args:
            out["enabled"] = bool_arg(args, "enabled")
        return out

    def add(self, args: dict[str, Any], who: str) -> dict[str, Any]:
        """Fetch first: a branch, a spec path that does not exist, or two specs and no
        --spec are refused, and nothing is added. A fetch that fails (the host may be down
        for now) is added anyway, with its first sync failed and why."""
        name = check_name(args.get("name"))
        fields = self._checked(args, self.settings())
        if any(p.name == name for p in self.projects.all()):
            raise AlreadyExists(f"a project named {name} exists already")
        fetch_error = self._probe(name, fields["url"], fields["branch"], fields["spec"])
        self.projects.add(
            Project(
                name=name,
                enabled=fields.pop("enabled", True),
                created_at=time.time(),
                created_by=who,
                **fields,
            )
        )
        if fetch_error is not None:
            self.projects.synced(name, ok=False, result=f"first sync failed: {fetch_error}")
        self.syncer.request_sync(name)  # the first build; its result shows in projects show
        return self.show({"name": name})

    def _probe(self, name: str, url: str, branch: str | None, spec: str | None) -> str | None:
        try:
            return self.syncer.probe(name, url, branch, spec)
        except (GitError, ExportError) as exc:
            raise InvalidArgument(f"project {name}: {exc}; nothing was changed") from None

    def edit(self, args: dict[str, Any]) -> dict[str, Any]:
        name = check_name(args.get("name"))
        before = self.projects.get(name)  # not found: exit 4, before anything is checked
        fields = self._checked({k: v for k, v in args.items() if k in EDITABLE}, None)
        share = self._share_change(args)
        if not fields and share is None:
            editable = ", ".join((*EDITABLE, *SHARE_FIELDS))
            raise InvalidArgument(f"nothing to change; editable: {editable}")
        if {"url", "branch", "spec"} & set(fields):  # what decides where the spec comes from
            after = {k: fields.get(k, getattr(before, k)) for k in ("url", "branch", "spec")}
            self._probe(name, after["url"], after["branch"], after["spec"])
        if share is not None:  # first: Redis is the part that may be unreachable
            self.limiter.set_share(name, share)
        if fields:
            self.projects.edit(name, **fields)
            self.syncer.request_sync(name)
        return self.show({"name": name})

    def remove(self, args: dict[str, Any]) -> dict[str, Any]:
        name = check_name(args.get("name"))
        self.projects.remove(name)
        self.syncer.forget_clone(name)
        return {"removed": name}

    def list(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        shares = self._shares()
        return [self._json(p, shares) for p in self.projects.all()]

    def show(self, args: dict[str, Any]) -> dict[str, Any]:
        project = self.projects.get(check_name(args.get("name")))
        out = self._json(project, self._shares())
        out["builds"] = self.projects.last_builds(project.name)
        return out

    def _shares(self) -> dict[str, Share] | None:
        """Every share in Redis; None when Redis cannot be read (then shown as unknown)."""
        try:
            return self.limiter.shares()
        except RedisUnavailable:
            return None

    def _json(self, p: Project, shares: dict[str, Share] | None) -> dict[str, Any]:
        health = self.syncer.health(p.name)
        share = None if shares is None else shares.get(p.name, Share())
        return {
            "name": p.name,
            "url": git.shown_url(p.url),
            "branch": p.branch,
            "spec": p.spec,
            "chroots": list(p.chroots),
            "priority": p.priority,
            # None (with share_known false): Redis could not be read
            "max_concurrent": share.max_concurrent if share else None,
            "weight": share.weight if share else None,
            "share_known": share is not None,
            "enabled": p.enabled,
            "created_at": p.created_at,
            "created_by": p.created_by,
            "last_sync_at": p.last_sync_at,
            "last_sync_ok": p.last_sync_ok,
            "last_sync_result": p.last_sync_result,
            "last_commit": p.last_commit,
            "sync_error": health["error"],
            "next_sync_in": health["next_sync_in"]
            if self.settings().auto_sync_projects and p.enabled
            else None,
        }

    def sync(self, args: dict[str, Any]) -> dict[str, Any]:
        name = check_name(args.get("name"))
        self.projects.get(name)
        wait = bool_arg(args, "wait")
        request = self.syncer.request_sync(name)
        if not wait:
            return {"name": name, "requested": True, "done": False}
        done = request.done.wait(SYNC_WAIT)
        return {"name": name, "requested": True, "done": done, **request.result}

    def build(self, args: dict[str, Any], who: str) -> dict[str, Any]:
        name = check_name(args.get("name"))
        project = self.projects.get(name)
        commit = args.get("commit")
        chroot = args.get("chroot")
        try:
            if commit is not None:
                commit = git.check_commit(commit)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if chroot is not None:
            chroot = check_chroot(chroot)
        try:
            return {"name": project.name, **self.syncer.build_now(name, commit, chroot, who)}
        except (GitError, ExportError) as exc:
            raise InvalidArgument(f"project {name}: {exc}") from None
