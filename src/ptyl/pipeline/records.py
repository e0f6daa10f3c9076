"""The record of one grid search on a transfer training set: the validation options of a task (its pool, else k-fold
CV and a refit) and the test metrics, fit statistics, selection and strength diagnostics of the chosen trial."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch.utils.data import Dataset

from ptyl.training.config import TrainConfig
from ptyl.tuning.trials import CONVERGED_LOSS, fit_status

if TYPE_CHECKING:
    from ptyl.pipeline.tasks import Task

__all__ = ["grid_record", "validation_options"]


def validation_options(task: Task, pool: Dataset | None, test: Dataset, folds: int | None,
                        repeats: int) -> dict[str, Any]:
    """The validation keywords of :func:`ptyl.tuning.tune` for a task: its pool (every trial scored on the test set
    too, no refit), else k-fold CV and a refit."""
    evaluate = task.evaluate
    return dict(val_set=pool, folds=None if pool is not None else folds, repeats=repeats,
                test_set=test if pool is not None else None, progress=False, objective=task.objective,
                collate_fn=task.collate_fn, likelihood=task.likelihood,
                evaluate=lambda probs, targets: evaluate(probs, targets), refit=pool is None)


def grid_record(task: Task, train: Dataset, tuned, config: TrainConfig, model_fn, *, seed: int) -> dict[str, Any]:
    """Test metrics, fit statistics, the selection and its diagnostics of one grid search."""
    row = tuned.selected
    record: dict[str, Any] = {}
    if tuned.validation == "pool":
        metrics = {k: row[f"test_{k}"] for k in task.metrics}
        fit_stats = {k: row.get(k) for k in ("final_loss", "epoch_loss", "fit_status", "steps", "stop_reason")}
        upper = tuned.test_selected
        record["test_selected"] = {**{k: upper[f"test_{k}"] for k in task.metrics},
                                   **{k: upper[k] for k in tuned.grid}}
    else:
        final = tuned.final
        test = task.test_set(seed)
        metrics = task.evaluate(final.predict(test), task.targets(test))
        final_loss = float(task.evaluate(final.predict(train), task.targets(train))["nll"])
        fit_stats = {"final_loss": final_loss, "epoch_loss": final.final_loss, "steps": final.steps,
                     "stop_reason": final.stop_reason,
                     "fit_status": fit_status(final_loss, bool(row.get("prior_off")),
                                              config.stop_loss or CONVERGED_LOSS,
                                              final.samples is not None)}
    record.update({k: float(v) for k, v in metrics.items()})
    record.update(fit_stats)
    record.update({
        "selected": tuned.best, "validation_mode": tuned.validation, "split": tuned.split,
        "val_" + tuned.metric: row[f"val_{tuned.metric}"], "std_ratio": row.get("std_ratio"),
        "prior_share": row.get("prior_share"), "prior_share_blocks": row.get("prior_share_blocks"),
        "prior_off": row.get("prior_off"), "off_limit": bool(row.get("off_limit")), "posthoc": row.get("posthoc"),
        "edge_status": tuned.edge_status, "edge_warnings": tuned.edge_warnings,
        "path": tuned.path, "trials": len(tuned.table), "validation": tuned.table,
    })
    return record
