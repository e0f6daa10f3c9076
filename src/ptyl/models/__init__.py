"""Small classifiers (plain torch) with a shared ``features / pool / head`` contract, and head helpers.

>>> from ptyl.models import build_model, replace_head
>>> model = build_model("resnet8", num_classes=10)
>>> model = replace_head(model, num_classes=5)  # new task, fresh head
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ptyl.errors import ConfigError
from ptyl.models.cnn import MLP, Classifier, GlobalAvgPool, SmallCNN
from ptyl.models.heads import backbone_parameter_names, get_head, head_parameter_names, replace_head
from ptyl.models.hf import minilm_classifier
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
    "is_factory",
    "load_factory",
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
    "minilm": minilm_classifier,  # text: all-MiniLM-L6-v2 + a head (pip install 'ptyl[hf]')
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(MODELS)


def is_factory(name: str) -> bool:
    """Whether ``name`` is a ``module:factory`` (or ``path/to/file.py:factory``) spec rather than a built-in name."""
    return ":" in str(name)


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable a ``module:factory`` spec names.

    Args:
        spec: ``package.module:function`` (imported like any module: it must be on the path) or
            ``path/to/file.py:function``; ``function`` may be dotted (``module:Class.create``).

    Returns:
        The callable.

    Raises:
        ConfigError: the module cannot be imported or lacks the attribute.
    """
    module_name, _, attr = str(spec).rpartition(":")
    if not module_name or not attr:
        raise ConfigError(f"model factory {spec!r} must look like 'module:function' or 'file.py:function'")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).resolve()
            if not path.is_file():
                raise ConfigError(f"model factory file not found: {module_name}")
            module_spec = importlib.util.spec_from_file_location(f"_ptyl_factory_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {module_name!r} for model {spec!r} ({err}); is its folder on "
                          "PYTHONPATH?") from err
    target = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{module_name!r} has no attribute {attr!r} (model {spec!r})")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"model factory {spec!r} is not callable")
    return target


def _accepted(factory: Callable, kwargs: dict) -> dict:
    """The keyword arguments ``factory`` takes (all of them if it has ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return kwargs
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model by name (case-insensitive), or call a ``module:factory``, passing ``kwargs``.

    ``"smallcnn"`` -> :class:`SmallCNN`, ``"resnet8"``/``"resnet20"``/``"resnet32"`` -> :class:`ResNet`,
    ``"mlp"`` -> :class:`MLP` (needs ``in_features``). A factory (:func:`load_factory`) gets the keyword arguments
    its signature accepts (e.g. ``num_classes``; the others are dropped) and must return an ``nn.Module``.
    """
    if is_factory(name):
        factory = load_factory(name)
        model = factory(**_accepted(factory, kwargs))
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
        return model
    key = str(name).lower()
    if key not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available models: {', '.join(MODELS)}, or module:factory")
    try:
        return MODELS[key](**kwargs)
    except TypeError as err:  # unexpected / missing keyword: report it as a configuration problem
        raise ConfigError(f"cannot build model {key!r} with arguments {sorted(kwargs)}: {err}") from err


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
