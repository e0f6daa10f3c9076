"""Hyper-parameter selection by grid search on a class-balanced validation split — the one protocol every method
and every baseline goes through, so that baselines are tuned as hard as the method.

For every point of the grid (the Cartesian product of the axes):

1. split the n training examples into a class-balanced 80 % / 20 % (``val_fraction``) train/validation pair
   (:func:`ptyl.data.balanced_split`; ``seed`` picks the split; the same split for every trial); data without one
   class label per example (segmentation: the target is a mask) get a seeded random 80 / 20 split instead
   (``split="auto"``, the default; ``split="balanced"`` / ``"random"`` force one) and per-pixel metrics;
2. build a fresh model (``model_fn()``) and its prior (``method``: ``standard`` / ``l2sp`` / ``diag`` / ``lowrank``
   / ``none``, see :func:`ptyl.priors.make_prior`);
3. fit with :func:`ptyl.inference.trainer.fit` on the 80 % (``num_data`` = its size) and score the validation set
   (NLL, accuracy, ECE, Brier) with :meth:`FitResult.predict`.

The best point by validation NLL (or ``metric``) wins. If its value on any numeric axis with two or more values is the
smallest or largest of that axis, the optimum may lie outside the grid: a warning is issued and recorded in
``edge_warnings``. With ``refit=True`` the model is retrained on all n examples with the chosen values.

Grid axes:
    prior: ``scale`` (lambda, learned priors), ``eps``, ``rank``, ``variance``, ``head_variance``;
    training: any :class:`TrainConfig` field (``lr``, ``head_lr``, ``temperature``, ``epochs``, ...) except ``seed``,
    ``progress`` and ``device``.
Baselines are parametrised by the **prior variance** ``variance`` of N(0, variance I) (``standard``) or
N(theta_0, variance I) (``l2sp``), never by weight decay: the variance is a property of the prior, independent of n,
so the value chosen on the 80 % split transfers unchanged to the refit on all n (its equivalent weight decay
``1 / (n variance)`` shrinks accordingly). Convert with :func:`ptyl.priors.variance_from_weight_decay`.

Same-budget grids (:func:`default_grid`), ``budget = B`` trials, ``L = len(lrs)`` learning rates and ``B // L``
log-spaced values of the method's main axis:

============  ============  ====================  ===================================================
method        axis          default log10 range   why
============  ============  ====================  ===================================================
``lowrank``   ``scale``     [0, 8]                SWAG variances are tiny: lambda is usually >> 1
``diag``      ``scale``     [0, 8]                same
``l2sp``      ``variance``  [-4, 0]               L2-SP alpha = 1/(n variance): 1e-2..1e2 at n = 100
``standard``  ``variance``  [-2, 2]               weight decay 1/(n variance): 1e-4..1 at n = 100
``none``      ``lr``        [log lrs]             no prior: the whole budget goes to the learning rate
============  ============  ====================  ===================================================

e.g. ``default_grid("lowrank", budget=15)`` = 5 scales {1, 1e2, 1e4, 1e6, 1e8} x lr {0.003, 0.01, 0.03}.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ptyl.errors import ConfigError, DataError, InvalidValueError
from ptyl.inference.trainer import FitResult, TrainConfig, fit
from ptyl.priors.factory import METHODS, make_prior

__all__ = ["MethodSpec", "TuneResult", "default_grid", "tune", "validation_split", "DEFAULT_LRS", "DEFAULT_RANGES"]

PRIOR_KEYS = ("scale", "eps", "rank", "variance", "head_variance")
_FORBIDDEN_CONFIG_KEYS = ("seed", "progress", "device")
SPLITS = ("auto", "balanced", "random")
METRICS = {"nll": "min", "ece": "min", "brier": "min", "accuracy": "max"}
DEFAULT_LRS = (0.003, 0.01, 0.03)
DEFAULT_RANGES: dict[str, tuple[str, float, float]] = {
    "lowrank": ("scale", 0.0, 8.0),
    "diag": ("scale", 0.0, 8.0),
    "l2sp": ("variance", -4.0, 0.0),
    "standard": ("variance", -2.0, 2.0),
}


@dataclass
class MethodSpec:
    """Which prior a method trains under (the fixed part; grid axes override the fields named in ``PRIOR_KEYS``).

    ``kind``: ``lowrank`` / ``diag`` (need ``posterior``), ``l2sp`` / ``standard`` (need ``variance``, here or in the
    grid), ``none``. Other fields as in :func:`ptyl.priors.make_prior`.
    """

    kind: str = "standard"
    posterior: Any = None  # SourcePosterior
    scale: float = 1.0
    eps: float = 0.0
    rank: int | None = None
    variance: float | None = None
    head: str | Sequence[str] | None = "head"
    head_variance: float | None = 1.0
    unregularized: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.kind not in METHODS:
            raise ConfigError(f"unknown method kind {self.kind!r}; choose one of {METHODS}")

    def build_prior(self, model: nn.Module, **values: Any):
        spec = replace(self, **values)
        return make_prior(model, spec.kind, posterior=spec.posterior, scale=spec.scale, eps=spec.eps, rank=spec.rank,
                          variance=spec.variance, head=spec.head, head_variance=spec.head_variance,
                          unregularized=spec.unregularized)


@dataclass
class TuneResult:
    """Outcome of :func:`tune`.

    Attributes:
        best: the chosen value of every grid axis.
        table: one row per trial: the axis values, ``val_nll``, ``val_accuracy``, ``val_ece``, ``val_brier``
            (``inf``/``nan`` and an ``error`` message if training diverged).
        edge_warnings: one message per numeric axis whose best value lies at an edge of its grid.
        final: the refit on all n examples (``None`` with ``refit=False``).
    """

    best: dict[str, Any]
    table: list[dict[str, Any]]
    edge_warnings: list[str] = field(default_factory=list)
    final: FitResult | None = None
    metric: str = "nll"
    grid: dict[str, list[Any]] = field(default_factory=dict)
    split: dict[str, int] = field(default_factory=dict)

    @property
    def at_edge(self) -> bool:
        return bool(self.edge_warnings)

    def to_dict(self) -> dict[str, Any]:
        final = None
        if self.final is not None:
            final = {"history": self.final.history, "config": asdict(self.final.config)}
        return {"best": self.best, "metric": self.metric, "grid": self.grid, "split": self.split,
                "table": self.table, "edge_warnings": self.edge_warnings, "final": final}

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text; with ``path``, also written there atomically."""
        import json

        from ptyl.metrics.results import save_json, to_jsonable

        if path is not None:
            save_json(path, self.to_dict())
        return json.dumps(to_jsonable(self.to_dict()), indent=2)

    def plot(self, path: str | Path, x: str | None = None) -> Path:
        """PNG of validation NLL against ``x`` (default ``scale``, else ``variance``, else the first numeric axis) on
        a log axis, one line per combination of the other axes; the selected point is starred."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ptyl.io.atomic import atomic_write

        x = x or next((k for k in ("scale", "variance") if k in self.grid), None) or next(
            (k for k, v in self.grid.items() if all(_is_number(a) for a in v)), None)
        if x is None or x not in self.grid:
            raise ConfigError(f"no numeric grid axis to plot against (axes: {list(self.grid)})")
        others = [k for k in self.grid if k != x]
        fig, ax = plt.subplots(figsize=(6, 4))
        for combo in itertools.product(*(self.grid[k] for k in others)):
            rows = [r for r in self.table if all(r[k] == v for k, v in zip(others, combo))]
            rows = sorted((r for r in rows if math.isfinite(r["val_nll"])), key=lambda r: r[x])
            label = ", ".join(f"{k}={v:g}" if _is_number(v) else f"{k}={v}" for k, v in zip(others, combo))
            ax.plot([r[x] for r in rows], [r["val_nll"] for r in rows], marker="o", label=label or None)
        best_row = next(r for r in self.table if all(r[k] == v for k, v in self.best.items()))
        ax.plot([best_row[x]], [best_row["val_nll"]], marker="*", markersize=16, color="k", linestyle="none",
                label="selected")
        ax.set_xscale("log")
        ax.set_xlabel("lambda (prior scale)" if x == "scale" else x)
        ax.set_ylabel("validation NLL")
        ax.legend(fontsize=7)
        fig.tight_layout()
        try:
            return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
        finally:
            plt.close(fig)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def default_grid(
    method: str,
    budget: int = 15,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    log10_range: tuple[float, float] | None = None,
) -> dict[str, list[float]]:
    """A grid of ``(budget // len(lrs)) * len(lrs)`` trials for ``method``: its main axis (``scale`` for learned
    priors, ``variance`` for ``l2sp``/``standard``) log-spaced over ``log10_range`` (default: the module table) times
    the learning rates. Equal budgets give every method the same number of trials. ``none`` (no prior) tunes ``lr``
    only: ``budget`` log-spaced learning rates between ``min(lrs)`` and ``max(lrs)``."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise InvalidValueError(f"budget must be a positive integer, got {budget!r}")
    lrs = [float(v) for v in lrs]
    if not lrs or any(v <= 0 for v in lrs):
        raise InvalidValueError(f"lrs must be non-empty and positive, got {lrs!r}")
    if method == "none":
        lo, hi = math.log10(min(lrs)), math.log10(max(lrs))
        return {"lr": _logspace(lo, hi, budget)}
    if method not in DEFAULT_RANGES:
        raise ConfigError(f"no default grid for method {method!r}; choose one of {(*DEFAULT_RANGES, 'none')}")
    axis, lo, hi = DEFAULT_RANGES[method]
    if log10_range is not None:
        lo, hi = map(float, log10_range)
    points = budget // len(lrs)
    if points < 2:
        raise InvalidValueError(f"budget {budget} leaves fewer than 2 values of {axis!r} per learning rate "
                                f"({len(lrs)} learning rates): raise the budget or pass fewer lrs")
    return {axis: _logspace(lo, hi, points), "lr": lrs}


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [10.0**lo]
    return [float(f"{10.0 ** (lo + (hi - lo) * i / (n - 1)):.6g}") for i in range(n)]


