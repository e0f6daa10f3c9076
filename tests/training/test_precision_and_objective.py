"""Mixed precision (autocast, fp16 gradient scaling, the prior in full precision), the logged objective (data and
prior terms, the prior without its normalising constant), dict batches, and divergence hints."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from ptyl.errors import ConfigError, DataError, DivergenceError
from ptyl.priors import make_prior
from ptyl.training import MixedPrecision, PriorTerm, TrainConfig, fit, log_normalizer, supervised_objective
from tests.helpers import TinyNet, random_posterior


def _net(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(8, 16))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(16, 3))
    return model


def _data(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 8, generator=gen), torch.arange(n) % 3)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_close_to_fp32(precision):
    runs = {}
    for p in ("fp32", precision):
        model = _net()
        prior = make_prior(model, "standard", variance=0.1)
        result = fit(model, _data(), prior, TrainConfig(epochs=3, lr=0.1, precision=p, prior_step="gradient",
                                                        progress=False))  # fp16 has no proximal step
        runs[p] = (_flat(model), result.history[-1])
    torch.testing.assert_close(runs[precision][0], runs["fp32"][0], rtol=0.05, atol=0.02)
    assert runs[precision][1]["loss"] == pytest.approx(runs["fp32"][1]["loss"], rel=0.02)
    assert runs[precision][0].dtype == torch.float32  # master weights stay fp32


def test_fp16_unscales_gradients_before_clipping():
    """Clipping the *scaled* gradients (x 65536) to norm 1 would shrink every step by the scale."""
    moves = {}
    for p in ("fp32", "fp16"):
        model = _net()
        before = _flat(model)
        fit(model, _data(), None, TrainConfig(epochs=1, lr=0.1, momentum=0.0, precision=p, grad_clip=0.5,
                                              schedule="constant", progress=False))
        moves[p] = (_flat(model) - before).norm()
    assert float(moves["fp16"]) == pytest.approx(float(moves["fp32"]), rel=0.02)


def test_prior_is_computed_in_full_precision_inside_autocast():
    model = TinyNet()
    prior = make_prior(model, "lowrank", posterior=random_posterior(model, dtype=torch.float32), scale=2.0, eps=1e-3)
    term = PriorTerm(prior, num_data=10, device=torch.device("cpu"))
    plain = term(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = term(model)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


def test_fp16_scaler_state_is_checkpointed(tmp_path):
    model = _net()
    fit(model, _data(), None, TrainConfig(epochs=1, lr=0.1, precision="fp16", progress=False),
        checkpoint=tmp_path / "run.pt")
    state = torch.load(tmp_path / "run.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["config"]["precision"] == "fp16"


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp8").validate()


def test_log_normalizer_matches_the_dense_gaussian():
    model = TinyNet()
    posterior = random_posterior(model, rank=3)
    prior = make_prior(model, "lowrank", posterior=posterior, scale=0.5, eps=1e-2, head_variance=2.0)
    backbone = posterior.dense_covariance(scale=0.5, eps=1e-2)
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    expected = 0.5 * (torch.logdet(2 * math.pi * backbone) + head * math.log(2 * math.pi * 2.0))
    assert float(log_normalizer(prior)) == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("kind", ["lowrank", "diag", "l2sp", "standard"])
def test_logged_prior_term_has_no_normalising_constant(kind):
    """A tight prior has a large negative constant (-1/2 log det 2 pi Sigma); the logged term is the quadratic part
    only, so it is >= 0 and zero at the prior's centre."""
    model = TinyNet()
    posterior = random_posterior(model, dtype=torch.float32)
    with torch.no_grad():
        model.head.weight.zero_(), model.head.bias.zero_()
        if kind == "standard":
            for p in model.parameters():
                p.zero_()
        elif kind in ("lowrank", "diag"):
            posterior.load_mean_into(model)
    prior = make_prior(model, kind, posterior=posterior, scale=1e-4, eps=1e-6, variance=1e-4, head_variance=1e-4)
    term = PriorTerm(prior, num_data=7, device=torch.device("cpu"))
    assert float(term.logged(term(model))) == pytest.approx(0.0, abs=1e-4)  # at the centre (fp32 rounding)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    value = term(model).detach()
    assert float(value) < 0  # the normalised penalty of a tight prior is negative near its centre...
    logged = term.logged(value)
    assert float(logged) > 0  # ...the logged term is not
    expected = float(value.double() - log_normalizer(prior) / 7)
    assert float(logged) == pytest.approx(expected, rel=1e-3)


