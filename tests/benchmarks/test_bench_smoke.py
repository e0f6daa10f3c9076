"""Every benchmark script runs end to end in --quick mode and writes its markdown + JSON (and plot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _run(script: str, out: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


SCRIPTS = {  # script -> (result name, extra files)
    "prior_overhead.py": ("prior_overhead_quick", ()),
    "speed/step_overhead.py": ("step_overhead_quick", ()),
    "speed/scaling.py": ("scaling_quick", ("scaling_quick.png",)),
    "speed/op_count.py": ("op_count_quick", ()),
    "speed/gpu.py": ("gpu_quick", ()),  # tiny sizes on the CPU: checks the script, measures nothing of interest
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory):
    """Each script once (they are the slow part); tests below inspect the outputs."""
    out = tmp_path_factory.mktemp("bench")
    return out, {script: _run(script, out).stdout for script in SCRIPTS}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_script_quick(quick_runs, script):
    out, stdout = quick_runs
    name, extra = SCRIPTS[script]
    md = (out / f"{name}.md").read_text()
    data = json.loads((out / f"{name}.json").read_text())
    assert md.startswith("# ") and "|---|" in md
    assert md.strip() in stdout[script]  # the table printed is the table written
    assert data["quick"] is True and data["machine"]["torch"]
    for file in extra:
        assert (out / file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_prior_overhead_quick_measures_both_routes(quick_runs):
    out, _ = quick_runs
    data = json.loads((out / "prior_overhead_quick.json").read_text())
    impls = {c["impl"] for c in data["cases"]}
    assert impls == {"ptyl", "reference", "reference-view"}
    values = [c["log_prob"] for c in data["cases"]]
    # the three implementations evaluate the same density (fp32 sums over ~45k terms)
    assert max(values) - min(values) <= 1e-4 * max(abs(v) for v in values)
    assert not data["memory_check_failures"]
    assert all(c["median_s"] > 0 and c["peak_extra_bytes"] >= 0 for c in data["cases"])


def test_op_count_quick_is_flat_and_under_the_bar(quick_runs):
    out, _ = quick_runs
    data = json.loads((out / "op_count_quick.json").read_text())
    assert data["per_call_flat"] and data["largest_per_call"] <= 64
    kinds = {r["kind"] for r in data["records"]}
    assert {"lowrank k=5", "lowrank k=20", "diag", "l2sp", "standard", "SWAG collect (K=20)"} <= kinds


def test_resnet18_shapes_has_resnet18_size():
    sys.path.insert(0, str(BENCH))
    try:
        from common import resnet18_shapes, synthetic_shapes
    finally:
        sys.path.remove(str(BENCH))
    import math

    assert sum(math.prod(s) for s in resnet18_shapes(64).values()) == 11_176_512  # torchvision resnet18 minus fc
    assert sum(math.prod(s) for s in synthetic_shapes(1_000_003, 20).values()) == 1_000_003
