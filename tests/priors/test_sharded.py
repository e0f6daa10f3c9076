"""Sharded priors in one process: two row shards of every prior kind exchange their partial sums through a fake
all-reduce (tests/test_fsdp.py runs the real thing on 2 gloo ranks)."""

import pytest
import torch

from ptyl.errors import ConfigError, InvalidValueError
from ptyl.posterior import ShardedPosterior
from ptyl.priors import ShardedPrior, learned_prior, make_prior, shard_prior
from ptyl.sharding import ShardLayout
from tests.helpers import TinyNet, random_posterior

KINDS = [("lowrank", {"scale": 2.0, "eps": 0.01}), ("diag", {"scale": 2.0, "eps": 0.01}),
         ("block", {"scale": 2.0, "eps": 0.01}), ("l2sp", {"variance": 0.3}), ("standard", {"variance": 0.3})]


class _Exchange:
    """Two shards in one process: in "record" mode every reduce returns its input and keeps it; in "sum" mode the
    i-th reduce of shard s adds the i-th recorded input of the other shard (an all-reduce of two ranks)."""

    def __init__(self):
        self.recorded = {0: [], 1: []}
        self.used = {0: 0, 1: 0}
        self.mode = "record"

    def reduce(self, shard: int):
        def fn(stats: torch.Tensor) -> torch.Tensor:
            if self.mode == "record":
                self.recorded[shard].append(stats.clone())
                return stats
            other = self.recorded[1 - shard][self.used[shard]]
            self.used[shard] += 1
            return stats + other
        return fn


class _Layout(ShardLayout):
    """An even 2-way layout whose reduce goes through an :class:`_Exchange`."""

    def __init__(self, base: ShardLayout, reduce):
        super().__init__(base.shards, None, base.rank, base.world_size)
        self._fn = reduce

    @property
    def sharded(self) -> bool:
        return True

    def reduce_sum(self, tensor):
        return self._fn(tensor)


def _setup(kind, options):
    torch.manual_seed(0)
    model = TinyNet().double()
    post = random_posterior(model, rank=3)
    extra = {"posterior": post} if kind in ("lowrank", "diag", "block") else {}
    full = make_prior(model, kind, head_variance=2.0, **extra, **options)
    theta = {n: p.detach() + 0.3 * torch.randn_like(p) for n, p in model.named_parameters()}
    layouts = [ShardLayout.even(dict(zip(full.names, full.shapes, strict=False)), r, 2) for r in range(2)]
    return model, post, full, theta, layouts


def _run_pair(shards, theta, layouts, exchange):
    """Both shards' penalty (one recording pass, then the summing pass) and local gradients."""
    locals_ = [{n: t.clone().requires_grad_(True) for n, t in layout.take(theta).items()} for layout in layouts]
    for i, shard in enumerate(shards):
        shard.local.penalty(locals_[i])
    exchange.mode = "sum"
    values = []
    for i, shard in enumerate(shards):
        value = shard.local.penalty(locals_[i])
        value.backward()
        values.append(value.detach())
    return values, locals_


@pytest.mark.parametrize("kind,options", KINDS)
def test_two_row_shards_give_the_exact_value_and_gradient(kind, options):
    model, post, full, theta, layouts = _setup(kind, options)
    exchange = _Exchange()
    shards = [ShardedPrior(shard_prior(full, layout).local, _Layout(layout, exchange.reduce(r)))
              for r, layout in enumerate(layouts)]
    values, locals_ = _run_pair(shards, theta, layouts, exchange)
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    expected = full.penalty(leaves)
    expected.backward()
    for r, value in enumerate(values):
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-10)
        for name, local in locals_[r].items():
            want = layouts[r].shards[name].take(leaves[name].grad)
            torch.testing.assert_close(local.grad, want, rtol=1e-10, atol=1e-12)
    # ONE reduce per evaluation, whatever the number of leaves: k + 1 numbers for the low-rank backbone, 1 per other
    # leaf
    assert len(exchange.recorded[0]) == 1
    sizes = {"lowrank": 3 + 1 + 1, "diag": 1 + 1, "block": 2 * (3 + 1) + 1, "l2sp": 1 + 1, "standard": 1 + 1}
    assert exchange.recorded[0][0].numel() == sizes[kind]