def test_history_records_data_prior_and_objective():
    model = TinyNet()
    prior = make_prior(model, "lowrank", posterior=random_posterior(model, dtype=torch.float32), scale=1e-3, eps=1e-4)
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.arange(20) % 3)
    result = fit(model, data, prior, TrainConfig(epochs=2, lr=1e-4, progress=False))
    for record in result.history:
        assert record["prior"] >= 0 and record["loss"] >= 0
        assert record["objective"] == pytest.approx(record["loss"] + record["prior"])


class _DictData(Dataset):
    """Hugging Face style examples: a dict with input tensors and ``labels``."""

    def __init__(self, n: int = 24):
        gen = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=gen), torch.arange(n) % 3

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"features": self.x[i], "labels": self.y[i]}


class _LossModel(nn.Module):
    """Returns a dict with its own loss when given labels (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)

    def forward(self, features, labels=None):
        logits = self.head(features)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class _NoLabels(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)

    def forward(self, features):
        return self.head(features)


@pytest.mark.parametrize("model_class", [_LossModel, _NoLabels])
def test_dict_batches_work_with_the_default_objective(model_class):
    torch.manual_seed(0)
    model = model_class()
    result = fit(model, _DictData(), None, TrainConfig(epochs=2, lr=0.1, progress=False))
    assert result.history[-1]["loss"] < result.history[0]["loss"] + 1e-6
    batch = {"features": torch.randn(4, 8), "labels": torch.tensor([0, 1, 2, 0])}
    expected = nn.functional.cross_entropy(model.head(batch["features"]), batch["labels"])
    torch.testing.assert_close(supervised_objective(model, batch), expected)


def test_dict_batch_without_labels_names_what_is_missing():
    with pytest.raises(DataError, match="labels.*features"):
        supervised_objective(_NoLabels(), {"features": torch.randn(2, 8)})
    with pytest.raises(DataError, match="objective="):
        supervised_objective(_NoLabels(), torch.randn(2, 8))


def test_divergence_under_a_strong_prior_suggests_eps_or_a_weaker_prior():
    model = TinyNet()
    prior = make_prior(model, "lowrank", posterior=random_posterior(model, dtype=torch.float32), scale=1e-6)
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.arange(20) % 3)
    with pytest.raises(DivergenceError) as err:
        fit(model, data, prior, TrainConfig(epochs=10, lr=0.5, schedule="constant", check_every=1,
                                            prior_step="gradient", progress=False))
    assert "eps" in str(err.value) and "scale" in str(err.value) and "proximal" in str(err.value)


def test_divergence_without_a_prior_suggests_the_learning_rate():
    model = TinyNet()
    data = TensorDataset(torch.full((8, 1, 6, 6), 1e30), torch.arange(8) % 3)
    with pytest.raises(DivergenceError, match="lower the learning rate$"):
        fit(model, data, None, TrainConfig(epochs=2, lr=1e3, check_every=1, progress=False))


def test_mixed_precision_object_is_a_no_op_for_fp32():
    mp = MixedPrecision("fp32", torch.device("cpu"))
    assert mp.scaler is None and mp.dtype is None and mp.state_dict() is None


def test_prior_term_add_grad_is_the_backward_of_the_term():
    model = TinyNet()
    prior = make_prior(model, "lowrank", posterior=random_posterior(model, dtype=torch.float32), scale=2.0, eps=1e-3)
    term = PriorTerm(prior, num_data=10, device=torch.device("cpu"))
    value = term(model)
    value.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)  # add_grad_ accumulates, as backward does
    returned = term.add_grad_(model)
    for p, g in zip(model.parameters(), expected, strict=False):
        torch.testing.assert_close(p.grad, g + 1, rtol=1e-6, atol=1e-7)
    assert float(returned) == pytest.approx(float(value.detach()), rel=1e-6)


def test_a_prior_of_your_own_without_a_centre_is_logged_as_it_is():
    from ptyl.priors import Prior

    class Laplace(Prior):  # only _log_prob: no flat kernels, no mean_flat
        def _log_prob(self, tensors):
            return -sum(t.abs().sum() for t in tensors)

    model = _net()
    prior = Laplace(["body.weight"], [tuple(model.body.weight.shape)])
    assert float(log_normalizer(prior)) == 0.0
    result = fit(model, _data(), prior, TrainConfig(epochs=1, lr=0.01, progress=False))
    assert result.history[0]["prior"] > 0
