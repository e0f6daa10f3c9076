"""CIFAR-style ResNet (He et al. 2016, "Deep Residual Learning for Image Recognition", Sec. 4.2,
https://arxiv.org/abs/1512.03385): a 3x3 stem, three stages of ``n`` BasicBlocks with ``width, 2*width,
4*width`` channels (strides 1, 2, 2), global average pooling and a linear head; depth = 6n + 2.

Shortcuts that change shape use a 1x1 conv + BN projection (option B of the paper) rather than zero
padding, so every block is an ordinary module with named parameters. The model follows the
``features / pool / head`` contract of :mod:`ptyl.models.cnn`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from ptyl.errors import ConfigError
from ptyl.models.cnn import Classifier, GlobalAvgPool, _check_positive

__all__ = ["BasicBlock", "ResNet", "resnet8", "resnet20", "resnet32"]


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with 3x3 convolutions."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    conv=nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                    bn=nn.BatchNorm2d(out_ch),
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(Classifier):
    """CIFAR-style ResNet-``depth`` (``depth = 6n + 2``: 8, 14, 20, 32, ...).

    ``resnet20`` with ``width=16`` is the 0.27M-parameter network of He et al.; ``feature_dim = 4*width``.
    Parameter names: ``features.conv1``, ``features.bn1``, ``features.layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``,
    ``features.layer{2,3}.0.shortcut.{conv,bn}``, ``head``.
    """

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        _check_positive(depth=depth, in_channels=in_channels, num_classes=num_classes, width=width)
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ConfigError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth}")
        blocks_per_stage = (depth - 2) // 6
        layers: list[tuple[str, nn.Module]] = [
            ("conv1", nn.Conv2d(in_channels, width, 3, padding=1, bias=False)),
            ("bn1", nn.BatchNorm2d(width)),
            ("relu", nn.ReLU()),
        ]
        in_ch = width
        for stage, (out_ch, stride) in enumerate(((width, 1), (2 * width, 2), (4 * width, 2)), start=1):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_ch, out_ch, stride if i == 0 else 1))
                in_ch = out_ch
            layers.append((f"layer{stage}", nn.Sequential(*blocks)))
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = GlobalAvgPool()
        self.feature_dim = in_ch
        self.num_classes = num_classes
        self.depth = depth
        self.head = nn.Linear(in_ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He initialisation for convs (the paper's choice); BN starts as the identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def resnet8(**kwargs) -> ResNet:
    """ResNet-8 (one BasicBlock per stage)."""
    return ResNet(depth=8, **kwargs)


def resnet20(**kwargs) -> ResNet:
    """ResNet-20 (three BasicBlocks per stage)."""
    return ResNet(depth=20, **kwargs)


def resnet32(**kwargs) -> ResNet:
    """ResNet-32 (five BasicBlocks per stage)."""
    return ResNet(depth=32, **kwargs)
