"""reqpmctl: drive reqpmd over its control socket.

\b
Exit codes:
  0  ok
  1  failed (the operation, or the build with --wait, did not succeed)
  2  usage error or invalid value
  3  permission denied (the operation needs the admin role)
  4  not found (no such build, slot or setting)
  5  daemon unreachable (is reqpmd running? socket path? group membership?)

\b
Shell completion (click's): add to your shell's start-up file
  bash: eval "$(_REQPMCTL_COMPLETE=bash_source reqpmctl)"
  zsh:  eval "$(_REQPMCTL_COMPLETE=zsh_source reqpmctl)"
  fish: _REQPMCTL_COMPLETE=fish_source reqpmctl | source
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from reqpmctl import output
from reqpmctl.client import Client, ClientError, ResultExists, default_socket
from reqpmctl.context import Ctx, Group, pass_ctx
from reqpmd import __version__
from reqpmd.builds.states import State
from reqpmd.control import protocol
from reqpmd.slots.keys import MAX_PRIORITY


@click.group(cls=Group, help=__doc__, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    default=default_socket,
    show_default="$REQPM_SOCKET or /run/reqpm/reqpmd.sock",
    help="reqpmd's control socket.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.version_option(__version__, prog_name="reqpmctl")
@click.pass_context
def main(ctx: click.Context, socket_path: str, as_json: bool) -> None:
    ctx.obj = Ctx(socket_path, as_json)


# -- status ------------------------------------------------------------------------------


_all_rows = click.option(
    "--all", "all_rows", is_flag=True, help="List every waiting build, not the first 50."
)


@main.command()
@_all_rows
@pass_ctx
def status(c: Ctx, all_rows: bool) -> None:
    """Cluster-wide slots, this host's queue, gates and Redis."""
    st = c.call("status", {"all": all_rows})
    lines = [output.safe(st["summary"]), ""]
    busy = st["active_count"] if st["active_count"] is not None else "?"
    lines.append(
        f"slots:   {busy}/{st['max_concurrent']} busy cluster-wide "
        f"(max_concurrent_builds={st['max_concurrent']})"
    )
    lines.append(
        f"here:    {st['building_here']} building, {st['waiting_here']} waiting for a "
        f"slot, {st['queued']} queued  (host {st['host_id']})"
    )
    if st.get("cluster_limit_invalid") is not None:
        lines.append(
            f"limit:   {st['cluster_limit_invalid']!r} found in Redis is not a valid "
            f"max_concurrent_builds: ignored, each host obeys its own "
            f"('reqpmctl settings set max_concurrent_builds=N' sets one)"
        )
    redis = st["redis"]
    lines.append(
        f"redis:   {'ok' if redis['ok'] else 'DOWN: ' + output.safe(redis['detail'])}  "
        f"({output.safe(redis['url'])})"
    )
    if redis.get("master"):
        lines.append(f"master:  {output.safe(redis['master'])} (from the Sentinels)")
    if redis.get("server_changed_at"):
        lines.append(
            f"failover: another Redis server answered {output.ago(redis['server_changed_at'])}"
            f" ({redis['server_changes']} change(s) since reqpmd started)"
        )
    if redis.get("repaired"):
        lines.append(f"repaired: {output.safe(redis['repaired'])}")
    if st.get("restart_grace"):
        lines.append(f"grace:   {st['restart_grace']}")
    pub = st.get("publish")
    if pub:
        lines.append(
            f"publish: {pub['published']} published, {pub['pending']} pending, "
            f"{pub['failed']} failed  (into {output.safe(pub['repo_dir'])})"
        )
        for chroot, problem in sorted(pub["failing_repos"].items()):
            lines.append(f"repo:    {output.safe(chroot)} FAILING: {output.safe(problem['error'])}")
    auto = st.get("auto_scale")
    if auto:
        lines.append(f"scale:   auto_scale cap {auto['cap']} ({output.safe(auto['why'])})")
    cl = st.get("cleanup")
    if cl and cl.get("last_at"):
        lines.append(
            f"cleanup: {output.ago(cl['last_at'])}: {cl['last_cleaned']} build(s), "
            f"{cl['last_bytes'] // (1024 * 1024)} MB freed, "
            f"{cl['last_roots_scrubbed']} orphaned root(s) scrubbed"
        )
    if cl and cl.get("shortage"):
        lines.append(f"disk:    {output.safe(cl['shortage'])}")
    for g in st["gates"]:
        lines.append(f"gate:    {g['name']}: {'open' if g['open'] else 'CLOSED'} ({g['detail']})")
    if st.get("groups"):
        lines += ["", _groups_table(st["groups"])]
    if st["active_builds"]:
        lines += ["", _slots_table(st["active_builds"])]
    if st["waiting"]:
        lines += ["", _waiting_table(st["waiting"], st.get("waiting_total"))]
    c.emit(st, "\n".join(lines))


