"""Small helpers for the figures the benchmarks print.

Issue 15's six scale figures are also written, one JSON object a line, to the file given
with ``--figures FILE`` (``add_option``): bench/scale_bench.py runs the four benches that
measure them and reads the figures from there rather than from their tables. A line is

    {"figure": 4, "what": "...", "value": 69.1, "unit": "ms",
     "values": [{"name": "...", "value": 69.1, "unit": "ms"}, ...],
     "goal": "p50 < 100 ms", "met": true, "bench": "daemon", "quick": false, "note": "..."}

``value`` and ``unit`` repeat the first of ``values`` (the headline). ``met`` is null for a
figure without a numeric goal (figure 2), and a value that could not be measured is null.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The q-th percentile by nearest rank (a value that was measured); nan for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def add_option(ap: argparse.ArgumentParser) -> None:
    """The ``--figures FILE`` option every scale bench takes."""
    ap.add_argument(
        "--figures",
        metavar="FILE",
        default="",
        help="also append this bench's issue-15 figures to FILE, one JSON object a line "
        "(bench/scale_bench.py reads them)",
    )


def _number(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def record(
    path: str | Path | None,
    figure: int,
    what: str,
    values: Sequence[tuple[str, float, str]],
    goal: str,
    met: bool | None,
    *,
    bench: str,
    quick: bool,
    note: str = "",
) -> None:
    """Append one figure to ``path`` (nothing without a path). ``values``: (name, value,
    unit), the headline first."""
    if not path:
        return
    if not values:
        raise ValueError(f"figure {figure}: no values")
    listed = [{"name": n, "value": _number(v), "unit": u} for n, v, u in values]
    line: dict[str, Any] = {
        "figure": figure,
        "what": what,
        "value": listed[0]["value"],
        "unit": listed[0]["unit"],
        "values": listed,
        "goal": goal,
        "met": met,
        "bench": bench,
        "quick": quick,
        "note": note,
    }
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(line, ensure_ascii=False) + "\n")


def read(path: str | Path) -> list[dict[str, Any]]:
    """Every figure in ``path``, in the order written (none if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line]


def num(v: float | None, unit: str = "") -> str:
    """A figure with as many digits as it deserves: 1,234 / 12.3 / 1.23; "-" for none."""
    if v is None or not math.isfinite(v):
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}{unit}"
    if abs(v) >= 10:
        return f"{v:.1f}{unit}"
    return f"{v:.2f}{unit}"
