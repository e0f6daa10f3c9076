"""The inference strategies ptyl knows, each declared once: ``Inference.SGLD.strategy`` is the class that trains
that way (:mod:`ptyl.training.strategies`). :class:`~ptyl.training.TrainConfig` validation, :func:`ptyl.training.fit`,
method parsing (:func:`ptyl.pipeline.parse_method`) and the command line's choices all read this registry. Adding a
sampler is one new strategy file plus one member line below (see ``docs/architecture.md``).

>>> Inference.parse("csgld").strategy.__name__
'CyclicalSGLDStrategy'
>>> [str(i) for i in Inference if i.strategy.collects_samples]
['sgld', 'csgld', 'swag']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ptyl.named_enum import NamedEnum

if TYPE_CHECKING:
    from ptyl.training.strategies.base import Strategy

__all__ = ["Inference"]


class Inference(NamedEnum):
    """How the downstream posterior is inferred; members compare equal to their names (``Inference.MAP == "map"``)."""

    _path: str

    def __new__(cls, value: str, strategy: str) -> Inference:
        member = str.__new__(cls, value)
        member._value_ = value
        member._path = strategy
        return member

    # name = "value", "module:StrategyClass" (imported on first use: this file imports no strategy code)
    MAP = "map", "ptyl.training.strategies.map:MAPStrategy"
    SGLD = "sgld", "ptyl.training.strategies.sgld:SGLDStrategy"
    CSGLD = "csgld", "ptyl.training.strategies.csgld:CyclicalSGLDStrategy"
    SWAG = "swag", "ptyl.training.strategies.swag:SWAGStrategy"
    LAPLACE = "laplace", "ptyl.training.strategies.laplace:LaplaceStrategy"

    @property
    def strategy(self) -> type[Strategy]:
        """The :class:`~ptyl.training.strategies.base.Strategy` subclass of this inference."""
        module, _, name = self._path.partition(":")
        return getattr(importlib.import_module(module), name)

