"""benchmarks/accuracy/kappa_sweep.py's table: paired differences to the grid's records of the same seeds, the
one-standard-deviation verdict, cells without grid records left out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy" / "kappa_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(SCRIPT.parent))
    sys.path.insert(0, str(SCRIPT.parents[1]))
    spec = importlib.util.spec_from_file_location("kappa_sweep_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_pairs_each_multiplier_with_the_grid(sweep):
    pair, n = sweep.CELLS[0]
    grid = [{"pair": pair, "n": n, "seed": s, "method": "lowrank", "tuning": "grid", "accuracy": acc, "nll": nll}
            for s, acc, nll in [(0, 0.90, 0.30), (1, 0.92, 0.20)]]  # sd: accuracy 0.0141, NLL 0.0707
    rows = [{"pair": pair, "n": n, "seed": s, "multiplier": c, "accuracy": acc, "nll": nll,
             "selected": {"scale": 10.0 * c}, "final_loss": 0.01}
            for c, s, acc, nll in [(1.0, 0, 0.89, 0.35), (1.0, 1, 0.91, 0.25),    # -0.01 / +0.05: both within
                                   (10.0, 0, 0.80, 0.50), (10.0, 1, 0.80, 0.40)]]  # -0.11 / +0.20: neither
    rows.append({**rows[0], "pair": "movies->amazon", "n": "10"})  # no grid record: left out
    markdown, data = sweep.report(rows, grid, sweep.machine_info(), ["python benchmarks/accuracy/kappa_sweep.py"])
    by_c = {r["multiplier"]: r for r in data["rows"]}
    assert set(by_c) == {1.0, 10.0} and by_c[1.0]["seeds"] == 2
    assert by_c[1.0]["delta_accuracy"] == pytest.approx(-0.01) and by_c[1.0]["delta_nll"] == pytest.approx(0.05)
    assert by_c[1.0]["within_accuracy"] and by_c[1.0]["within_nll"]
    assert not by_c[10.0]["within_accuracy"] and not by_c[10.0]["within_nll"]
    assert "`python benchmarks/accuracy/kappa_sweep.py`" in markdown and markdown.count("| " + pair) == 2