def _groups_table(groups: list[dict[str, Any]]) -> str:
    """The share of each project (or ~user, for builds without one) of the cluster."""
    return output.table(
        ["PROJECT", "HOLDING", "CAP", "WEIGHT", "WAITING"],
        [
            [
                output.safe(g["group"]),
                g["holders"],
                "-" if g["max_concurrent"] is None else g["max_concurrent"],
                g["weight"],
                g["waiting"],
            ]
            for g in groups
        ],
    )


def _slots_table(holders: list[dict[str, Any]]) -> str:
    return output.table(
        ["SLOT", "PROJECT", "HOST", "BUILD", "AGE", "LEASE LEFT", "TOKEN"],
        [
            [
                output.safe(h["name"]),
                output.safe(h.get("group")),
                output.safe(h["host"]),
                output.safe(h.get("build")),
                output.duration(h["age"]),
                output.duration(h["lease_left"]),
                h["token"],
            ]
            for h in holders
        ],
    )


def _waiting_table(waiting: list[dict[str, Any]], total: int | None = None) -> str:
    """The waiters listed, and how many more there are (``--all`` lists them)."""
    more = (total or 0) - len(waiting)
    return output.table(
        ["#", "WAITING", "PROJECT", "HOST", "BUILD", "PRIORITY", "SINCE"],
        [
            [
                w["position"],
                output.safe(w["name"]),
                output.safe(w.get("group")),
                output.safe(w["host"]),
                output.safe(w.get("build")),
                w["priority"],
                output.ago(w["enqueued_at"]),
            ]
            for w in waiting
        ],
    ) + (f"\n... and {more} more waiting (--all lists every one)" if more > 0 else "")


# -- settings ------------------------------------------------------------------------------


@main.group()
def settings() -> None:
    """Show and change settings (changes apply at once and are audited)."""


@settings.command("show")
@pass_ctx
def settings_show(c: Ctx) -> None:
    values = c.call("settings.show")
    c.emit(values, output.table(["KEY", "VALUE"], sorted(values.items())))


@settings.command("get")
@click.argument("key")
@pass_ctx
def settings_get(c: Ctx, key: str) -> None:
    value = c.call("settings.get", {"key": key})
    c.emit({key: value}, str(value))


@settings.command("set")
@click.argument("pairs", nargs=-1, required=True, metavar="KEY=VALUE...")
@pass_ctx
def settings_set(c: Ctx, pairs: tuple[str, ...]) -> None:
    """Validate every pair, then apply all of them or none."""
    from reqpmd.config.parse import parse_assignment  # yaml: only here
    from reqpmd.config.schema import SettingsInvalid

    changes: dict[str, Any] = {}
    for pair in pairs:
        try:
            key, value = parse_assignment(pair)
        except SettingsInvalid as exc:
            raise click.UsageError(str(exc)) from None
        changes[key] = value
    result = c.call("settings.set", {"changes": changes})
    lines = [f"{k}: {old} -> {new}" for k, (old, new) in result["changed"].items()]
    if not lines:
        lines = ["nothing changed"]
    if result["restart_required"]:
        lines.append(f"takes effect at the next restart: {', '.join(result['restart_required'])}")
    c.emit(result, "\n".join(lines))


@settings.command("edit")
@pass_ctx
def settings_edit(c: Ctx) -> None:
    """Edit the config in $EDITOR; a file with errors is reopened, like visudo."""
    current = c.call("settings.file")
    text = current["text"]
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory(prefix="reqpmctl-") as tmp:
        path = Path(tmp) / "reqpmd.yaml"
        path.write_text(text)
        while True:
            if subprocess.call([*editor.split(), str(path)]) != 0:
                raise click.ClickException(f"{editor} failed; nothing changed")
            new = path.read_text()
            if new == text:
                click.echo("no changes", err=True)
                return
            try:
                result = c.call("settings.replace", {"text": new})
            except ClientError as exc:
                if exc.code != "invalid" or not sys.stdin.isatty():
                    raise
                click.echo(f"reqpmctl: {exc.message}", err=True)
                if not click.confirm("Edit again?", default=True, err=True):
                    click.echo("nothing changed", err=True)
                    sys.exit(protocol.EXIT_USAGE)
                continue
            break
    lines = [f"{k}: {old} -> {new}" for k, (old, new) in result["changed"].items()]
    c.emit(result, "\n".join(lines) or "nothing changed")


