"""The fused paths: add_grad_ == autograd for every prior kind, validation once per model, the sharding hook."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from ptyl.errors import ParameterMismatchError
from ptyl.priors import LowRankGaussianPrior, Prior, block_prior, make_prior
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet, random_posterior

KINDS = [("lowrank", dict(rank=3, eps=0.01)), ("lowrank", dict(rank=1)), ("diag", dict(eps=0.01)),
         ("l2sp", dict(variance=0.3)), ("standard", dict(variance=0.3))]


def _prior(kind, kw, model, post):
    extra = {"posterior": post} if kind in ("lowrank", "diag") else {}
    return make_prior(model, kind, head="head", head_variance=2.0, **extra, **kw)


def _perturbed(dtype):
    torch.manual_seed(0)
    model = TinyNet().to(dtype)
    post = random_posterior(model, rank=3)  # float64 storage: float32 parameters use the cast path
    return model, post


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,kw", KINDS)
@pytest.mark.parametrize("populated", [False, True])
def test_add_grad_gives_the_autograd_update(kind, kw, dtype, populated):
    model, post = _perturbed(dtype)
    prior = _prior(kind, kw, model, post)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    weight = 1.0 / 37
    start = [torch.randn_like(p) for p in model.parameters()]

    def reset():
        for p, g in zip(model.parameters(), start, strict=False):
            p.grad = g.clone() if populated else None

    reset()
    (weight * prior.penalty(model)).backward()
    expected = _grads(model)
    reset()
    assert prior.add_grad_(model, weight) is None
    assert all(torch.equal(a, b) for a, b in zip(_grads(model), expected, strict=False))  # bit for bit
    reset()
    value = prior.add_grad_(model, torch.tensor(weight, dtype=dtype), return_value=True)
    torch.testing.assert_close(value, prior.penalty(model).detach(), rtol=0, atol=0)
    assert value.dtype == dtype and not value.requires_grad
    for a, b in zip(_grads(model), expected, strict=False):
        torch.testing.assert_close(a, b)


def test_add_grad_skips_frozen_uncovered_and_tracks_log_prob():
    model, post = _perturbed(torch.float32)
    prior = make_prior(model, "lowrank", posterior=post, head="head", head_variance=None)
    model.features[0].bias.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    prior.add_grad_(model, 0.5)
    assert model.features[0].bias.grad is None  # frozen: autograd would not touch it either
    assert model.head.weight.grad is None  # unregularised head
    assert model.features[2].weight.grad is not None
    torch.testing.assert_close(prior.log_prob(model), -prior.penalty(model))


def test_block_prior_add_grad_matches_autograd():
    model, post = _perturbed(torch.float64)
    prior = block_prior(post, "auto", scale=0.5)
    (0.3 * prior.penalty(model)).backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    prior.add_grad_(model, 0.3)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(_grads(model), expected, strict=False))
    torch.testing.assert_close(prior.penalty(model), -prior.log_prob(model))


class _Quadratic(Prior):
    """A prior written the old way (``_log_prob`` only) still works, through autograd."""

    def _log_prob(self, tensors):
        return -0.5 * sum((t**2).sum() for t in tensors)


def test_legacy_subclass_falls_back_to_autograd():
    model = TinyNet().double()
    named = dict(model.named_parameters())
    prior = _Quadratic(list(named), [p.shape for p in named.values()])
    value = prior.add_grad_(model, 2.0, return_value=True)
    torch.testing.assert_close(value, 0.5 * sum((p.detach() ** 2).sum() for p in named.values()))
    for p in model.parameters():
        torch.testing.assert_close(p.grad, 2.0 * p.detach())


def test_composite_with_a_legacy_part_sums_its_parts():
    from ptyl.priors import CompositePrior, IsotropicGaussianPrior

    model = TinyNet().double()
    named = dict(model.named_parameters())
    body = [n for n in named if n.startswith("features.")]
    legacy = _Quadratic(body, [named[n].shape for n in body])
    head = IsotropicGaussianPrior.from_model({n: p for n, p in named.items() if n.startswith("head.")}, 2.0,
                                             centered=False)
    prior = CompositePrior({"backbone": legacy, "head": head})
    expected = legacy.log_prob(model) + head.log_prob(model)
    torch.testing.assert_close(prior.log_prob(model), expected)
    torch.testing.assert_close(prior.penalty(model), -expected)
    prior.add_grad_(model, 1.0)
    torch.testing.assert_close(model.features[0].weight.grad, model.features[0].weight.detach())
    torch.testing.assert_close(model.head.weight.grad, model.head.weight.detach() / 2.0)


def test_model_is_validated_once_and_again_after_a_change():
    model, post = _perturbed(torch.float32)
    prior = make_prior(model, "l2sp", variance=0.3, head="head")
    prior.penalty(model)
    model.head = nn.Linear(4, 3)  # a new head: new parameter objects, same shapes
    model.zero_grad(set_to_none=True)
    prior.add_grad_(model)
    assert model.head.weight.grad is not None  # the new parameters, not the cached old ones
    model.head = nn.Linear(4, 5)
    with pytest.raises(ParameterMismatchError, match="head.weight"):
        prior.penalty(model)
    with pytest.raises(ParameterMismatchError, match="missing"):
        prior.penalty({"features.0.weight": torch.zeros(2, 1, 3, 3)})
    good = {n: p.detach().clone() for n, p in TinyNet().named_parameters()}
    prior.penalty(good)
    good["features.0.weight"] = torch.zeros(3, 1, 3, 3)  # same keys, other shape: checked on every mapping call
    with pytest.raises(ParameterMismatchError, match="features.0.weight"):
        prior.penalty(good)


def test_prefixes_key_order_copy_and_pickle():
    model, post = _perturbed(torch.float64)
    prior = make_prior(model, "lowrank", posterior=post, head="head")
    value = prior.penalty(model)
    wrapped = {"module." + n: p for n, p in reversed(list(model.named_parameters()))}
    torch.testing.assert_close(prior.penalty(wrapped), value)
    twin = copy.deepcopy(prior)
    torch.testing.assert_close(twin.penalty(model), value)
    buffer = io.BytesIO()
    torch.save(prior, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False).penalty(model), value)


def test_sharded_evaluation_through_reduce_stats():
    """Two shards of one low-rank prior, each holding half of mu, d and U: exchanging the k + 1 partial sums through
    ``reduce_stats`` gives every shard the exact penalty and its slice of the exact gradient."""
    torch.manual_seed(0)
    post = random_posterior(TinyNet().double(), rank=3)
    full = learned_prior(post, "lowrank", scale=0.5, eps=0.01)
    names = list(post.names)
    shards = [learned_prior(post.restrict(names[:2]), "lowrank", scale=0.5, eps=0.01),
              learned_prior(post.restrict(names[2:]), "lowrank", scale=0.5, eps=0.01)]
    for shard in shards:  # what a sharded constructor computes with one all-reduce of C - I and sum log d
        shard.capacitance_chol.copy_(full.capacitance_chol)
        shard.log_norm.copy_(full.log_norm)
    theta = {n: post.mean[n] + torch.randn(post.shapes[n], dtype=torch.float64) for n in names}
    partials = {}

    def recorder(i):
        def reduce(stats):
            partials[i] = stats.clone()
            return stats
        return reduce

    for i, shard in enumerate(shards):  # pass 1: each shard's local partial sums
        shard.reduce_stats = recorder(i)
        shard.penalty(theta)
    for i, shard in enumerate(shards):  # pass 2: the "all-reduce"
        shard.reduce_stats = lambda stats, i=i: stats + partials[1 - i]
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    full.penalty(leaves).backward()
    for shard in shards:
        local = {n: theta[n].clone().requires_grad_(True) for n in shard.names}
        value = shard.penalty(local)
        torch.testing.assert_close(value, full.penalty(theta), rtol=1e-12, atol=1e-10)
        value.backward()
        for n in shard.names:
            torch.testing.assert_close(local[n].grad, leaves[n].grad, rtol=1e-10, atol=1e-12)


class _Counter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def _ops(fn):
    with _Counter() as counter:
        fn()
    return counter.count


def test_kernel_count_does_not_grow_with_the_number_of_tensors():
    """The CPU proxy of the GPU launch count (benchmarks/speed/op_count.py has the full table)."""
    from ptyl.posterior import SWAGCollector

    counts = {}
    for layers in (3, 12):
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)])
        swag = SWAGCollector(model, rank=2)
        for _ in range(3):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            swag.collect(model)
        prior = LowRankGaussianPrior(swag.mean(), {n: v + 0.1 for n, v in swag.variance().items()},
                                     {n: d.float() for n, d in swag.deviations().items()})
        model.float()
        row = []
        for call in (lambda prior=prior, model=model: prior.penalty(model).backward(),
                     lambda prior=prior, model=model: prior.add_grad_(model, 0.1),
                     lambda swag=swag, model=model: swag.collect(model)):
            call()
            model.zero_grad(set_to_none=True)
            row.append(_ops(call))
            model.zero_grad(set_to_none=True)
        counts[layers] = row
    assert counts[3] == counts[12] and max(counts[12]) <= 64, counts
    assert math.prod(counts[3]) > 0


@pytest.mark.parametrize("kind,kw", KINDS)
def test_cpu_groups_give_the_single_group_result(kind, kw, monkeypatch):
    """On the CPU flat vectors are processed in groups of >= GROUP_NUMEL numbers; tiny groups must not change a bit
    of the penalty or gradient beyond float64 summation order (and SWAG's moments not at all)."""
    import ptyl.flat as flat
    from ptyl.posterior import SWAGCollector

    model, post = _perturbed(torch.float64)
    single = _prior(kind, kw, model, post)
    swag_single = SWAGCollector(model, rank=2)
    monkeypatch.setattr(flat, "GROUP_NUMEL", 10)
    grouped = _prior(kind, kw, model, post)
    swag_grouped = SWAGCollector(model, rank=2)
    assert len(grouped.parts["backbone"].cpu_groups) > 1 and len(single.parts["backbone"].cpu_groups) == 1
    values = []
    for prior in (single, grouped):
        model.zero_grad(set_to_none=True)
        value = prior.penalty(model)
        value.backward()
        values.append((value.detach(), _grads(model)))
    torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-13, atol=0)
    for a, b in zip(values[0][1], values[1][1], strict=False):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        swag_single.collect(model)
        swag_grouped.collect(model)
    for a, b in zip(swag_single.state_dict().values(), swag_grouped.state_dict().values(), strict=False):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_per_call_on_cuda():
    """With CUDA's sync debug mode set to error, prior calls (both paths) and SWAG collection never wait for the
    device once the model has been seen (construction and the first call validate, which may synchronise)."""
    from ptyl.posterior import SWAGCollector

    torch.manual_seed(0)
    model = TinyNet().cuda()
    post = random_posterior(model, rank=3, dtype=torch.float32)
    priors = [_prior(kind, kw, model, post).cuda() for kind, kw in KINDS]
    swag = SWAGCollector(model, rank=2)
    for prior in priors:
        prior.penalty(model).backward()
        prior.add_grad_(model, 0.1)
    swag.collect(model)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for prior in priors:
            model.zero_grad(set_to_none=True)
            (prior.penalty(model) / 10).backward()
            prior.add_grad_(model, 0.1, return_value=True)
        swag.collect(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
