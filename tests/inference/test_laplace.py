"""Post-hoc Laplace: Bayesian linear regression in closed form, the last-layer predictive against a dense computation,
and the low-rank prior's posterior log-determinant, solve and samples against dense float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import DataLoader, TensorDataset

from ptyl.autotune import Categorical, Gaussian, compute_curvature
from ptyl.errors import ConfigError, InvalidValueError
from ptyl.inference import LaplacePredictive, PosteriorPrecision, laplace
from ptyl.inference.laplace_predictive import average_softmax, logit_moments
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit
from tests.autotune.problems import exact_ggn, log_marginal, random_posterior, regression_data

F64 = torch.float64


def _regression():
    x, y = regression_data(40, 5, noise=0.3, seed=1)
    model = nn.Sequential()
    model.add_module("head", nn.Linear(5, 1, bias=False).double())
    return x, y, model


def _dense_prior_precision(prior) -> torch.Tensor:
    """Sigma^-1 of a (composite) ptyl prior, dense float64 in ``names`` order."""
    from ptyl.priors.lowrank import LowRankGaussianPrior
    from ptyl.priors.separable import leaves

    mats = []
    for leaf in leaves(prior):
        if isinstance(leaf, LowRankGaussianPrior):
            _, d, f = leaf.flat_parts(F64)
            mats.append(torch.linalg.inv(torch.diag(d) + f.T @ f))
        else:
            mats.append(torch.diag(leaf.precision_diagonal().double()))
    return torch.block_diag(*mats)


@pytest.mark.parametrize("curvature", ["full", "kfac"])
def test_linear_regression_laplace_is_the_exact_posterior(curvature):
    """y = X theta + noise under N(0, v I): the Laplace posterior at the MAP is the exact Gaussian posterior, and its
    evidence the exact marginal likelihood (K-FAC is exact for one linear layer with a Gaussian likelihood)."""
    x, y, model = _regression()
    noise, v = 0.3, 0.8
    precision = x.T @ x / noise + torch.eye(5, dtype=F64) / v
    mean = torch.linalg.solve(precision, x.T @ y / noise)
    with torch.no_grad():
        model.head.weight.copy_(mean.unsqueeze(0))
    prior = make_prior(model, "standard", variance=v, head=None)
    loader = DataLoader(TensorDataset(x, y.unsqueeze(1)), batch_size=16)
    curv = compute_curvature(model, loader, Gaussian(noise), ["head.weight"], method=curvature)
    post = PosteriorPrecision(curv, prior)
    torch.testing.assert_close(post.dense(), precision)
    rhs = torch.randn(3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(post.solve(rhs), torch.linalg.solve(precision, rhs.T).T)
    torch.testing.assert_close(post.log_det(), torch.linalg.slogdet(precision)[1])
    predictive = LaplacePredictive(model, post, predictive="probit", mc_samples=1, seed=0, batch_size=16,
                                   collate_fn=None, log_likelihood=curv.log_likelihood)
    exact = log_marginal(x, y, torch.zeros(5, dtype=F64), v * torch.eye(5, dtype=F64), noise)
    assert predictive.log_marginal_likelihood(prior) == pytest.approx(exact, rel=1e-9)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _classification(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(48, 4, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _trained(kind: str = "l2sp", **kwargs):
    torch.manual_seed(0)
    data = _classification()
    model = _Net()
    prior = make_prior(model, kind, **kwargs)
    fit(model, data, prior, TrainConfig(epochs=30, lr=0.1, batch_size=16, progress=False))
    return model, data, prior


def test_last_layer_predictive_matches_a_dense_computation():
    model, data, prior = _trained("l2sp", variance=0.5, head_variance=2.0)
    tau = 3.0
    predictive = laplace(model, data, prior, subset="last-layer", prior_precision=tau)
    assert predictive.posterior.names == ["head.weight", "head.bias"]
    # dense: the head's exact GGN, prior precision tau / v_h, Jacobians of the logits by jacrev
    head64 = copy.deepcopy(model.head).double()
    feats = model.body(data.tensors[0]).detach().double()
    h = exact_ggn(head64, feats, Categorical())
    precision = h + tau / 2.0 * torch.eye(h.shape[0], dtype=F64)
    cov = torch.linalg.inv(precision)

    def logits(p, f):
        return functional_call(head64, p, (f.unsqueeze(0),)).squeeze(0)

    params = {n: p.detach() for n, p in head64.named_parameters()}
    jac = [jacrev(logits)(params, f) for f in feats]
    rows = torch.stack([torch.cat([j["weight"].reshape(3, -1), j["bias"]], 1) for j in jac]).double()
    f_cov = rows @ cov @ rows.transpose(1, 2)
    f_mean = model(data.tensors[0]).detach().double()
    means, covs = logit_moments(model, DataLoader(data, batch_size=20), predictive.posterior.names,
                                [predictive.posterior])
    torch.testing.assert_close(means, f_mean)
    torch.testing.assert_close(covs[0], f_cov, rtol=1e-5, atol=1e-8)
    probit = torch.softmax(f_mean / torch.sqrt(1 + math.pi / 8 * f_cov.diagonal(dim1=1, dim2=2)), 1).float()
    torch.testing.assert_close(predictive.predict(data), probit, rtol=1e-5, atol=1e-6)
    # the MC predictive averages softmax over draws of the same Gaussian logits: close to a large-sample reference
    mc = average_softmax(f_mean, f_cov, "mc", 20000, seed=1)
    torch.testing.assert_close(average_softmax(means, covs[0], "mc", 20000, seed=2), mc, atol=0.01, rtol=0)


@pytest.mark.parametrize("curvature", ["diag", "kfac"])
def test_low_rank_prior_log_det_and_solve_match_dense(curvature):
    """A = H + tau Sigma^-1 with a learned low-rank backbone prior (constant variances per tensor: the Kronecker fit
    is exact) and the isotropic head prior: log det, solve and sample covariance against dense float64."""
    torch.manual_seed(0)
    model = _Net().double()
    posterior = random_posterior(model, rank=3, skip="head", constant=True)
    prior = make_prior(model, "lowrank", posterior=posterior, scale=2.0, eps=0.0, head_variance=1.5)
    data = _classification()
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    names = list(prior.names)
    curv = compute_curvature(model, DataLoader(data, batch_size=16), Categorical(), names, method=curvature)
    tau = 0.7
    post = PosteriorPrecision(curv, prior, prior_precision=tau)
    assert post.info["kron_fit_max_log_error"] < 1e-10
    shapes = [tuple(dict(model.named_parameters())[n].shape) for n in names]
    dense = curv.dense(names, shapes) + tau * _dense_prior_precision(prior)
    torch.testing.assert_close(post.dense(), dense)
    torch.testing.assert_close(post.log_det(), torch.linalg.slogdet(dense)[1])
    rhs = torch.randn(4, dense.shape[0], dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(post.solve(rhs), torch.linalg.solve(dense, rhs.T).T)
    rows = torch.randn(5, 3, dense.shape[0], dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(post.covariance_blocks(rows), rows @ torch.linalg.solve(dense, rows.transpose(1, 2)))
    draws = post.sample(40000, generator=torch.Generator().manual_seed(3))
    empirical = draws.T @ draws / draws.shape[0]
    cov = torch.linalg.inv(dense)
    scale = cov.diagonal().sqrt()
    assert ((empirical - cov) / (scale[:, None] * scale[None, :])).abs().max() < 0.04  # ~5 standard errors


def test_kron_fit_of_a_varying_prior_is_reported():
    """Per-parameter variances inside a K-FAC layer are replaced by their Kronecker fit; the fit's error is kept."""
    model = _Net().double()
    posterior = random_posterior(model, rank=2, skip="head")
    prior = make_prior(model, "lowrank", posterior=posterior, eps=0.0)
    data = _classification()
    data = TensorDataset(data.tensors[0].double(), data.tensors[1])
    curv = compute_curvature(model, DataLoader(data, batch_size=16), Categorical(), list(prior.names), method="kfac")
    assert PosteriorPrecision(curv, prior).info["kron_fit_max_log_error"] > 0.01
    exact = PosteriorPrecision(compute_curvature(model, DataLoader(data, batch_size=16), Categorical(),
                                                 list(prior.names), method="diag"), prior)
    assert exact.info["kron_fit_max_log_error"] == 0.0


