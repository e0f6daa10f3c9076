"""Selecting model parameters by name.

Priors and posteriors are keyed by parameter *name* (never by position), so a prior file fits any model with the same
named parameters. Names are normalised first: wrappers such as ``DistributedDataParallel`` (``module.``),
``torch.compile`` (``_orig_mod.``) and PEFT (``base_model.model.``, ``base_layer``, the ``default`` adapter) add
prefixes and infixes that must not change which prior a parameter gets:

>>> normalize_name("base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight")
'bert.encoder.layer.0.attention.self.query.weight'
>>> normalize_name("module.base_model.model.encoder.query.lora_A.default.weight")  # = ptyl's own LoRA name
'encoder.query.lora_A'
>>> normalize_name("base_model.model.classifier.modules_to_save.default.bias")
'classifier.bias'
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ptyl.errors import ConfigError, ParameterMismatchError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")
# PEFT (https://github.com/huggingface/peft) names of its "default" adapter -> the names of the unwrapped model, with
# LoRA factors named as ptyl.models.hf.LoRALinear names them (same shapes: A [r, in], B [out, r])
_PEFT_RENAMES = (
    (re.compile(r"(^|\.)base_layer\."), r"\1"),
    (re.compile(r"(^|\.)modules_to_save\.default\."), r"\1"),
    (re.compile(r"(^|\.)(lora_A|lora_B)\.default\.weight$"), r"\1\2"),
    (re.compile(r"(^|\.)(lora_embedding_A|lora_embedding_B)\.default$"), r"\1\2"),
)
# top-level module names that usually hold a task head (torchvision fc, timm head, Hugging Face classifier / score)
HEAD_LIKE_NAMES = ("head", "heads", "fc", "classifier", "lm_head", "score", "classification_head")

Selector = None | str | Sequence[str] | Callable[[str, torch.Tensor], bool]


def normalize_name(name: str) -> str:
    """A parameter name without wrapper prefixes (DDP ``module.``, ``torch.compile`` ``_orig_mod.``, PEFT
    ``base_model.model.``) and with PEFT's default-adapter names mapped back (``x.base_layer.weight`` ->
    ``x.weight``, ``x.lora_A.default.weight`` -> ``x.lora_A``, ``x.modules_to_save.default.w`` -> ``x.w``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    if "base_layer." in name or ".default" in name or "default." in name:  # PEFT only: plain names skip the regexes
        for pattern, replacement in _PEFT_RENAMES:
            name = pattern.sub(replacement, name)
    return name


def looks_like_head(name: str) -> bool:
    """Whether a (normalised) parameter name sits in a top-level module usually holding a task head
    (:data:`HEAD_LIKE_NAMES`: ``fc.weight``, ``classifier.bias``, ``head.fc.weight``...)."""
    return name.split(".", 1)[0] in HEAD_LIKE_NAMES


def head_like_names(names: Iterable[str], head: str | Sequence[str] | None) -> list[str]:
    """The names among ``names`` that look like a task head (:func:`looks_like_head`) but are not in ``head``.

    Args:
        names: parameter names (normalised).
        head: the head module name(s) the caller uses.

    Returns:
        The suspicious names, in order.
    """
    heads = as_name_list(head)
    return [n for n in names if looks_like_head(n) and not any(name_matches(n, h) for h in heads)]


def check_head_matches(names: Iterable[str], head: str | Sequence[str] | None, where: str = "the model") -> None:
    """Raise :class:`ConfigError` when a head name matches no parameter (naming head-like candidates).

    Args:
        names: the model's parameter names (normalised).
        head: head module name(s); ``None`` / empty: nothing to check.
        where: how the message names the model.
    """
    names = list(names)
    for h in as_name_list(head):
        if not any(name_matches(n, h) for n in names):
            candidates = sorted({n.rsplit(".", 1)[0] for n in names if looks_like_head(n)})
            hint = f"; head-like modules: {candidates}" if candidates else f"; parameters are e.g. {names[:4]}"
            raise ConfigError(f"head {h!r} matches no parameter of {where}{hint}")


def name_matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is the name, a module prefix of it (``features`` matches ``features.0.weight``) or a glob."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def as_name_list(names: str | Sequence[str] | None) -> list[str]:
    """``"head"`` -> ``["head"]``, a sequence -> a list, ``None`` -> ``[]``."""
    return [names] if isinstance(names, str) else list(names or [])


def _matches(selector: Selector, name: str, tensor: torch.Tensor) -> bool:
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(name, tensor))
    patterns = [selector] if isinstance(selector, str) else list(selector)
    return any(name_matches(name, p) for p in patterns)


def named_parameters(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters of a module (or an existing mapping) keyed by normalised name."""
    items = model.items() if isinstance(model, Mapping) else model.named_parameters()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in items:
        key = normalize_name(name)
        if key in out:
            raise ParameterMismatchError(f"two parameters normalise to the same name {key!r}")
        out[key] = tensor
    return out


def select_parameters(
    model: nn.Module | Mapping[str, torch.Tensor],
    include: Selector = None,
    exclude: Selector = None,
    head: str | Sequence[str] | None = None,
    trainable_only: bool = True,
) -> dict[str, torch.Tensor]:
    """Choose parameters by name.

    Args:
        include: names, module prefixes or glob patterns (or a callable ``(name, tensor) -> bool``) to keep;
            ``None`` keeps everything.
        exclude: same form; matching parameters are dropped.
        head: module name(s) of the task head, dropped as well (the head gets its own prior downstream).
        trainable_only: drop parameters with ``requires_grad=False``.
    """
    params = named_parameters(model)
    chosen = {}
    for name, tensor in params.items():
        if trainable_only and not tensor.requires_grad:
            continue
        if include is not None and not _matches(include, name, tensor):
            continue
        if _matches(exclude, name, tensor) or _matches(head, name, tensor):
            continue
        chosen[name] = tensor
    if not chosen:
        raise ConfigError(
            f"no parameters selected (include={include!r}, exclude={exclude!r}, head={head!r}); "
            f"the model has {len(params)} parameters, e.g. {list(params)[:5]}"
        )
    return chosen


def check_names_and_shapes(
    expected: Mapping[str, Sequence[int]],
    actual: Mapping[str, torch.Tensor],
    *,
    what: str = "prior",
) -> None:
    """Raise :class:`ParameterMismatchError` listing every missing name and every shape mismatch."""
    missing = [n for n in expected if n not in actual]
    wrong = [
        f"{n}: {what} {tuple(expected[n])} vs model {tuple(actual[n].shape)}"
        for n in expected
        if n in actual and tuple(actual[n].shape) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} parameter(s) of the {what} are missing from the model: {_short(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es): {_short(wrong)}")
    if problems:
        raise ParameterMismatchError("; ".join(problems))


def _short(items: Iterable[str], limit: int = 6) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
