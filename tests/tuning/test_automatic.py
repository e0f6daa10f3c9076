"""tune(..., strategy=<every automatic strategy of the registry>): every learnable prior kind, the grid's report
(selected values, per-epoch path, search cost), the refit of sampling methods, each strategy's own settings, and a
clear error for every bad input before training."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptyl.errors import ConfigError, DataError, DivergenceError, InvalidValueError
from ptyl.training import TrainConfig
from ptyl.tuning import DEELBOSettings, MarglikSettings, PriorSpec, TuningStrategy, tune
from ptyl.tuning.selection import selected_prior
from ptyl.tuning.trials import OFF
from tests.helpers import TinyNet, random_posterior

AUTOMATIC = [str(s) for s in TuningStrategy if s.automatic]
CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
FAST = {"de-elbo": {"hyper_every": 2}, "marglik": {}, "hypergradient": {"segments": 2, "refit": False},
        "continuation": {"refit": False, "patience": 1}}


@pytest.fixture(scope="module")
def pool():
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(30, 1, 6, 6, generator=gen), torch.arange(30) % 3)


def run(strategy, data, spec_, pool, **kw):
    """tune() with the strategy's fast settings (and the pool, for the strategies that learn from one)."""
    entry = TuningStrategy.parse(strategy)
    kw.setdefault("auto", FAST.get(strategy, {}))
    kw.setdefault("config", CONFIG)
    val = {"val_set": pool} if entry.tuner.uses_validation else {}
    return tune(TinyNet, data, spec_, strategy=strategy, progress=False, **val, **kw)


@pytest.fixture(scope="module")
def data():
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(48, 1, 6, 6, generator=gen), torch.arange(48) % 3)


@pytest.fixture(scope="module")
def posterior():
    return random_posterior(TinyNet(), dtype=torch.float32)


def spec(kind, posterior, **extra):
    return PriorSpec(kind=kind, posterior=posterior if kind in ("lowrank", "diag", "block") else None, **extra)


@pytest.mark.parametrize("strategy", AUTOMATIC)
@pytest.mark.parametrize("kind", ["lowrank", "diag", "block", "l2sp", "standard"])
def test_every_kind_is_learned_and_reported_like_the_grid(kind, strategy, data, posterior, pool):
    result = run(strategy, data, spec(kind, posterior), pool)
    tuner = TuningStrategy.parse(strategy).tuner
    axis = "variance" if kind in ("l2sp", "standard") else "scale"
    assert result.strategy == strategy and set(result.best) >= {axis, "head_variance"}
    recipe = PriorSpec(kind).kind.recipe
    start = tuner(tuner.Settings()).start_values(PriorSpec(kind))[axis]
    broad = {"hypergradient": recipe.log10_range[1], "continuation": min(recipe.log10_range[1] + 4, recipe.bounds[1])}
    assert start == (10.0 ** broad[strategy] if strategy in broad else recipe.default)  # the pool ones: broad
    learned = result.best[axis]
    if tuner.uses_validation:  # their path begins at the off limit (no backbone prior) and stays in the bounds
        assert result.path[0][axis] == OFF and result.path[0]["val_nll"] > 0
        selected = [e for e in result.path if e.get("selected")]
        assert len(selected) == 1 and selected[0][axis] == learned  # the selection is the best point of the path
        assert selected[0]["val_nll"] == min(e["val_nll"] for e in result.path if "val_nll" in e)
        for entry in result.path:
            for value in (entry[axis].values() if isinstance(entry.get(axis), dict) else [entry.get(axis, OFF)]):
                assert value == OFF or 10.0 ** recipe.bounds[0] <= value <= 10.0 ** recipe.bounds[1]
        assert result.table[-1]["off_limit"] == (learned == OFF)
    else:
        learned = learned if kind != "block" else next(iter(learned.values()))
        assert learned != pytest.approx(start) and learned > 0
    epochs = [r["epoch"] for r in result.table]  # the pool strategies: every segment's epochs, numbered on
    assert epochs == (list(range(1, len(epochs) + 1)) if tuner.uses_validation else [1, 2, 3])
    assert result.search_cost_s > 0
    assert result.metric in result.table[-1] and math.isfinite(result.objective)
    assert result.split == {"train": 48, "val": len(pool) if tuner.uses_validation else 0, "total": 48}
    assert result.validation == ("pool" if tuner.uses_validation else "none")
    prior = selected_prior(spec(kind, posterior), TinyNet(), result.best)  # the refit path
    with torch.no_grad():
        assert math.isfinite(float(prior.log_prob(result.final.model)))
    report = json.loads(result.to_json())
    assert report["strategy"] == strategy and report["settings"] == TuningStrategy.parse(strategy).settings(
        **FAST[strategy]).to_dict()


