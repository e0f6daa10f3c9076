"""Strong priors train stably: the proximal step for the prior's separable part reaches the exact MAP (closed form,
float64) for every prior kind, keeps any prior strength stable where the plain gradient step diverges, and MAP under
the low-rank prior at lambda = 0.1 converges with no NaN at the default settings."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import DivergenceError
from ptyl.posterior import SourcePosterior
from ptyl.priors import make_prior, separable_parts
from ptyl.training import TrainConfig, fit

D, N = 6, 40


def regression():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(D, generator=gen, dtype=torch.float64)
    y = x @ weight + 0.3 * torch.randn(N, generator=gen, dtype=torch.float64)
    return TensorDataset(x, y)


def linear():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(D, 1, bias=False).double())
    return model


def mse(model, batch):
    x, y = batch
    return 0.5 * (model(x).squeeze(-1) - y).pow(2).mean()


def posterior(variance: float = 0.02, deviation: float = 0.05, rank: int = 3):
    gen = torch.Generator().manual_seed(1)
    return SourcePosterior({"body.weight": 0.5 * torch.randn(1, D, generator=gen, dtype=torch.float64)},
                           {"body.weight": variance * (0.5 + torch.rand(1, D, generator=gen, dtype=torch.float64))},
                           {"body.weight": deviation * torch.randn(rank, 1, D, generator=gen, dtype=torch.float64)})


def exact_map(prior, data) -> torch.Tensor:
    """argmin 1/(2N) ||Xw - y||^2 + 1/N * 1/2 (w - mu)^T Sigma^-1 (w - mu): a dense float64 solve, with Sigma^-1
    read off the prior's own gradient (the penalty is quadratic: grad(w) = Sigma^-1 (w - mu))."""
    x, y = data.tensors

    def grad(w):
        w = w.clone().requires_grad_()
        return torch.autograd.grad(prior.penalty({"body.weight": w[None]}), w)[0]

    g0 = grad(torch.zeros(D, dtype=torch.float64))  # = -Sigma^-1 mu
    precision = torch.stack([grad(e) - g0 for e in torch.eye(D, dtype=torch.float64)], dim=1)
    return torch.linalg.solve(x.T @ x + precision, x.T @ y - g0)


@pytest.mark.parametrize("kind,options", [("lowrank", {"scale": 2.0, "eps": 1e-3}), ("diag", {"scale": 2.0}),
                                          ("l2sp", {"variance": 0.05}), ("standard", {"variance": 0.05})])
def test_proximal_sgd_with_momentum_reaches_the_exact_map(kind, options):
    data = regression()
    model = linear()
    prior = make_prior(model, kind, posterior=posterior(), head=None, **options)
    expected = exact_map(prior, data)
    config = TrainConfig(epochs=1500, batch_size=N, lr=0.05, schedule="constant", progress=False)
    fit(model, data, prior, config, objective=mse, head=None)
    torch.testing.assert_close(model.body.weight.detach()[0], expected, rtol=1e-6, atol=1e-8)


def test_a_prior_far_too_stiff_for_the_gradient_step_is_stable_as_a_proximal_step():
    data = regression()
    stiff = posterior(variance=1e-9, deviation=1e-6)  # precision ~1e9 per coordinate, eps = 0
    config = TrainConfig(epochs=50, batch_size=N, lr=0.1, progress=False)
    with pytest.raises(DivergenceError):
        model = linear()
        fit(model, data, make_prior(model, "lowrank", posterior=stiff, scale=1.0, eps=0.0, head=None),
            config, objective=mse, head=None, prior_step="gradient")
    model = linear()
    prior = make_prior(model, "lowrank", posterior=stiff, scale=1.0, eps=0.0, head=None)
    fit(model, data, prior, config, objective=mse, head=None)
    assert torch.isfinite(model.body.weight).all()
    torch.testing.assert_close(model.body.weight.detach(), stiff.mean["body.weight"], atol=1e-4, rtol=0)


def test_map_under_the_lowrank_prior_at_lambda_0_1_converges_at_the_default_settings():
    from ptyl.data import few_shot_subset, load_dataset
    from ptyl.models import SmallCNN, replace_head
    from ptyl.pipeline import learn_prior

    torch.manual_seed(0)
    source = few_shot_subset(load_dataset("kmnist", "train"), 6, 0)
    model = SmallCNN(width=4)
    post = learn_prior(model, source, epochs=3, lr=0.05, rank=4, batch_size=20, progress=False)
    target = few_shot_subset(load_dataset("mnist", "train"), 4, 0)
    replace_head(model, 10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for eps in (None, 0.0):  # the default eps (precision capped at 1/eps), and none: precision up to ~1e7
        prior = make_prior(model, "lowrank", posterior=post, scale=0.1, eps=eps)  # default head prior
        diag = prior.parts["backbone"].flat_parts()[1]
        assert float(1.0 / diag.min()) > (900.0 if eps is None else 1e5)  # far stiffer than lr / N can take
        objectives = []
        for epochs in (30, 60):  # converged: twice the budget ends at the same objective
            model.load_state_dict(start, strict=False)
            result = fit(model, target, prior, TrainConfig(epochs=epochs, progress=False))  # default lr, step
            objective = torch.tensor([r["loss"] + r["prior"] for r in result.history])
            assert torch.isfinite(objective).all() and all(torch.isfinite(p).all() for p in model.parameters())
            assert objective[-3:].mean() < objective[:3].mean()
            objectives.append(float(objective[-3:].mean()))
        assert abs(objectives[0] - objectives[1]) < 0.05


def test_separable_parts_split_the_precision():
    model = linear()
    prior = make_prior(model, "lowrank", posterior=posterior(), scale=2.0, eps=1e-3, head=None)
    (part,) = separable_parts(prior)
    _, diag, factor = prior.parts["backbone"].flat_parts()
    torch.testing.assert_close(part.precision, 1.0 / diag)
    assert not part.exact
    dense = torch.linalg.inv(torch.diag(diag) + factor.T @ factor)
    correction = torch.diag(part.precision) - dense  # C = A - Sigma^-1 must be PSD and below A
    assert torch.linalg.eigvalsh(correction).min() > -1e-8
    assert torch.linalg.eigvalsh(torch.diag(part.precision) - correction).min() > 0
    (iso,) = separable_parts(make_prior(model, "l2sp", variance=0.5, head=None))
    assert iso.exact and torch.allclose(iso.precision, torch.full((D,), 2.0, dtype=torch.float64))
