"""Split a classifier into backbone and head by module name, and swap the head for a new task.

Works for any ``nn.Module`` whose classification head is an ``nn.Linear`` reachable by a dotted name:
``"head"`` (ptyl models), ``"fc"`` (torchvision ResNets), ``"classifier.1"`` (a layer in a Sequential),
``"classifier"`` / ``"score"`` (Hugging Face ``*ForSequenceClassification``), ``"head"`` / ``"fc"`` (timm).
Models with a ``reset_classifier(num_classes)`` method (timm) get their head from it; Hugging Face models get their
``config.num_labels`` (and ``id2label``) updated, so their own loss sees the new classes.
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
    """Give ``model`` a freshly initialised head with ``num_classes`` outputs, in place, and return it.

    A model with ``reset_classifier`` (timm) resets its own classifier; otherwise the ``nn.Linear`` at ``head_name``
    is replaced by ``nn.Linear(in_features, num_classes)`` (same bias setting, device and dtype). Integer
    ``num_classes`` / ``num_labels`` attributes and a Hugging Face ``config.num_labels`` are updated. Seed with
    ``torch.manual_seed`` beforehand for a reproducible head. (PEFT: replace the head before wrapping the model.)

    Args:
        model: the classifier.
        num_classes: outputs of the new head.
        head_name: dotted module name of the head (checked: a :class:`ConfigError` lists the Linear layers).

    Returns:
        ``model``.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise InvalidValueError(f"num_classes must be a positive int, got {num_classes!r}")
    old = get_head(model, head_name)
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):  # timm: the model knows how to rebuild its head (pooling, dropout, ...)
        reset(num_classes)
        new = get_head(model, head_name)
        if new is old or new.out_features != num_classes:
            raise ConfigError(f"{type(model).__name__}.reset_classifier({num_classes}) did not replace the head "
                              f"{head_name!r}; name the module it resets")
    else:
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        parent_name, _, child_name = head_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, new)  # also works for Sequential children named "0", "1", ...
    _update_label_count(model, num_classes)
    return model


def _update_label_count(model: nn.Module, num_classes: int) -> None:
    """``num_classes`` / ``num_labels`` attributes and a Hugging Face config (its setter rebuilds ``id2label``)."""
    for attr in ("num_classes", "num_labels"):
        if isinstance(getattr(model, attr, None), int):
            setattr(model, attr, num_classes)
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "num_labels", None), int):
        config.num_labels = num_classes


def head_parameter_names(model: nn.Module, head_name: str = "head") -> list[str]:
    """Names (as in ``model.named_parameters()``) of the head's parameters, e.g. ``["head.weight", "head.bias"]``."""
    get_head(model, head_name)
    prefix = head_name + "."
    return [name for name, _ in model.named_parameters() if name.startswith(prefix)]


def backbone_parameter_names(model: nn.Module, head_name: str = "head") -> list[str]:
    """Names of every parameter outside the head (the part a transferred prior usually covers)."""
    head = set(head_parameter_names(model, head_name))
    return [name for name, _ in model.named_parameters() if name not in head]