def validation_split(
    train_set: Dataset, val_fraction: float = 0.2, seed: int = 0, split: str = "balanced"
) -> tuple[Dataset, Dataset]:
    """Disjoint ``(train, val)`` split.

    ``split="balanced"`` (default): class-balanced split of an :class:`ImageDataset` or an ``(x, y)``
    :class:`TensorDataset` (``round(val_fraction * n_c)`` of every class in val).
    ``split="random"``: a seeded uniform split with ``round(val_fraction * n)`` examples in val (at least one on each
    side), for data without one class label per example, e.g. segmentation canvases whose target is a mask.
    """
    from ptyl.data import balanced_split, stratified_split_indices

    if split == "random":
        return _random_split(train_set, val_fraction, seed)
    if split != "balanced":
        raise ConfigError(f"unknown split {split!r}; choose one of {SPLITS}")
    if hasattr(train_set, "subset") and hasattr(train_set, "targets"):
        return balanced_split(train_set, val_fraction, seed)
    if isinstance(train_set, TensorDataset) and len(train_set.tensors) >= 2:
        targets = train_set.tensors[1]
        if targets.is_floating_point() or targets.dim() != 1:
            raise DataError("validation_split needs integer class labels of shape [n] to balance classes "
                            "(pass split='random' for targets without one class label per example)")
        train_idx, val_idx = stratified_split_indices(targets, val_fraction, seed)
        if val_idx.numel() == 0:
            raise DataError("no class has 2 or more examples, so the validation set would be empty")
        return Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())
    raise DataError(f"cannot split a {type(train_set).__name__} by class: pass an ImageDataset or an (x, y) "
                    "TensorDataset, or split='random'")


