"""Named parameters <-> one flat vector, resolved and validated once per model.

Priors and the SWAG collector work on flat buffers in ``names`` order, so a call costs a handful of kernels whatever
the number of parameter tensors: one ``cat`` in, a few vector ops, one view per tensor out. What must not run on every
call is Python validation: :class:`ParamBinder` checks names and shapes the first time it sees a model and then only
re-reads the cached parameter slots (``owner._parameters[key]``, ~50 ns each).

A cached model is re-validated whenever any ``nn.Module`` registers a parameter or submodule anywhere (global
registration hooks bump an epoch), e.g. after ``model.head = nn.Linear(...)``. Under ``torch.compile`` the plain
lookup runs instead, which Dynamo traces once and guards.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules import module as module_mod

from ptyl.errors import InvalidValueError
from ptyl.params import check_names_and_shapes, named_parameters

__all__ = ["GROUP_NUMEL", "ParamBinder", "compute_dtype", "flatten", "groups_for", "is_compiling", "plan_groups",
           "unflatten"]

# On the CPU, flat temporaries are built per group of consecutive tensors holding >= GROUP_NUMEL numbers: a vector
# of 11M floats (44 MB) is above glibc's largest mmap threshold (32 MB), so every call would map fresh pages and
# fault them in (measured: ~25 ms per elementwise pass at P = 11M, 5x the cached cost). Other devices (CUDA's
# caching allocator) use one group: the fewest kernels.
GROUP_NUMEL = 1 << 21

_EPOCH = [0]  # bumped on every parameter/submodule registration of any nn.Module
_HOOKS: list = []
_MAX_CACHED = 8  # models remembered per binder (a prior is typically used with one model, DDP-wrapped or not)


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _bump(*_args) -> None:
    _EPOCH[0] += 1


def _install_hooks() -> bool:
    """Global registration hooks (torch >= 2.0); False where unavailable (then nothing is cached)."""
    if not _HOOKS:
        for name in ("register_module_module_registration_hook", "register_module_parameter_registration_hook"):
            register = getattr(module_mod, name, None)
            if register is None:
                _HOOKS.append(None)
                continue
            _HOOKS.append(register(_bump))
    return None not in _HOOKS


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic dtype for parameters of ``dtype``: half precisions compute in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def plan_groups(shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Tensor counts of consecutive groups holding >= GROUP_NUMEL numbers each (the last may hold fewer)."""
    counts, count, size = [], 0, 0
    for shape in shapes:
        count += 1
        size += math.prod(shape)
        if size >= GROUP_NUMEL:
            counts.append(count)
            count, size = 0, 0
    if count:
        counts.append(count)
    return tuple(counts)


def groups_for(device: torch.device, cpu_groups: tuple[int, ...], num_tensors: int) -> tuple[int, ...]:
    """The grouping to use on ``device``: ``cpu_groups`` on the CPU, one group elsewhere."""
    return cpu_groups if device.type == "cpu" else (num_tensors,)


def flatten(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """A *fresh* flat copy of ``tensors`` (safe to modify in place) in ``dtype``: one ``cat``. Call it with grad
    disabled (inside an autograd Function's forward or ``torch.no_grad``)."""
    if len(tensors) == 1:  # flatten_dense_tensors would return a view of the parameter itself
        flat = tensors[0].reshape(-1)
        return flat.to(dtype) if dtype is not None and dtype != flat.dtype else flat.clone()
    if is_compiling():
        flat = torch.cat([t.reshape(-1) for t in tensors])
    else:
        flat = torch._C._nn.flatten_dense_tensors(list(tensors))
    return flat.to(dtype) if dtype is not None else flat


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor | torch.Size]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (tensors, or their shapes; no copy)."""
    if is_compiling() or len(like) == 1 or isinstance(like[0], torch.Size):
        shapes = [s if isinstance(s, torch.Size) else s.shape for s in like]
        return [part.view(s) for part, s in zip(flat.split([math.prod(s) for s in shapes]), shapes, strict=False)]
    return list(torch._C._nn.unflatten_dense_tensors(flat, list(like)))


class _Entry:
    __slots__ = ("ref", "epoch", "slots")

    def __init__(self, module: nn.Module, slots: list[tuple[nn.Module, str]]):
        self.ref, self.epoch, self.slots = weakref.ref(module), _EPOCH[0], slots


class ParamBinder:
    """Finds the tensors named ``names`` (with ``shapes``) in a module or mapping, in ``names`` order.

    Module: names and shapes are validated the first time, then cached until a module registration anywhere.
    Mapping (e.g. ``{name: tensor}`` built per call): key order is cached, shapes are checked on every call (a
    tuple comparison; the tensors are usually new objects).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], what: str = "prior"):
        self.names = tuple(names)
        self.shapes = tuple(torch.Size(s) for s in shapes)
        self.what = what
        self._modules: dict[int, _Entry] = {}
        self._key_orders: dict[tuple, list] = {}

    def __getstate__(self) -> dict:  # weak references do not pickle; the caches rebuild themselves
        return {**self.__dict__, "_modules": {}, "_key_orders": {}}

    def __deepcopy__(self, memo) -> ParamBinder:
        return ParamBinder(self.names, self.shapes, self.what)

    def tensors(self, params: nn.Module | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if is_compiling():  # Dynamo traces this once and guards on the model
            named = named_parameters(params)
            return [named[n] for n in self.names]
        if isinstance(params, nn.Module):
            return self._from_module(params)
        if isinstance(params, Mapping):
            return self._from_mapping(params)
        raise InvalidValueError(f"expected an nn.Module or a name -> tensor mapping, got {type(params).__name__}")

    def _from_module(self, module: nn.Module) -> list[torch.Tensor]:
        entry = self._modules.get(id(module))
        if entry is not None and entry.epoch == _EPOCH[0] and entry.ref() is module:
            return [owner._parameters[key] for owner, key in entry.slots]
        named = named_parameters(module)
        check_names_and_shapes(dict(zip(self.names, self.shapes, strict=False)), named, what=self.what)
        tensors = [named[n] for n in self.names]
        if _install_hooks():
            owners = {id(p): (m, k) for m in module.modules() for k, p in m._parameters.items() if p is not None}
            if len(self._modules) >= _MAX_CACHED:
                self._modules.clear()
            self._modules[id(module)] = _Entry(module, [owners[id(t)] for t in tensors])
        return tensors

    def _from_mapping(self, mapping: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        keys = tuple(mapping)
        order = self._key_orders.get(keys)
        if order is None:
            named = named_parameters(mapping)
            check_names_and_shapes(dict(zip(self.names, self.shapes, strict=False)), named, what=self.what)
            raw = dict(zip(named, keys, strict=False))  # normalised name -> the mapping's own key
            order = [raw[n] for n in self.names]
            if len(self._key_orders) >= _MAX_CACHED:
                self._key_orders.clear()
            self._key_orders[keys] = order
        tensors = [mapping[k] for k in order]
        if any(t.shape != s for t, s in zip(tensors, self.shapes, strict=False)):
            # strict=False: a wrong number of tensors is what the check reports, by name
            check_names_and_shapes(dict(zip(self.names, self.shapes, strict=True)),
                                   dict(zip(self.names, tensors, strict=False)), what=self.what)
        return tensors
