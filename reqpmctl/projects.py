"""``reqpmctl projects``: packages whose spec lives in git, built again whenever their
branch moves."""

from __future__ import annotations

import sys
from typing import Any

import click

from reqpmctl import output
from reqpmctl.client import Client
from reqpmctl.context import Ctx, pass_ctx
from reqpmd.builds.states import State
from reqpmd.control import protocol
from reqpmd.slots.scripts import MAX_PRIORITY

DEFAULT_SPEC = "(the one *.spec at the top level)"
RESULT_WIDTH = 60  # characters of a sync result shown in the list; show has all of it
_STATE_ORDER = {s.value: i for i, s in enumerate(State)}

_priority = click.option(
    "--priority",
    type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY),
    help="Priority of the project's builds (default 0).",
)
_chroots = click.option(
    "--chroot",
    "chroots",
    multiple=True,
    metavar="CHROOT",
    help="A mock config to build in; repeat for several (default: default_chroot).",
)


def _commit(commit: str | None) -> str:
    return output.safe(commit[:12]) if commit else "-"


def _branch(p: dict[str, Any]) -> str:
    return output.safe(p["branch"]) if p["branch"] else "(the remote's default)"


def _shorten(text: str, width: int = RESULT_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _result(p: dict[str, Any], short: bool = False) -> str:
    """How the last sync went: "ok: what it did", "FAILED: why", or "-" (never synced)."""
    if p["last_sync_at"] is None:
        return "-"
    text = str(p["last_sync_result"] or "")
    if short:
        text = _shorten(text)
    return output.safe(("ok: " if p["last_sync_ok"] else "FAILED: ") + text)


@click.group()
def projects() -> None:
    """Packages built from git: each new commit of a project's branch is built in its
    chroots (add, edit and remove are for admins; any member may look, sync or build)."""


@projects.command("add")
@click.argument("name")
@click.option("--git", "url", required=True, metavar="URL", help="The repository to fetch.")
@click.option(
    "--branch", metavar="BRANCH", help="The branch to follow (default: the remote's HEAD)."
)
@click.option(
    "--spec", metavar="PATH", help="The spec inside the repository (default: the one *.spec)."
)
@_chroots
@_priority
@pass_ctx
def projects_add(
    c: Ctx,
    name: str,
    url: str,
    branch: str | None,
    spec: str | None,
    chroots: tuple[str, ...],
    priority: int | None,
) -> None:
    """Add a project (admins). Its first sync starts at once: a URL that cannot be
    fetched is added all the same, and 'projects show NAME' says why it failed."""
    args: dict[str, Any] = {"name": name, "url": url}
    if branch is not None:
        args["branch"] = branch
    if spec is not None:
        args["spec"] = spec
    if chroots:
        args["chroots"] = list(chroots)
    if priority is not None:
        args["priority"] = priority
    with c.client() as client:
        p = client.add_project(args)
    c.emit(
        p,
        f"project {output.safe(p['name'])} added: {output.safe(p['url'])}, branch "
        f"{_branch(p)}, chroots {output.safe(', '.join(p['chroots']))}\n"
        f"its first sync is under way; 'reqpmctl projects show {output.safe(p['name'])}' "
        "shows how it went",
    )


@projects.command("edit")
@click.argument("name")
@click.option("--git", "url", metavar="URL", help="Another repository (cloned afresh).")
@click.option("--branch", metavar="BRANCH", help="Follow this branch.")
@click.option("--default-branch", is_flag=True, help="Follow the remote's HEAD again.")
@click.option("--spec", metavar="PATH", help="Build this spec inside the repository.")
@click.option("--default-spec", is_flag=True, help="Build the one *.spec at the top level.")
@click.option(
    "--chroot",
    "chroots",
    multiple=True,
    metavar="CHROOT",
    help="Build in these mock configs instead (repeat for several).",
)
@_priority
@click.option("--enable/--disable", "enabled", default=None, help="Sync periodically, or not.")
@click.option(
    "--max-concurrent",
    type=int,
    metavar="N",
    help="At most N of the cluster's slots at once for this project, on every host "
    "(0: no cap of its own).",
)
@click.option(
    "--weight",
    type=int,
    metavar="W",
    help="Its share of free slots against other waiting projects (1-100, default 1).",
)
@pass_ctx
def projects_edit(
    c: Ctx,
    name: str,
    url: str | None,
    branch: str | None,
    default_branch: bool,
    spec: str | None,
    default_spec: bool,
    chroots: tuple[str, ...],
    priority: int | None,
    enabled: bool | None,
    max_concurrent: int | None,
    weight: int | None,
) -> None:
    """Change a project (admins); it is synced at once with its new settings. Its
    --max-concurrent and --weight apply to the next grant on every host, and sync
    nothing."""
    if branch is not None and default_branch:
        raise click.UsageError("give --branch B or --default-branch, not both")
    if spec is not None and default_spec:
        raise click.UsageError("give --spec PATH or --default-spec, not both")
    changes: dict[str, Any] = {}
    if url is not None:
        changes["url"] = url
    if branch is not None or default_branch:
        changes["branch"] = branch
    if spec is not None or default_spec:
        changes["spec"] = spec
    if chroots:
        changes["chroots"] = list(chroots)
    if priority is not None:
        changes["priority"] = priority
    if enabled is not None:
        changes["enabled"] = enabled
    syncs = bool(changes)
    if max_concurrent is not None:
        changes["max_concurrent"] = max_concurrent
    if weight is not None:
        changes["weight"] = weight
    if not changes:
        raise click.UsageError(
            "nothing to change: give --git, --branch/--default-branch, --spec/--default-spec, "
            "--chroot, --priority, --enable/--disable, --max-concurrent or --weight"
        )
    with c.client() as client:
        p = client.edit_project(name, changes)
        auto_sync = _auto_sync(c, client, p)
    done = "changed; a sync is under way" if syncs else "changed"
    c.emit(p, f"project {output.safe(p['name'])} {done}\n\n" + _show(p, auto_sync))


@projects.command("remove")
@click.argument("name")
@pass_ctx
def projects_remove(c: Ctx, name: str) -> None:
    """Remove a project and its clone (admins). Its builds, and the packages they
    published, stay."""
    with c.client() as client:
        result = client.remove_project(name)
    c.emit(
        result,
        f"project {output.safe(result['removed'])} removed; its builds and published packages stay",
    )


@projects.command("list")
@pass_ctx
def projects_list(c: Ctx) -> None:
    """Every project: branch, chroots, and how its last sync went."""
    rows = c.call("projects.list")
    human = (
        output.table(
            [
                "NAME",
                "ENABLED",
                "CAP",
                "WEIGHT",
                "BRANCH",
                "CHROOTS",
                "LAST SYNC",
                "RESULT",
                "COMMIT",
            ],
            [
                [
                    output.safe(p["name"]),
                    "yes" if p["enabled"] else "no",
                    "?" if not p.get("share_known") else (p["max_concurrent"] or "-"),
                    p["weight"] if p.get("share_known") else "?",
                    output.safe(p["branch"]) if p["branch"] else "(default)",
                    output.safe(",".join(p["chroots"])),
                    output.ago(p["last_sync_at"]),
                    _result(p, short=True),
                    _commit(p["last_commit"]),
                ]
                for p in rows
            ],
        )
        if rows
        else "no projects yet: reqpmctl projects add NAME --git URL"
    )
    c.emit(rows, human)


def _auto_sync(c: Ctx, client: Client, p: dict[str, Any]) -> Any:
    """auto_sync_projects, when it explains why an enabled project has no next sync."""
    if c.json or not p["enabled"] or p["next_sync_in"] is not None:
        return None
    return client.call("settings.get", {"key": "auto_sync_projects"})


def _next_sync(p: dict[str, Any], auto_sync: Any) -> str:
    if not p["enabled"]:
        return "none: the project is disabled ('projects sync' still works)"
    if p["next_sync_in"] is None:
        if auto_sync is False:
            return "none: auto_sync_projects is off ('projects sync' still works)"
        return "not scheduled yet"
    when = output.duration(p["next_sync_in"])
    return f"in {when}" + (" (retrying with backoff)" if p["sync_error"] else "")


def _builds_table(builds: dict[str, dict[str, int]]) -> str:
    rows = [
        [output.safe(chroot), output.safe(state), build_id]
        for chroot in sorted(builds)
        for state, build_id in sorted(
            builds[chroot].items(), key=lambda kv: _STATE_ORDER.get(kv[0], len(_STATE_ORDER))
        )
    ]
    return output.table(["CHROOT", "STATE", "LAST BUILD"], rows)


def _share(p: dict[str, Any]) -> str:
    """Its cap and weight of the cluster's slots, the same on every host."""
    if not p.get("share_known"):
        return "unknown (Redis unreachable)"
    cap = p["max_concurrent"]
    return f"{'no cap' if cap is None else f'at most {cap} slot(s)'}, weight {p['weight']}"


def _show(p: dict[str, Any], auto_sync: Any = None) -> str:
    lines = [
        f"project:     {output.safe(p['name'])} ({'enabled' if p['enabled'] else 'disabled'})",
        f"url:         {output.safe(p['url'])}",
        f"branch:      {_branch(p)}",
        f"spec:        {output.safe(p['spec']) if p['spec'] else DEFAULT_SPEC}",
        f"chroots:     {output.safe(', '.join(p['chroots']))}",
        f"priority:    {p['priority']}",
        f"share:       {_share(p)}",
        f"created:     {output.ago(p['created_at'])} by {output.safe(p['created_by'])}",
    ]
    if p["last_sync_at"] is None:
        lines.append("last sync:   never")
    elif p["last_sync_ok"]:
        lines.append(f"last sync:   {output.ago(p['last_sync_at'])}, {_result(p)}")
    elif p["sync_error"] and p["sync_error"] == p["last_sync_result"]:
        lines.append(f"last sync:   {output.ago(p['last_sync_at'])}, FAILED (below)")
    else:
        lines.append(f"last sync:   {output.ago(p['last_sync_at'])}, {_result(p)}")
    lines.append(f"last commit: {output.safe(p['last_commit'] or '-')}")
    if p["sync_error"]:
        lines.append(f"sync error:  {output.safe(p['sync_error'])}")
    lines.append(f"next sync:   {_next_sync(p, auto_sync)}")
    builds = p.get("builds") or {}
    lines += ["", _builds_table(builds) if builds else "no builds yet"]
    return "\n".join(lines)


@projects.command("show")
@click.argument("name")
@pass_ctx
def projects_show(c: Ctx, name: str) -> None:
    """A project: its URL (passwords masked), branch, last sync and commit, the sync
    error if any, when it syncs next, and per chroot its last build of each state."""
    with c.client() as client:
        p = client.call("projects.show", {"name": name})
        auto_sync = _auto_sync(c, client, p)
    c.emit(p, _show(p, auto_sync))


@projects.command("sync")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait for the fetch and say what it did.")
@pass_ctx
def projects_sync(c: Ctx, name: str, wait: bool) -> None:
    """Fetch the project now and build its branch head if it moved. With --wait, exits 1
    if the sync failed."""
    with c.client() as client:
        result = client.sync_project(name, wait)
    shown = output.safe(result["name"])
    if not wait:
        c.emit(result, f"sync of project {shown} requested")
        return
    if not result["done"]:
        human = f"{shown}: the sync did not finish in time; see 'reqpmctl projects show {shown}'"
    elif result.get("ok") and result.get("builds"):
        ids = ", ".join(str(i) for i in result["builds"])
        human = f"{shown}: new commit {_commit(result['commit'])}: queued build(s) {ids}"
    elif result.get("ok"):
        human = f"{shown}: unchanged at {_commit(result['commit'])}: nothing to build"
    else:
        why = result.get("error") or "see the daemon's journal"
        human = f"{shown}: sync FAILED: {output.safe(why)}"
    c.emit(result, human)
    if not (result["done"] and result.get("ok")):
        sys.exit(protocol.EXIT_FAILED)


@projects.command("build")
@click.argument("name")
@click.option("--commit", metavar="SHA", help="Full id of the commit to build (default: the head).")
@click.option("--chroot", metavar="CHROOT", help="Only this chroot (default: the project's).")
@pass_ctx
def projects_build(c: Ctx, name: str, commit: str | None, chroot: str | None) -> None:
    """Fetch the project and build a commit now, even if nothing changed. Prints the
    ids of the builds queued, one a line."""
    with c.client() as client:
        result = client.build_project(name, commit, chroot)
    if not c.json:
        click.echo(
            f"project {output.safe(result['name'])}: commit {output.safe(result['commit'])}",
            err=True,
        )
    c.emit(result, "\n".join(str(i) for i in result["builds"]))