def test_prior_precision_is_chosen_on_validation_data_and_large_values_recover_map():
    model, data, prior = _trained("l2sp", variance=0.5)
    val = _classification(seed=5)
    taus = [0.01, 1.0, 1e8]
    predictive = laplace(model, data, prior, subset="all", curvature="kfac", prior_precision=taus, val_data=val)
    assert [row["prior_precision"] for row in predictive.validation] == taus
    best = min(predictive.validation, key=lambda row: row["val_nll"])
    assert predictive.prior_precision == best["prior_precision"]
    at_map = laplace(model, data, prior, subset="all", prior_precision=1e8)
    torch.testing.assert_close(at_map.predict(val), torch.softmax(model(val.tensors[0]), 1).detach(), atol=1e-4,
                               rtol=0)


def test_without_validation_data_the_prior_precision_of_highest_evidence_is_chosen():
    model, data, prior = _trained("l2sp", variance=0.5, head_variance=2.0)
    taus = [0.1, 1.0, 10.0, 100.0]
    chosen = laplace(model, data, prior, prior_precision=taus)
    each = [laplace(model, data, prior, prior_precision=t).log_marginal_likelihood(prior) for t in taus]
    assert [row["log_evidence"] for row in chosen.evidence] == pytest.approx(each, rel=1e-9)
    assert chosen.prior_precision == taus[max(range(len(taus)), key=each.__getitem__)]
    assert chosen.validation == []


