"""Selecting model parameters by name.

Priors and posteriors are keyed by parameter *name* (never by position), so a prior file fits any model with the same
named parameters. Names are normalised first: wrappers such as ``DistributedDataParallel`` (``module.``) and
``torch.compile`` (``_orig_mod.``) add prefixes that must not change which prior a parameter gets.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ptyl.errors import ConfigError, ParameterMismatchError

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

Selector = None | str | Sequence[str] | Callable[[str, torch.Tensor], bool]


def normalize_name(name: str) -> str:
    """Strip wrapper prefixes (``module.``, ``_orig_mod.``) from a parameter name."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                changed = True
    return name


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
