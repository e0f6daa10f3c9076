import pytest
import torch
from torch.distributions import MultivariateNormal

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.priors import LowRankGaussianPrior
from ptyl.priors.block import OTHER_BLOCK, BlockLowRankPrior, assign_blocks, auto_block, block_prior
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet, random_posterior


def _random_params(posterior, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return {n: m + 0.5 * torch.randn(m.shape, generator=gen, dtype=m.dtype) for n, m in posterior.mean.items()}


def _dense_block_log_prob(posterior, groups, params, scales, eps, rank):
    total = torch.zeros((), dtype=torch.float64)
    for block, names in groups.items():
        sub = posterior.restrict(names)
        cov = sub.dense_covariance(scale=scales[block], eps=eps, rank=rank)
        mean = torch.cat([sub.mean[n].reshape(-1) for n in names])
        x = torch.cat([params[n].reshape(-1) for n in names])
        total = total + MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)
    return total


def test_auto_block_names():
    assert auto_block("encoder.encoder.layer.3.attention.self.query.lora_A") == "encoder.encoder.layer.3"
    assert auto_block("features.0.weight") == "features.0"
    assert auto_block("layer1.2.conv1.weight") == "layer1.2"
    assert auto_block("head.weight") == "head"
    assert auto_block("bias") == "bias"


@pytest.mark.parametrize("rank", [1, 3])
def test_log_prob_equals_sum_of_dense_block_marginals(rank):
    model = TinyNet()
    post = random_posterior(model, rank=3)
    prior = block_prior(post, "auto", scale=0.7, eps=1e-3, rank=rank)
    assert prior.blocks == ("features.0", "features.2")
    params = _random_params(post)
    groups = assign_blocks(post.names, "auto")
    expected = _dense_block_log_prob(post, groups, params, {b: 0.7 for b in groups}, 1e-3, rank)
    torch.testing.assert_close(prior.log_prob(params), expected, rtol=1e-10, atol=1e-8)


def test_gradient_matches_dense_and_per_block_scale():
    model = TinyNet()
    post = random_posterior(model, rank=3)
    scales = {"features.0": 2.0, "features.2": 0.3}
    prior = block_prior(post, ["features.0", "features.2"], scale=scales, eps=0.0)
    groups = assign_blocks(post.names, ["features.0", "features.2"])
    params = {n: t.clone().requires_grad_(True) for n, t in _random_params(post).items()}
    prior.log_prob(params).backward()
    ref = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
    _dense_block_log_prob(post, groups, ref, scales, 0.0, None).backward()
    for n in params:
        torch.testing.assert_close(params[n].grad, ref[n].grad, rtol=1e-9, atol=1e-10)


def test_differs_from_global_prior_when_blocks_correlate():
    post = random_posterior(TinyNet(), rank=3)
    params = _random_params(post)
    blocked = block_prior(post, "auto").log_prob(params)
    global_ = learned_prior(post, "lowrank").log_prob(params)
    assert not torch.allclose(blocked, global_)
    # a single block covering everything is the global prior
    single = block_prior(post, ["features"]).log_prob(params)
    torch.testing.assert_close(single, global_, rtol=1e-10, atol=1e-8)


def test_unlisted_parameters_go_to_other_block_and_rank_zero_is_diagonal():
    post = random_posterior(TinyNet(), rank=2)
    groups = assign_blocks(post.names, ["features.2"])
    assert groups == {"features.2": ["features.2.weight", "features.2.bias"],
                      OTHER_BLOCK: ["features.0.weight", "features.0.bias"]}
    prior = block_prior(post, ["features.2"], rank=0)
    params = _random_params(post)
    expected = sum(learned_prior(post.restrict(names), "diag").log_prob(params) for names in groups.values())
    torch.testing.assert_close(prior.log_prob(params), expected)
    assert isinstance(block_prior(post, "auto").block("features.0"), LowRankGaussianPrior)


def test_penalty_on_model_and_bf16_storage():
    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    prior = block_prior(post, "auto", dtype=torch.bfloat16)
    assert prior.block("features.0").mean.dtype == torch.bfloat16
    pen = prior.penalty(model)
    pen.backward()
    assert torch.isfinite(pen) and model.features[0].weight.grad is not None
    assert model.head.weight.grad is None  # the head is not covered by the prior


def test_bad_blocks_and_scales_raise():
    post = random_posterior(TinyNet(), rank=2)
    with pytest.raises(ConfigError, match="match no parameter"):
        block_prior(post, ["features.0", "decoder"])
    with pytest.raises(ConfigError, match="'auto'"):
        block_prior(post, "layers")
    with pytest.raises(ConfigError, match="no value for blocks"):
        block_prior(post, "auto", scale={"features.0": 1.0})
    with pytest.raises(InvalidValueError, match="positive"):
        block_prior(post, "auto", scale=-1.0)
    with pytest.raises(InvalidValueError):
        BlockLowRankPrior({})
