"""``reqpmctl stats``: queue analytics over a window, as a table with a per-hour bar."""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import click

from reqpmctl import output
from reqpmctl.context import Ctx, pass_ctx

_AGO = re.compile(r"(?P<n>[1-9][0-9]*)(?P<unit>[mhdw])")
_UNITS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# plain characters, low to high: survives a terminal, less and a pasted ticket
LEVELS = " .:-=+*#"


def since_epoch(text: str, now: float | None = None) -> float:
    """``1h``, ``24h``, ``7d``, ``30m`` ago, or a date (``2026-11-01``, local midnight) or a
    date and time (``2026-11-01T08:00``)."""
    now = time.time() if now is None else now
    match = _AGO.fullmatch(text)
    if match:
        return now - int(match["n"]) * _UNITS[match["unit"]]
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: give 30m, 1h, 24h, 7d, 2w, or a date such as 2026-11-01"
        ) from None


def sparkline(counts: list[int]) -> str:
    top = max(counts, default=0)
    if top == 0:
        return " " * len(counts)
    return "".join(LEVELS[min(len(LEVELS) - 1, -(-c * (len(LEVELS) - 1) // top))] for c in counts)


def _seconds(v: float | None) -> str:
    return "-" if v is None else output.duration(v)


def _summary_row(name: str, s: dict[str, Any]) -> list[Any]:
    return [name, s["count"], *(_seconds(s[k]) for k in ("mean", "p50", "p90", "p99", "max"))]


def render(result: dict[str, Any]) -> str:
    lines = []
    groups = {"all": result["all"], **(result.get("groups") or {})}
    for name, f in groups.items():
        title = "all builds" if name == "all" else f"{result['by']} {output.safe(name)}"
        if f["builds"] == 0:
            lines += [f"{title}: no build ended in this window", ""]
            continue
        states = ", ".join(f"{n} {output.safe(s)}" for s, n in f["states"].items())
        util = f["utilisation"]
        lines.append(
            f"{title}: {f['builds']} ended ({states}); "
            f"{f['throughput_per_hour']:.1f}/h; slots busy "
            f"{'-' if util is None else f'{util * 100:.0f}%'}"
        )
        lines.append(
            output.table(
                ["TIME", "BUILDS", "MEAN", "P50", "P90", "P99", "MAX"],
                [
                    _summary_row("waiting for a slot", f["slot_wait"]),
                    _summary_row("submit to start", f["submit_to_start"]),
                    _summary_row("build duration", f["duration"]),
                ],
            )
        )
        busiest = f["busiest_hour"]
        if busiest:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(busiest["start"]))
            lines.append(f"busiest hour: from {when}, {busiest['builds']} builds")
        lines += [f"per hour:  |{sparkline(f['per_hour'][-72:])}|", ""]
    start = time.strftime("%Y-%m-%d %H:%M", time.localtime(result["since"]))
    end = time.strftime("%Y-%m-%d %H:%M", time.localtime(result["until"]))
    hosts = result.get("hosts")
    scope = f"{len(hosts)} hosts ({', '.join(map(output.safe, hosts))})" if hosts else "this host"
    header = f"builds that ended {start} .. {end}, {scope}; capacity {result['capacity']} slots"
    return "\n".join([header, "", *lines]).rstrip()


@click.command()
@click.option(
    "--since", "since", default="24h", show_default=True, help="30m, 1h, 24h, 7d, or a date."
)
@click.option("--by", type=click.Choice(["chroot", "project", "host", "user"]), default=None)
@click.option(
    "--cluster", is_flag=True, help="Every host's figures merged (from their heartbeats)."
)
@pass_ctx
def stats(c: Ctx, since: str, by: str | None, cluster: bool) -> None:
    """Builds per end state; time waiting for a slot, from submit to start, and building
    (count, mean, p50, p90, p99, max); throughput; slot utilisation; the busiest hour; and
    a bar of builds per hour (the last 72 hours of the window). --json: the raw figures."""
    args: dict[str, Any] = {"since": since_epoch(since), "cluster": cluster}
    if by is not None:
        args["by"] = by
    result = c.call("stats", args)
    c.emit(result, render(result))


@click.command()
@pass_ctx
def metrics(c: Ctx) -> None:
    """This host's metrics in Prometheus's text format (what /metrics serves with
    metrics_listen). --json wraps the text."""
    result = c.call("metrics")
    c.emit(result, result["text"].rstrip("\n"))