@settings.command("history")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@pass_ctx
def settings_history(c: Ctx, limit: int) -> None:
    rows = c.call("settings.history", {"limit": limit})
    c.emit(
        rows,
        output.table(
            ["WHEN", "WHO", "UID", "KEY", "OLD", "NEW"],
            [
                [output.ago(r["at"]), r["user"], r["uid"], r["key"], r["old"], r["new"]]
                for r in rows
            ],
        ),
    )


# -- slots ----------------------------------------------------------------------------------


@main.group()
def slots() -> None:
    """Cluster-wide build slots: list, and free stuck ones (admin)."""


@slots.command("list")
@_all_rows
@pass_ctx
def slots_list(c: Ctx, all_rows: bool) -> None:
    """Holders, waiters (the first 50 in queue order) and each project's share."""
    listing = c.call("slots.list", {"all": all_rows})
    parts = [f"{len(listing['holders'])}/{listing['max_concurrent']} slots busy"]
    if listing.get("groups"):
        parts.append(_groups_table(listing["groups"]))
    if listing["holders"]:
        parts.append(_slots_table(listing["holders"]))
    if listing["waiting"]:
        parts.append(_waiting_table(listing["waiting"], listing.get("waiting_total")))
    c.emit(listing, "\n\n".join(parts))


@slots.command("release")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def slots_release(c: Ctx, names: tuple[str, ...]) -> None:
    """Free slots by name, whoever holds them; the holder learns at its next renewal."""
    result = c.call("slots.release", {"names": list(names)})
    lines = [f"released {n}" for n in result["released"]]
    lines += [f"no slot named {n}" for n in result["missing"]]
    c.emit(result, "\n".join(lines))
    if result["missing"]:
        sys.exit(protocol.EXIT_NOT_FOUND)


@slots.command("clear")
@click.option("--yes", is_flag=True, help="Really free every slot of the cluster.")
@pass_ctx
def slots_clear(c: Ctx, yes: bool) -> None:
    """Free every slot (a last resort; running builds are told at their next renewal)."""
    if not yes:
        raise click.UsageError("slots clear frees every slot of the cluster; add --yes")
    result = c.call("slots.clear", {"yes": True})
    c.emit(result, f"cleared {result['cleared']} slot(s)")


@slots.command("end-grace")
@click.option("--yes", is_flag=True, help="Really grant slots now.")
@pass_ctx
def slots_end_grace(c: Ctx, yes: bool) -> None:
    """End a Redis restart grace now (only if no build from before can still run).

    After Redis restarts empty, or on a new Redis, no slot is granted for one lease so
    that running builds can re-register theirs; this grants the free slots at once.
    """
    if not yes:
        raise click.UsageError(
            "ending the grace may admit more builds than the limit if a build from before "
            "the restart still runs; add --yes"
        )
    result = c.call("slots.end_grace", {"yes": True})
    c.emit(
        result,
        "restart grace ended; slots are granted again"
        if result["ended"]
        else "no restart grace was in force",
    )


# -- builds -----------------------------------------------------------------------------------


