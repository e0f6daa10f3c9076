"""End-to-end tests of the ``ptyl`` command line on tiny settings (real entry point, real files)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptyl.cli import main
from ptyl.pipeline import pretrained_weights_path

FAST = ["--n-per-class", "2", "--steps", "3", "--eps", "0.01", "--quiet"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # exactly one line, no traceback
    assert err[0].startswith("ptyl: error: ")
    return err[0]


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("pretrain", "learn-prior", "inspect", "finetune", "evaluate", "demo"):
        assert command in out
    for command in ("pretrain", "learn-prior", "inspect", "finetune", "evaluate", "demo"):
        assert main([command, "--help"]) == 0
        assert "--config" in capsys.readouterr().out


def test_learn_prior_writes_prior_and_weights_and_inspect_shows_rank(tiny_prior, capsys):
    assert tiny_prior.is_file() and pretrained_weights_path(tiny_prior).is_file()
    assert main(["inspect", str(tiny_prior), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "rank: 3" in out and "source: kmnist" in out and "architecture: smallcnn" in out
    assert "features.conv1.weight" in out and "more tensors" in out  # --top 3 of 9 tensors


def test_pretrain_then_learn_prior_from_init(tmp_path, capsys):
    weights = tmp_path / "w.safetensors"
    assert main(["pretrain", "--data", "kmnist", "--n-per-class", "4", "--width", "4", "--epochs", "1",
                 "--batch-size", "16", "--quiet", "--out", str(weights)]) == 0
    assert "source test accuracy" in capsys.readouterr().out
    prior = tmp_path / "p.safetensors"
    assert main(["learn-prior", "--init", str(weights), "--n-per-class", "4", "--swag-epochs", "1", "--rank", "2",
                 "--batch-size", "16", "--dtype", "bf16", "--quiet", "--out", str(prior)]) == 0
    assert main(["inspect", str(prior)]) == 0
    out = capsys.readouterr().out
    assert "rank: 2" in out and "dtype: bfloat16" in out and "'width': 4" in out


def test_inspect_estimate(capsys):
    assert main(["inspect", "--estimate", "smallcnn", "--rank", "5", "--dtype", "bf16", "--width", "8"]) == 0
    out = capsys.readouterr().out
    assert "parameters covered" in out and "K=5" in out


@pytest.mark.parametrize("baseline", [None, "standard", "l2sp", "diag", "scratch"])
def test_finetune_each_baseline_and_evaluate(tiny_prior, tmp_path, baseline, capsys):
    out = tmp_path / "run"
    extra = ["--baseline", baseline] if baseline else []
    assert main(["finetune", "--prior", str(tiny_prior), "--data", "mnist", *FAST, *extra, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert report["prior"] == {None: "lowrank", "scratch": "standard"}.get(baseline, baseline)
    assert report["num_train"] == 20 and 0 <= report["metrics"]["accuracy"] <= 1
    assert 0 <= report["strength"]["prior_share"] <= 1 and isinstance(report["strength"]["prior_off"], bool)
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    if baseline in (None, "scratch"):  # evaluate reproduces the test metrics from the saved weights
        assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--quiet"]) == 0
        metrics = json.loads(capsys.readouterr().out)
        assert metrics["accuracy"] == pytest.approx(report["metrics"]["accuracy"])
        assert metrics["nll"] == pytest.approx(report["metrics"]["nll"], rel=1e-4)


def test_finetune_sgld_saves_samples_and_evaluate_does_bma(tiny_prior, tmp_path, capsys):
    out = tmp_path / "sgld"
    assert main(["finetune", "--prior", str(tiny_prior), *FAST, "--method", "sgld", "--num-samples", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--samples",
                 str(out / "samples.safetensors"), "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["nll"] == pytest.approx(report["metrics"]["nll"], rel=1e-4)
    # without --samples: the samples file next to the weights, not the last sample alone
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--quiet"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["samples"] == str(out / "samples.safetensors") and found["nll"] == pytest.approx(metrics["nll"])
    (out / "samples.safetensors").rename(out / "elsewhere.safetensors")
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--quiet"]) == 2
    assert "sgld run" in (line := _error_line(capsys)) and "--samples" in line and "--single" in line
    assert main(["evaluate", "--weights", str(out / "model.safetensors"), "--single", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] is None


@pytest.mark.filterwarnings("ignore:.*best")
def test_finetune_tune_selects_the_kind_and_strength_on_the_pool(tiny_prior, tmp_path, capsys):
    out = tmp_path / "tuned"
    args = ["finetune", "--prior", str(tiny_prior), "--n-per-class", "2", "--steps", "3", "--eps", "0.01",
            "--tune", "--budget", "2", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "results.json").read_text())
    tuning = report["tuning"]
    assert list(tuning["kinds"]) == ["lowrank", "diag", "l2sp", "standard"]  # every kind compared on the pool
    scores = {k: v["val_nll"] for k, v in tuning["kinds"].items()}
    assert tuning["kind"] in (*scores, "none") and report["prior"] == tuning["kind"]
    assert min(scores.values()) == pytest.approx(min(r["val_nll"] for r in tuning["table"]))
    log = capsys.readouterr().err
    assert "selected on the validation pool:" in log and all(k in log for k in scores)


@pytest.mark.filterwarnings("ignore:.*best")
def test_finetune_tune_one_kind_reaches_its_off_limit(tiny_prior, tmp_path):
    out = tmp_path / "tuned"
    assert main(["finetune", "--prior", str(tiny_prior), *FAST, "--baseline", "l2sp", "--tune", "--budget", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert sum(row["round"] == 0 for row in report["tuning"]["table"]) == 3  # 2 values + the off limit
    assert report["tuning"]["path"] and report["tuning"]["edge_status"]["variance"] != "edge"
    assert "kinds" not in report["tuning"]


def test_finetune_kinds_errors_name_the_choices(tiny_prior, tmp_path, capsys):
    base = ["finetune", *FAST, "--tune", "--out", str(tmp_path)]
    assert main([*base, "--prior", str(tiny_prior), "--kinds", "lowrnk"]) == 2
    assert "unknown prior kind in --kinds 'lowrnk'" in _error_line(capsys)
    assert main([*base, "--model", "smallcnn", "--kinds", "lowrank", "l2sp"]) == 2
    assert "learned priors need --prior" in _error_line(capsys)
    assert main([*base, "--prior", str(tiny_prior), "--baseline", "l2sp", "--kinds", "l2sp"]) == 2
    assert "without --baseline" in _error_line(capsys)


@pytest.mark.parametrize("strategy", ["de-elbo", "auto"])
def test_finetune_tune_learns_the_strength_in_one_run(tiny_prior, tmp_path, strategy):
    from ptyl.tuning import AUTO

    out = tmp_path / strategy
    assert main(["finetune", "--prior", str(tiny_prior), *FAST, "--tune", strategy, "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    tuning = report["tuning"]
    assert tuning["strategy"] == (AUTO if strategy == "auto" else strategy) and tuning["search_cost_s"] > 0
    assert report["hyperparameters"]["scale"] == tuning["best"]["scale"] != 1e4  # learned from the default
    assert [row["epoch"] for row in tuning["table"]] == [h["epoch"] for h in report["history"]]


@pytest.mark.parametrize("strategy", ["continuation", "hypergradient"])
def test_finetune_tune_from_the_validation_pool(tiny_prior, tmp_path, strategy, capsys):
    out = tmp_path / strategy
    args = ["finetune", "--prior", str(tiny_prior), *FAST, "--val-pool", "20", "--tune", strategy]
    assert main([*args, "--out", str(out)]) == 0
    tuning = json.loads((out / "results.json").read_text())["tuning"]
    assert tuning["strategy"] == strategy and tuning["validation"] == "pool" and tuning["split"]["val"] == 20
    assert tuning["path"][0]["scale"] == math.inf  # the path begins at the off limit
    assert "prior_share" in tuning["table"][-1] and tuning["search_cost_s"] > 0
    assert main([*args[:-4], "--val-pool", "0", "--tune", strategy, "--out", str(tmp_path / "none")]) == 2
    assert "learns from a validation pool: give --val-pool > 0" in _error_line(capsys)


def test_finetune_tune_none_has_nothing_to_learn(tiny_prior, tmp_path, capsys):
    args = ["finetune", "--prior", str(tiny_prior), *FAST, "--baseline", "none", "--tune", "marglik"]
    assert main([*args, "--out", str(tmp_path)]) == 2
    assert "no usable scale" in _error_line(capsys)


def test_finetune_segmentation(tiny_prior, tmp_path):
    out = tmp_path / "seg"
    assert main(["finetune", "--prior", str(tiny_prior), "--task", "segmentation", "--n-train", "4", "--n-test", "4",
                 "--steps", "2", "--eps", "0.01", "--quiet", "--out", str(out)]) == 0
    report = json.loads((out / "results.json").read_text())
    assert set(report["metrics"]) >= {"miou", "pixel_accuracy", "nll", "ece"}


def test_config_file_with_flag_override(tiny_prior, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text(f"prior: {tiny_prior}\nn-per-class: 3\nsteps: 2\nlr: 0.5\neps: 0.01\nquiet: true\n"
                      f"out: {tmp_path / 'from-config'}\n")
    assert main(["finetune", "--config", str(config), "--lr", "0.02"]) == 0
    report = json.loads((tmp_path / "from-config" / "results.json").read_text())
    assert report["n_per_class"] == 3 and report["hyperparameters"]["lr"] == 0.02  # flag beats file
    toml = tmp_path / "ft.toml"
    toml.write_text(f'prior = "{tiny_prior}"\nquiet = true\n[finetune]\nn_per_class = 2\nsteps = 2\neps = 0.01\n'
                    f'out = "{tmp_path / "toml"}"\n')
    assert main(["finetune", "--config", str(toml)]) == 0
    assert json.loads((tmp_path / "toml" / "results.json").read_text())["n_per_class"] == 2


def test_config_file_unknown_key(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("n-per-klass: 3\n")
    assert main(["finetune", "--config", str(config)]) == 2
    assert "unknown option 'n-per-klass'" in _error_line(capsys)


def test_bad_flag_is_one_line_and_exit_2(capsys):
    assert main(["finetune", "--n-per-class", "ten"]) == 2
    assert "invalid positive_int value" in _error_line(capsys)
    assert main(["finetune", "--frobnicate"]) == 2
    assert "unrecognized arguments: --frobnicate" in _error_line(capsys)
    assert main(["finetune", "--method", "adam"]) == 2
    assert "invalid choice" in _error_line(capsys)


def test_missing_prior_file(tmp_path, capsys):
    assert main(["finetune", "--prior", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]) == 2
    assert "nope.safetensors" in _error_line(capsys)
    assert main(["inspect", str(tmp_path / "nope.safetensors")]) == 2
    assert "not found" in _error_line(capsys)


def test_prior_for_another_architecture(tiny_prior, tmp_path, capsys):
    assert main(["finetune", "--prior", str(tiny_prior), "--model", "resnet8", *FAST, "--out", str(tmp_path)]) == 2
    assert "'smallcnn'" in _error_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.safetensors"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_installed_script_reports_errors_in_one_line(tmp_path):
    script = Path(sys.executable).with_name("ptyl")
    assert script.is_file(), "the ptyl console script is not installed (pip install -e .)"
    proc = subprocess.run([str(script), "inspect", str(tmp_path / "missing.safetensors")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    missing = tmp_path / "missing.safetensors"
    assert proc.stderr.strip().splitlines() == [f"ptyl: error: prior file not found: {missing}"]


def test_finetune_writes_every_output_or_none(tiny_prior, tmp_path, monkeypatch, capsys):
    import ptyl.cli.finetune

    def failing_json(*args, **kwargs):  # the last write fails after the plot and the weights were written
        raise OSError("disk full")

    monkeypatch.setattr(ptyl.cli.finetune, "save_json", failing_json)  # the name the command calls
    out = tmp_path / "run"
    assert main(["finetune", "--prior", str(tiny_prior), "--data", "mnist", *FAST, "--out", str(out)]) != 0
    assert list(out.iterdir()) == []


def test_a_prior_whose_pretrained_weights_belong_to_another_width(tiny_prior, tmp_path, capsys):
    """Issue 25: the weights file next to a width-4 prior holds a width-6 model: one line naming the parameters, their
    shapes and the file, exit 2 (was: exit 1, "unexpected RuntimeError: Error(s) in loading state_dict")."""
    import shutil

    from ptyl.io import read_weights_metadata, save_weights
    from ptyl.pipeline.tasks import build_from_metadata

    prior = tmp_path / "prior.safetensors"
    shutil.copy(tiny_prior, prior)
    meta = read_weights_metadata(pretrained_weights_path(tiny_prior))
    meta = {**meta, "model_kwargs": {**meta["model_kwargs"], "width": 6}}
    weights = save_weights(build_from_metadata(meta), pretrained_weights_path(prior), meta)
    assert main(["finetune", "--prior", str(prior), "--data", "mnist", *FAST, "--out", str(tmp_path / "run")]) == 2
    line = _error_line(capsys)
    assert str(weights) in line and "shape" in line
    assert "expected (4, 1, 3, 3)" in line and "found (6, 1, 3, 3)" in line, line