def test_each_strategy_takes_its_own_settings(data, pool):
    with pytest.raises(ConfigError, match="takes MarglikSettings settings, got DEELBOSettings"):
        tune(TinyNet, data, "standard", strategy="marglik", auto=DEELBOSettings(), progress=False)
    with pytest.raises(ConfigError, match=r"has no setting\(s\) \['hyper_every'\]"):
        tune(TinyNet, data, "standard", strategy="marglik", auto={"hyper_every": 2}, progress=False)
    for strategy in AUTOMATIC:
        settings = TuningStrategy.parse(strategy).settings
        assert issubclass(settings, TuningStrategy.parse(strategy).tuner.Settings)
    assert {f for f in DEELBOSettings().to_dict()} & {f for f in MarglikSettings().to_dict()} == {
        "learn", "initial", "likelihood", "noise_variance", "hyper_lr"}


def test_marglik_diag_curvature_and_the_path_plot(data, tmp_path):
    result = tune(TinyNet, data, "standard", strategy="marglik", auto=MarglikSettings(curvature="diag", updates=3),
                  config=CONFIG, progress=False)
    assert [r["epoch"] for r in result.table if "log_evidence" in r] == [1, 2, 3]
    assert result.plot(tmp_path / "path.png").stat().st_size > 0


def test_sampling_inference_is_refit_at_the_learned_values(data):
    config = TrainConfig(inference="sgld", epochs=2, batch_size=16, lr=0.01, temperature=0.01, num_samples=2,
                         progress=False)
    result = tune(TinyNet, data, "standard", strategy="de-elbo", config=config, progress=False,
                  auto=DEELBOSettings(hyper_every=2))
    assert result.final.config.inference == "sgld" and len(result.final.samples) == 2
    assert result.table[-1]["variance"] == pytest.approx(result.best["variance"])


@pytest.mark.filterwarnings("ignore:best .* of its grid")
def test_grid_default_grid_and_search_cost(data):
    result = tune(TinyNet, data, PriorSpec("standard", variance=1.0), {"variance": [0.1, 1.0]}, config=CONFIG,
                  progress=False, refit=False)
    assert result.strategy == "grid" and result.search_cost_s > 0
    assert "variance" in tune(TinyNet, data, "standard", config=CONFIG, progress=False, refit=False).grid


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_a_prior_without_a_usable_scale(strategy, data, posterior, pool):
    go = lambda s, **kw: run(strategy, data, s, pool, **kw)  # noqa: E731
    with pytest.raises(ConfigError, match="no usable scale"):
        go("none")
    with pytest.raises(ConfigError, match="no usable scale"):
        go(PriorSpec("standard", head_variance=None), auto={"learn": ("head_variance",)})
    with pytest.raises(ConfigError, match="needs PriorSpec.posterior"):
        go("lowrank")
    with pytest.raises(InvalidValueError, match="lambda"):
        go(spec("lowrank", posterior), auto={"initial": {"scale": 0.0}})
    with pytest.raises(InvalidValueError, match="variance"):
        go("standard", auto={"initial": {"variance": math.nan}})


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_a_model_without_the_named_head(strategy, data, pool):
    with pytest.raises(ConfigError, match="no parameter belongs to the head 'fc'"):
        run(strategy, data, PriorSpec("standard", head="fc"), pool)


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_data_that_yields_no_batches(strategy, pool):
    empty = TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    few = TensorDataset(torch.zeros(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))
    for data, match in ((empty, "empty"), (DataLoader(empty, batch_size=4), "no batches"),
                        (DataLoader(few, batch_size=8, drop_last=True), "no batches")):
        with pytest.raises(DataError, match=match):
            run(strategy, data, "standard", pool)


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_a_pool_only_where_the_strategy_learns_from_one(strategy, data, pool):
    uses = TuningStrategy.parse(strategy).tuner.uses_validation
    with pytest.raises(ConfigError, match="drop val_set" if not uses else "pass val_set"):
        tune(TinyNet, data, "standard", strategy=strategy, config=CONFIG, progress=False,
             val_set=None if uses else pool)


def test_grid_axes_an_automatic_strategy_cannot_take(data):
    with pytest.raises(ConfigError, match="learns the prior's values"):
        tune(TinyNet, data, "standard", {"variance": [1.0]}, strategy="marglik", progress=False)
    with pytest.raises(ConfigError, match="runs once"):
        tune(TinyNet, data, "standard", {"lr": [0.01, 0.1]}, strategy="marglik", progress=False)
    with pytest.raises(ConfigError, match="tuning strategy"):
        tune(TinyNet, data, "standard", strategy="bayes", progress=False)
    one = tune(TinyNet, data, "standard", {"lr": [0.02]}, strategy="marglik", config=CONFIG, progress=False)
    assert one.final.config.lr == 0.02


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_divergence_is_a_divergence_error(strategy, data, pool):
    config = TrainConfig(epochs=2, batch_size=16, lr=1e6, progress=False)
    with pytest.raises(DivergenceError):
        run(strategy, data, "standard", pool, config=config)
