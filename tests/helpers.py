"""Small shared test fixtures: a tiny model and a synthetic SWAG posterior."""

import torch
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
