"""One trial of a tuning search -- a fresh model and its prior, fitted and scored on validation data -- under one
of three validation schemes (:func:`make_validation`):

``pool``   a validation pool of target examples never used for training: each trial is trained once on all n
           training examples and scored on the pool (and on the test set, if given, which makes the test-selected
           upper bound free); no refit is needed.
``cv``     repeated stratified k-fold cross-validation on the n examples (targets too small for a pool): the
           out-of-fold predictions of each repetition are scored together, the metrics averaged over repetitions;
           the chosen values are refit on all n.
``split``  one class-balanced ``val_fraction`` split of the n examples (the quick default of ``ptyl finetune
           --tune``); refit on all n.

A predictive built after training with knobs of its own (the Laplace predictive's prior precision, given several
values) chooses them on the trial's validation data before it is scored (:func:`select_posthoc`; ``posthoc`` in the
row, applied to the refit).

Every trial records two strength diagnostics of its prior: the N-aware curvature share
(:func:`ptyl.autotune.prior_share`: the prior's share of the MAP objective's curvature per layer, at the trained
model on its training data; ``prior_share``, ``prior_off`` = below 1% in every layer) and the std ratio
(:func:`ptyl.priors.prior_strength`: median prior std / median |theta0|, descriptive only). The **off limit** -- a
strength axis value of ``inf`` -- is plain fine-tuning from the same start: no backbone prior, the same head prior and
training settings (``off_limit``). Each trial also records how its training ended: ``final_loss``, the data term (NLL)
of the final model on its own training data (evaluation mode: the training-mode epoch means are inflated by
BatchNorm on small last batches), ``epoch_loss`` (the last epoch's training-mode mean), ``steps``, ``stop_reason``, and
``fit_status``:

``fit``            ``final_loss <= converged_loss`` (the training data are fitted);
``prior-limited``  above it, with an active prior: the prior holds the fit back (that is what it is for);
``undertrained``   above it with the prior off: only the budget can have stopped it -- tables flag it;
``sampled``        a sampling strategy (SGLD, cSGLD, SWAG): the model average of a posterior has no point to converge
                   to, so its training NLL is reported without a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ptyl.autotune.share import prior_share
from ptyl.errors import ConfigError, DivergenceError
from ptyl.metrics import evaluate_probs
from ptyl.priors.registry import PriorKind
from ptyl.priors.strength import prior_strength
from ptyl.training.config import TrainConfig
from ptyl.training.fitting import fit
from ptyl.training.result import FitResult
from ptyl.tuning.splits import k_folds, stacked_targets, validation_split
from ptyl.validation import check_int

__all__ = ["BACKBONE_KEYS", "CONVERGED_LOSS", "OFF", "PRIOR_KEYS", "TrialRunner", "Validation", "fit_status",
           "is_off_limit", "make_validation", "select_posthoc"]

PRIOR_KEYS = ("scale", "eps", "rank", "variance", "head_variance")
BACKBONE_KEYS = ("scale", "eps", "rank", "variance")  # what the off limit does not depend on
OFF = math.inf  # the strength-axis value of the off limit: no backbone prior (plain fine-tuning)
CONVERGED_LOSS = 0.05
_FAILED = {"val_nll": math.inf, "val_accuracy": math.nan, "val_ece": math.nan, "val_brier": math.inf}


@dataclass
class Validation:
    """Where trials are trained and scored.

    Attributes:
        mode: ``"pool"``, ``"cv"`` or ``"split"`` (see the module docstring).
        parts: ``[(fit data, validation data)]``: one for pool / split, ``folds * repeats`` for cv.
        repeats: cv repetitions (the parts are ``repeats`` blocks of ``folds``).
        test: scored by every trial too (pool only), or ``None``.
        sizes: examples in each role (for the record).
    """

    mode: str
    parts: list[tuple[Dataset, Dataset]]
    repeats: int = 1
    test: Dataset | None = None
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def refit(self) -> bool:
        """Whether the selected values must be refit on all n (the trials did not train on all of them)."""
        return self.mode != "pool"


def make_validation(train_set: Dataset, *, val_set: Dataset | None = None, folds: int | None = None,
                    repeats: int = 1, val_fraction: float = 0.2, seed: int = 0, split: str = "auto",
                    test_set: Dataset | None = None) -> Validation:
    """The validation scheme of a search: a pool if ``val_set`` is given, else k-fold CV if ``folds`` is, else a
    split.

    Args:
        train_set: the n training examples.
        val_set: a validation pool disjoint from ``train_set``.
        folds, repeats: k and the number of repetitions of cross-validation (repetition r uses seed ``seed + r``).
        val_fraction, split: the single split's share and kind (:func:`ptyl.tuning.validation_split`).
        seed: picks folds and splits.
        test_set: also score every trial here (pool only).

    Returns:
        A :class:`Validation`.

    Raises:
        ConfigError: ``val_set`` together with ``folds``, or ``test_set`` without a pool.
    """
    if val_set is not None and folds is not None:
        raise ConfigError("pass either a validation pool (val_set) or cross-validation folds, not both")
    if test_set is not None and val_set is None:
        raise ConfigError("test_set scoring needs a validation pool (val_set): with cross-validation or a split the "
                          "trials are not the final models")
    if val_set is not None:
        return Validation("pool", [(train_set, val_set)], test=test_set,
                          sizes={"train": len(train_set), "val": len(val_set), "total": len(train_set)})
    if folds is not None:
        repeats = check_int(repeats, "repeats", minimum=1)
        parts = [part for r in range(repeats) for part in k_folds(train_set, folds, seed + r)]
        return Validation("cv", parts, repeats=repeats,
                          sizes={"folds": int(folds), "repeats": repeats, "total": len(train_set)})
    fit_part, val_part = validation_split(train_set, val_fraction, seed, split)
    return Validation("split", [(fit_part, val_part)],
                      sizes={"train": len(fit_part), "val": len(val_part), "total": len(train_set)})


def is_off_limit(values: Mapping[str, Any]) -> bool:
    """Whether a trial's values put the strength axis at the off limit (``scale`` or ``variance`` = ``inf``)."""
    return any(values.get(k) == OFF for k in ("scale", "variance"))


