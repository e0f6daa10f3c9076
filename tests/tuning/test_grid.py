"""Grid search protocol: class-balanced split, argmin selection, edge warnings, refit on all n, determinism."""

import json
import math
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError, DataError, InvalidValueError
from ptyl.metrics import evaluate_probs
from ptyl.models import MLP
from ptyl.posterior import SourcePosterior
from ptyl.training import TrainConfig, fit
from ptyl.tuning import PriorSpec, default_grid, tune, validation_split
from ptyl.tuning.result import edge_warnings

CONFIG = TrainConfig(epochs=4, batch_size=16, lr=0.05, progress=False)


def blobs(n_per_class: int = 20, num_classes: int = 3, dim: int = 4, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(num_classes, dim, generator=gen)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), dim, generator=gen)
    return TensorDataset(x, y)


def model_fn() -> MLP:
    torch.manual_seed(123)  # the "pretrained" backbone: identical on every call
    return MLP(4, 3, hidden=(8,))


def test_split_is_class_balanced_and_disjoint():
    y = torch.tensor([0] * 10 + [1] * 20 + [2] * 5)
    data = TensorDataset(torch.arange(len(y)).float()[:, None], y)  # x = example id
    train, val = validation_split(data, 0.2, seed=3)
    train_ids, val_ids = set(train.indices), set(val.indices)
    assert not train_ids & val_ids and train_ids | val_ids == set(range(len(y)))
    val_counts = torch.bincount(y[sorted(val_ids)], minlength=3).tolist()
    assert val_counts == [2, 4, 1]  # round(0.2 * n_c) per class
    assert set(validation_split(data, 0.2, seed=4)[1].indices) != val_ids  # the seed picks the split


@pytest.mark.filterwarnings("ignore:best .* grid")
def test_tune_picks_argmin_and_matches_an_independent_fit():
    data = blobs()
    grid = {"variance": [0.01, 0.1, 10.0], "lr": [0.05]}
    result = tune(model_fn, data, "standard", grid, config=CONFIG, seed=1, progress=False, refit=False, extend=False)
    assert len(result.table) == 4 and result.split == {"train": 48, "val": 12, "total": 60}
    assert [r["variance"] for r in result.table] == [0.01, 0.1, 10.0, math.inf]  # the off limit is a point
    best_row = min(result.table, key=lambda r: r["val_nll"])
    assert result.best == {"variance": best_row["variance"], "lr": 0.05}
    assert all({"val_nll", "val_accuracy", "val_ece"} <= set(r) for r in result.table)
    # the protocol by hand: same split, fresh model, prior, fit on the 80 % with num_data = its size
    train, val = validation_split(data, 0.2, seed=1)
    for row in (result.table[1], result.table[-1]):
        torch.manual_seed(1)
        model = model_fn()
        off = row["variance"] == math.inf  # the off limit: no backbone prior, the same head prior
        prior = PriorSpec("none" if off else "standard").build_prior(model, variance=None if off else row["variance"])
        by_hand = fit(model, train, prior, CONFIG, num_data=len(train), seed=1)
        val_nll = evaluate_probs(by_hand.predict(val), val.dataset.tensors[1][val.indices])["nll"]
        assert val_nll == pytest.approx(row["val_nll"], rel=1e-6)


@pytest.mark.filterwarnings("ignore:best .* grid")
def test_same_seed_same_table_and_refit_uses_all_data():
    data = blobs()
    grid = {"variance": [0.1, 1.0], "lr": [0.02, 0.05]}
    first = tune(model_fn, data, "l2sp", grid, config=CONFIG, seed=0, progress=False)
    second = tune(model_fn, data, "l2sp", grid, config=CONFIG, seed=0, progress=False, refit=False)
    assert first.table == second.table
    assert len(first.final.train_loader.dataset) == len(data)  # refit on all n
    assert first.final.config.lr == first.best["lr"]


