"""Small classifiers (plain torch) with a shared ``features / pool / head`` contract, and head helpers.

>>> from ptyl.models import build_model, replace_head
>>> model = build_model("resnet8", num_classes=10)
>>> model = replace_head(model, num_classes=5)  # new task, fresh head
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ptyl.errors import ConfigError
from ptyl.models.cnn import MLP, Classifier, GlobalAvgPool, SmallCNN
from ptyl.models.heads import backbone_parameter_names, get_head, head_parameter_names, replace_head
from ptyl.models.resnet import BasicBlock, ResNet, resnet8, resnet20, resnet32
from ptyl.models.segmentation import SegmentationDecoder, SegmentationNet

__all__ = [
    "MODELS",
    "BasicBlock",
    "Classifier",
    "GlobalAvgPool",
    "MLP",
    "ResNet",
    "SegmentationDecoder",
    "SegmentationNet",
    "SmallCNN",
    "available_models",
    "backbone_parameter_names",
    "build_model",
    "count_parameters",
    "get_head",
    "head_parameter_names",
    "replace_head",
    "resnet8",
    "resnet20",
    "resnet32",
]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "smallcnn": SmallCNN,
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "mlp": MLP,
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (case-insensitive), passing ``kwargs`` to its constructor.

    ``"smallcnn"`` -> :class:`SmallCNN`, ``"resnet8"``/``"resnet20"``/``"resnet32"`` -> :class:`ResNet`,
    ``"mlp"`` -> :class:`MLP` (needs ``in_features``).
    """
    key = str(name).lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(MODELS)}")
    try:
        return MODELS[key](**kwargs)
    except TypeError as err:  # unexpected / missing keyword: report it as a configuration problem
        raise ConfigError(f"cannot build model {key!r} with arguments {sorted(kwargs)}: {err}") from err


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