def test_gradient_only_reduces_the_k_vector():
    _, _, full, theta, layouts = _setup("lowrank", {"scale": 2.0})
    calls = []
    shard = ShardedPrior(shard_prior(full, layouts[0]).local, _Layout(layouts[0], lambda t: calls.append(t) or t))
    local = {n: t.clone() for n, t in layouts[0].take(theta).items()}
    shard.local._flat_grads(list(local.values()), 1.0, need_value=False)
    assert [t.numel() for t in calls] == [3]  # U^T D^-1 r only; the isotropic head needs nothing without the value


@pytest.mark.parametrize("kind", ["lowrank", "diag", "block"])
def test_constants_of_shards_built_alone_become_global(kind):
    """from_shards: priors built on each rank's rows alone get the full prior's capacitance and normaliser from one
    all-reduce of (C - I) and sum log d."""
    _, post, full, _, layouts = _setup(kind, {"scale": 2.0, "eps": 0.01})
    exchange = _Exchange()
    built = {}
    for mode in ("record", "sum"):
        exchange.mode = mode
        for r, layout in enumerate(layouts):
            rows = ShardedPosterior.from_full(post, layout.restrict(post.names))
            if kind == "block":
                from ptyl.priors import block_prior

                local = block_prior(rows.local, scale=2.0, eps=0.01)
            else:
                local = learned_prior(rows.local, kind, scale=2.0, eps=0.01)
            built[r] = ShardedPrior.from_shards(local, _Layout(rows.layout, exchange.reduce(r)))
    backbone = full.parts["backbone"]
    reference = {n: b for n, b in backbone.named_buffers() if n.endswith(("capacitance_chol", "log_norm"))}
    assert reference
    for r in range(2):
        ours = dict(built[r].local.named_buffers())
        for name, value in reference.items():
            torch.testing.assert_close(ours[name], value, rtol=1e-12, atol=1e-12, msg=name)


def test_log_det_and_curvature_of_shards():
    _, _, full, _, layouts = _setup("lowrank", {"scale": 2.0, "eps": 0.01})
    h = torch.rand(full.num_parameters, dtype=torch.float64)
    exchange = _Exchange()
    shards = [ShardedPrior(shard_prior(full, layout).local, _Layout(layout, exchange.reduce(r)))
              for r, layout in enumerate(layouts)]
    starts, start = {}, 0
    for name, shape in zip(full.names, full.shapes, strict=False):
        starts[name] = (start, shape)
        start += torch.Size(shape).numel()

    def rows(layout, flat):
        return torch.cat([layout.shards[n].take(flat[a:a + torch.Size(s).numel()].reshape(s)).reshape(-1)
                          for n, (a, s) in starts.items()])

    parts = [rows(layout, h) for layout in layouts]
    for r, shard in enumerate(shards):
        shard.posterior_log_det(parts[r])
    exchange.mode = "sum"
    for r, shard in enumerate(shards):
        torch.testing.assert_close(shard.posterior_log_det(parts[r]), full.posterior_log_det(h), rtol=1e-12, atol=0)
        torch.testing.assert_close(shard.precision_diagonal(), rows(layouts[r], full.precision_diagonal()))
        torch.testing.assert_close(shard.mean_flat(), rows(layouts[r], full.mean_flat()))


def test_unsharded_model_and_misuse():
    model, post, full, theta, _ = _setup("lowrank", {"scale": 2.0})
    # a plain model: a trivial layout, the same numbers as the unsharded prior
    plain = make_prior(model, "lowrank", posterior=post, scale=2.0, head_variance=2.0, sharded=True)
    assert isinstance(plain, ShardedPrior) and not plain.layout.sharded
    torch.testing.assert_close(plain.penalty(model), full.penalty(model), rtol=0, atol=0)
    with pytest.raises(InvalidValueError, match="already sharded"):
        shard_prior(plain, model)
    layout = ShardLayout.even(dict(zip(full.names, full.shapes, strict=False)), 0, 2)
    fake = ShardedPrior(shard_prior(full, layout).local, _Layout(layout, lambda t: t))
    with pytest.raises(ConfigError, match="unsharded parameters"):  # e.g. between FSDP2's forward and backward
        fake.penalty(model)
    with pytest.raises(ConfigError, match="sharded posterior builds a sharded prior"):
        make_prior(model, "lowrank", posterior=ShardedPosterior.from_full(post, layout.restrict(post.names)),
                   sharded=False)