def fit_status(final_loss: float, prior_off: bool, converged_loss: float = CONVERGED_LOSS,
               sampled: bool = False) -> str:
    """``"fit"``, ``"prior-limited"``, ``"undertrained"`` or ``"sampled"`` (see the module docstring)."""
    if sampled:
        return "sampled"
    if final_loss <= converged_loss:
        return "fit"
    return "undertrained" if prior_off else "prior-limited"


def _default_evaluate(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    return evaluate_probs(probs, targets)


class TrialRunner:
    """Runs trials: ``runner(values) -> (row, FitResult | None)``.

    Args:
        model_fn: a fresh (pretrained) model per call; called after ``torch.manual_seed(config.seed)``.
        spec: the :class:`~ptyl.tuning.PriorSpec`.
        config: the base training settings (trial values override them).
        validation: the :class:`Validation`.
        objective, collate_fn: training objective and batching.
        evaluate: ``evaluate(probs, targets) -> metrics`` (default :func:`ptyl.metrics.evaluate_probs`).
        converged_loss: the training NLL below which a fit counts as converged (default ``config.stop_loss``, else
            :data:`CONVERGED_LOSS`).
        likelihood: the data term's likelihood for the curvature share (default: categorical when ``objective`` is
            the default cross-entropy; ``None`` with a custom objective: the share is not computed).
    """

    def __init__(self, model_fn: Callable[[], nn.Module], spec, config: TrainConfig, validation: Validation, *,
                 objective=None, collate_fn=None, evaluate=None, converged_loss: float | None = None,
                 likelihood: Any = None) -> None:
        self.model_fn, self.spec, self.config, self.validation = model_fn, spec, config, validation
        self.objective, self.collate_fn = objective, collate_fn
        self.likelihood = likelihood if likelihood is not None or objective is not None else "categorical"
        self.evaluate = evaluate or _default_evaluate
        self.converged_loss = converged_loss if converged_loss is not None else (
            config.stop_loss if config.stop_loss is not None else CONVERGED_LOSS)
        self._targets: dict[int, torch.Tensor] = {}

    def fit_once(self, data: Dataset, values: dict[str, Any], progress: bool = False) -> tuple[FitResult, dict]:
        """Fit a fresh model on ``data`` with the trial's values.

        Returns:
            ``(result, diagnostics of the prior)``: the std ratio against the start and the curvature share at the
            trained model (``prior_share``, ``prior_share_total``, ``prior_share_blocks``, ``prior_off``; ``None``
            without a likelihood).
        """
        prior_values = {k: v for k, v in values.items() if k in PRIOR_KEYS}
        config = replace(self.config, progress=progress, **{k: v for k, v in values.items() if k not in PRIOR_KEYS})
        spec = self.spec
        if is_off_limit(values):  # plain fine-tuning: no backbone prior, the same head prior
            spec = replace(spec, kind=PriorKind.NONE)
            prior_values = {k: v for k, v in prior_values.items() if k not in BACKBONE_KEYS}
        torch.manual_seed(config.seed)  # same initial head in every trial: differences come from the values only
        model = self.model_fn()
        prior = spec.build_prior(model, **prior_values)  # before training: L2-SP centres on the start
        diagnostics: dict[str, Any] = {"std_ratio": prior_strength(prior, model).std_ratio}
        result = fit(model, data, prior, config, objective=self.objective, num_data=len(data), head=self.spec.head,
                     collate_fn=self.collate_fn)
        diagnostics.update(self.share(prior, result.model, data))
        return result, diagnostics

    def share(self, prior, model: nn.Module, data: Dataset) -> dict[str, Any]:
        """The curvature-share fields of a row (:func:`ptyl.autotune.prior_share` at ``model`` on ``data``)."""
        if self.likelihood is None:
            return {"prior_share": None, "prior_share_total": None, "prior_share_blocks": None, "prior_off": None}
        share = prior_share(prior, model, data, likelihood=self.likelihood, collate_fn=self.collate_fn)
        return {"prior_share": share.share, "prior_share_total": share.total, "prior_share_blocks": share.blocks,
                "prior_off": share.off}

    def _score(self, result: FitResult, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        probs = result.predict(data)
        if not torch.isfinite(probs).all():
            raise DivergenceError("non-finite predictions")
        key = id(data)
        if key not in self._targets:
            self._targets[key] = stacked_targets(data)
        return probs, self._targets[key]

    def __call__(self, values: dict[str, Any]) -> tuple[dict[str, Any], FitResult | None]:
        row: dict[str, Any] = dict(values)
        v = self.validation
        try:
            fits, losses, per_repeat, kept = [], [], [[] for _ in range(v.repeats)], None
            folds = len(v.parts) // v.repeats
            choices: list[dict[str, Any]] = []
            for i, (fit_data, val_data) in enumerate(v.parts):
                result, strength = self.fit_once(fit_data, values)
                choices.append(select_posthoc(result, val_data))
                fits.append(result)
                losses.append(float(self.evaluate(*self._score(result, fit_data))["nll"]))
                per_repeat[i // folds].append(self._score(result, val_data))
                kept = result
            scores = [self.evaluate(torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts]))
                      for parts in per_repeat]
            row.update({f"val_{k}": sum(float(s[k]) for s in scores) / len(scores) for k in scores[0]})
            if v.test is not None:
                row.update({f"test_{k}": float(x) for k, x in self.evaluate(*self._score(kept, v.test)).items()})
            final_loss = sum(losses) / len(losses)
            row.update({**strength, "off_limit": is_off_limit(values), "final_loss": final_loss,
                        "epoch_loss": sum(f.final_loss for f in fits) / len(fits),
                        "fit_status": fit_status(final_loss, bool(strength["prior_off"]), self.converged_loss,
                                                 fits[-1].samples is not None),
                        "steps": sum(f.steps for f in fits) / len(fits), "stop_reason": fits[-1].stop_reason,
                        "fits": len(fits)})
            if any(choices):
                row["posthoc"] = _median_choice(choices)
        except DivergenceError as err:  # numerical failure: the trial loses, the search goes on
            row.update({**_FAILED, "error": str(err)})
            kept = None
        return row, (kept if v.mode == "pool" else None)


def select_posthoc(result: FitResult, val_data: Dataset) -> dict[str, Any]:
    """Let a predictive built after training choose its own knobs on the trial's validation data (the Laplace
    predictive's prior precision among the values of ``laplace_prior_precision``:
    :meth:`ptyl.inference.LaplacePredictive.select`) -- the choice a grid axis over them would make, at one fit.

    Returns:
        The choice as :class:`TrainConfig` overrides (``{}``: nothing to choose).
    """
    select = getattr(result.predictive, "select", None)
    return dict(select(val_data)) if callable(select) else {}


def _median_choice(choices: list[dict[str, Any]]) -> dict[str, Any]:
    """One choice per fold -> per key the lower median (a value that was tried; the refit on all n uses it)."""
    out = {}
    for key in dict.fromkeys(k for c in choices for k in c):
        values = sorted(c[key] for c in choices if key in c)
        out[key] = values[(len(values) - 1) // 2]
    return out
