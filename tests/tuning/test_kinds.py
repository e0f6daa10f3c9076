"""tune(..., kinds=[...]): the prior kind chosen on validation data, each kind tuned the same way, the off limit (plain
fine-tuning from the same start) a shared point of every search, run once; clear errors for bad kinds."""

import json
import math

import pytest
import torch
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError
from ptyl.models import MLP
from ptyl.posterior import SourcePosterior
from ptyl.training import TrainConfig
from ptyl.tuning import PriorSpec, tune

CONFIG = TrainConfig(epochs=2, batch_size=16, lr=0.05, progress=False)


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(45) % 3
    return TensorDataset(torch.randn(45, 4, generator=gen) + y[:, None], y)


def model_fn() -> MLP:
    torch.manual_seed(1)
    return MLP(4, 3, hidden=(6,))


def posterior() -> SourcePosterior:
    model = model_fn()
    gen = torch.Generator().manual_seed(0)
    body = {n: p.detach() for n, p in model.named_parameters() if not n.startswith("head.")}
    return SourcePosterior({n: p.clone() for n, p in body.items()},
                           {n: 1e-3 + 1e-2 * torch.rand(p.shape, generator=gen) for n, p in body.items()},
                           {n: 0.05 * torch.randn((3, *p.shape), generator=gen) for n, p in body.items()})


@pytest.fixture
def curves(monkeypatch):
    """Known validation curves per kind (log10 of the strength -> NLL), the off limit at ``off``; counts trials."""
    import ptyl.tuning.trials as trials

    calls = []

    def install(per_kind: dict, off: float):
        def run(self, values):
            kind = str(self.spec.kind)
            calls.append((kind, dict(values)))
            axis = "scale" if "scale" in values else "variance"
            if values[axis] == math.inf:
                return {**values, "val_nll": off, "std_ratio": math.inf, "prior_off": True}, None
            x = math.log10(values[axis])
            optimum, depth = per_kind[kind]
            return {**values, "val_nll": depth + 0.1 * (x - optimum) ** 2, "prior_off": x >= 9}, None

        monkeypatch.setattr(trials.TrialRunner, "__call__", run)
        return calls

    return install


def test_the_best_kind_wins_and_every_kind_is_reported(curves):
    calls = curves({"lowrank": (3.0, 0.2), "diag": (2.0, 0.3), "l2sp": (-3.0, 0.35), "standard": (1.0, 0.45)},
                   off=0.5)
    spec = PriorSpec(posterior=posterior())
    grid = {"lowrank": {"scale": [10.0, 1e3, 1e5]}, "diag": {"scale": [10.0, 100.0, 1e3]},
            "l2sp": {"variance": [1e-5, 1e-3, 1e-1]}, "standard": {"variance": [0.1, 10.0, 1e3]}}
    result = tune(model_fn, data(), spec, grid, kinds=["lowrank", "diag", "l2sp", "standard"], config=CONFIG,
                  refit=False, progress=False)
    assert result.kind == "lowrank" and result.best["scale"] == 1e3 and result.selected["val_nll"] == 0.2
    assert list(result.kinds) == ["lowrank", "diag", "l2sp", "standard"]
    assert {k: r.selected["val_nll"] for k, r in result.kinds.items()} == \
        {"lowrank": 0.2, "diag": 0.3, "l2sp": 0.35, "standard": 0.45}
    assert sum(math.inf in v.values() for _, v in calls) == 1  # the off limit ran once for the four searches
    assert all(math.inf in r.grid[r.spec.kind.recipe.axis] for r in result.kinds.values())
    summary = json.loads(result.to_json())
    assert summary["kind"] == "lowrank" and summary["kinds"]["l2sp"]["val_nll"] == 0.35


def test_plain_fine_tuning_wins_when_every_prior_hurts(curves):
    # every prior's curve has its optimum in a strong-prior basin that is worse than switching it off
    curves({"l2sp": (-4.0, 0.7), "standard": (0.0, 0.8)}, off=0.6)
    result = tune(model_fn, data(), PriorSpec(), {"l2sp": {"variance": [1e-5, 1e-4, 1e-3]},
                                                  "standard": {"variance": [0.1, 1.0, 10.0]}},
                  kinds=["l2sp", "standard"], config=CONFIG, refit=False, progress=False)
    assert result.kind == "none" and result.best["variance"] == math.inf and result.selected["val_nll"] == 0.6
    # each search followed its weak edge to where the diagnostic says off (10^9 here) or its hard bound
    assert all(r.edge_status["variance"] == "off limit" for r in result.kinds.values())


def test_bad_kinds_are_named_before_training():
    with pytest.raises(ConfigError, match="unknown prior kind in kinds 'lowrnk'.*choose one of"):
        tune(model_fn, data(), PriorSpec(), kinds=["lowrnk"], config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match=r"need a source posterior.*\['l2sp', 'standard', 'none'\]"):
        tune(model_fn, data(), PriorSpec(), kinds=["lowrank", "l2sp"], config=CONFIG, progress=False)
    with pytest.raises(ConfigError, match="not among the compared kinds"):
        tune(model_fn, data(), PriorSpec(), {"diag": {"scale": [1.0]}}, kinds=["l2sp"], config=CONFIG,
             progress=False)
    with pytest.raises(ConfigError, match="at least one"):
        tune(model_fn, data(), PriorSpec(), kinds=[], config=CONFIG, progress=False)


def test_real_kind_selection_keeps_one_model_and_matches_the_single_kind_searches():
    grid = {"l2sp": {"variance": [1e-3, 1.0]}, "standard": {"variance": [1.0, 100.0]}}
    options = dict(config=CONFIG, progress=False, extend=False, val_fraction=0.3)
    both = tune(model_fn, data(), PriorSpec(), grid, kinds=["l2sp", "standard"], **options)
    alone = tune(model_fn, data(), "standard", grid["standard"], **options)
    standard = both.kinds["standard"]
    assert [r["val_nll"] for r in standard.table] == [r["val_nll"] for r in alone.table]  # same trials, same order
    assert both.final is not None and len(both.final.train_loader.dataset) == len(data())  # the winner, refit on n
    best = min((r for r in both.kinds.values()), key=lambda r: r.selected["val_nll"])
    assert both.selected["val_nll"] == best.selected["val_nll"]
