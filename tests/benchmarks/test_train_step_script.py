"""``benchmarks/train_step.py`` end to end on the CPU (``--tiny``: a two-layer model on short rows): the script the
training figures come from runs, checks every peer's loss and gradients against SDPA's before timing (a gradient
off by more than ``WRONG_GRAD`` is marked "(wrong)"), settles attnopt (``attnopt.settle``) and prints a row for
every workload and peer. The GPU runs it at full size; here a broken script is found before device time is spent
on it."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "train_step.py"


def test_train_step_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "train_step.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--peers", "sdpa", "attnopt",
                           "--repeat", "1", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in out.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    workloads = {row.split(" | ")[0] for row in rows}
    assert len(workloads) >= 3 and len(rows) == 2 * len(workloads), rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] in ("sdpa", "attnopt") and float(cells[2]) > 0, row
        assert "wrong" not in row and "error" not in row, row
        if cells[1] == "attnopt":
            assert cells[10] != "" and cells[11] != "", row  # settled seconds, and what attnopt did to the sites
