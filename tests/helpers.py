"""Small shared test fixtures: a tiny model, a synthetic SWAG posterior and the fuzz tests' hypothesis settings."""

import os

import torch
from hypothesis import HealthCheck, settings
from torch import nn

from ptyl.posterior import SourcePosterior


class TinyNet(nn.Module):
    """~200 parameters: features.0 (conv), features.2 (linear) and a head."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 4))
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


def random_posterior(model: nn.Module, rank: int = 3, dtype=torch.float64, head: str = "head") -> SourcePosterior:
    gen = torch.Generator().manual_seed(1)
    mean, var, dev = {}, {}, {}
    for n, p in model.named_parameters():
        if n.startswith(head + "."):
            continue
        mean[n] = torch.randn(p.shape, generator=gen, dtype=dtype)
        var[n] = torch.rand(p.shape, generator=gen, dtype=dtype) * 0.5 + 0.1
        dev[n] = torch.randn((rank, *p.shape), generator=gen, dtype=dtype) * 0.3
    return SourcePosterior(mean, var, dev, {"architecture": "TinyNet"})


FUZZ_SCALE = float(os.environ.get("PTYL_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int):
    """Hypothesis settings of the in-suite fuzz: derandomised (the same examples on every run, so CI is reproducible);
    ``PTYL_FUZZ_SCALE=10`` runs ten times as many, ``PTYL_FUZZ_RANDOM=1`` draws new ones."""
    return settings(max_examples=max(1, int(examples * FUZZ_SCALE)), deadline=None, database=None,
                    derandomize=os.environ.get("PTYL_FUZZ_RANDOM") != "1",
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
