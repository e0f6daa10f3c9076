"""Shared by the integration tests: a small model with a ``fc`` head, data, a learned prior, and the reference run
through ptyl's own :func:`fit` that every integration must reproduce."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.pipeline import learn_prior
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit

LR, BATCH, EPOCHS, SEED, CLIP = 0.05, 8, 2, 0, 1.0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 12), nn.Tanh())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.features(x))


def make_net(seed: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net()


def dataset(n: int = 40) -> TensorDataset:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 6, generator=gen)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def shuffled_loader(data) -> DataLoader:
    """The loader ptyl's own loop builds: shuffled by a generator seeded with the config's seed."""
    return DataLoader(data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(SEED))


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch (seeded ``SEED + epoch``), however far each epoch's iterator is consumed:
    frameworks that stop after ``len(loader)`` batches (Lightning) and loops that run to ``StopIteration`` (ptyl,
    a plain ``for``) read the same order. (A shuffling DataLoader draws one more permutation at ``StopIteration``.)"""

    def __init__(self, n: int):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(SEED + self.epoch)).tolist()
        self.epoch += 1
        return iter(order)


def ordered_loader(data, batch_size: int = BATCH) -> DataLoader:
    """Shuffled batches in an order fixed per epoch (:class:`EpochSampler`): one per run, for each side."""
    return DataLoader(data, batch_size=batch_size, sampler=EpochSampler(len(data)))


def source_posterior():
    """A learned posterior over the backbone (``features``) of :class:`Net`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return learn_prior(make_net(7), dataset(), epochs=3, lr=0.05, rank=3, collect_every=2, head="fc",
                           batch_size=BATCH, progress=False)


def prior_for(model: nn.Module, posterior):
    return make_prior(model, "lowrank", posterior=posterior, scale=0.5, eps=1e-3, head="fc", head_variance=1.0)


def reference_fit(data, posterior, **config) -> Net:
    """ptyl's own loop: SGD (Nesterov 0.9) at a constant lr, clipping at CLIP, the prior term with N = 40 (the data
    set's size); ``data`` a Dataset (ptyl shuffles it) or a loader."""
    model = make_net()
    settings = dict(epochs=EPOCHS, batch_size=BATCH, lr=LR, schedule="constant", grad_clip=CLIP, seed=SEED,
                    prior_step="gradient", progress=False)  # the integrations add the prior's gradient
    fit(model, data, prior_for(model, posterior), TrainConfig(**{**settings, **config}), head="fc",
        num_data=len(dataset()))
    return model


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
