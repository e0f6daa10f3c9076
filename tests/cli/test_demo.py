"""``ptyl demo``: the quick demo runs every stage, and the README's demo tables are what the demo prints (issue 25).

``summary.md`` is the deterministic part of the demo's output. ``scripts/readme_demo.py`` copies a full run's into
``docs/demo/summary.md`` and the README (between markers) and the quick run's into ``docs/demo/summary-quick.md``;
these tests fail whenever the code's results or the README drift from those copies: rerun the script (``make
readme``).
"""

import importlib.util
import json
from pathlib import Path

from ptyl.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "scripts" / "readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCRIPT = _script()
REGENERATE = "the code's results changed: rerun `python scripts/readme_demo.py` (make readme) and commit what it writes"


def test_demo_quick_runs_every_stage_and_prints_the_committed_summary(tmp_path, capsys):
    """Two worker processes (the default), as a user runs it: the same summary as the committed one, to the byte."""
    assert main(["demo", "--quick", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| n/class | method | accuracy | nll | ece | selected | prior share | std ratio | train NLL |" in out
    assert "the method chosen on the validation pool" in out
    assert "SMOKE TEST" in out and "None" not in out
    assert "mnist5k -> mnist" in out and "kmnist -> mnist** (control" in out and "minus the validation-selected" in out
    for name in ("prior_mnist5k.safetensors", "prior_kmnist.safetensors", "results.json", "data_efficiency.png",
                 "summary.md"):
        assert (tmp_path / name).is_file()
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert {r["method"] for r in results} == {"standard", "l2sp", "lowrank", "selected"}
    assert {r["pair"] for r in results} == {"mnist5k->mnist", "kmnist->mnist"}
    assert all(r["validation_mode"] == "pool" and "final_loss" in r and "prior_share" in r for r in results)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert summary in out and "wall time" not in summary and "time (s)" not in summary
    committed = SCRIPT.QUICK_SUMMARY.read_text(encoding="utf-8")
    assert summary == committed, REGENERATE + "\n" + SCRIPT.differences(committed, summary, "committed", "today")


def test_the_readme_shows_the_committed_full_demo_summary():
    readme = SCRIPT.README.read_text(encoding="utf-8")
    committed = SCRIPT.FULL_SUMMARY.read_text(encoding="utf-8")
    block = SCRIPT.readme_block(readme)
    assert block == committed, ("README.md's demo block is not docs/demo/summary.md: rerun `python "
                                "scripts/readme_demo.py --from <a full demo's output>`\n"
                                + SCRIPT.differences(committed, block, "docs/demo/summary.md", "README.md"))
    assert "ptyl demo:" in committed and "SMOKE TEST" not in committed  # a full run, not the quick one


def test_embedding_replaces_only_the_block():
    readme = f"intro\n{SCRIPT.BEGIN}\nold table\n{SCRIPT.END}\noutro\n"
    new = SCRIPT.embed(readme, "| new |\n")
    assert new == f"intro\n{SCRIPT.BEGIN}\n| new |\n{SCRIPT.END}\noutro\n"
    assert SCRIPT.readme_block(new) == "| new |\n" and SCRIPT.embed(new, "| new |\n") == new
