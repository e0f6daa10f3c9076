"""Tuning never stops on an edge silently: edge extension by decades until the optimum is interior, the strong edge is
flat, the weak edge is off by the N-aware diagnostic, or the hard bound is reached; every strength axis ends at the
exact off limit; the search path; the cache of finished trials; the strength columns."""

import math
import warnings

import pytest
import torch
from torch.utils.data import TensorDataset

from ptyl.models import MLP
from ptyl.priors import PriorKind
from ptyl.training import TrainConfig
from ptyl.tuning import tune
from ptyl.tuning.search import axis_status, next_values

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False)


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(30) % 3
    return TensorDataset(torch.randn(30, 4, generator=gen) + y[:, None], y)


def model_fn() -> MLP:
    torch.manual_seed(1)
    return MLP(4, 3, hidden=(6,))


@pytest.fixture
def synthetic(monkeypatch):
    """Replace the fit by a known validation curve of log10(variance), counting the trials run."""
    import ptyl.tuning.trials as trials

    calls = []

    def curve(optimum: float, flat_below: float | None = None, off_nll: float = math.inf, off_above: float = 99.0):
        """val NLL = 1 + (log10 v - optimum)^2; the off limit scores ``off_nll``; the diagnostic calls every
        variance >= 10^off_above off."""
        def run(self, values):
            calls.append(dict(values))
            if values["variance"] == math.inf:
                return {**values, "val_nll": off_nll, "std_ratio": math.inf, "prior_off": True}, None
            x = math.log10(values["variance"])
            nll = 1.0 + (x - optimum) ** 2
            if flat_below is not None:  # below flat_below the curve keeps falling, by a hair
                nll = 1.0 + (max(x, flat_below) - optimum) ** 2 + 1e-4 * x
            return {**values, "val_nll": nll, "std_ratio": 1.0, "prior_off": x >= off_above}, None

        monkeypatch.setattr(trials.TrialRunner, "__call__", run)
        return calls

    return curve


def test_an_edge_optimum_is_extended_until_interior(synthetic):
    calls = synthetic(optimum=2.0)  # best variance 100, far above the grid
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no edge warning: the search resolved it
        result = tune(model_fn, data(), "standard", {"variance": [0.01, 0.1], "lr": [0.05]}, config=CONFIG,
                      refit=False, progress=False)
    assert result.best["variance"] == 100.0 and result.edge_status["variance"] == "interior"
    # the weak edge steps 1, 2, 4 decades beyond the grid, then the gaps next to the best are halved to one decade
    assert result.grid["variance"] == [0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e6, math.inf]  # the off limit last
    assert [c["variance"] for c in calls] == [0.01, 0.1, math.inf, 1.0, 100.0, 1e6, 10.0, 1e4, 1e3]  # each once
    assert [p["best"]["variance"] for p in result.path][-1] == 100.0
    assert result.path[-1]["status"] == {"variance": "interior"} and not result.at_edge


