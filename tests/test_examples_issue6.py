"""Smoke tests: the SimCLR-prior and segmentation examples run end to end in --quick mode and write real prior files."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, out: Path, monkeypatch, capsys) -> str:
    """Run ``examples/<name>`` as ``__main__`` in this process (imports are shared, so it takes seconds)."""
    torch.manual_seed(0)
    monkeypatch.setattr(sys, "argv", [name, "--quick", "--out", str(out)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the examples cap threads at the current count; 1 avoids contention on shared cores
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def metric(text: str, label: str, key: str) -> float:
    line = next(line for line in text.splitlines() if line.strip().startswith(label))
    return float(re.search(rf"{key} ([-0-9.]+)", line).group(1))


def test_simclr_prior_example(tmp_path, monkeypatch, capsys):
    from ptyl.io import load_posterior, read_metadata

    text = run_example("simclr_prior.py", tmp_path, monkeypatch, capsys)
    path = tmp_path / "kmnist_simclr.safetensors"
    assert path.is_file()
    meta = read_metadata(path)
    assert meta["objective"] == "simclr"
    post = load_posterior(path)
    # the prior covers the trunk only: the projection head stays on the source side
    assert post.names and all(n.startswith("features.") for n in post.names)
    assert not any(n.startswith("projection.") for n in post.names)
    assert post.rank == 2
    for label in ("SimCLR learned prior", "standard fine-tuning"):
        acc, nll = metric(text, label, "accuracy"), metric(text, label, "NLL")
        assert 0.0 <= acc <= 1.0 and nll > 0 and nll == nll  # finite, not NaN


def test_segmentation_example(tmp_path, monkeypatch, capsys):
    from ptyl.io import load_posterior

    text = run_example("segmentation.py", tmp_path, monkeypatch, capsys)
    post = load_posterior(tmp_path / "kmnist_classifier.safetensors")
    assert post.names and all(n.startswith("features.") for n in post.names)  # matches SegmentationNet by name
    for label in ("learned prior", "standard fine-tuning"):
        miou, pix = metric(text, label, "mIoU"), metric(text, label, "acc")
        assert 0.0 <= miou <= 1.0 and 0.0 <= pix <= 1.0
        assert metric(text, label, "NLL") > 0 and 0.0 <= metric(text, label, "ECE") <= 1.0


@pytest.mark.parametrize("script", ["simclr.py", "segmentation.py"])
def test_benchmark_scripts_have_quick_mode(script):
    source = (Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy" / script).read_text()
    assert "--quick" in source and "def settings(quick: bool)" in source
