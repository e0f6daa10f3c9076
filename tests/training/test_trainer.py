"""The downstream loop on a tiny real dataset (sklearn digits, 8x8) with every prior kind and method."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError, DataError
from ptyl.metrics import evaluate_probs
from ptyl.posterior import SWAGCollector
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit


class DigitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[:300], perm[1000:1500]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


@pytest.fixture(scope="module")
def source_posterior(digits):
    torch.manual_seed(0)
    model = DigitNet()
    swag = SWAGCollector(model, rank=5, head="head")
    fit(model, digits[0], None, TrainConfig(inference="swag", epochs=8, lr=0.05, burn_in_fraction=0.25, progress=False),
        collector=swag, head=None)
    return swag.posterior()


@pytest.mark.parametrize("prior_method", ["standard", "l2sp", "diag", "lowrank"])
def test_map_with_each_prior_beats_chance(digits, source_posterior, prior_method):
    torch.manual_seed(1)
    model = DigitNet()
    source_posterior.load_mean_into(model)
    kw = dict(posterior=source_posterior, scale=1.0, eps=1e-4, variance=1.0, head_variance=1.0)
    prior = make_prior(model, prior_method, **kw)
    result = fit(model, digits[0], prior, TrainConfig(epochs=5, lr=0.05, progress=False))
    metrics = evaluate_probs(result.predict(digits[1]), digits[1].tensors[1])
    assert metrics["accuracy"] > 0.5  # chance is 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


@pytest.mark.parametrize("method", ["sgld", "csgld", "swag"])
def test_sampling_methods_collect_and_average(digits, source_posterior, method):
    torch.manual_seed(2)
    model = DigitNet()
    prior = make_prior(model, "lowrank", posterior=source_posterior, eps=1e-4)
    cfg = TrainConfig(inference=method, epochs=6, lr=0.05, num_samples=4, num_cycles=2, samples_per_cycle=2,
                      temperature=1.0, progress=False)
    result = fit(model, digits[0], prior, cfg)
    assert len(result.samples) == 4
    probs = result.predict(digits[1])
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)
    assert evaluate_probs(probs, digits[1].tensors[1])["accuracy"] > 0.5


def test_resume_equals_uninterrupted(digits, tmp_path):
    cfg = TrainConfig(inference="sgld", epochs=4, lr=0.02, num_samples=3, progress=False, seed=3)

    def run(epochs, ckpt, resume):
        torch.manual_seed(5)
        model = DigitNet()
        prior = make_prior(model, "standard", variance=1.0)
        return fit(model, digits[0], prior, cfg, epochs=epochs, checkpoint=ckpt, resume=resume)

    full = run(4, None, False)
    run(2, tmp_path / "ckpt.pt", False)  # "interrupted" after 2 epochs
    with pytest.raises(ConfigError, match="other settings"):
        run(4, tmp_path / "ckpt.pt", True)  # epochs differ from the checkpoint's config
    # the honest interruption: same settings, stopped early -> emulate by saving at epoch 2 with epochs=4
    torch.manual_seed(5)
    model = DigitNet()
    prior = make_prior(model, "standard", variance=1.0)

    class Stop(Exception):
        pass

    def stop_after_two(m):
        if len(stop_after_two.calls) == 1:
            raise Stop
        stop_after_two.calls.append(1)
        return {}

    stop_after_two.calls = []
    with pytest.raises(Stop):
        fit(model, digits[0], prior, cfg, checkpoint=tmp_path / "c2.pt", eval_fn=stop_after_two)
    resumed = run(4, tmp_path / "c2.pt", True)
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=False):
        assert torch.equal(a, b), n
    assert len(resumed.samples) == len(full.samples) == 3


def test_empty_dataset_and_bad_config(digits):
    model = DigitNet()
    with pytest.raises(DataError, match="empty"):
        fit(model, TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(ConfigError, match="unknown inference"):
        fit(model, digits[0], inference="adam")


def test_adam_optimizer_for_map(digits):
    torch.manual_seed(3)
    model = DigitNet()
    prior = make_prior(model, "standard", variance=1.0)
    result = fit(model, digits[0], prior, TrainConfig(epochs=4, lr=3e-3, optimizer="adam", progress=False))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    with pytest.raises(ConfigError, match="optimizer"):
        fit(DigitNet(), digits[0], None, TrainConfig(inference="sgld", optimizer="adam", progress=False))