def test_edge_warning_fires_when_every_variance_is_absurdly_tiny():
    # variances this small pin the backbone to zero, so the largest one is always best: an edge optimum
    grid = {"variance": [1e-3, 3e-3, 1e-2]}
    with pytest.warns(UserWarning, match="largest value"):
        result = tune(model_fn, blobs(), PriorSpec("standard", head_variance=1e-3), grid, config=CONFIG,
                      progress=False, refit=False, extend=False, off_limit=False)
    assert result.best["variance"] == 1e-2 and result.at_edge and result.edge_status["variance"] == "edge"
    assert "variance" in result.edge_warnings[0]


def test_edge_rule():
    grid = {"scale": [1.0, 10.0, 100.0], "lr": [0.01], "rank": [2, 5], "kind": ["a", "b"]}
    assert edge_warnings(grid, {"scale": 10.0, "lr": 0.01, "rank": 2, "kind": "a"}) == [
        "best rank=2 is the smallest value of its grid [2, 5]: the optimum may lie outside it, extend the grid"
    ]
    assert edge_warnings(grid, {"scale": 10.0, "lr": 0.01, "rank": 5, "kind": "b"})[0].startswith("best rank=5")
    assert not edge_warnings({"scale": [1.0, 10.0, 100.0]}, {"scale": 10.0})


