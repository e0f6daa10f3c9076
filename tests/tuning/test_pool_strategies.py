"""The strategies that learn the prior's strength from a validation pool (``hypergradient``, ``continuation``):
on ridge regression the hypergradient strategy's learned variance lands within 10% of the closed-form validation
optimum; the path begins at the off limit (no backbone prior term) and selects it where every prior hurts; the
continuation chooses the learning rate among several at a stated cost; bad input is a clear error before training
(an empty pool, a pool sharing examples with the training set, a non-finite hypergradient naming its step)."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError, DataError, DivergenceError
from ptyl.training import TrainConfig
from ptyl.tuning import PriorSpec, TuningStrategy, tune
from ptyl.tuning.continuation import ContinuationSettings, ladder
from ptyl.tuning.trials import OFF
from tests.helpers import TinyNet

POOL_STRATEGIES = [str(s) for s in TuningStrategy if s.automatic and s.tuner.uses_validation]
CONFIG = TrainConfig(epochs=3, batch_size=16, lr=0.05, progress=False)
N, M, P, NOISE = 40, 400, 5, 0.5


def ridge_data(seed=1):
    """y = x w + b + noise, with w far from the prior's centre (the start, zero): an interior optimal variance."""
    gen = torch.Generator().manual_seed(seed)
    truth = 0.3 * torch.randn(P + 1, generator=gen, dtype=torch.float64)

    def draw(n):
        x = torch.randn(n, P, generator=gen, dtype=torch.float64)
        y = x @ truth[:P] + truth[P] + math.sqrt(NOISE) * torch.randn(n, generator=gen, dtype=torch.float64)
        return TensorDataset(x, y[:, None])

    return draw(N), draw(M)


def linear_model():
    model = nn.Linear(P, 1).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def closed_form_validation_optimum(train, pool) -> float:
    """argmin_v of the pool's Gaussian NLL at theta*(v) = argmin sum (y - X theta)^2 / (2 s^2) + |theta|^2 / (2 v):
    a dense search over log10 v, refined by golden sections."""
    x, y = torch.cat([train.tensors[0], torch.ones(N, 1, dtype=torch.float64)], 1), train.tensors[1][:, 0]
    xv, yv = torch.cat([pool.tensors[0], torch.ones(M, 1, dtype=torch.float64)], 1), pool.tensors[1][:, 0]

    def loss(log10_v):
        theta = torch.linalg.solve(x.T @ x / NOISE + torch.eye(P + 1, dtype=torch.float64) / 10.0 ** log10_v,
                                   x.T @ y / NOISE)
        return float(((yv - xv @ theta) ** 2).mean())

    grid = torch.linspace(-4, 4, 801).tolist()
    best = min(grid, key=loss)
    lo, hi = best - 0.02, best + 0.02
    for _ in range(60):
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        lo, hi = (lo, b) if loss(a) < loss(b) else (a, hi)
    return 10.0 ** ((lo + hi) / 2)


def test_ridge_the_learned_variance_is_the_closed_form_validation_optimum():
    train, pool = ridge_data()
    optimum = closed_form_validation_optimum(train, pool)
    assert 0.05 < optimum < 0.1  # interior: neither off nor at a bound
    spec = PriorSpec("standard", head=None, head_variance=None)  # N(0, v I) on the weights and the bias: ridge
    config = TrainConfig(max_steps=2000, batch_size=N, lr=0.1, momentum=0.0, progress=False)
    result = tune(linear_model, train, spec, strategy="hypergradient", val_set=pool, config=config,
                  auto={"likelihood": "gaussian", "noise_variance": NOISE, "curvature": "hessian", "segments": 25,
                        "segment_fraction": 0.1, "segment_lr": 1.0, "solver_steps": 3 * (P + 1),
                        "damping": 0.0},
                  progress=False)
    assert result.best["variance"] == pytest.approx(optimum, rel=0.10), (result.best, optimum)
    steps = [e for e in result.path if isinstance(e.get("segment"), int) and e["segment"] >= 0]
    assert steps[0]["variance"] == pytest.approx(10.0 ** PriorSpec("standard").kind.recipe.log10_range[1])  # broad
    assert result.path[0]["variance"] == OFF  # the off limit first


