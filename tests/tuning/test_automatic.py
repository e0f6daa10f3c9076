"""tune(..., strategy="de-elbo" | "marglik"): every learnable prior kind, the grid's report (selected values,
per-epoch path, search cost), the refit of sampling methods, and a clear error for every bad input before training."""

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ptyl.errors import ConfigError, DataError, DivergenceError, InvalidValueError
from ptyl.priors import make_prior
from ptyl.training import TrainConfig
from ptyl.tuning import STRATEGIES, AutoConfig, PriorSpec, tune
from tests.helpers import TinyNet, random_posterior

AUTOMATIC = [s for s in STRATEGIES if s != "grid"]
CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)


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
def test_every_kind_is_learned_and_reported_like_the_grid(kind, strategy, data, posterior):
    result = tune(TinyNet, data, spec(kind, posterior), strategy=strategy, config=CONFIG, progress=False,
                  auto=AutoConfig(hyper_every=2))
    axis = "variance" if kind in ("l2sp", "standard") else "scale"
    assert result.strategy == strategy and set(result.best) >= {axis, "head_variance"}
    start = {"scale": 1e4, "variance": 1e-2 if kind == "l2sp" else 1.0}[axis]  # the registry's default
    learned = result.best[axis] if kind != "block" else next(iter(result.best[axis].values()))
    assert learned != pytest.approx(start) and learned > 0
    assert [r["epoch"] for r in result.table] == [1, 2, 3] and result.search_cost_s > 0
    assert result.metric in result.table[-1] and math.isfinite(result.objective)
    assert result.split == {"train": 48, "val": 0, "total": 48}
    prior = make_prior(TinyNet(), kind, posterior=spec(kind, posterior).posterior, **result.best)  # the refit path
    with torch.no_grad():
        assert math.isfinite(float(prior.log_prob(result.final.model)))
    report = json.loads(result.to_json())
    assert report["strategy"] == strategy and report["settings"]["curvature"] == "kfac"


def test_marglik_diag_curvature_and_the_path_plot(data, tmp_path):
    result = tune(TinyNet, data, "standard", strategy="marglik", auto=AutoConfig(curvature="diag", updates=3),
                  config=CONFIG, progress=False)
    assert [r["epoch"] for r in result.table if "log_evidence" in r] == [1, 2, 3]
    assert result.plot(tmp_path / "path.png").stat().st_size > 0


def test_sampling_inference_is_refit_at_the_learned_values(data):
    config = TrainConfig(inference="sgld", epochs=2, batch_size=16, lr=0.01, temperature=0.01, num_samples=2,
                         progress=False)
    result = tune(TinyNet, data, "standard", strategy="de-elbo", config=config, progress=False,
                  auto=AutoConfig(hyper_every=2))
    assert result.final.config.inference == "sgld" and len(result.final.samples) == 2
    assert result.table[-1]["variance"] == pytest.approx(result.best["variance"])


@pytest.mark.filterwarnings("ignore:best .* of its grid")
def test_grid_default_grid_and_search_cost(data):
    result = tune(TinyNet, data, PriorSpec("standard", variance=1.0), {"variance": [0.1, 1.0]}, config=CONFIG,
                  progress=False, refit=False)
    assert result.strategy == "grid" and result.search_cost_s > 0
    assert "variance" in tune(TinyNet, data, "standard", config=CONFIG, progress=False, refit=False).grid


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_a_prior_without_a_usable_scale(strategy, data, posterior):
    run = lambda s, **kw: tune(TinyNet, data, s, strategy=strategy, config=CONFIG, progress=False, **kw)  # noqa: E731
    with pytest.raises(ConfigError, match="no usable scale"):
        run("none")
    with pytest.raises(ConfigError, match="no usable scale"):
        run(PriorSpec("standard", head_variance=None), auto=AutoConfig(learn=("head_variance",)))
    with pytest.raises(ConfigError, match="needs PriorSpec.posterior"):
        run("lowrank")
    with pytest.raises(InvalidValueError, match="lambda"):
        run(spec("lowrank", posterior), auto=AutoConfig(initial={"scale": 0.0}))
    with pytest.raises(InvalidValueError, match="variance"):
        run("standard", auto=AutoConfig(initial={"variance": math.nan}))


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_a_model_without_the_named_head(strategy, data):
    with pytest.raises(ConfigError, match="no parameter belongs to the head 'fc'"):
        tune(TinyNet, data, PriorSpec("standard", head="fc"), strategy=strategy, config=CONFIG, progress=False)


@pytest.mark.parametrize("strategy", AUTOMATIC)
def test_data_that_yields_no_batches(strategy):
    empty = TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    few = TensorDataset(torch.zeros(4, 1, 6, 6), torch.zeros(4, dtype=torch.long))
    for data, match in ((empty, "empty"), (DataLoader(empty, batch_size=4), "no batches"),
                        (DataLoader(few, batch_size=8, drop_last=True), "no batches")):
        with pytest.raises(DataError, match=match):
            tune(TinyNet, data, "standard", strategy=strategy, config=CONFIG, progress=False)


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
def test_divergence_is_a_divergence_error(strategy, data):
    config = TrainConfig(epochs=2, batch_size=16, lr=1e6, progress=False)
    with pytest.raises(DivergenceError):
        tune(TinyNet, data, "standard", strategy=strategy, config=config, progress=False)
