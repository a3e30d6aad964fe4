"""``reqpmctl cleanup``: what retention and the orphaned-root scrub would do, or do now."""

from __future__ import annotations

from typing import Any

import click

from reqpmctl import output
from reqpmctl.context import Ctx, pass_ctx
from reqpmctl.repos import size


@click.command()
@click.option("--dry-run", "dry_run", is_flag=True, help="Show what would go; change nothing.")
@click.option("--now", "now", is_flag=True, help="Clean up now (admins only).")
@pass_ctx
def cleanup(c: Ctx, dry_run: bool, now: bool) -> None:
    """Old builds' files (cleanup_builds_after_days) and mock roots left by crashes.

    --dry-run (anyone) lists what the next run would delete and what it keeps on purpose,
    and why; --now (admin) runs it and reports what was freed."""
    if dry_run == now:
        raise click.UsageError("give one of --dry-run and --now")
    if dry_run:
        plan = c.call("cleanup.plan")
        c.emit(plan, _plan_text(plan))
        return
    with c.client() as client:
        report = client.cleanup_now()
    c.emit(report, _report_text(report))


def _plan_text(plan: dict[str, Any]) -> str:
    builds = plan["builds"]
    lines = [
        f"builds that ended before {output.ago(builds['cutoff'])} "
        f"(cleanup_builds_after_days={plan['cleanup_builds_after_days']}): "
        f"{len(builds['delete'])} to delete: {builds['files']} files, {size(builds['bytes'])}",
    ]
    if builds["delete"]:
        lines.append(
            output.table(
                ["BUILD", "STATE", "CHROOT", "PACKAGE", "ENDED", "SIZE", "IN A REPOSITORY"],
                [
                    [
                        d["id"],
                        d["state"],
                        output.safe(d["chroot"]),
                        output.safe(d["package"] or "?"),
                        output.ago(d["finished_at"]),
                        size(d["bytes"]),
                        "yes: taken out first" if d["published"] else "no",
                    ]
                    for d in builds["delete"]
                ],
            )
        )
    for keep in builds["keep"]:
        lines.append(f"kept: build {keep['id']}: {output.safe(keep['why'])}")
    for root in plan["orphaned_roots"]:
        lines.append(
            f"orphaned root {output.safe(root['path'])}: {root['action']} "
            f"({output.safe(root['why'])})"
        )
    return "\n".join(lines)


def _report_text(report: dict[str, Any]) -> str:
    roots = report["orphaned_roots"]
    lines = [
        f"cleaned {len(report['cleaned'])} build(s), freed {size(report['bytes'])}; "
        f"scrubbed {len(roots['scrubbed'])} orphaned mock root(s); "
        f"forgot {report['records_forgotten']} history record(s) older than a year"
    ]
    lines += [f"kept: build {k['id']}: {output.safe(k['why'])}" for k in report["kept"]]
    lines += [
        f"left alone: {output.safe(r['path'])}: {output.safe(r['why'])}" for r in roots["skipped"]
    ]
    return "\n".join(lines)