def test_learned_prior_scale_axis_json_and_plot(tmp_path):
    model = model_fn()
    gen = torch.Generator().manual_seed(0)
    backbone = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("head.")}
    posterior = SourcePosterior(
        {n: p.clone() for n, p in backbone.items()},
        {n: torch.rand(p.shape, generator=gen) * 0.01 + 1e-3 for n, p in backbone.items()},
        {n: 0.05 * torch.randn((3, *p.shape), generator=gen) for n, p in backbone.items()},
    )
    spec = PriorSpec("lowrank", posterior=posterior, eps=1e-4)
    grid = {"scale": [1.0, 100.0], "lr": [0.02, 0.05]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tune(model_fn, blobs(), spec, grid, config=CONFIG, progress=False, refit=False)
    text = result.to_json(tmp_path / "tune.json")
    assert json.loads(text)["best"] == result.best
    assert json.loads((tmp_path / "tune.json").read_text())["table"] == json.loads(text)["table"]
    png = result.plot(tmp_path / "nll.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_grids_have_equal_budgets():
    sizes = {m: math.prod(len(v) for v in default_grid(m, budget=15).values())
             for m in ("lowrank", "diag", "l2sp", "standard", "none")}
    assert set(sizes.values()) == {15}
    assert default_grid("lowrank", budget=15)["scale"] == [1.0, 10.0, 100.0, 1e3, 1e4]
    assert default_grid("standard", budget=6, lrs=(0.01, 0.1)) == {"variance": [0.1, 10.0, 1e3], "lr": [0.01, 0.1]}
    with pytest.raises(InvalidValueError, match="fewer than 2"):
        default_grid("diag", budget=5)


def test_bad_input_is_named():
    data = blobs()
    with pytest.raises(ConfigError, match="unknown grid axis 'wd'"):
        tune(model_fn, data, "standard", {"wd": [1.0]}, config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="weight_decay"):
        tune(model_fn, data, "standard", {"weight_decay": [1e-4]}, config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="posterior"):
        tune(model_fn, data, "lowrank", {"scale": [1.0]}, config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="seed"):
        tune(model_fn, data, "standard", {"seed": [0, 1], "variance": [1.0]}, config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="metric"):
        tune(model_fn, data, "standard", {"variance": [1.0]}, config=CONFIG, metric="auc", progress=False)
    with pytest.raises(DataError):
        validation_split(TensorDataset(torch.randn(4, 2), torch.randn(4)))


def test_tune_splits_segmentation_masks_at_random_and_scores_per_pixel():
    from torch import nn

    from ptyl.data.segmentation import DigitCanvasSegmentation
    from ptyl.metrics.segmentation import evaluate_segmentation

    gen = torch.Generator().manual_seed(0)
    digits, labels = torch.rand(12, 1, 6, 6, generator=gen), torch.arange(12) % 3
    data = DigitCanvasSegmentation(digits, labels, 10, canvas_size=6, digits_per_canvas=(1, 1), threshold=0.5)
    train, val = validation_split(data, 0.2, seed=5, split="random")
    assert sorted(train.indices + val.indices) == list(range(10)) and len(val) == 2
    assert val.indices == validation_split(data, 0.2, seed=5, split="random")[1].indices  # seeded
    with pytest.raises(DataError, match="split='random'"):
        validation_split(data)  # the default stays class-balanced, and says what to do

    class PixelNet(nn.Module):  # per-pixel logits [B, 4, H, W]
        def __init__(self):
            super().__init__()
            self.features = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Conv2d(4, data.num_classes, 1)

        def forward(self, x):
            return self.head(torch.relu(self.features(x)))

    def pixel_model():
        torch.manual_seed(7)
        return PixelNet()

    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, optimizer="adam", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = tune(pixel_model, data, "standard", {"variance": [0.1, 10.0]}, config=config, seed=5,
                      progress=False)  # split="auto": no labels of shape [n], so a random split
    assert result.split == {"train": 8, "val": 2, "total": 10}
    # the validation NLL is the per-pixel NLL of an independent fit on the same random split
    fit_part, val_part = validation_split(data, 0.2, seed=5, split="random")
    torch.manual_seed(5)
    model = pixel_model()
    prior = PriorSpec("standard").build_prior(model, variance=result.best["variance"])
    fitted = fit(model, fit_part, prior, replace_seed(config, 5), num_data=len(fit_part), head="head")
    expected = evaluate_segmentation(fitted.predict(val_part), data.masks[val_part.indices])["nll"]
    best_row = next(r for r in result.table if r["variance"] == result.best["variance"])
    assert best_row["val_nll"] == pytest.approx(expected, rel=1e-5)
    assert result.final is not None and len(result.final.train_loader.dataset) == len(data)
    with pytest.raises(ConfigError, match="split"):
        tune(pixel_model, data, "standard", {"variance": [1.0]}, config=config, split="stratified", progress=False)


def replace_prior_step(config: TrainConfig) -> TrainConfig:
    from dataclasses import replace

    return replace(config, prior_step="gradient")


def replace_seed(config: TrainConfig, seed: int) -> TrainConfig:
    from dataclasses import replace

    return replace(config, seed=seed)


def test_user_errors_are_raised_before_the_first_fit(monkeypatch):
    import ptyl.tuning.trials as grid_module

    def no_fit(*args, **kwargs):
        raise AssertionError("a fit started before the grid was checked")

    monkeypatch.setattr(grid_module, "fit", no_fit)
    data = blobs()
    with pytest.raises(ConfigError, match="unknown grid axis 'lrr'"):
        tune(model_fn, data, "standard", {"variance": [1.0], "lrr": [0.1]}, config=CONFIG, progress=False)
    with pytest.raises(InvalidValueError, match="lr"):  # the second value of the axis, not found by a first trial
        tune(model_fn, data, "standard", {"variance": [1.0], "lr": [0.1, -1.0]}, config=CONFIG, progress=False)
    with pytest.raises(InvalidValueError, match="variance"):
        tune(model_fn, data, "standard", {"variance": [1.0, 0.0]}, config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="optimizer"):
        tune(model_fn, data, "standard", {"variance": [1.0], "optimizer": ["sgd", "adamw"]}, config=CONFIG,
             progress=False)


def test_every_trial_diverging_is_a_divergence_error_not_a_config_error():
    from ptyl.errors import DivergenceError

    with pytest.raises(DivergenceError, match="every one of the 3 trials diverged"):
        # the gradient step (a proximal step pins an absurd-lr model to the prior mean instead of diverging); 2 values
        # and the off limit
        tune(model_fn, blobs(), "standard", {"variance": [1.0, 10.0], "lr": [1e9]},
             config=replace_prior_step(CONFIG), progress=False, extend=False)


def test_plot_leaves_the_callers_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = tune(model_fn, blobs(), "standard", {"variance": [0.1, 1.0]}, config=CONFIG, progress=False,
                          refit=False)
        result.plot(tmp_path / "nll.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "nll.png").read_bytes()[:4] == b"\x89PNG"
