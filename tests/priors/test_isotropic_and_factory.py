import math

import pytest
import torch
from torch import nn

from ptyl.errors import ConfigError, InvalidValueError, ParameterMismatchError
from ptyl.priors import IsotropicGaussianPrior, make_prior, variance_from_weight_decay
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet, random_posterior


def test_l2sp_log_prob_matches_normal_and_is_centred_on_pretrained():
    model = TinyNet().double()
    params = dict(model.named_parameters())
    prior = IsotropicGaussianPrior.from_model(params, variance=0.25, centered=True)
    assert torch.allclose(prior.log_prob(model), torch.tensor(sum(
        torch.distributions.Normal(p.detach(), 0.5).log_prob(p.detach()).sum().item() for p in params.values()
    ), dtype=torch.float64))
    # the centre is a copy: moving the model does not move the prior
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert prior.penalty(model) > -prior.log_prob({n: p.detach() - 1 for n, p in model.named_parameters()})


def test_weight_decay_equivalence():
    """wd/2 ||theta||^2 in a mean loss == -log N(0, 1/(N wd)) / N up to a constant (same gradient)."""
    model = TinyNet().double()
    n, wd = 500, 5e-4
    prior = IsotropicGaussianPrior.from_model(dict(model.named_parameters()), variance_from_weight_decay(wd, n),
                                              centered=False)
    (prior.penalty(model) / n).backward()
    for p in model.parameters():
        assert torch.allclose(p.grad, wd * p.detach())


def test_make_prior_covers_backbone_and_head():
    model = TinyNet().double()
    post = random_posterior(model)
    prior = make_prior(model, "lowrank", posterior=post, scale=1.0, eps=0.01, head="head", head_variance=2.0)
    assert set(prior.parts) == {"backbone", "head"}
    assert set(prior.names) == {n for n, _ in model.named_parameters()}
    value = prior.log_prob(model)
    expected = prior.parts["backbone"].log_prob(model) + sum(
        torch.distributions.Normal(0.0, math.sqrt(2.0)).log_prob(p.detach()).sum()
        for n, p in model.named_parameters() if n.startswith("head.")
    )
    assert torch.allclose(value, expected)


def test_make_prior_errors_are_clear():
    model = TinyNet().double()
    with pytest.raises(ConfigError, match="unknown prior kind"):
        make_prior(model, "bogus")
    with pytest.raises(ConfigError, match="needs a learned posterior"):
        make_prior(model, "lowrank")
    with pytest.raises(ConfigError, match="no parameter belongs to the head"):
        make_prior(model, "standard", variance=1.0, head="fc")
    post = random_posterior(model).restrict(["features.0.weight"])
    with pytest.raises(ParameterMismatchError, match="no learned prior"):
        make_prior(model, "diag", posterior=post)
    with pytest.warns(UserWarning, match="left without a prior"):
        prior = make_prior(model, "diag", posterior=post, strict=False)
    assert "features.0.bias" in prior.unregularized


def test_prior_for_other_architecture_names_the_mismatch():
    post = random_posterior(TinyNet().double())
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ParameterMismatchError, match="TinyNet"):
        post.matched_to(other)


def test_wrapper_prefixes_are_ignored():
    model = TinyNet().double()
    post = random_posterior(model)
    prior = learned_prior(post, "lowrank")
    wrapped = {"module." + n: p for n, p in model.named_parameters()}
    assert torch.allclose(prior.log_prob(wrapped), prior.log_prob(model))


def test_isotropic_bad_variance():
    with pytest.raises(InvalidValueError):
        IsotropicGaussianPrior({"w": (2,)}, variance=0.0)


def test_none_method_is_zero():
    model = TinyNet()
    prior = make_prior(model, "none", head_variance=None)
    assert float(prior.penalty(model)) == 0.0
