"""Each prior kind, inference strategy and tuning strategy is spelled out in exactly one place (its registry), and
adding one is one new file plus one registry line -- checked by applying the worked example of docs/architecture.md
to a copy of the package."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ptyl.pipeline.methods import Start
from ptyl.priors import PriorKind
from ptyl.training import Inference
from ptyl.tuning import TuningStrategy

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "ptyl"
REGISTRIES = {SRC / "priors" / "registry.py", SRC / "training" / "registry.py", SRC / "tuning" / "registry.py"}
# the same word meaning something else: (file, word) -> why it is not a prior kind / inference name
OTHER_MEANINGS = {
    ("metrics/segmentation.py", "none"): "torchmetrics average='none'",
    ("tuning/result.py", "none"): "matplotlib linestyle='none'",
    ("tuning/automatic.py", "none"): "validation='none': automatic strategies hold out no data",
    ("autotune/curvature.py", "diag"): "the 'diag' curvature structure",
    ("autotune/kfac.py", "diag"): "the 'diag' curvature structure",
    ("autotune/marglik.py", "diag"): "the 'diag' curvature structure",
    ("tuning/hypergradient.py", "diag"): "the 'diag' curvature structure",
    ("data/segmentation.py", "grid"): "placement='grid' of the digit canvases",
    ("tuning/searches.py", "grid"): "the search path's 'grid' entry: the axes searched",
    ("tuning/result.py", "grid"): "TuneResult.to_dict's 'grid' entry: the axes searched",
    ("autotune/share.py", "diag"): "the 'diag' curvature method",
    ("autotune/likelihoods.py", "none"): "torch reduction='none'",
    ("inference/laplace_predictive.py", "diag"): "the 'diag' curvature structure",
    ("inference/laplace_predictive.py", "laplace"): "the function ptyl.inference.laplace in __all__",
    ("inference/__init__.py", "laplace"): "the function ptyl.inference.laplace in __all__",
}


def _not_names(tree: ast.AST) -> set[int]:
    """Strings that cannot name a prior kind: docstrings, ``__all__`` entries, and attribute names
    (``register_buffer("diag", ...)``,
    ``getattr(obj, "mean")``)."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            ids.update(id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant))  # exported names
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            position = 0 if name in ("register_buffer", "register_parameter") else 1
            if name in ("register_buffer", "register_parameter", "getattr", "setattr", "hasattr") \
                    and len(node.args) > position and isinstance(node.args[position], ast.Constant):
                ids.add(id(node.args[position]))
    return ids


def test_each_name_is_spelled_in_one_place():
    names = {str(k) for k in PriorKind} | {str(i) for i in Inference} | {str(Start.SCRATCH)} | {
        str(s) for s in TuningStrategy}
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path in REGISTRIES:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _not_names(tree)
        relative = str(path.relative_to(SRC))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
                # an identifier-like string ("lowrank", "lowrank-sgld"), not prose that happens to say "block"
                words = set(node.value.split("-")) if re.fullmatch(r"[a-z0-9_]+(-[a-z0-9_]+)*", node.value) else set()
                for word in words & names:
                    if (relative, word) not in OTHER_MEANINGS and not (relative == "pipeline/methods.py"
                                                                        and word == str(Start.SCRATCH)):
                        found.append(f"{relative}:{node.lineno}: {node.value!r}")
    assert found == [], ("spell these through the registries (PriorKind / Inference / Start / TuningStrategy) "
                         "instead:\n" + "\n".join(found))


def _doc_blocks() -> dict[str, str]:
    """The worked example of docs/architecture.md: ```python blocks whose first line is '# file: <path>' or
    '# registry line: <path>'."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    blocks = {}
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        first, _, body = block.partition("\n")
        match = re.match(r"# (file|registry line|check): (\S+)", first)
        if match:
            blocks[f"{match.group(1)}:{match.group(2)}"] = body
    return blocks


def test_worked_example_adds_a_prior_kind_a_sampler_and_a_tuning_strategy(tmp_path):
    blocks = _doc_blocks()
    files = {k.split(":", 1)[1]: v for k, v in blocks.items() if k.startswith("file:")}
    lines = {k.split(":", 1)[1]: v for k, v in blocks.items() if k.startswith("registry line:")}
    checks = [v for k, v in blocks.items() if k.startswith("check:")]
    assert len(files) == 3 and len(lines) == 3 and checks, sorted(blocks)
    copy = tmp_path / "src" / "ptyl"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__", "embedded"))
    os.symlink(SRC / "data" / "embedded", copy / "data" / "embedded")
    for relative, body in files.items():  # one new file each
        (copy / relative).write_text(body, encoding="utf-8")
    for relative, line in lines.items():  # one line in each registry, after its last member line
        path = copy / relative
        source = path.read_text(encoding="utf-8").splitlines(keepends=True)
        last = max(i for i, text in enumerate(source) if re.match(r"    [A-Z0-9_]+ = \"", text))
        while not source[last].rstrip().endswith(('"', ")")) or source[last + 1].startswith(" " * 8):
            last += 1  # a member spread over continuation lines
        source.insert(last + 1, line if line.endswith("\n") else line + "\n")
        path.write_text("".join(source), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", "\n".join(checks)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "worked example ok" in proc.stdout


def test_every_registered_kind_builds_and_has_a_grid():
    from ptyl.priors import make_prior
    from ptyl.tuning import default_grid
    from tests.helpers import TinyNet, random_posterior

    model = TinyNet()
    posterior = random_posterior(model, dtype=torch.float32)
    for kind in PriorKind:
        recipe = kind.recipe
        values = {recipe.axis: recipe.default} if recipe.axis else {}
        prior = make_prior(model, kind, posterior=posterior if recipe.needs_posterior else None, **values)
        covered = set(prior.names) | set(prior.unregularized)
        assert covered == {n for n, _ in model.named_parameters()}, kind
        assert torch.isfinite(prior.penalty(model)), kind
        grid = default_grid(kind, budget=4, lrs=(0.01, 0.1))
        assert (recipe.axis in grid) == (recipe.axis is not None) and "lr" in grid


def test_every_registered_strategy_trains():
    from torch.utils.data import TensorDataset

    from ptyl.priors import make_prior
    from ptyl.training import fit

    data = TensorDataset(torch.randn(24, 4), torch.arange(24) % 2)
    for inference in Inference:
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("head", torch.nn.Linear(4, 2))
        prior = make_prior(model, PriorKind.STANDARD, variance=10.0)  # laplace needs one: its precision's part
        result = fit(model, data, prior, inference=inference, epochs=4, batch_size=8, num_samples=2, num_cycles=2,
                     samples_per_cycle=1, swag_collect_every=1, progress=False)
        assert (result.samples is not None and len(result.samples) == 2) == inference.strategy.collects_samples
        assert result.predict(data).shape == (24, 2)