@main.command()
@click.argument(
    "srpm", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("--spec", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--sources", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--chroot", help="mock config (default: the daemon's default_chroot).")
@click.option(
    "--priority", default=0, show_default=True, type=click.IntRange(-MAX_PRIORITY, MAX_PRIORITY)
)
@click.option("--wait", is_flag=True, help="Follow the build; exit 1 unless it succeeds.")
@click.option(
    "--no-publish",
    "no_publish",
    is_flag=True,
    help="Keep the build out of the repository (it is published by default).",
)
@pass_ctx
def submit(
    c: Ctx,
    srpm: Path | None,
    spec: Path | None,
    sources: Path | None,
    chroot: str | None,
    priority: int,
    wait: bool,
    no_publish: bool,
) -> None:
    """Queue a build of SRPM, or of --spec FILE with --sources DIR."""
    if (srpm is None) == (spec is None):
        raise click.UsageError("give either an SRPM or --spec FILE --sources DIR")
    if spec is not None and sources is None:
        raise click.UsageError("--spec needs --sources DIR")
    if srpm is not None and sources is not None:
        raise click.UsageError("--sources goes with --spec, not with an SRPM")
    with c.client() as client:
        build_id = client.submit(
            srpm=srpm,
            spec=spec,
            sources=sources,
            chroot=chroot,
            priority=priority,
            publish=not no_publish,
        )
    if not wait:
        c.emit({"id": build_id}, str(build_id))
        return
    if not c.json:
        click.echo(f"build {build_id} submitted", err=True)
    build = _follow(c, build_id, show_log=not c.json)
    c.emit(
        build,
        f"build {build_id}: {build['state']}"
        + (f" ({build['error']})" if build.get("error") else ""),
    )
    sys.exit(protocol.EXIT_OK if build["state"] == "succeeded" else protocol.EXIT_FAILED)


def _log_chunk(client: Client, build_id: int, offset: int) -> tuple[bytes, dict[str, Any]]:
    """The next bytes of a build log, exactly as mock wrote them, and the reply."""
    chunk = client.call("build.log", {"id": build_id, "offset": offset})
    return base64.b64decode(chunk["data_b64"]), chunk


def _follow(c: Ctx, build_id: int, show_log: bool) -> dict[str, Any]:
    """Stream the build log as mock writes it; return the build once it has ended.

    A connection per poll while idle: a follower must not hold one of its user's few
    connections for the hours a build may take."""
    offset = 0
    while True:
        with c.client() as client:
            while True:
                data, chunk = _log_chunk(client, build_id, offset)
                if show_log and data:
                    click.echo(data, nl=False)  # bytes: written as they are
                offset = chunk["offset"]
                if chunk["done"]:
                    return dict(client.call("build.show", {"id": build_id}))
                if not data:
                    break
        time.sleep(0.3)


@main.group()
def builds() -> None:
    """List, show, cancel, retry builds, read their logs and fetch their results."""


def _builds_table(rows: list[dict[str, Any]], colour: bool) -> str:
    return output.table(
        ["ID", "STATE", "CHROOT", "SOURCE", "PRIO", "BY", "SUBMITTED", "TOOK"],
        [
            [
                b["id"],
                output.colour_state(b["state"], colour),
                b["chroot"],
                b["source"],
                b["priority"],
                b["submitted_name"] or b["submitted_by"],
                output.ago(b["submitted_at"]),
                output.duration(b["finished_at"] - b["started_at"])
                if b["finished_at"] and b["started_at"]
                else "-",
            ]
            for b in rows
        ],
    )


@builds.command("list")
@click.option("--state", type=click.Choice([s.value for s in State]))
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10000))
@pass_ctx
def builds_list(c: Ctx, state: str | None, limit: int) -> None:
    args: dict[str, Any] = {"limit": limit}
    if state:
        args["state"] = state
    rows = c.call("build.list", args)
    c.emit(rows, _builds_table(rows, c.colour))


@builds.command("show")
@click.argument("build_id", type=int, metavar="ID")
@pass_ctx
def builds_show(c: Ctx, build_id: int) -> None:
    b = c.call("build.show", {"id": build_id})
    human = "\n".join(
        f"{k + ':':<15}{output.colour_state(str(v), c.colour) if k == 'state' else v}"
        for k, v in b.items()
    )
    if b.get("cleaned_at"):
        human += (
            f"\nfiles:         cleaned up {output.ago(b['cleaned_at'])} "
            "(cleanup_builds_after_days): this is its history record"
        )
    c.emit(b, human)


@builds.command("cancel")
@click.argument("build_id", type=int, metavar="ID")
@pass_ctx
def builds_cancel(c: Ctx, build_id: int) -> None:
    b = c.call("build.cancel", {"id": build_id})
    c.emit(b, f"build {build_id}: cancel requested (was {b['state']})")


@builds.command("retry")
@click.argument("build_id", type=int, metavar="ID")
@pass_ctx
def builds_retry(c: Ctx, build_id: int) -> None:
    b = c.call("build.retry", {"id": build_id})
    c.emit(b, f"build {build_id}: queued again")