def _random_split(train_set: Dataset, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    if not 0.0 < float(val_fraction) < 1.0:
        raise InvalidValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(train_set)
    if n < 2:
        raise DataError(f"a random split needs at least 2 examples, got {n}")
    n_val = min(max(1, round(val_fraction * n)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    train_idx, val_idx = perm[n_val:].sort().values, perm[:n_val].sort().values
    return Subset(train_set, train_idx.tolist()), Subset(train_set, val_idx.tolist())


def _has_class_labels(dataset: Dataset) -> bool:
    """Whether :func:`validation_split` can balance classes: integer labels of shape ``[n]``."""
    if hasattr(dataset, "subset") and hasattr(dataset, "targets"):
        targets = torch.as_tensor(dataset.targets)
    elif isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        targets = dataset.tensors[1]
    else:
        return False
    return targets.dim() == 1 and not targets.is_floating_point()


def _targets(dataset: Dataset) -> torch.Tensor:
    """Targets of every example stacked: labels ``[n]``, or masks ``[n, H, W]`` for segmentation."""
    if hasattr(dataset, "targets"):
        return torch.as_tensor(dataset.targets).long()
    return torch.stack([torch.as_tensor(dataset[i][1]) for i in range(len(dataset))]).long()


def _check_grid(grid: Mapping[str, Sequence[Any]], spec: MethodSpec) -> dict[str, list[Any]]:
    config_keys = {f.name for f in fields(TrainConfig)} - set(_FORBIDDEN_CONFIG_KEYS)
    out = {}
    for key, values in grid.items():
        if key == "weight_decay":
            raise ConfigError("grid axis 'weight_decay' is not used: tune the prior 'variance' (weight decay = "
                              "1/(n variance), see ptyl.priors.variance_from_weight_decay)")
        if key not in PRIOR_KEYS and key not in config_keys:
            raise ConfigError(f"unknown grid axis {key!r}; prior axes {PRIOR_KEYS}, or a TrainConfig field "
                              f"other than {_FORBIDDEN_CONFIG_KEYS}")
        values = list(values) if not isinstance(values, (str, bytes)) else [values]
        if not values:
            raise ConfigError(f"grid axis {key!r} has no values")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"grid axis {key!r} repeats a value: {values}")
        out[key] = [float(v) if isinstance(v, torch.Tensor) else v for v in values]
    if spec.kind in ("l2sp", "standard") and spec.variance is None and "variance" not in out:
        raise ConfigError(f"method {spec.kind!r} needs a prior variance: set MethodSpec.variance or a 'variance' axis")
    if spec.kind in ("lowrank", "diag") and spec.posterior is None:
        raise ConfigError(f"method {spec.kind!r} needs MethodSpec.posterior (the learned source posterior)")
    return out


def _edge_warnings(grid: dict[str, list[Any]], best: dict[str, Any]) -> list[str]:
    messages = []
    for key, values in grid.items():
        if len(values) < 2 or not all(_is_number(v) for v in values):
            continue
        lo, hi = min(values), max(values)
        if best[key] in (lo, hi):
            side = "smallest" if best[key] == lo else "largest"
            messages.append(f"best {key}={best[key]:g} is the {side} value of its grid [{lo:g}, {hi:g}]: "
                            "the optimum may lie outside it, extend the grid")
    return messages


def _as_spec(method_spec: MethodSpec | str | Mapping[str, Any]) -> MethodSpec:
    if isinstance(method_spec, MethodSpec):
        return method_spec
    if isinstance(method_spec, str):
        return MethodSpec(kind=method_spec)
    if isinstance(method_spec, Mapping):
        return MethodSpec(**method_spec)
    raise ConfigError(f"method_spec must be a MethodSpec, a kind name or a dict, got {type(method_spec).__name__}")


def tune(
    model_fn: Callable[[], nn.Module],
    train_set: Dataset,
    method_spec: MethodSpec | str | Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    config: TrainConfig | None = None,
    metric: str = "nll",
    progress: bool = True,
    refit: bool = True,
    objective: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    split: str = "auto",
) -> TuneResult:
    """Grid search on a class-balanced split (see the module docstring).

    Args:
        model_fn: returns a fresh pretrained / initialised model on every call (called after
            ``torch.manual_seed(seed)``, so random heads are the same in every trial).
        method_spec: a :class:`MethodSpec`, a kind name (``"standard"``...), or a dict of MethodSpec fields.
        grid: axis name -> values (see the module docstring).
        seed: picks the split and seeds every fit (``config.seed`` is replaced): same seed, same table.
        metric: selection criterion on the validation set: ``nll`` (default), ``ece``, ``brier`` or ``accuracy``.
        split: ``"balanced"`` (class-balanced, needs integer labels ``[n]``), ``"random"`` (seeded uniform split, for
            targets that are not one class per example, e.g. segmentation masks; the metrics are then per pixel), or
            ``"auto"`` (default): balanced when the data set has such labels, random otherwise.
    """
    from tqdm.auto import tqdm

    from ptyl.metrics import evaluate_probs

    spec = _as_spec(method_spec)
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose one of {tuple(METRICS)}")
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {SPLITS}")
    axes = _check_grid(grid, spec)
    base = replace(config or TrainConfig(), seed=int(seed), progress=False)
    if split == "auto":
        split = "balanced" if _has_class_labels(train_set) else "random"
    fit_part, val_part = validation_split(train_set, val_fraction, seed, split)
    val_targets = _targets(val_part)
    combos = list(itertools.product(*axes.values()))
    table = []
    for combo in tqdm(combos, desc=f"tune[{spec.kind}]", disable=not progress):
        values = dict(zip(axes, combo))
        row = dict(values)
        try:
            result = _fit_once(model_fn, fit_part, spec, base, values, objective)
            probs = result.predict(val_part)
            if not torch.isfinite(probs).all():
                raise FloatingPointError("non-finite validation predictions")
            row.update({f"val_{k}": v for k, v in evaluate_probs(probs, val_targets).items()})
        except FloatingPointError as err:  # divergence: the trial loses, the search goes on
            row.update({"val_nll": math.inf, "val_accuracy": math.nan, "val_ece": math.nan, "val_brier": math.inf,
                        "error": str(err)})
        table.append(row)
    sign = 1.0 if METRICS[metric] == "min" else -1.0
    finite = [r for r in table if math.isfinite(r[f"val_{metric}"])]
    if not finite:
        raise ConfigError(f"every one of the {len(table)} trials diverged; lower the learning rates or widen the prior "
                          "(a stiff prior, lr / (n variance) > 2, makes SGD diverge) "
                          f"(first error: {table[0].get('error')})")
    best_row = min(finite, key=lambda r: sign * r[f"val_{metric}"])  # first of ties, in grid order
    best = {k: best_row[k] for k in axes}
    edges = _edge_warnings(axes, best)
    for message in edges:
        warnings.warn(message, stacklevel=2)
    final = None
    if refit:
        final = _fit_once(model_fn, train_set, spec, replace(base, progress=progress), best, objective)
    split = {"train": len(fit_part), "val": len(val_part), "total": len(train_set)}
    return TuneResult(best, table, edges, final, metric, axes, split)


def _fit_once(model_fn, data: Dataset, spec: MethodSpec, base: TrainConfig, values: dict[str, Any],
              objective) -> FitResult:
    prior_values = {k: v for k, v in values.items() if k in PRIOR_KEYS}
    config = replace(base, **{k: v for k, v in values.items() if k not in PRIOR_KEYS})
    torch.manual_seed(config.seed)  # same initial head in every trial: differences come from the grid values only
    model = model_fn()
    prior = spec.build_prior(model, **prior_values)  # before training: L2-SP centres on the pretrained weights
    return fit(model, data, prior, config, objective=objective, num_data=len(data), head=spec.head)
