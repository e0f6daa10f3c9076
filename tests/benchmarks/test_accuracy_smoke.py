"""benchmarks/accuracy/transfer.py runs end to end in --quick mode, writes its results atomically and resumes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptyl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "accuracy" / "transfer.py"
METHODS = ["standard", "lowrank", "lowrank-sgld", "scratch"]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--methods", *METHODS, *extra],
                          capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accuracy")
    return out, _run(out).stdout


def test_quick_writes_results(quick_run):
    out, stdout = quick_run
    md = (out / "accuracy_quick.md").read_text()
    data = json.loads((out / "accuracy_quick.json").read_text())
    assert md.startswith("# ") and "|---|" in md and md.strip() in stdout
    assert data["quick"] is True and data["complete"] is True and data["machine"]["torch"]
    assert data["command"].startswith("python benchmarks/accuracy/transfer.py")
    assert [r["method"] for r in data["results"]] == METHODS
    for r in data["results"]:
        assert r["n_per_class"] == 5 and r["seed"] == 0 and r["num_train"] == 50
        assert 0.0 <= r["accuracy"] <= 1.0 and r["nll"] > 0 and r["wall_time_s"] > 0
        assert r["selected"] and ("scale" in r["selected"]) == (r["prior"] in ("diag", "lowrank"))
    for png in ("accuracy_quick_efficiency.png", "accuracy_quick_lambda.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "accuracy_quick_prior.safetensors").is_file()  # the cached prior
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))


def _script_module():
    spec = importlib.util.spec_from_file_location("accuracy_transfer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rerun_resumes_without_recomputing(quick_run, capsys):
    out, _ = quick_run
    before = json.loads((out / "accuracy_quick.json").read_text())["results"]
    assert _script_module().main(["--quick", "--out", str(out), "--methods", *METHODS]) == 0
    stdout = capsys.readouterr().out
    assert "re-using cached prior" in stdout and f"resuming: {len(METHODS)} runs" in stdout
    after = json.loads((out / "accuracy_quick.json").read_text())["results"]
    assert after == before  # nothing re-run: the same records, the same wall times


def test_bad_input_is_a_clear_error(tmp_path):
    main = _script_module().main
    with pytest.raises(ConfigError, match="n=5000 per class is impossible"):
        main(["--quick", "--out", str(tmp_path), "--n", "5000"])
    with pytest.raises(ConfigError, match="unknown method"):
        main(["--quick", "--out", str(tmp_path), "--methods", "bogus"])
    assert not list(tmp_path.iterdir())  # failed before learning a prior or writing anything
