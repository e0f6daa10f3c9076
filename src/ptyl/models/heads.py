"""Split a classifier into backbone and head by module name, and swap the head for a new task.

Works for any ``nn.Module`` whose classification head is an ``nn.Linear`` reachable by a dotted name:
``"head"`` (ptyl models), ``"fc"`` (torchvision ResNets), ``"classifier.1"`` (a layer in a Sequential).
"""

from __future__ import annotations

from torch import nn

from ptyl.errors import ConfigError, InvalidValueError

__all__ = ["get_head", "replace_head", "head_parameter_names", "backbone_parameter_names"]


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def get_head(model: nn.Module, head_name: str = "head") -> nn.Linear:
    """The ``nn.Linear`` at dotted path ``head_name``; :class:`ConfigError` naming the Linear layers if absent."""
    try:
        head = model.get_submodule(head_name) if head_name else None
    except AttributeError:
        head = None
    if not isinstance(head, nn.Linear):
        what = "is not an nn.Linear" if head is not None else "does not exist"
        raise ConfigError(
            f"head {head_name!r} {what} in {type(model).__name__}; nn.Linear modules in the model: "
            f"{_linear_names(model)}"
        )
    return head


def replace_head(model: nn.Module, num_classes: int, head_name: str = "head") -> nn.Module:
    """Replace the Linear head at ``head_name`` by a freshly initialised ``nn.Linear(in_features, num_classes)``
    (same bias setting, device and dtype) in place, and return ``model``.

    Seed with ``torch.manual_seed`` beforehand for a reproducible head. If ``model`` has an int attribute
    ``num_classes`` it is updated.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidValueError(f"num_classes must be a positive int, got {num_classes!r}")
    old = get_head(model, head_name)
    new = nn.Linear(
        old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )
    parent_name, _, child_name = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, new)  # also works for Sequential children named "0", "1", ...
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    return model


def head_parameter_names(model: nn.Module, head_name: str = "head") -> list[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters, e.g. ``["head.weight", "head.bias"]``."""
    get_head(model, head_name)
    prefix = head_name + "."
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def backbone_parameter_names(model: nn.Module, head_name: str = "head") -> list[str]:
    """Names of every parameter outside the head (the part a transferred prior usually covers)."""
    head = set(head_parameter_names(model, head_name))
    return [name for name, _ in model.named_parameters() if name not in head]
