"""The scale benchmark's smoke test: ``bench/scale_bench.py --quick --parallel`` runs
its four benches at once and measures all six of issue 15's figures. Goals are not
checked here (a loaded machine is slower); only that every figure was measured and the
summary says where."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bench import figures

ROOT = Path(__file__).resolve().parent.parent
SCALE = ROOT / "bench" / "scale_bench.py"
RUN_TIMEOUT = 300  # about 40 s on an idle 2-vCPU machine


@pytest.mark.timeout(RUN_TIMEOUT + 90)
def test_quick_scale_bench_measures_the_six_figures(tmp_path: Path) -> None:
    out_file = tmp_path / "figures.jsonl"
    env = dict(os.environ)
    env.pop("REQPM_BENCH_COMMAND", None)  # as if run by hand, not from ./dev bench
    proc = subprocess.Popen(
        # at once: only that each figure is measured counts here, not its value
        [sys.executable, str(SCALE), "--quick", "--parallel", "--figures", str(out_file)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the benches and all they started: one group to stop
    )
    try:
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the benches clean up on SIGTERM
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"scale bench still running after {RUN_TIMEOUT} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]

    head = "## Scale benchmark (issue 15): summary"
    assert head in out, out[-4000:]
    summary = out[out.index(head) :]
    assert re.search(r"^- date: \d{4}-\d\d-\d\d \d\d:\d\d UTC$", summary, re.M), summary
    machine = re.search(r"^- machine: (.+)$", summary, re.M)
    assert machine, summary
    for part in (r"\d+ CPUs", r"Python \d+\.\d+", r"redis-server \d+\.\d+"):
        assert re.search(part, machine.group(1)), (part, machine.group(1))
    command = re.search(r"^- command: (.+)$", summary, re.M)
    assert command and command.group(1).endswith(
        f"scale_bench.py --quick --parallel --figures {out_file}"
    )
    rows = {int(m.group(1)): m.group(0) for m in re.finditer(r"^\| (\d) \|.*$", summary, re.M)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6], summary
    for n, row in rows.items():
        assert "not measured" not in row and "not run" not in row, row
        assert n == 2 or re.search(r"\| \*\*(met|not met)\*\* \|$", row), row

    measured = {f["figure"]: f for f in figures.read(out_file)}
    assert sorted(measured) == [1, 2, 3, 4, 5, 6]
    for n, fig in measured.items():
        assert fig["quick"] is True and fig["what"] and fig["goal"], fig
        assert fig["met"] is None if n == 2 else isinstance(fig["met"], bool), fig
        assert fig["value"] == fig["values"][0]["value"], fig
        for v in fig["values"]:
            value = v["value"]
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (n, v)
            assert v["unit"], (n, v)
