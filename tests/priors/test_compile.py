"""torch.compile: the prior call and a training step with it compile into one graph and agree with eager mode.

The default tests use the ``aot_eager`` backend (Dynamo + AOTAutograd, no code generation: about a second); the
``inductor`` one generates C++ kernels (~45 s on a small CPU with a cold cache) and runs with PTYL_TEST_INDUCTOR=1.
"""

import os

import pytest
import torch
from torch import nn

from ptyl.priors import make_prior
from tests.helpers import TinyNet, random_posterior

dynamo = pytest.importorskip("torch._dynamo")
KINDS = [("lowrank", dict(eps=0.01)), ("diag", dict(eps=0.01)), ("l2sp", dict(variance=0.1)),
         ("standard", dict(variance=0.1))]


def _setup(kind, kw):
    torch.manual_seed(0)
    model = TinyNet()
    post = random_posterior(model, rank=3, dtype=torch.float32)
    extra = {"posterior": post} if kind in ("lowrank", "diag") else {}
    prior = make_prior(model, kind, head="head", head_variance=2.0, **extra, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    return model, prior, x, y


def _loss_and_grads(fn, model, *args):
    model.zero_grad(set_to_none=True)
    loss = fn(*args)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _check_step(kind, kw, backend):
    model, prior, x, y = _setup(kind, kw)

    def step_loss(x, y):
        return nn.functional.cross_entropy(model(x), y) + prior.penalty(model) / 100

    dynamo.reset()
    explained = dynamo.explain(step_loss)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(step_loss, backend=backend, fullgraph=True)
    loss_c, grads_c = _loss_and_grads(compiled, model, x, y)
    loss_e, grads_e = _loss_and_grads(step_loss, model, x, y)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_e, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return model, prior


@pytest.mark.parametrize("kind,kw", KINDS)
def test_training_step_compiles_without_graph_breaks(kind, kw):
    model, prior = _check_step(kind, kw, "aot_eager")

    def direct():
        return prior.add_grad_(model, 0.01, return_value=True)

    dynamo.reset()
    assert dynamo.explain(direct)().graph_break_count == 0
    compiled = torch.compile(direct, backend="aot_eager", fullgraph=True)
    for populated in (False, True):
        results = []
        for fn in (compiled, direct):
            for p in model.parameters():
                p.grad = torch.ones_like(p) if populated else None
            value = fn()
            results.append((value, [p.grad.clone() for p in model.parameters()]))
        torch.testing.assert_close(results[0][0], results[1][0])
        for a, b in zip(results[0][1], results[1][1], strict=False):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PTYL_TEST_INDUCTOR") != "1", reason="C++ code generation: ~45 s on a cold cache; "
                    "set PTYL_TEST_INDUCTOR=1")
def test_training_step_compiles_with_inductor():
    _check_step("lowrank", dict(eps=0.01), "inductor")