@builds.command("log")
@click.argument("build_id", type=int, metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Stream as mock writes; end with the build.")
@pass_ctx
def builds_log(c: Ctx, build_id: int, follow: bool) -> None:
    if follow:
        _follow(c, build_id, show_log=True)
        return
    offset, parts = 0, []
    with c.client() as client:
        while True:
            data, chunk = _log_chunk(client, build_id, offset)
            parts.append(data)
            if not data:
                break
            offset = chunk["offset"]
    log = b"".join(parts)
    if c.json:
        click.echo(output.dump_json({"id": build_id, "log": log.decode(errors="replace")}))
    else:
        click.echo(log, nl=False)  # byte-exact


@builds.command("results")
@click.argument("build_id", type=int, metavar="ID")
@pass_ctx
def builds_results(c: Ctx, build_id: int) -> None:
    """List a build's result files with their SHA-256.

    Result files are the packages and mock's logs; a build still running lists what it
    has written so far. --json gives the list."""
    with c.client() as client:
        listing = client.results(build_id)
    files = listing["files"]
    human = (
        output.table(
            ["NAME", "SIZE", "SHA256"],
            [[output.safe(f["name"]), f["size"], output.safe(f["sha256"])] for f in files],
        )
        if files
        else f"build {build_id} ({listing['state']}) has no result files"
    )
    c.emit(files, human)


@builds.command("fetch")
@click.argument("build_id", type=int, metavar="ID")
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default="the current directory",
    metavar="DIR",
    help="Where to write the files (made if missing).",
)
@click.option(
    "--rpms-only", is_flag=True, help="Only the packages (binary and source), not the logs."
)
@click.option("--force", is_flag=True, help="Overwrite files of the same names in DIR.")
@pass_ctx
def builds_fetch(c: Ctx, build_id: int, dest: Path, rpms_only: bool, force: bool) -> None:
    """Copy a finished build's result files into DIR.

    Prints one line per file written (--json: the list). Each file is checked against
    the SHA-256 the daemon lists, and the files take their names only once all have
    arrived intact: an interrupted fetch leaves none half written (only, after a kill
    -9, a .reqpmctl-fetch-* directory).

    \b
    Exit codes:
      1  a file of that name is already in DIR (it is named; nothing is written;
         --force overwrites it), or a file arrived corrupt
      2  the build has not ended yet
      4  there is no such build
    """
    try:
        with c.client() as client:
            files = client.fetch(build_id, dest, rpms_only=rpms_only, force=force)
    except ResultExists as exc:
        raise ClientError(exc.code, f"{exc.message} (--force overwrites it)") from None
    if not files and not c.json:
        click.echo(f"build {build_id} has no result files to fetch", err=True)
        return
    c.emit(files, "\n".join(output.safe(f["path"]) for f in files))


# -- hosts ---------------------------------------------------------------------------------------


def _auto_cap(auto: Any) -> str:
    """A host's auto-scaled cap and why it last moved, as its heartbeat says."""
    if not isinstance(auto, dict):
        return "-"
    return output.safe(f"{auto.get('cap', '?')}: {auto.get('why', '')}")


def _redis_seen(redis: Any) -> str:
    """The server a host talks to (its address under Sentinel) and its last change."""
    if not isinstance(redis, dict):
        return "-"
    seen = output.safe(str(redis.get("master") or redis.get("server") or "-"))
    when = redis.get("changed_at")
    if isinstance(when, int | float) and not isinstance(when, bool) and abs(when) < 1e12:
        seen += f" (changed {output.ago(when)})"
    return seen


@main.command()
@pass_ctx
def hosts(c: Ctx) -> None:
    """Every reqpmd sharing the namespace, and whether they agree on the limit."""
    rows = c.call("hosts")
    limits = {h.get("max_concurrent_builds") for h in rows if not h.get("stale")}
    table = output.table(
        [
            "HOST",
            "LAST SEEN",
            "BUILDING",
            "WAITING",
            "QUEUED",
            "LIMIT",
            "HOST CAP",
            "AUTO CAP",
            "REDIS",
            "GATES",
        ],
        [
            [
                output.safe(h["host_id"]),
                output.ago(h["last_seen"]) + (" (stale)" if h.get("stale") else ""),
                h.get("building", "?"),
                h.get("waiting", "?"),
                h.get("queued", "?"),
                h.get("max_concurrent_builds", "?"),
                h.get("host_max_builds") or "-",
                _auto_cap(h.get("auto_scale")),
                _redis_seen(h.get("redis")),
                ", ".join(
                    f"{output.safe(g.get('name', '?'))}:{'open' if g.get('open') else 'CLOSED'}"
                    for g in h.get("gates") or []
                    if isinstance(g, dict)
                ),
            ]
            for h in rows
        ],
    )
    if len(limits) > 1:
        warning = (
            f"warning: the config files of these hosts disagree on max_concurrent_builds "
            f"({', '.join(str(x) for x in sorted(limits))}); the cluster obeys one value, "
            f"the last one set ('reqpmctl status' shows it); make the files agree"
        )
        click.echo(warning, err=True)
    c.emit(rows, table)


main.lazy.update(
    {
        "repos": "reqpmctl.repos:repos",
        "cleanup": "reqpmctl.cleanup:cleanup",
        "projects": "reqpmctl.projects:projects",
        "top": "reqpmctl.top:top",
        "stats": "reqpmctl.stats:stats",
        "metrics": "reqpmctl.stats:metrics",
    }
)

if __name__ == "__main__":
    main(prog_name="reqpmctl")