def test_extension_stops_at_the_documented_hard_bound(synthetic):
    synthetic(optimum=9.0)  # beyond the standard prior's bound
    hi = PriorKind.STANDARD.recipe.bounds[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tune(model_fn, data(), "standard", {"variance": [10.0**(hi - 3), 10.0**(hi - 2)]}, config=CONFIG,
                      refit=False, progress=False)
    assert result.best["variance"] == 10.0**hi and result.edge_status["variance"] == "upper bound"
    assert max(result.grid["variance"][:-1]) == 10.0**hi and not result.edge_warnings


def test_the_weak_edge_is_followed_to_the_off_limit(synthetic):
    # the case: an interior optimum at v = 100 in the strong-prior basin, worse at 1e4, better with the prior
    # off: the search must not stop at the interior optimum, and it follows the weak edge until the diagnostic says off
    calls = synthetic(optimum=2.0, off_nll=0.5, off_above=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = tune(model_fn, data(), "standard", {"variance": [1.0, 100.0, 1e4]}, config=CONFIG, refit=False,
                      progress=False)
    assert result.best["variance"] == math.inf and result.selected["val_nll"] == 0.5
    assert result.edge_status["variance"] == "off limit"
    # the weak edge stepped 1, then 2 decades (10^5, 10^7), stopping at the first value the diagnostic calls off
    assert [v for v in result.grid["variance"] if v > 1e4] == [1e5, 1e7, math.inf]
    assert sum(c["variance"] == math.inf for c in calls) == 1


def test_a_flat_weak_edge_is_not_the_off_limit(synthetic):
    # flat between 1e3 and 1e4 (both "on"), then better at the off limit: flatness does not stop the weak edge
    synthetic(optimum=9.0, flat_below=99.0, off_nll=0.1, off_above=7.0)
    result = tune(model_fn, data(), "standard", {"variance": [1e2, 1e3]}, config=CONFIG, refit=False,
                  progress=False)
    assert result.best["variance"] == math.inf and max(result.grid["variance"][:-1]) >= 1e7


def test_a_flat_curve_beyond_the_edge_stops_the_search(synthetic):
    calls = synthetic(optimum=-6.0, flat_below=-2.0)  # nothing changes below variance 1e-2
    result = tune(model_fn, data(), "l2sp", {"variance": [1e-2, 1e-1, 1.0]}, config=CONFIG, refit=False,
                  progress=False)
    assert result.edge_status["variance"] == "flat" and not result.edge_warnings
    assert min(c["variance"] for c in calls) == 1e-3  # one value beyond the edge showed the flatness


def test_without_extension_an_edge_is_a_warning(synthetic):
    synthetic(optimum=2.0)
    with pytest.warns(UserWarning, match="largest value"):
        result = tune(model_fn, data(), "standard", {"variance": [0.01, 0.1]}, config=CONFIG, refit=False,
                      progress=False, extend=False)
    assert result.edge_status["variance"] == "edge" and result.at_edge and len(result.table) == 3  # 2 + off limit


def test_the_cache_replays_finished_trials(synthetic):
    calls = synthetic(optimum=0.0)

    class Cache(dict):
        def get(self, values):
            return super().get(tuple(sorted(values.items())))

        def put(self, values, row):
            self[tuple(sorted(values.items()))] = row

    cache = Cache()
    grid = {"variance": [0.01, 0.1, 1.0, 10.0]}
    first = tune(model_fn, data(), "standard", grid, config=CONFIG, refit=False, progress=False, cache=cache)
    ran = len(calls)
    second = tune(model_fn, data(), "standard", grid, config=CONFIG, refit=False, progress=False, cache=cache)
    assert len(calls) == ran == len(cache) and second.best == first.best and second.table == first.table


def test_status_and_next_values_rules():
    assert axis_status([1.0, 10.0, 100.0], 10.0, (0.0, 4.0)) == "interior"
    assert axis_status([1.0, 10.0], 1.0, (0.0, 4.0)) == "lower bound"
    assert axis_status([1.0, 10.0], 1.0, None) == "edge"
    assert axis_status([1.0], 1.0, (0.0, 4.0)) == "interior"  # a single value is a fixed setting, not a search
    assert axis_status([1.0, 10.0, math.inf], math.inf, (0.0, 4.0)) == "off limit"
    table = [{"scale": 10.0, "val_nll": 0.5}, {"scale": 100.0, "val_nll": 0.4}]
    assert next_values({"scale": [10.0, 100.0]}, table[1], {"scale": (0.0, 2.5)}, table) == \
        ({"scale": [316.228]}, {"scale": "edge"})  # the last step lands on the bound (10^2.5, 6 digits)
    table[1]["prior_off"] = True  # the weak edge is off by the diagnostic: the curve has joined the off limit
    assert next_values({"scale": [10.0, 100.0]}, table[1], {"scale": (0.0, 2.5)}, table) == ({}, {"scale": "off limit"})


def test_real_trials_carry_strength_and_fit_columns():
    result = tune(model_fn, data(), "standard", {"variance": [1e-3, 1e8]}, config=CONFIG, refit=False,
                  progress=False, extend=False, val_fraction=0.3)
    tight, loose, off = result.table
    assert {"std_ratio", "prior_share", "prior_share_blocks", "prior_off", "off_limit", "final_loss", "fit_status",
            "steps", "epoch_loss"} <= set(tight)
    assert tight["std_ratio"] < 10 <= loose["std_ratio"]
    assert not tight["prior_off"] and tight["prior_share"] > 0.5 and loose["prior_off"] and loose["prior_share"] < 0.01
    assert off["off_limit"] and off["prior_off"] and off["prior_share"] == 0.0 and not tight["off_limit"]
    assert tight["fit_status"] in ("fit", "prior-limited") and tight["steps"] == 2 * 2  # 21 examples, batch 16
