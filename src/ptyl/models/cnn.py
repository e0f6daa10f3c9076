"""Small convolutional classifiers for 28x28-ish grayscale images, and an MLP for vector inputs.

Every classifier in :mod:`ptyl.models` follows one contract, relied on by priors (matched by parameter
name) and by the segmentation / SimCLR code (which reuses the trunk):

* ``features``: the trunk, image ``[B,C,H,W]`` -> feature map ``[B, feature_dim, h, w]``;
* ``pool``: global average pool + flatten (no parameters) -> ``[B, feature_dim]``;
* ``head``: ``nn.Linear(feature_dim, num_classes)``; ``head_name = "head"``;
* ``forward(x) = head(pool(features(x)))`` and ``forward_features(x) = features(x)``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from ptyl.errors import ConfigError

__all__ = ["GlobalAvgPool", "Classifier", "SmallCNN", "MLP"]


class GlobalAvgPool(nn.Module):
    """``[B,C,H,W] -> [B,C]`` mean over the spatial dimensions (parameter-free)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1))


class Classifier(nn.Module):
    """Base class implementing the ``features -> pool -> head`` contract; subclasses set the three parts."""

    head_name = "head"
    features: nn.Module
    pool: nn.Module
    head: nn.Linear
    feature_dim: int
    num_classes: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")


def _conv_block(index: int, in_ch: int, out_ch: int, batchnorm: bool) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [
        (f"conv{index}", nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=not batchnorm))  # BN makes a bias redundant
    ]
    if batchnorm:
        layers.append((f"bn{index}", nn.BatchNorm2d(out_ch)))
    layers.append((f"relu{index}", nn.ReLU()))
    return layers


class SmallCNN(Classifier):
    """Three 3x3 conv blocks (conv-BN-ReLU) of ``width, 2*width, 2*width`` channels with 2x2 max-pools after
    the first two, global average pooling and a linear head.

    With the defaults (``width=32``) it has 56,554 parameters, ``feature_dim = 64`` and a 7x7 map for 28x28
    inputs; one SGD epoch over 5,000 MNIST images takes about 3 s on 2 CPU cores. Parameter names:
    ``features.conv{1,2,3}.weight``, ``features.bn{1,2,3}.{weight,bias}``, ``head.{weight,bias}``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, batchnorm: bool = True):
        super().__init__()
        _check_positive(in_channels=in_channels, num_classes=num_classes, width=width)
        channels = (width, 2 * width, 2 * width)
        layers = _conv_block(1, in_channels, channels[0], batchnorm)
        layers.append(("pool1", nn.MaxPool2d(2)))
        layers += _conv_block(2, channels[0], channels[1], batchnorm)
        layers.append(("pool2", nn.MaxPool2d(2)))
        layers += _conv_block(3, channels[1], channels[2], batchnorm)
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = GlobalAvgPool()
        self.feature_dim = channels[-1]
        self.num_classes = num_classes
        self.head = nn.Linear(self.feature_dim, num_classes)


class MLP(Classifier):
    """Fully connected ReLU network for vectors (or images, flattened first).

    ``features`` = Flatten + ``Linear-ReLU`` per entry of ``hidden`` and outputs ``[B, hidden[-1]]``, so
    ``pool`` is ``nn.Identity`` and ``feature_dim = hidden[-1]`` (``in_features`` if ``hidden`` is empty).
    Parameter names: ``features.fc{1,2,...}.{weight,bias}``, ``head.{weight,bias}``.
    """

    def __init__(self, in_features: int, num_classes: int = 10, hidden: Sequence[int] = (256, 128)):
        super().__init__()
        hidden = tuple(hidden)
        _check_positive(in_features=in_features, num_classes=num_classes)
        _check_positive(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten(1))]
        width = in_features
        for i, h in enumerate(hidden, start=1):
            layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
            width = h
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.Identity()
        self.feature_dim = width
        self.num_classes = num_classes
        self.head = nn.Linear(width, num_classes)
