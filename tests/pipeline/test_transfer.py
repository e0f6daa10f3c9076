"""The pipeline end to end: source prior + pretrained weights, method parsing, the tuned comparison, reports."""

import json
import math

import pytest
import torch

from ptyl.errors import ConfigError, ParameterMismatchError, PriorFileError
from ptyl.io import load_posterior, read_metadata, save_weights
from ptyl.models import SmallCNN
from ptyl.pipeline import (
    learn_source_prior,
    load_pretrained,
    load_weights,
    parse_method,
    plot_data_efficiency,
    pretrained_weights_path,
    run_transfer,
    summarize,
    train_config,
)


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("prior") / "prior.safetensors"
    return learn_source_prior("kmnist", "smallcnn", pretrain_epochs=1, swag_epochs=2, rank=3, lr=0.05, batch_size=32,
                              n_per_class=8, model_kwargs={"width": 4}, out=out, progress=False)


def test_prior_file_metadata_and_pretrained_weights_are_the_swa_mean(tiny_prior):
    meta = read_metadata(tiny_prior)
    assert meta["source"] == "kmnist" and meta["architecture"] == "smallcnn" and meta["objective"] == "supervised"
    assert meta["num_classes"] == 10 and meta["rank"] == 3 and meta["model_kwargs"]["width"] == 4
    assert pretrained_weights_path(tiny_prior).is_file()
    post = load_posterior(tiny_prior)
    assert not any(n.startswith("head.") for n in post.names)  # the source head is not part of the prior
    model, _ = load_pretrained(tiny_prior)
    params = dict(model.named_parameters())
    for name, mean in post.mean.items():
        torch.testing.assert_close(params[name], mean)
    # BatchNorm statistics were recomputed for the SWA mean (defaults are mean 0 / var 1)
    assert not torch.allclose(model.features.bn1.running_mean, torch.zeros(4))


def test_load_pretrained_with_new_head(tiny_prior):
    model, _ = load_pretrained(tiny_prior, num_classes=3)
    assert model.head.out_features == 3


def test_weights_roundtrip_and_mismatch(tmp_path):
    model = SmallCNN(width=4, num_classes=5)
    path = save_weights(model, tmp_path / "w.safetensors", {"model": "smallcnn", "model_kwargs": {"width": 4},
                                                            "num_classes": 5})
    loaded, meta = load_weights(path)
    assert meta["num_classes"] == 5
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=False):
        torch.testing.assert_close(a, b, msg=n)
    save_weights(model, tmp_path / "bad.safetensors", {"model": "smallcnn", "model_kwargs": {"width": 8},
                                                       "num_classes": 5})
    with pytest.raises(ParameterMismatchError, match=r"bad.safetensors.*cannot be loaded into SmallCNN.*"
                                                     r"features.conv1.weight \(expected \(8, 1, 3, 3\), "
                                                     r"found \(4, 1, 3, 3\)\)"):
        load_weights(tmp_path / "bad.safetensors")


def test_parse_method():
    assert parse_method("lowrank-sgld").prior == "lowrank" and parse_method("lowrank-sgld").inference == "sgld"
    assert parse_method("l2sp").inference == "map"
    swag = parse_method("swag")
    assert (swag.prior, swag.inference, swag.pretrained) == ("standard", "swag", True)
    scratch = parse_method("scratch")
    assert scratch.prior == "standard" and not scratch.pretrained
    for bad in ("lowrank-adam", "bayes", "scratchy"):
        with pytest.raises(ConfigError, match="unknown method"):
            parse_method(bad)


def test_train_config_keeps_the_step_budget():
    small, large = train_config("map", 20, steps=60, batch_size=10), train_config("map", 600, steps=60, batch_size=10)
    assert small.epochs == 30 and large.epochs == 2  # 2 steps/epoch vs 60 steps/epoch
    assert (small.max_steps, large.max_steps) == (60, 120)  # at least 2 epochs
    rule = train_config("map", 20, steps=60, batch_size=10, stop_loss=0.05, stop_plateau=1e-3, min_steps=10)
    assert (rule.stop_loss, rule.stop_plateau, rule.min_steps) == (0.05, 1e-3, 10)
    swag = train_config("swag", 100, steps=100, batch_size=10)
    assert swag.swag_collect_every >= 1 and swag.burn_in_fraction == 0.5


def test_run_transfer_records_every_method(tiny_prior, tmp_path):
    torch.manual_seed(0)
    methods = ["lowrank", "scratch"]
    results = run_transfer(tiny_prior, "mnist", n_per_class=[2], seeds=[0, 1], methods=methods, budget=2, steps=2,
                           eps=1e-2, max_test=50, out_dir=tmp_path, progress=False)
    assert [r["method"] for r in results] == methods * 2
    for r in results:
        assert r["num_train"] == 20 and r["num_test"] == 50 and r["n_per_class"] == 2
        assert 0.0 <= r["accuracy"] <= 1.0 and math.isfinite(r["nll"]) and r["wall_time_s"] > 0
        assert sum(t["round"] == 0 for t in r["validation"]) == 3  # the same grid for every method, + the off limit
        assert r["validation_mode"] == "pool" and r["split"]["val"] == 500  # the default 500-image pool
        assert r["final_loss"] > 0 and r["std_ratio"] > 0 and isinstance(r["prior_off"], bool)
        assert set(r["test_selected"]) >= {"accuracy", "nll"} and r["test_selected"]["nll"] <= r["nll"] + 1e-12
        axis = "scale" if r["prior"] == "lowrank" else "variance"
        assert set(r["selected"]) == {axis, "lr"}
    assert not results[1]["pretrained"] and results[0]["pretrained"]
    assert all(r["prior_share"] >= 0 for r in results)  # the N-aware diagnostic in every record
    # different seeds draw different few-shot subsets, so the runs differ
    assert results[0]["nll"] != results[2]["nll"]
    assert (tmp_path / "results.json").is_file()