def test_select_rechooses_on_validation_data():
    model, data, prior = _trained("l2sp", variance=0.5)
    val = _classification(seed=5)
    predictive = laplace(model, data, prior, prior_precision=[0.01, 1.0, 1e8])
    on_val = laplace(model, data, prior, prior_precision=[0.01, 1.0, 1e8], val_data=val)
    assert predictive.select(val) == {"laplace_prior_precision": on_val.prior_precision}
    assert predictive.validation == on_val.validation
    torch.testing.assert_close(predictive.predict(val), on_val.predict(val))


@pytest.mark.filterwarnings("ignore:.*laplace_prior_precision.*:UserWarning")  # the axis may end on an edge
def test_several_prior_precisions_through_fit_and_tuning_equal_a_grid_axis():
    """``laplace_prior_precision=(...)``: a plain fit chooses by the evidence; a tuning trial on its validation data,
    which is the choice a grid axis over the same values makes (same seed, same MAP fit per point)."""
    from ptyl.tuning import PriorSpec, tune

    data, val = _classification(), _classification(seed=5)
    taus = (0.01, 1.0, 100.0)
    config = TrainConfig(inference="laplace", epochs=8, lr=0.1, batch_size=16, laplace_prior_precision=taus,
                         progress=False)

    def model_fn():
        return _Net()

    torch.manual_seed(0)
    result = fit(model_fn(), data, make_prior(_Net(), "l2sp", variance=0.5), config)
    assert [row["prior_precision"] for row in result.predictive.evidence] == list(taus)
    spec = PriorSpec(kind="l2sp", head="head")
    shared = tune(model_fn, data, spec, {"variance": [0.5], "lr": [0.1]}, config=config, val_set=val,
                  extend=False, off_limit=False)
    axis = tune(model_fn, data, spec, {"variance": [0.5], "lr": [0.1], "laplace_prior_precision": list(taus)},
                config=config, val_set=val, extend=False, off_limit=False)
    best = axis.selected
    assert shared.selected["posthoc"] == {"laplace_prior_precision": best["laplace_prior_precision"]}
    assert shared.selected["val_nll"] == pytest.approx(best["val_nll"], rel=1e-6)
    assert len(shared.table) == 1 and len(axis.table) == 3


def test_laplace_inference_through_fit():
    torch.manual_seed(0)
    data = _classification()
    model = _Net()
    prior = make_prior(model, "l2sp", variance=0.5)
    result = fit(model, data, prior, TrainConfig(inference="laplace", epochs=5, lr=0.1, batch_size=16,
                                                 laplace_prior_precision=2.0, progress=False))
    assert result.predictive is not None and result.predictive.prior_precision == 2.0
    reference = laplace(model, data, prior, prior_precision=2.0).predict(data)
    torch.testing.assert_close(result.predict(data), reference)


def test_bad_input_is_a_clear_error():
    model, data, prior = _trained("l2sp", variance=0.5)
    with pytest.raises(ConfigError, match="at least one"):
        laplace(model, data, prior, prior_precision=[])
    with pytest.raises(InvalidValueError, match="laplace_prior_precision"):
        fit(_Net(), data, prior, TrainConfig(inference="laplace", laplace_prior_precision=(1.0, -2.0), epochs=1,
                                             progress=False))
    with pytest.raises(ConfigError, match="Laplace subset"):
        laplace(model, data, prior, subset="everything")
    with pytest.raises(ConfigError, match="head prior"):
        laplace(model, data, make_prior(model, "l2sp", variance=0.5, head_variance=None))
    with pytest.raises(ConfigError, match="needs the prior"):
        laplace(model, data, None)
    with pytest.raises(ConfigError, match="prior"):
        fit(_Net(), data, None, TrainConfig(inference="laplace", epochs=1, progress=False))
