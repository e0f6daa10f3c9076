"""Transfer experiments, any task: start from the source stage's model and posterior, and compare methods on
few-shot training sets of a target task, every method tuned by the same protocol and budget.

For every seed and every training-set size n the task draws a training set (``task.train_set(n, seed)``: n examples
per class, or n canvases). Every method (:func:`ptyl.pipeline.parse_method`) starts from the pretrained model with a
fresh head (or from a random initialisation: ``scratch``), has its hyper-parameters chosen by
:func:`ptyl.tuning.tune` (validation NLL on an 80/20 split, grid :func:`ptyl.tuning.default_grid`), is refit on all
n and scored on the task's test set (Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 4; Harvey et al., TMLR 2024:
baselines tuned as hard as the method).

>>> results = run_transfer("runs/prior.safetensors", "mnist", n_per_class=[10, 100])   # doctest: +SKIP
>>> print(summarize(results))                                                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ptyl.errors import ConfigError, DivergenceError
from ptyl.io.prior_file import load_posterior, read_metadata
from ptyl.metrics.results import save_json
from ptyl.pipeline.artifacts import load_pretrained
from ptyl.pipeline.methods import DEFAULT_METHODS, Method, parse_method, train_config
from ptyl.pipeline.tasks import ClassificationTask, Task, pretrained_model_fn
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.tuning.grid import PriorSpec, check_grid, default_grid, tune

__all__ = ["run_transfer"]


def _grid(method: Method, budget: int, lrs: Sequence[float], grids: dict | None, ranges: dict | None):
    for key in (method.name, method.prior):
        if grids and key in grids:
            return dict(grids[key])
    log10_range = next((ranges[k] for k in (method.name, method.prior) if ranges and k in ranges), None)
    return default_grid(method.prior, budget, lrs=lrs, log10_range=log10_range)


def run_transfer(
    prior_path: str | Path | None,
    target: str = "mnist",
    n_per_class: Sequence[int] = (10, 100),
    seeds: Sequence[int] = (0,),
    methods: Sequence[str | Method] = DEFAULT_METHODS,
    *,
    task: Task | None = None,
    pretrained: nn.Module | None = None,
    posterior: SourcePosterior | None = None,
    budget: int = 4,
    lrs: Sequence[float] = (0.01,),
    grids: dict[str, dict[str, Sequence[Any]]] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    steps: int = 100,
    epochs: int | None = None,
    batch_size: int = 32,
    num_samples: int = 10,
    temperature: float = 1.0,
    eps: float = 0.0,
    max_test: int | None = None,
    train_overrides: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Compare ``methods`` on few-shot training sets of a target task (see the module docstring).

    Args:
        prior_path: the source stage's prior file (its pretrained weights lie next to it); ``None`` with
            ``pretrained`` (and ``posterior`` for learned priors) given directly.
        target: the data set of the default task, :class:`ClassificationTask` ``(target)``.
        n_per_class: training-set sizes (per class for classification, canvases for segmentation).
        seeds: each seed draws a different training set and validation split.
        methods: ``<prior>[-<inference>]`` names or :class:`Method` objects.
        task: the :class:`Task` (segmentation, text, ...); default classification of ``target``.
        pretrained, posterior: the source model and posterior, instead of ``prior_path``.
        budget, lrs: every method gets ``default_grid(prior, budget, lrs=lrs)`` (``budget // len(lrs)`` values of
            its prior-strength axis times ``lrs``) unless ``grids`` names it.
        grids: explicit grids keyed by method name or prior kind, e.g. ``{"lowrank": {"scale": [1e2, 1e4], "lr":
            [0.01]}}``.
        ranges: log10 range of the strength axis per method name or prior kind, e.g. ``{"lowrank": (3, 6)}``.
        steps: optimiser steps per fit (epochs follow from n) unless ``epochs`` fixes the epochs for every n.
        batch_size, num_samples, temperature: training settings (``num_samples`` / ``temperature``: samplers).
        eps: isotropic jitter of the learned priors, N(mu, lam Sigma + eps I) (caps their precision).
        max_test: evaluate on the first ``max_test`` test examples of a class-balanced order (default task only).
        train_overrides: other :class:`~ptyl.training.TrainConfig` fields for every fit (e.g. ``{"optimizer":
            "adam"}``).
        out_dir: if given, ``results.json`` is rewritten there after every finished run.
        progress, log: a progress bar; a function receiving one line per finished run.

    Returns:
        One record per (seed, n, method): the metrics of the task, ``selected`` (chosen hyper-parameters),
        ``validation`` (the tuning table), ``edge_warnings``, ``warnings``, ``wall_time_s``; ``error`` when every
        trial diverged (the metrics are then NaN).

    Raises:
        ConfigError: a bad method, grid or setting -- before anything is trained.
    """
    from tqdm.auto import tqdm

    plans = [parse_method(m) for m in methods]
    if not plans:
        raise ConfigError("no methods to run")
    meta = read_metadata(prior_path) if prior_path is not None else {}
    if pretrained is None:
        if prior_path is None:
            raise ConfigError("run_transfer needs a prior file or a pretrained model")
        pretrained, _ = load_pretrained(prior_path)
    if posterior is None and prior_path is not None and any(p.needs_posterior for p in plans):
        posterior = load_posterior(prior_path)
    task = task or ClassificationTask(target, image_size=meta.get("image_size"), max_test=max_test)
    state = copy.deepcopy(pretrained.state_dict()) if meta else None
    jobs = []
    for seed in seeds:
        for n in n_per_class:
            train = task.train_set(int(n), int(seed))
            for plan in plans:
                config = train_config(plan.inference, len(train), steps=steps, batch_size=batch_size,
                                      num_samples=num_samples, temperature=temperature, **(train_overrides or {}))
                if epochs is not None:
                    config.epochs = int(epochs)
                spec = PriorSpec(kind=plan.prior, posterior=posterior if plan.needs_posterior else None, eps=eps,
                                 head=task.head)
                grid = _grid(plan, budget, lrs, grids, ranges)
                check_grid(grid, spec, config)  # every user error surfaces now, before the first fit
                jobs.append((int(seed), int(n), train, plan, config, spec, grid))

    results: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="transfer", disable=not progress)
    for seed, n, train, plan, config, spec, grid in bar:
        bar.set_postfix_str(f"n={n} seed={seed} {plan.name}")
        start = time.perf_counter()
        test = task.test_set(seed)
        model_fn = pretrained_model_fn(meta, state if plan.pretrained else None, task,
                                       module=pretrained if plan.pretrained and not meta else None)
        record = {
            "method": plan.name, "prior": str(plan.prior), "inference": str(plan.inference),
            "pretrained": plan.pretrained, task.size_key: n, "seed": seed, "num_train": len(train),
            "num_test": len(test), "target": getattr(task, "data", target), "source": meta.get("source"),
            "prior_file": str(prior_path) if prior_path is not None else None, "epochs": config.epochs,
        }
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tuned = tune(model_fn, train, spec, grid, seed=seed, config=config, progress=False,
                             objective=task.objective, collate_fn=task.collate_fn)
                metrics = task.evaluate(tuned.final.predict(test), task.targets(test))
            except DivergenceError as err:  # every trial (or the refit) diverged: record it and go on
                tuned, metrics = None, {k: math.nan for k in task.metrics}
                record["error"] = str(err)
        record.update({k: float(v) for k, v in metrics.items()})
        record.update({
            "selected": tuned.best if tuned else {}, "edge_warnings": tuned.edge_warnings if tuned else [],
            "warnings": list(dict.fromkeys(str(w.message) for w in caught
                                           if not tuned or str(w.message) not in tuned.edge_warnings)),
            "validation": tuned.table if tuned else [], "split": tuned.split if tuned else {},
            "wall_time_s": time.perf_counter() - start,
        })
        results.append(record)
        if log is not None:
            log(_log_line(record, task, plan, n, seed))
        if out_dir is not None:
            save_json(Path(out_dir) / "results.json", results)
    bar.close()
    return results


def _log_line(record: dict[str, Any], task: Task, plan: Method, n: int, seed: int) -> str:
    chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["selected"].items())
    status = f"FAILED: {record['error']}" if "error" in record else f"[{chosen}]"
    short = {"accuracy": "acc"}
    scores = " ".join(f"{short.get(k, k)}={record[k]:.4f}" for k in task.metrics[:3])
    return f"  n={n:<4d} seed={seed} {plan.name:<14s} {scores}  {status}  {record['wall_time_s']:.1f}s"

