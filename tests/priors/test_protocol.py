"""The public extension protocol of prior classes (issue 24, item 2): a class that implements it takes part in every
consumer without a list of types anywhere; what it leaves out is a clear error where it is needed; a learned kind
declares its own family or the automatic strategies refuse it."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from ptyl.autotune.build import scaled_family
from ptyl.errors import ConfigError
from ptyl.priors import DiagonalGaussianPrior, IsotropicGaussianPrior, LowRankGaussianPrior, make_prior, shard_prior
from ptyl.priors.base import Prior
from ptyl.priors.registry import SCALED_FAMILY, PriorRecipe
from ptyl.priors.separable import marginal_variance, separable_parts
from tests.helpers import TinyNet, random_posterior


class KernelOnly(Prior):
    """N(0, I) with nothing but the flat kernel."""

    def penalty_partials(self, xs, need_value, need_grad):
        xs = list(xs)
        quad = sum(torch.dot(x, x).double() for x in xs)
        return quad, None, xs

    def penalty_finish(self, quad, vec, grads, need_value, need_grad):
        return (0.5 * quad + 0.5 * self.num_parameters * math.log(2 * math.pi)) if need_value else None, grads


def _model():
    torch.manual_seed(0)
    return TinyNet().double()


def test_a_kernel_only_class_trains_and_says_what_is_missing():
    model = _model()
    named = {n: p for n, p in model.named_parameters() if n.startswith("features.")}
    prior = KernelOnly(list(named), [p.shape for p in named.values()])
    dense = MultivariateNormal(torch.zeros(prior.num_parameters, dtype=torch.float64),
                               torch.eye(prior.num_parameters, dtype=torch.float64))
    flat = torch.cat([p.detach().reshape(-1) for p in named.values()])
    torch.testing.assert_close(prior.log_prob(model), dense.log_prob(flat))
    prior.add_grad_(model, 1.0)
    torch.testing.assert_close(model.features[0].weight.grad, model.features[0].weight.detach())
    with pytest.raises(ConfigError, match="separable_part or flat_parts.*prior_step='gradient'"):
        separable_parts(prior)
    with pytest.raises(ConfigError, match="marginal_variance or flat_parts"):
        marginal_variance(prior)
    with pytest.raises(NotImplementedError, match="precision_diagonal nor flat_parts"):
        prior.precision_diagonal()
    with pytest.raises(NotImplementedError, match="local_rows"):
        shard_prior(prior, model)


def test_defaults_from_flat_parts_match_the_built_in_classes():
    """The protocol's defaults (from flat_parts) give what each built-in class computes itself."""
    model = _model()
    post = random_posterior(model)
    for kind in ("lowrank", "diag", "l2sp", "standard"):
        prior = make_prior(model, kind, posterior=post).parts["backbone"]
        h = torch.rand(prior.num_parameters, dtype=torch.float64)
        mean, d, factor = prior.flat_parts()
        cov = torch.diag(d) + (factor.T @ factor if factor is not None else 0.0)
        torch.testing.assert_close(prior.precision_diagonal(), torch.linalg.inv(cov).diagonal())
        torch.testing.assert_close(prior.posterior_log_det(h), torch.logdet(torch.diag(h) + torch.linalg.inv(cov)))
        torch.testing.assert_close(prior.marginal_variance(), cov.diagonal())
        part = prior.separable_part()
        assert part.exact == (factor is None)
        torch.testing.assert_close(part.precision, d.reciprocal())
        assert isinstance(prior, (LowRankGaussianPrior, DiagonalGaussianPrior, IsotropicGaussianPrior))


def test_sharding_goes_through_local_rows_of_every_class():
    model = _model()
    post = random_posterior(model)
    for kind in ("lowrank", "diag", "block", "l2sp", "standard"):
        prior = make_prior(model, kind, posterior=post)
        sharded = shard_prior(prior, model)
        torch.testing.assert_close(sharded.log_prob(model), prior.log_prob(model))
        h = torch.rand(prior.num_parameters, dtype=torch.float64)
        torch.testing.assert_close(sharded.posterior_log_det(h), prior.posterior_log_det(h))


def test_a_learnable_kind_without_a_family_is_refused():
    with pytest.raises(ConfigError, match="no family: give it family=SCALED_FAMILY"):
        PriorRecipe(True, "scale", (0.0, 4.0), 1.0, "x:y", learnable=("scale",))
    with pytest.raises(ConfigError, match="axis 'lam'"):
        PriorRecipe(True, "lam", (0.0, 4.0), 1.0, "x:y")


def test_a_kind_without_a_family_is_refused_by_the_automatic_strategies():
    from torch.utils.data import TensorDataset

    from ptyl.tuning import tune

    data = TensorDataset(torch.randn(8, 1, 6, 6), torch.arange(8) % 3)
    for strategy in ("de-elbo", "marglik"):
        with pytest.raises(ConfigError, match="tune it with strategy 'grid'"):
            tune(TinyNet, data, {"kind": "none"}, strategy=strategy, progress=False)


def build_squared(backbone, posterior, options):
    """A prior NOT linear in its axis: variance sigma^2 * scale^2."""
    return DiagonalGaussianPrior(posterior.mean, {n: v * options.scale**2 for n, v in posterior.variance.items()})


def build_scaled(backbone, posterior, options):
    """A prior linear in its axis: variance sigma^2 * scale."""
    return DiagonalGaussianPrior(posterior.mean, {n: v * options.scale for n, v in posterior.variance.items()})


def test_the_scaled_family_is_the_kinds_prior_and_refuses_a_nonlinear_one():
    model = _model()
    post = random_posterior(model).matched_to(model, strict=False)
    backbone = {n: p for n, p in model.named_parameters() if n in post.names}
    linear = PriorRecipe(True, "scale", (0.0, 4.0), 3.0, f"{__name__}:build_scaled", learnable=("scale",),
                         family=SCALED_FAMILY)
    options = linear.options()
    family = scaled_family(linear, backbone, post, options, {"scale"}, torch.float64)
    torch.testing.assert_close(family.to_prior().log_prob(model), linear.build(backbone, post, options).log_prob(model))
    assert family.hyper_values()["scale"] == pytest.approx(3.0)
    squared = PriorRecipe(True, "scale", (0.0, 4.0), 3.0, f"{__name__}:build_squared", learnable=("scale",),
                          family=SCALED_FAMILY)
    with pytest.raises(ConfigError, match="not h Sigma_1 \\+ eps I"):
        scaled_family(squared, backbone, post, squared.options(), {"scale"}, torch.float64)
