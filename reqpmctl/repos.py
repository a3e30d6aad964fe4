"""``reqpmctl repos``: the dnf repositories reqpmd publishes succeeded builds into."""

from __future__ import annotations

import sys
from typing import Any

import click

from reqpmctl import output
from reqpmctl.context import Ctx, pass_ctx
from reqpmd.control import protocol


def size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _problem(r: dict[str, Any]) -> str:
    return output.safe(r.get("last_error") or r.get("metadata_error") or "-")


@click.group()
def repos() -> None:
    """The dnf repositories of succeeded builds, one per chroot under repo_dir."""


@repos.command("list")
@pass_ctx
def repos_list(c: Ctx) -> None:
    """Each repository: packages, size, last update and last error."""
    rows = c.call("repos.list")
    human = (
        output.table(
            ["CHROOT", "PACKAGES", "SIZE", "UPDATED", "RUNS", "LAST ERROR"],
            [
                [
                    output.safe(r["chroot"]),
                    "?" if r["packages"] is None else r["packages"],
                    size(r["size"]),
                    output.ago(r["updated_at"]),
                    r["metadata_runs"],
                    _problem(r),
                ]
                for r in rows
            ],
        )
        if rows
        else "no repositories yet: the first succeeded build makes one"
    )
    c.emit(rows, human)


@repos.command("show")
@click.argument("chroot")
@pass_ctx
def repos_show(c: Ctx, chroot: str) -> None:
    """A repository's packages, with the build that published each."""
    with c.client() as client:  # every page of the package list
        r = client.call("repos.show", {"chroot": chroot})
        while r.get("next") is not None:
            page = client.call("repos.show", {"chroot": chroot, "offset": r["next"]})
            r["package_list"] += page["package_list"]
            r["next"] = page["next"]
    lines = [
        f"repository: {output.safe(r['chroot'])}  ({output.safe(r['path'])})",
        f"packages:   {'?' if r['packages'] is None else r['packages']}, {size(r['size'])}",
        f"updated:    {output.ago(r['updated_at'])}; this daemon made "
        f"{r['metadata_runs']} metadata run(s) and published {r['published_builds']} build(s)",
        f"last sync:  {output.safe(r['last_sync'] or '-')} ({output.ago(r['last_sync_at'])})",
    ]
    if r.get("last_error") or r.get("metadata_error"):
        lines.append(f"ERROR:      {_problem(r)}")
    for skipped in r.get("skipped") or []:
        lines.append(f"skipped:    {output.safe(skipped)}")
    pkgs = r["package_list"]
    if pkgs:
        lines += [
            "",
            output.table(
                ["NAME", "VERSION-RELEASE", "ARCH", "BUILD", "HOST", "FILE"],
                [
                    [
                        output.safe(p["name"]),
                        output.safe(f"{p['version']}-{p['release']}"),
                        output.safe(p["arch"]),
                        p["build"] if p["build"] is not None else "(by hand)",
                        output.safe(p["host"] or "-"),
                        output.safe(p["href"]),
                    ]
                    for p in pkgs
                ],
            ),
        ]
    c.emit(r, "\n".join(lines))


@repos.command("sync")
@click.argument("chroot", required=False)
@click.option("--wait", is_flag=True, help="Wait until the sync is done and show what it did.")
@click.option("--full", is_flag=True, help="Regenerate the metadata from every package.")
@pass_ctx
def repos_sync(c: Ctx, chroot: str | None, wait: bool, full: bool) -> None:
    """Sync one repository, or all, now, as the periodic sync does: pick up RPMs added or
    removed by hand, check the metadata against its files and regenerate it if broken
    (--full: regenerate it whatever the check finds). Admins only. With --wait, exits 1
    if a repository failed."""
    with c.client() as client:
        result = client.sync_repos(chroot, wait, full)
    if not wait:
        c.emit(result, f"sync of {output.safe(result['requested'])} requested")
        return
    failed = [k for k, v in result["results"].items() if v.get("action") == "failed"]
    human = "\n".join(
        f"{output.safe(k)}: {output.safe(v.get('action'))}: "
        f"{output.safe(v.get('reason') or v.get('error'))}"
        for k, v in sorted(result["results"].items())
    ) or ("nothing to sync" if result["done"] else "the sync did not finish in time")
    c.emit(result, human)
    if failed or not result["done"]:
        sys.exit(protocol.EXIT_FAILED)


@repos.command("dnf-config")
@click.argument("chroot")
@pass_ctx
def repos_dnf_config(c: Ctx, chroot: str) -> None:
    """Print a .repo stanza for the repository (put it in /etc/yum.repos.d/)."""
    r = c.call("repos.dnf_config", {"chroot": chroot})
    c.emit(r, r["text"].rstrip("\n"))
