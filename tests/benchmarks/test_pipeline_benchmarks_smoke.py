"""The SimCLR and segmentation accuracy benchmarks run end to end through the pipeline in --quick mode."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, name, keys", [
    ("segmentation.py", "segmentation", ("miou", "nll", "ece")),
    ("simclr.py", "simclr", ("accuracy", "nll", "ece")),
])
def test_quick_run_writes_its_tables(tmp_path, script, name, keys):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy" / script), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / f"{name}.md").read_text()
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert md.startswith("# ") and "|---|" in md and md.strip() in proc.stdout
    assert data["runs"] and all(math.isfinite(run[k]) and run[k] >= 0 for run in data["runs"] for k in keys)
    assert all(run["tuning"] for run in data["runs"])  # every method was tuned
    # a second run resumes: the source prior(s) and every finished cell are reused
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy" / script), "--quick", "--out",
                            str(tmp_path), "--jobs", "2"], capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(reused" in again.stdout and "already done (resuming), 0 to run" in again.stdout
    assert json.loads((tmp_path / f"{name}.json").read_text())["summary"] == data["summary"]


def test_segmentation_budget_check_trains_fixed_priors_at_growing_budgets(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy" / "segmentation.py"), "--quick",
                           "--budget-check", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "segmentation_budget.json").read_text())["rows"]
    assert [r["steps"] for r in rows] == [6, 12, 24]  # the quick budget, doubled, quadrupled
    for row in rows:
        assert {"standard", "lowrank", "off limit"} <= set(row)
        assert all(math.isfinite(row[k]["test_nll"]) and row[k]["train_nll"] > 0 for k in ("standard", "off limit"))
    assert "| 10 | 24 |" in (tmp_path / "segmentation_budget.md").read_text()
