"""The README's Python example prints what the README says it prints.

The block under "## Python API" runs as written, in a fresh process on one thread, and its printed metrics must
match the ``# prints {...}`` line under it within ``TOLERANCE``. When defaults or the example change, rerun it
(``python tests/test_readme.py`` prints the line to paste into the README) -- the README is the one place the
expected numbers live.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.01  # absolute, on every metric (run-to-run on one machine: 0; other CPUs may round differently)


def example() -> tuple[str, dict[str, float]]:
    """The example's code and the metrics the README says it prints."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API.*?```python\n(.*?)```", readme, re.S).group(1)
    stated = re.search(r"^# prints (\{.*\})$", code, re.M)
    try:
        return code, ast.literal_eval(stated.group(1)) if stated else {}
    except ValueError:  # a placeholder, not numbers yet
        return code, {}


def run_example(workdir: Path) -> dict[str, float]:
    """Run the example in ``workdir``; the metrics it printed."""
    code, _ = example()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_readme_example_prints_what_the_readme_says(tmp_path):
    _, stated = example()
    assert set(stated) == {"accuracy", "nll", "ece", "brier"}, "the README states no '# prints {...}' line"
    printed = run_example(tmp_path)
    assert set(printed) == set(stated)
    for name, value in stated.items():
        assert printed[name] == pytest.approx(value, abs=TOLERANCE), (name, printed)


if __name__ == "__main__":  # regenerate the README's line
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        printed = run_example(Path(workdir))
    print("# prints " + repr({k: round(float(v), 3) for k, v in printed.items()}))