def signal_data(n, seed):
    """Labels a TinyNet can learn from its inputs (the class shifts the mean of the image)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=gen) + 1.5 * y[:, None, None, None].float(), y)


def test_continuation_selects_the_off_limit_where_every_prior_hurts():
    """L2-SP around a random start, no coarse points: every strength of the ladder holds the weights near a random
    network and is worse on the pool than no backbone prior at all, which the path must return (inf) with the
    diagnostic calling it off."""
    config = TrainConfig(max_steps=150, batch_size=16, lr=0.05, progress=False)
    result = tune(TinyNet, signal_data(60, 0), "l2sp", strategy="continuation", val_set=signal_data(60, 1),
                  config=config, auto={"coarse_above": 0.0, "patience": 2}, progress=False)
    assert result.best["variance"] == OFF
    row = result.table[-1]
    assert row["off_limit"] and row["prior_off"] and row["prior_share"] == 0.0
    assert [e["log10"] for e in result.path] == [OFF, -1.0, -2.0]  # stopped after two worse points
    assert result.path[0]["selected"] and all(e["val_nll"] > result.objective for e in result.path[1:])


@pytest.mark.parametrize("strategy", POOL_STRATEGIES)
def test_the_selection_is_never_worse_on_the_pool_than_plain_fine_tuning(strategy):
    """The off limit is a point of every path: whatever is selected scores at most its pool NLL."""
    result = tune(TinyNet, signal_data(48, 0), "l2sp", strategy=strategy, val_set=signal_data(30, 1), config=CONFIG,
                  auto={"segments": 2} if strategy == "hypergradient" else {}, progress=False)
    off = result.path[0]
    assert off["variance"] == OFF
    assert result.objective <= off["val_nll"] + 1e-12
    assert result.table[-1]["prior_share"] is not None and "search_cost_s" in result.to_dict()


def test_continuation_chooses_the_learning_rate_at_the_off_limit():
    lrs = [0.005, 0.05, 0.2]
    result = tune(TinyNet, signal_data(48, 0), "standard", {"lr": lrs}, strategy="continuation",
                  val_set=signal_data(30, 1), config=CONFIG, progress=False)
    firsts = [e for e in result.path if e["point"] == 0]
    assert [e["lr"] for e in firsts] == lrs  # the off limit once per lr, the same start
    best = min(firsts, key=lambda e: e["val_nll"])
    assert result.best["lr"] == best["lr"] and all(e["lr"] == best["lr"] for e in result.path if e["point"] > 0)
    with pytest.raises(ConfigError, match="runs once"):
        tune(TinyNet, signal_data(48, 0), "standard", {"lr": lrs}, strategy="hypergradient",
             val_set=signal_data(30, 1), config=CONFIG, progress=False)


def test_the_continuation_ladder_walks_weak_to_strong_inside_the_bounds():
    for kind in ("lowrank", "l2sp", "standard"):
        recipe = PriorSpec(kind).kind.recipe
        points = ladder(recipe, ContinuationSettings())
        assert points[0] == OFF and points == sorted(points, reverse=True)
        assert all(recipe.bounds[0] <= p <= recipe.bounds[1] for p in points[1:])
        assert points[-1] == recipe.log10_range[0]
    with pytest.raises(ConfigError, match="outside the hard bounds"):
        ladder(PriorSpec("lowrank").kind.recipe, ContinuationSettings(start_log10=20.0))
    with pytest.raises(ConfigError, match="weak to strong"):
        ladder(PriorSpec("lowrank").kind.recipe, ContinuationSettings(start_log10=1.0, stop_log10=2.0))


@pytest.mark.parametrize("strategy", POOL_STRATEGIES)
def test_bad_pools_are_refused_before_training(strategy):
    train = signal_data(48, 0)
    empty = TensorDataset(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))
    go = lambda pool: tune(TinyNet, train, "standard", strategy=strategy, val_set=pool,  # noqa: E731
                           config=CONFIG, progress=False)
    with pytest.raises(DataError, match="empty"):
        go(empty)
    with pytest.raises(DataError, match="is the training set"):
        go(train)
    shared = TensorDataset(torch.cat([signal_data(10, 5).tensors[0], train.tensors[0][7:9]]),
                           torch.cat([signal_data(10, 5).tensors[1], train.tensors[1][7:9]]))
    with pytest.raises(DataError, match=r"overlaps the training set: 2 of its 12 examples .*pool example 10 = "
                                        r"training example 7"):
        go(shared)
    with pytest.raises(ConfigError, match="no usable scale"):  # a kind without a learnable strength
        tune(TinyNet, train, "none", strategy=strategy, val_set=signal_data(30, 1), config=CONFIG, progress=False)


class Overflowing(TinyNet):
    """TinyNet whose logits overflow on inputs far outside the training data's range (a pool the model diverges on)."""

    def forward(self, x):
        out = super().forward(x)
        return out * math.inf if float(x.abs().amax()) > 100.0 else out


def test_a_non_finite_hypergradient_names_its_step(monkeypatch):
    """A pool the model gives a non-finite loss on: the off limit's score is not kept, and the first hypergradient
    raises, naming the training step it was taken at; so does a non-finite hypergradient itself."""
    pool = signal_data(30, 1)
    pool = TensorDataset(pool.tensors[0] * 1e3, pool.tensors[1])
    train = signal_data(48, 0)
    with pytest.raises(DivergenceError, match=r"hypergradient is non-finite at step \d+: the pool's loss"):
        tune(Overflowing, train, "standard", strategy="hypergradient", val_set=pool, config=CONFIG, progress=False)
    with pytest.raises(DivergenceError, match="non-finite pool loss at every lr"):
        tune(Overflowing, train, "standard", strategy="continuation", val_set=pool, config=CONFIG, progress=False)
    import ptyl.tuning.hypergradient_step as step

    monkeypatch.setattr(step, "hypergradient", lambda family, model, direction: [torch.tensor(math.nan)])
    with pytest.raises(DivergenceError, match=r"non-finite at step (\d+): the hypergradient \[nan\]"):
        tune(TinyNet, train, "standard", strategy="hypergradient", val_set=signal_data(30, 1), config=CONFIG,
             progress=False)