def test_run_transfer_selects_the_kind_on_the_pool(tiny_prior):
    methods = ["standard", "l2sp", "lowrank"]
    results = run_transfer(tiny_prior, "mnist", n_per_class=[2], seeds=[0], methods=methods, budget=2, steps=2,
                           eps=1e-2, max_test=50, progress=False, max_rounds=1)
    assert [r["method"] for r in results] == [*methods, "selected"]
    selected = results[-1]
    per_kind = {r["method"]: r["val_nll"] for r in results[:-1]}
    assert selected["kind_scores"] == pytest.approx(per_kind)
    assert selected["val_nll"] == pytest.approx(min(per_kind.values()))  # never worse on the pool than any kind
    winner = min(per_kind, key=per_kind.get)
    assert selected["selected_kind"] in (winner, "none")
    off = [t for r in results[:-1] for t in r["validation"] if t.get("off_limit")]
    assert len({json.dumps({k: t[k] for k in ("val_nll", "test_nll")}) for t in off}) == 1  # one shared trial
    assert "selected" in summarize(results)


def test_run_transfer_records_divergence_instead_of_crashing(tiny_prior):
    results = run_transfer(tiny_prior, "mnist", n_per_class=[2], methods=["standard"], steps=4, max_test=20,
                           grids={"standard": {"variance": [1.0], "lr": [1e9]}}, progress=False,
                           train_overrides={"prior_step": "gradient"})
    assert "diverged" in results[0]["error"] and math.isnan(results[0]["accuracy"])
    assert "failed" in summarize(results)


def _fake(method, n, seed, acc, nll):
    return {"method": method, "n_per_class": n, "seed": seed, "accuracy": acc, "nll": nll, "ece": 0.1, "brier": 0.2,
            "selected": {"lr": 0.01}, "edge_warnings": [], "wall_time_s": 1.0, "source": "kmnist", "target": "mnist"}


def test_summarize_mean_and_std_over_seeds(tmp_path):
    results = [_fake("standard", 10, 0, 0.5, 1.0), _fake("standard", 10, 1, 0.7, 2.0),
               _fake("lowrank", 10, 0, 0.9, 0.5),
               _fake("standard", 100, 0, 0.8, 0.6)]
    table = summarize(results)
    lines = table.splitlines()
    assert lines[0].startswith("| n/class | method | accuracy | nll")
    std = torch.tensor([0.5, 0.7]).std().item()
    assert f"0.6000 ± {std:.4f}" in table and "1.5000 ± 0.7071" in table
    assert lines[2].startswith("| 10 | standard") and lines[3].startswith("| 10 | lowrank")
    assert lines[4].startswith("| 100 | standard")
    png = plot_data_efficiency(results, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simclr_source_prior_covers_the_trunk_only(tmp_path):
    torch.manual_seed(0)
    path = learn_source_prior("kmnist", "smallcnn", pretrain_epochs=1, swag_epochs=1, rank=2, batch_size=16,
                              n_per_class=4, model_kwargs={"width": 4}, objective="simclr",
                              out=tmp_path / "simclr.safetensors", progress=False)
    meta = read_metadata(path)
    assert meta["objective"] == "simclr" and meta["architecture"] == "smallcnn"
    names = load_posterior(path).names
    assert names and all(n.startswith("features.") for n in names)  # no projection.*, no head.*
    model, _ = load_pretrained(path, num_classes=10)  # the classifier loads the shared trunk
    assert model.head.out_features == 10



def test_run_transfer_raises_user_errors_before_training(tiny_prior, monkeypatch):
    import ptyl.pipeline.transfer as transfer

    monkeypatch.setattr(transfer, "tune",
                        lambda *a, **k: pytest.fail("a method was tuned before every grid was checked"))
    with pytest.raises(ConfigError, match="unknown grid axis 'lrr'"):  # the second method's grid is wrong
        run_transfer(tiny_prior, "mnist", n_per_class=[2], methods=["standard", "l2sp"], steps=2, max_test=20,
                     grids={"l2sp": {"variance": [1.0], "lrr": [0.1]}}, progress=False)
    with pytest.raises(ConfigError, match="unknown method"):
        run_transfer(tiny_prior, "mnist", n_per_class=[2], methods=["standard", "lowrank-adam"], progress=False)


def test_learn_source_prior_writes_weights_and_prior_together_or_not_at_all(tmp_path, monkeypatch):
    import ptyl.pipeline.source as source

    def failing_save(*args, **kwargs):  # runs after the weights were written inside the same group
        raise PriorFileError("prior save failed (e.g. fp16 underflow of the variance)")

    monkeypatch.setattr(source, "save_posterior", failing_save)
    out = tmp_path / "prior.safetensors"
    with pytest.raises(PriorFileError, match="prior save failed"):
        learn_source_prior("kmnist", "smallcnn", pretrain_epochs=0, swag_epochs=1, rank=2, batch_size=32,
                           n_per_class=4, model_kwargs={"width": 4}, out=out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no weights file, no temporary file


def test_fewer_snapshots_than_the_requested_rank_is_a_warning(tmp_path):
    out = tmp_path / "prior.safetensors"
    with pytest.warns(UserWarning, match="fewer than the requested rank 50: the prior has rank"):
        learn_source_prior("kmnist", "smallcnn", pretrain_epochs=0, swag_epochs=1, rank=50, batch_size=32,
                           n_per_class=4, model_kwargs={"width": 4}, out=out, progress=False)
    assert read_metadata(out)["rank"] < 50
