"""Segmentation network on top of a classifier's conv trunk (so a classifier prior applies by name).

``SegmentationNet`` keeps the encoder under the attribute ``features`` — the very module of the
classifier, hence parameter names ``features.*`` identical to the classifier's — and adds a light
decoder (``decoder.*``, the downstream "head", trained from scratch):

    f = features(x)                                  # [B, C, h, w], any stride
    u = interpolate(context(f), size=(H, W))         # 3x3 conv-BN-ReLU x2 at low resolution, bilinear up
    logits = classify(refine(cat[u, x]))             # U-Net-lite skip from the input image, 3x3 + 1x1 conv

The input skip lets the decoder draw sharp boundaries even when the encoder has a large stride.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError, InvalidValueError

__all__ = ["SegmentationDecoder", "SegmentationNet"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _infer_channels(features: nn.Module) -> int:
    """Output channels of a conv trunk: its ``feature_dim`` or the last Conv2d/BatchNorm2d it contains."""
    if hasattr(features, "feature_dim"):
        return int(features.feature_dim)
    for module in reversed(list(features.modules())):
        if isinstance(module, nn.BatchNorm2d):
            return module.num_features
        if isinstance(module, nn.Conv2d):
            return module.out_channels
    raise ConfigError(
        f"cannot infer the output channels of {type(features).__name__}; pass feature_channels explicitly"
    )


class SegmentationDecoder(nn.Module):
    """Low-resolution context convs, bilinear upsampling to the input size, input skip, per-pixel classifier."""

    def __init__(self, feature_channels: int, image_channels: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.context = nn.Sequential(_conv_bn_relu(feature_channels, channels), _conv_bn_relu(channels, channels))
        self.refine = _conv_bn_relu(channels + image_channels, channels)
        self.classify = nn.Conv2d(channels, num_classes, kernel_size=1)

    def forward(self, feature_map: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        u = F.interpolate(self.context(feature_map), size=image.shape[-2:], mode="bilinear", align_corners=False)
        return self.classify(self.refine(torch.cat([u, image], dim=1)))


class SegmentationNet(nn.Module):
    """Encoder (``features``, shared with the classifier) + ``decoder``; ``forward(x) -> logits [B, K, H, W]``.

    Args:
        classifier_or_features: a ptyl classifier (its ``features`` module and ``feature_dim`` are used)
            or a bare conv trunk. The module is shared, not copied: pass ``copy.deepcopy(model)`` to keep
            the classifier untouched.
        num_classes: number of pixel classes ``K`` (background included).
        decoder_channels: width of the decoder.
        image_channels: channels of the input images (for the skip connection).
        feature_channels: output channels of the trunk; inferred when omitted.
    """

    head_name = "decoder"

    def __init__(
        self,
        classifier_or_features: nn.Module,
        num_classes: int,
        decoder_channels: int = 32,
        image_channels: int = 1,
        feature_channels: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(classifier_or_features, nn.Module):
            raise ConfigError(f"expected a classifier or conv trunk nn.Module, "
                              f"got {type(classifier_or_features).__name__}")
        if num_classes < 2 or decoder_channels < 1 or image_channels < 1:
            raise InvalidValueError(
                f"need num_classes >= 2, decoder_channels >= 1, image_channels >= 1; "
                f"got {num_classes}, {decoder_channels}, {image_channels}"
            )
        source = classifier_or_features
        self.features = source.features if hasattr(source, "features") else source
        if feature_channels is None:
            feature_channels = (int(source.feature_dim) if hasattr(source, "feature_dim")
                                else _infer_channels(self.features))
        self.feature_dim = int(feature_channels)
        self.num_classes = int(num_classes)
        self.image_channels = int(image_channels)
        self.decoder = SegmentationDecoder(self.feature_dim, self.image_channels, self.num_classes, decoder_channels)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise InvalidValueError(f"expected images [B, {self.image_channels}, H, W], got {tuple(x.shape)}")
        return self.decoder(self.features(x), x)
