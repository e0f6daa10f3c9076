"""The tuning strategies ptyl knows, each declared once: ``TuningStrategy.MARGLIK.tuner`` is the class that runs it,
``TuningStrategy.MARGLIK.settings`` its settings dataclass.

:func:`ptyl.tuning.tune` (``strategy=``, its settings as ``auto=``), the pipeline's runner
(:func:`ptyl.pipeline.transfer_run`, ``tuning=``), the benchmarks (``pairs.py --tuning``) and the command line's
``--tune`` choices all read this registry. ``grid`` is :func:`~ptyl.tuning.tune`'s own validation grid; every other
member is an automatic strategy: an :class:`~ptyl.tuning.automatic.AutomaticTuner` subclass that learns the prior's
strength in one training run, with its own settings (a subclass of
:class:`~ptyl.tuning.automatic.AutomaticSettings`). Adding one is one new file plus one member line below (see
``docs/architecture.md``).

>>> TuningStrategy.parse("marglik").settings.__name__
'MarglikSettings'
>>> [str(s) for s in TuningStrategy if s.automatic]
['de-elbo', 'marglik', 'hypergradient', 'continuation']
>>> [str(s) for s in TuningStrategy if s.automatic and s.tuner.uses_validation]
['hypergradient', 'continuation']
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ptyl.errors import ConfigError
from ptyl.named_enum import NamedEnum

if TYPE_CHECKING:
    from ptyl.tuning.automatic import AutomaticSettings, AutomaticTuner

__all__ = ["AUTO", "TuningStrategy"]


class TuningStrategy(NamedEnum):
    """How :func:`ptyl.tuning.tune` chooses the prior's hyper-parameters; members compare equal to their names
    (``TuningStrategy.GRID == "grid"``)."""

    _path: str | None

    def __new__(cls, value: str, tuner: str | None) -> TuningStrategy:
        member = str.__new__(cls, value)
        member._value_ = value
        member._path = tuner
        return member

    # name = "value", "module:TunerClass" (imported on first use: this file imports no tuning code); None: the grid
    GRID = "grid", None
    DEELBO = "de-elbo", "ptyl.tuning.deelbo:DEELBOTuner"
    MARGLIK = "marglik", "ptyl.tuning.marglik:MarglikTuner"
    HYPERGRADIENT = "hypergradient", "ptyl.tuning.hypergradient:HypergradientTuner"
    CONTINUATION = "continuation", "ptyl.tuning.continuation:ContinuationTuner"

    @property
    def automatic(self) -> bool:
        """Whether this is an automatic strategy (one training run), not the validation grid."""
        return self._path is not None

    @property
    def tuner(self) -> type[AutomaticTuner]:
        """The :class:`~ptyl.tuning.automatic.AutomaticTuner` subclass of an automatic strategy.

        Raises:
            ConfigError: the grid (it is :func:`ptyl.tuning.tune` itself).
        """
        if self._path is None:
            raise ConfigError(f"tuning strategy {self.value!r} is tune()'s validation grid, not an automatic tuner")
        module, _, name = self._path.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def settings(self) -> type[AutomaticSettings]:
        """The settings dataclass of an automatic strategy (``tuner.Settings``)."""
        return self.tuner.Settings



AUTO = TuningStrategy.DEELBO
"""What ``--tune auto`` runs: DE-ELBO. In the side-by-side benchmark (``benchmarks/results/autotune.md``, four pairs,
n = 10, 100 and full, 5 seeds, learned low-rank prior) neither DE-ELBO nor the marginal likelihood matches the
validation grid on any cell. DE-ELBO's accuracy is the closer on average (-1.5 points against the marginal
likelihood's -3.2) and it never collapses the way the Laplace evidence does at n = 10 (0.64 against the grid's 0.85 on
KMNIST -> MNIST); its NLL is the worse (+0.27 against +0.13 on average), almost all of it on the text pair, where it is
over-confident and the marginal likelihood ties the grid. The validation hypergradient (issue 22) has not been
measured on every cell yet; until it is, ``auto`` stays DE-ELBO and the grid stays the default of ``tune`` and
``--tune``."""
