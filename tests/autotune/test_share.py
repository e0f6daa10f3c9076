"""The N-aware strength diagnostic: the prior's share of the MAP objective's curvature per layer, against a dense
float64 reference; N-awareness (v = 1 at N = 50 is "on"); and a prior it calls off gives the test NLL of no prior at
all, within the noise of training itself."""

import math
import statistics

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev
from torch.utils.data import TensorDataset

from ptyl.autotune import OFF_SHARE, prior_share
from ptyl.data import few_shot_subset, load_dataset
from ptyl.metrics import evaluate_probs
from ptyl.models import SmallCNN
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit


def mlp() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Linear(3, 4))
    net.add_module("act", nn.Tanh())
    net.add_module("head", nn.Linear(4, 3))
    return net.double()


def test_block_shares_match_a_dense_float64_reference():
    net = mlp()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, generator=gen, dtype=torch.float64), torch.arange(20) % 3
    data = TensorDataset(x, y)
    prior = make_prior(net, "l2sp", variance=0.3, head="head")
    share = prior_share(prior, net, data, num_data=200)  # G of 20 examples scaled to N = 200
    params = {n: p.detach() for n, p in net.named_parameters()}
    body = {n: p for n, p in params.items() if n.startswith("body.")}

    def logits(theta, xi):
        return functional_call(net, {**params, **theta}, (xi.unsqueeze(0),)).squeeze(0)

    ggn = {n: torch.zeros_like(p) for n, p in body.items()}
    for xi in x:  # diag G = sum_n diag(J_n^T (diag p - p p^T) J_n), per parameter
        jac = jacrev(logits)(body, xi)
        p = torch.softmax(logits(body, xi), 0)
        hess = torch.diag(p) - torch.outer(p, p)
        for n in body:
            j = jac[n].reshape(3, -1)
            ggn[n] += torch.einsum("ci,cd,di->i", j, hess, j).reshape(body[n].shape)
    trace_g = 10.0 * sum(float(g.sum()) for g in ggn.values())
    trace_p = sum(p.numel() for p in body.values()) / 0.3
    assert share.blocks == pytest.approx({"body": trace_p / (trace_p + trace_g)}, rel=1e-9)
    assert share.share == share.total == share.blocks["body"] and share.num_data == 200 and share.examples == 20


def _mnist(n_per_class: int, seed: int):
    images = load_dataset("mnist", "train")
    return few_shot_subset(images, n_per_class, seed)


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)  # the "pretrained" start, the same in every fit
    return SmallCNN(in_channels=1, num_classes=10, width=4)


def test_v1_at_n50_is_on_and_the_same_prior_fades_with_n():
    train = _mnist(5, 0)  # N = 50
    model = _small_cnn()
    fit(model, train, None, TrainConfig(epochs=20, batch_size=25, lr=0.05, progress=False), num_data=len(train))
    prior = make_prior(model, "l2sp", variance=1.0, head="head")  # a weight decay 1 / (N v) = 0.02
    at_50 = prior_share(prior, model, train)
    assert not at_50.off and at_50.share > 10 * OFF_SHARE and at_50.label == "prior on"
    at_50k = prior_share(prior, model, train, num_data=50_000)  # the same prior on 1,000x the data
    assert at_50k.share < at_50.share / 20
    none = prior_share(make_prior(model, "none", head="head"), model, train)
    assert none.off and none.share == 0.0


@pytest.mark.slow
def test_a_prior_called_off_scores_like_no_prior_within_training_noise():
    train, test = _mnist(5, 1), load_dataset("mnist", "test")
    test = test.subset(torch.arange(0, len(test), 10))  # 1,000 test images
    config = TrainConfig(max_steps=120, batch_size=25, lr=0.05, grad_clip=5.0, progress=False)

    def run(kind, variance, seed):
        torch.manual_seed(seed)
        model = _small_cnn()
        torch.manual_seed(seed)  # the fresh head and the batch order differ by seed
        model.head.reset_parameters()
        prior = make_prior(model, kind, variance=variance, head="head")
        result = fit(model, train, prior, config, num_data=len(train), seed=seed)
        nll = evaluate_probs(result.predict(test), test.targets)["nll"]
        return nll, prior_share(prior, result.model, train)

    seeds = range(4)
    plain = [run("none", None, s)[0] for s in seeds]
    weak = [run("l2sp", 1e8, s) for s in seeds]
    strong = [run("l2sp", 1e-4, s) for s in seeds]
    assert all(s.off for _, s in weak) and not any(s.off for _, s in strong)
    noise = statistics.stdev(plain)  # how much test NLL moves between runs of plain fine-tuning
    gap_weak = abs(statistics.mean(n for n, _ in weak) - statistics.mean(plain))
    gap_strong = abs(statistics.mean(n for n, _ in strong) - statistics.mean(plain))
    assert gap_weak < noise / 2, (gap_weak, noise)  # "off": indistinguishable from no prior
    assert gap_strong > 2 * noise, (gap_strong, noise)  # the check can tell: an "on" prior changes the result
    assert math.isfinite(noise) and noise > 0
