"""Bring your own model and data to the command line: ``--data <image folder>``, ``--model module:factory`` and one
``--head`` name, end to end (learn-prior -> finetune -> evaluate), and the errors a wrong head gives."""

import json
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from ptyl.cli import main
from ptyl.io import read_metadata

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_outputs):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                          nn.Flatten())
            self.fc = nn.Linear(16, num_outputs)

        def forward(self, x):
            return self.fc(self.features(x))


    def make_net():
        # a "pretrained" network of someone else's: 7 outputs, no num_classes argument
        torch.manual_seed(123)
        return Net(7)
""")


def _write_folder(root, classes=("circle", "cross", "plain"), per_class=12, size=12):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    shapes = {"circle": ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2),
              "cross": (abs(yy - xx) < 2) | (abs(yy + xx - size) < 2), "plain": np.zeros((size, size), bool),
              "bar": abs(yy - size / 2) < 2}
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = 0.7 * shapes[name] + 0.3 * rng.random((size, size))
            Image.fromarray((pixels * 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture()
def byo(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("mymodels", None)


FAST = ["--n-per-class", "4", "--steps", "8", "--batch-size", "8", "--quiet"]


def test_finetune_own_folder_and_factory_end_to_end(byo, capsys):
    folder = _write_folder(byo / "shapes")
    out = byo / "run"
    assert main(["finetune", "--data", str(folder), "--model", "mymodels:make_net", "--head", "fc", "--out",
                 str(out), *FAST]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= metrics["accuracy"] <= 1.0
    report = json.loads((out / "results.json").read_text())
    assert report["prior"] == "l2sp" and report["num_train"] == 12 and report["num_test"] == 6
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(metrics["accuracy"], abs=1e-5) and evaluated["num_examples"] == 6


def test_learned_prior_for_own_model_and_data(byo, capsys):
    source = _write_folder(byo / "source", classes=("circle", "cross", "plain", "bar"))
    target = _write_folder(byo / "target", classes=("circle", "cross"))
    prior = byo / "shapes.prior.safetensors"
    assert main(["learn-prior", "--data", str(source), "--model", str(byo / "mymodels.py") + ":make_net",
                 "--head", "fc", "--pretrain-epochs", "1", "--swag-epochs", "2", "--rank", "2", "--batch-size", "8",
                 "--quiet", "--out", str(prior)]) == 0
    meta = read_metadata(prior)
    assert meta["head"] == "fc" and meta["num_classes"] == 4 and not any(p["name"].startswith("fc.")
                                                                         for p in meta["parameters"])
    out = byo / "run"
    assert main(["finetune", "--prior", str(prior), "--data", str(target), "--out", str(out), *FAST]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["prior"] == "lowrank" and report["num_train"] == 8
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--quiet"]) == 0


def test_a_head_that_matches_nothing_names_the_linear_layers(byo, capsys):
    folder = _write_folder(byo / "shapes")
    assert main(["finetune", "--data", str(folder), "--model", "mymodels:make_net", "--out", str(byo / "r"),
                 *FAST]) == 2
    err = capsys.readouterr().err
    assert "head 'head'" in err and "'fc'" in err


def test_unimportable_factory_is_one_line(byo, capsys):
    assert main(["finetune", "--data", "mnist", "--model", "nowhere:make", "--out", str(byo / "r"), *FAST]) == 2
    assert "cannot import 'nowhere'" in capsys.readouterr().err


def test_finetune_needs_a_prior_or_a_model(byo, capsys):
    assert main(["finetune", "--data", "mnist", "--out", str(byo / "r"), *FAST]) == 2
    assert "needs --prior" in capsys.readouterr().err


def test_learn_prior_does_not_silently_pretrain_again_next_to_a_pretrain_output(byo, capsys):
    (byo / "pretrained.safetensors").write_bytes(b"")  # 'ptyl pretrain' wrote its default output here
    assert main(["learn-prior", "--data", "kmnist", "--quiet"]) == 2
    assert "--init pretrained.safetensors" in capsys.readouterr().err
    assert main(["learn-prior", "--init", "x.safetensors", "--pretrain-epochs", "2", "--quiet"]) == 2
    assert "exclude each other" in capsys.readouterr().err


def test_finetune_in_mixed_precision(tiny_prior, tmp_path):
    out = tmp_path / "bf16"
    assert main(["finetune", "--prior", str(tiny_prior), "--n-per-class", "2", "--steps", "3", "--precision", "bf16",
                 "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["precision"] == "bf16" and all(h["prior"] >= 0 for h in report["history"])
