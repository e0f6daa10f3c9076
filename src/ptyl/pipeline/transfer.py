"""Transfer experiments, any task: start from the source stage's model and posterior, and compare methods on
few-shot training sets of a target task, every method tuned by the same protocol and budget.

For every seed and every training-set size n the task draws a training set (``task.train_set(n, seed)``: n examples
per class, or n canvases). Every method (:func:`ptyl.pipeline.parse_method`) starts from the pretrained model with a
fresh head (or from a random initialisation: ``scratch``) and has its hyper-parameters chosen by
:func:`ptyl.tuning.tune` with the same grid size and the same edge-extension rule
(Shwartz-Ziv et al. 2022, arXiv 2205.10279, Sec. 4; Harvey et al., TMLR 2024: baselines tuned as hard as the method).
Validation (:mod:`ptyl.tuning.trials`): the task's validation pool when it has one (every trial trains on the n
examples once and is scored on the pool and on the test set: the record holds the validation-selected result and,
labelled as such, the test-selected upper bound), else repeated k-fold CV (``folds``) or a split, then a refit on n.

Every record carries the chosen fit's final training loss and whether it converged (:func:`train_config`), the
chosen prior's N-aware share of the curvature (``prior_share``, ``prior_off``: :func:`ptyl.autotune.prior_share`), the
search path and the status of every tuned axis. The tuning strategy (``tuning``: a
:class:`~ptyl.tuning.registry.TuningStrategy`) is ``"grid"`` above, or an automatic strategy learning the strength in
one run with the same budget (:func:`automatic_run`); the pool strategies get the task's validation pool.

>>> results = run_transfer("runs/prior.safetensors", "mnist", n_per_class=[10, 100])   # doctest: +SKIP
>>> print(summarize(results))                                                        # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ptyl.errors import ConfigError, DivergenceError
from ptyl.io.prior_file import load_posterior, read_metadata
from ptyl.metrics.results import save_json
from ptyl.pipeline.artifacts import load_pretrained, pretrained_weights_path
from ptyl.pipeline.methods import DEFAULT_METHODS, Method, parse_method, train_config
from ptyl.pipeline.records import grid_record, validation_options
from ptyl.pipeline.tasks import ClassificationTask, Task, pretrained_model_fn
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.training.config import TrainConfig
from ptyl.training.registry import Inference
from ptyl.tuning.automatic import AutomaticSettings
from ptyl.tuning.grid import PriorSpec, check_grid, default_grid, tune
from ptyl.tuning.registry import TuningStrategy
from ptyl.tuning.search import MAX_ROUNDS
from ptyl.tuning.trials import CONVERGED_LOSS, TrialRunner, fit_status

__all__ = ["SELECTED", "automatic_run", "method_grid", "run_transfer", "transfer_run", "transfer_select"]

SELECTED = "selected"  # the method name of a kind selection's record
GRID = TuningStrategy.GRID.value


def method_grid(method: Method, budget: int, lrs: Sequence[float], grids: dict | None = None,
                ranges: dict | None = None) -> dict[str, list[Any]]:
    """The tuning grid of a method: ``grids[name or prior]`` if given, else :func:`ptyl.tuning.default_grid` with
    ``ranges[name or prior]`` as the strength axis' log10 range.

    Args:
        method: the method.
        budget, lrs: trials and learning rates of the default grid.
        grids, ranges: per method name or prior kind.

    Returns:
        ``{axis: values}``.
    """
    for key in (method.name, method.prior):
        if grids and key in grids:
            return dict(grids[key])
    log10_range = next((ranges[k] for k in (method.name, method.prior) if ranges and k in ranges), None)
    return default_grid(method.prior, budget, lrs=lrs, log10_range=log10_range)


def transfer_run(task: Task, train: Dataset, method: Method, spec: PriorSpec, grid: dict[str, list[Any]],
                 config: TrainConfig, model_fn: Callable[[], nn.Module], *, seed: int, folds: int | None = None,
                 repeats: int = 1, tuning: str = GRID, cache: Any = None, max_rounds: int = MAX_ROUNDS,
                 auto: AutomaticSettings | Mapping[str, Any] | None = None,
                 extend: bool | Mapping[str, tuple[float, float]] = True) -> dict[str, Any]:
    """Tune one method on one training set and score it on the task's test set.

    Args:
        task: the target task (its validation pool, if any, is used).
        train: the training set.
        method, spec, grid, config: the method, its prior, its grid and the training settings.
        model_fn: fresh starting models.
        seed: seeds the fits (and picks folds / splits).
        folds, repeats: cross-validation when the task has no pool (``None``: one 80/20 split).
        tuning: the tuning strategy (a :class:`~ptyl.tuning.registry.TuningStrategy` name): ``"grid"``, or an
            automatic strategy (:func:`automatic_run`; ``folds``, ``cache`` and ``max_rounds`` are then unused, and
            of ``grid`` only several ``lr`` values, for a strategy that chooses the learning rate too).
        cache, max_rounds, extend: finished trials, the most edge-extension rounds and the axes extended (``True``:
            the prior's strength axis; else axis -> hard log10 bounds), as in :func:`ptyl.tuning.tune`.
        auto: the automatic strategy's settings (its settings class or a mapping of its fields).

    Returns:
        The metrics and diagnostics of the record (see the module docstring); ``error`` when every trial diverged.

    Raises:
        ConfigError: an unknown tuning strategy.
    """
    if TuningStrategy.parse(tuning).automatic:
        lrs = list(grid.get("lr", ())) if len(grid.get("lr", ())) > 1 else None
        return automatic_run(task, train, spec, config, model_fn, seed=seed, tuning=tuning, auto=auto, lrs=lrs)
    test, pool = task.test_set(seed), task.validation_set()
    record: dict[str, Any] = {"tuning": tuning}
    try:
        tuned = tune(model_fn, train, spec, grid, seed=seed, config=config, max_rounds=max_rounds, cache=cache,
                     extend=extend, **validation_options(task, pool, test, folds, repeats))
    except DivergenceError as err:  # every trial diverged: record it and go on
        return {**record, **{k: math.nan for k in task.metrics}, "error": str(err)}
    return {**record, **grid_record(task, train, tuned, config, model_fn, seed=seed)}


def transfer_select(task: Task, train: Dataset, methods: Sequence[Method], spec: PriorSpec,
                    grids: dict[str, dict[str, list[Any]]], config: TrainConfig, model_fn: Callable[[], nn.Module], *,
                    seed: int, folds: int | None = None, repeats: int = 1, cache: Any = None,
                    max_rounds: int = MAX_ROUNDS) -> list[dict[str, Any]]:
    """Tune several MAP methods (prior kinds) on one training set in one search, choose the kind on the validation
    data (:func:`ptyl.tuning.tune` with ``kinds``: the off limit, plain fine-tuning, is a shared point of every
    kind's search) and score each on the task's test set.

    Args:
        task, train, config, model_fn, seed, folds, repeats, cache, max_rounds: as in :func:`transfer_run`.
        methods: MAP methods from the pretrained start, one per prior kind.
        spec: the fields the kinds share (posterior, head, eps...).
        grids: per kind name, its grid.

    Returns:
        One record per method (its own tuned selection, as :func:`transfer_run` writes it), then the record of the
        selection, ``method = "selected"``, with ``selected_kind`` (``"none"``: the off limit won) and
        ``kind_scores`` (every kind's validation score); one record with ``error`` if every trial diverged.
    """
    kinds = [str(m.prior) for m in methods]
    if any(m.inference is not Inference.MAP or not m.pretrained for m in methods):
        raise ConfigError("kind selection compares MAP methods from the pretrained start, got "
                          f"{[m.name for m in methods]}")
    test, pool = task.test_set(seed), task.validation_set()
    try:
        tuned = tune(model_fn, train, spec, {k: grids[k] for k in kinds}, kinds=kinds, seed=seed, config=config,
                     max_rounds=max_rounds, cache=cache, **validation_options(task, pool, test, folds, repeats))
    except DivergenceError as err:
        return [{"method": SELECTED, "tuning": GRID, **{k: math.nan for k in task.metrics}, "error": str(err)}]
    records = []
    for method, kind in zip(methods, kinds, strict=True):
        part = tuned.kinds[kind]
        if pool is None:  # the trials were not the final models: refit this kind's choice on all n
            part = replace(part, final=TrialRunner(model_fn, part.spec, replace(config, seed=int(seed), progress=False),
                                                   None, objective=task.objective, collate_fn=task.collate_fn,
                                                   likelihood=task.likelihood).fit_once(train, part.best)[0])
        records.append({"method": method.name, "tuning": GRID,
                        **grid_record(task, train, part, config, model_fn, seed=seed)})
    scores = {k: r.selected.get(f"val_{tuned.metric}") for k, r in tuned.kinds.items()}
    records.append({"method": SELECTED, "tuning": GRID, **grid_record(task, train, tuned, config, model_fn, seed=seed),
                    "selected_kind": tuned.kind, "kind_scores": scores, "trials": _distinct_trials(tuned)})
    return records


def _distinct_trials(tuned) -> int:
    """Trials a kind selection ran: every kind's own, and its shared off-limit trials once."""
    own = sum(not r.get("off_limit") and not _at_off(r) for p in tuned.kinds.values() for r in p.table)
    return own + max(sum(_at_off(r) for r in p.table) for p in tuned.kinds.values())


def _at_off(row: dict[str, Any]) -> bool:
    return any(row.get(k) == math.inf for k in ("scale", "variance"))


def automatic_run(task: Task, train: Dataset, spec: PriorSpec, config: TrainConfig, model_fn: Callable[[], nn.Module],
                  *, seed: int, tuning: str, auto: AutomaticSettings | Mapping[str, Any] | None = None,
                  lrs: Sequence[float] | None = None) -> dict[str, Any]:
    """One run of an automatic strategy on one training set (same budget as one grid trial), scored on the task's
    test set. A strategy that learns from a validation pool (``tuner.uses_validation``) gets the task's pool (its
    final score is ``val_nll``); for the others the pool is never used to choose anything and is scored for
    reference (``pool_<metric>``). With DE-ELBO draws of q (``auto.bma_samples``) the record also holds their
    Bayesian model average (``bma``); the headline metrics are the variational mean's.

    Args:
        task, train, spec, config, model_fn, seed: as in :func:`transfer_run`.
        tuning: an automatic :class:`~ptyl.tuning.registry.TuningStrategy` name.
        auto: its settings.
        lrs: learning rates to choose among (a strategy that ``tunes_lr``); ``None``: ``config.lr``.

    Returns:
        The record: test metrics, ``selected`` (make_prior keyword arguments; the strength axis ``inf`` at the off
        limit), the N-aware diagnostic ``prior_share`` / ``prior_off`` and the std ratio, the final training NLL and
        fit status, ``search_cost_s``, ``path`` (hyper-parameters per epoch), ``updates`` (the strategy's own path:
        h per hyper step, the continuation's points).
    """
    record: dict[str, Any] = {"tuning": tuning}
    pool = task.validation_set()
    uses_pool = TuningStrategy.parse(tuning).tuner.uses_validation
    if uses_pool and pool is None:
        raise ConfigError(f"tuning strategy {tuning!r} learns from a validation pool and the task has none")
    try:
        tuned = tune(model_fn, train, spec, {"lr": list(lrs)} if lrs else None, strategy=tuning, auto=auto, seed=seed,
                     config=config, progress=False, objective=task.objective, collate_fn=task.collate_fn,
                     val_set=pool if uses_pool else None)
    except DivergenceError as err:  # the run diverged: record it and go on
        return {**record, **{k: math.nan for k in task.metrics}, "error": str(err)}
    final, row = tuned.final, tuned.selected
    single = replace(final, samples=None)  # the variational mean / the MAP model
    test = task.test_set(seed)
    record.update({k: float(v) for k, v in task.evaluate(single.predict(test), task.targets(test)).items()})
    if final.samples is not None:
        record["bma"] = {k: float(v) for k, v in task.evaluate(final.predict(test), task.targets(test)).items()}
    if pool is not None:
        scores = task.evaluate(single.predict(pool), task.targets(pool))
        record.update({f"pool_{k}": float(v) for k, v in scores.items()})
        if uses_pool:  # the pool chose: its score is the selection's validation score, as the grid's val_nll
            record["val_nll"] = record["pool_nll"]
    final_loss = float(task.evaluate(single.predict(train), task.targets(train))["nll"])
    record.update({
        "final_loss": final_loss, "epoch_loss": final.final_loss, "steps": final.steps,
        "stop_reason": final.stop_reason,
        "fit_status": fit_status(final_loss, bool(row.get("prior_off")), config.stop_loss or CONVERGED_LOSS),
        "selected": tuned.best, "validation_mode": tuned.validation, "split": tuned.split,
        "std_ratio": row.get("std_ratio"), "prior_share": row.get("prior_share"),
        "prior_share_blocks": row.get("prior_share_blocks"), "prior_off": row.get("prior_off"),
        "off_limit": bool(row.get("off_limit")), "objective": tuned.objective, "search_cost_s": tuned.search_cost_s,
        "trials": 1, "lrs": list(lrs) if lrs else None, "path": tuned.table, "updates": tuned.path,
    })
    return record


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
    lrs: Sequence[float] = (0.1,),
    grids: dict[str, dict[str, Sequence[Any]]] | None = None,
    ranges: dict[str, tuple[float, float]] | None = None,
    steps: int = 1000,
    epochs: int | None = None,
    stop_loss: float | None = None,
    stop_plateau: float | None = None,
    batch_size: int = 32,
    num_samples: int = 10,
    temperature: float | None = None,
    eps: float | None = None,
    val_pool: int = 500,
    folds: int | None = 5,
    repeats: int = 1,
    max_test: int | None = None,
    tuning: str = GRID,
    auto: AutomaticSettings | Mapping[str, Any] | None = None,
    max_rounds: int = MAX_ROUNDS,
    select: bool = True,
    train_overrides: dict[str, Any] | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Compare ``methods`` on few-shot training sets of a target task (see the module docstring).

    Args:
        prior_path: the source stage's prior file (its pretrained weights lie next to it); ``None`` with
            ``pretrained`` (and ``posterior`` for learned priors) given directly.
        target: the data set of the default task, :class:`ClassificationTask` ``(target, val_pool=val_pool)``.
        n_per_class: training-set sizes (per class for classification, canvases for segmentation).
        seeds: each seed draws a different training set (and, without a pool, different folds).
        methods: ``<prior>[-<inference>]`` names or :class:`Method` objects.
        task: the :class:`Task` (segmentation, text, ...); default classification of ``target``.
        pretrained, posterior: the source model and posterior, instead of ``prior_path``.
        budget, lrs: every method gets ``default_grid(prior, budget, lrs=lrs)`` (``budget // len(lrs)`` values of
            its prior-strength axis times ``lrs``) unless ``grids`` names it; edge extensions come on top.
        grids: explicit grids keyed by method name or prior kind, e.g. ``{"lowrank": {"scale": [1e2, 1e4], "lr":
            [0.1]}}``.
        ranges: log10 range of the strength axis per method name or prior kind, e.g. ``{"lowrank": (0, 4)}``.
        steps, stop_loss, stop_plateau: the step budget and the convergence rule (:func:`train_config`).
        epochs: fix the epochs of every fit instead of ``steps`` (whatever n is).
        batch_size, num_samples, temperature: training settings (``num_samples`` / ``temperature``: samplers).
        eps: isotropic jitter of the learned priors (``None``: the kind's default).
        val_pool: validation pool of the default task (0: none).
        folds, repeats: cross-validation when the task has no pool (``folds=None``: one 80/20 split).
        max_test: evaluate on the first ``max_test`` test examples of a class-balanced order (default task only).
        tuning: the tuning strategy (a :class:`~ptyl.tuning.registry.TuningStrategy` name); ``auto``: an
            automatic strategy's settings.
        max_rounds: most extension rounds per search.
        select: with the grid, tune the MAP methods from the pretrained start together and choose the prior kind on
            the validation data (:func:`transfer_select`): their records, and one more, ``method = "selected"``.
        train_overrides: other :class:`~ptyl.training.TrainConfig` fields for every fit (e.g. ``{"grad_clip": 5}``).
        out_dir: if given, ``results.json`` is rewritten there after every finished run.
        progress, log: a progress bar; a function receiving one line per finished run.

    Returns:
        One record per (seed, n, method): see :func:`transfer_run`, plus the method, sizes, ``warnings`` and
        ``wall_time_s``; with ``select``, also the kind selection's record per (seed, n) (``method = "selected"``).

    Raises:
        ConfigError: a bad method, grid or setting -- before anything is trained.
    """
    plans = [parse_method(m) for m in methods]
    if not plans:
        raise ConfigError("no methods to run")
    TuningStrategy.parse(tuning)
    meta = read_metadata(prior_path) if prior_path is not None else {}
    if pretrained is None:
        if prior_path is None:
            raise ConfigError("run_transfer needs a prior file or a pretrained model")
        pretrained, _ = load_pretrained(prior_path)
    if posterior is None and prior_path is not None and any(p.needs_posterior for p in plans):
        posterior = load_posterior(prior_path)
    task = task or ClassificationTask(target, image_size=meta.get("image_size"), max_test=max_test, val_pool=val_pool)
    state = copy.deepcopy(pretrained.state_dict()) if meta else None
    source = pretrained_weights_path(prior_path) if prior_path is not None else "the pretrained model"
    jobs = []
    for seed in seeds:
        for n in n_per_class:
            train = task.train_set(int(n), int(seed))
            group, singles = [], []
            for plan in plans:
                config = train_config(plan.inference, len(train), steps=steps, batch_size=batch_size,
                                      num_samples=num_samples, temperature=temperature, stop_loss=stop_loss,
                                      stop_plateau=stop_plateau, **(train_overrides or {}))
                if epochs is not None:
                    config.epochs, config.max_steps = int(epochs), None
                spec = PriorSpec(kind=plan.prior, posterior=posterior if plan.needs_posterior else None, eps=eps,
                                 head=task.head)
                grid = method_grid(plan, budget, lrs, grids, ranges)
                check_grid(grid, spec, config)  # every user error surfaces now, before the first fit
                job = (int(seed), int(n), train, [plan], config, spec, {str(plan.prior): grid})
                selectable = plan.inference is Inference.MAP and plan.pretrained and plan.prior.recipe.axis
                grid_kinds = select and not TuningStrategy.parse(tuning).automatic and selectable
                (group if grid_kinds else singles).append(job)
            if len(group) > 1:  # one search over the kinds, their off limit shared
                _, _, _, _, config, spec, _ = group[0]
                group = [(int(seed), int(n), train, [job[3][0] for job in group], config,
                          replace(spec, posterior=posterior), {k: g for job in group for k, g in job[6].items()})]
            jobs.extend(group + singles)

    results: list[dict[str, Any]] = []
    bar = tqdm(jobs, desc="transfer", disable=not progress)
    for seed, n, train, group_plans, config, spec, grids_ in bar:
        names = " + ".join(p.name for p in group_plans)
        bar.set_postfix_str(f"n={n} seed={seed} {names}")
        start = time.perf_counter()
        first = group_plans[0]
        model_fn = pretrained_model_fn(meta, state if first.pretrained else None, task,
                                       module=pretrained if first.pretrained and not meta else None, source=source)
        common = {task.size_key: n, "seed": seed, "num_train": len(train), "num_test": len(task.test_set(seed)),
                  "target": getattr(task, "data", target), "source": meta.get("source"),
                  "prior_file": str(prior_path) if prior_path is not None else None, "max_steps": config.max_steps}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if len(group_plans) > 1:
                outcomes = transfer_select(task, train, group_plans, spec, grids_, config, model_fn, seed=seed,
                                           folds=folds, repeats=repeats, max_rounds=max_rounds)
            else:
                outcomes = [{"method": first.name, **transfer_run(
                    task, train, first, spec, grids_[str(first.prior)], config, model_fn, seed=seed, folds=folds,
                    repeats=repeats, tuning=tuning, max_rounds=max_rounds, auto=auto)}]
        wall = time.perf_counter() - start
        by_name = {p.name: p for p in group_plans}
        for outcome in outcomes:
            plan = by_name.get(outcome["method"])
            record = {"method": outcome["method"], "prior": str(plan.prior) if plan else outcome.get("selected_kind"),
                      "inference": str(plan.inference if plan else Inference.MAP),
                      "pretrained": plan.pretrained if plan else True, **common,
                      "temperature": config.temperature if plan and plan.inference.strategy.uses_temperature else None,
                      **outcome}
            edges = record.get("edge_warnings", [])
            record["warnings"] = list(dict.fromkeys(str(w.message) for w in caught if str(w.message) not in edges))
            record["wall_time_s"] = wall  # of the whole search (a kind selection's kinds share it)
            results.append(record)
            if log is not None:
                log(_log_line(record, task, record["method"], n, seed))
        if out_dir is not None:
            save_json(Path(out_dir) / "results.json", results)
    bar.close()
    return results


def _log_line(record: dict[str, Any], task: Task, name: str, n: int, seed: int) -> str:
    chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["selected"].items()) \
        if "selected" in record else ""
    status = f"FAILED: {record['error']}" if "error" in record else f"[{chosen}]"
    short = {"accuracy": "acc"}
    scores = " ".join(f"{short.get(k, k)}={record[k]:.4f}" for k in task.metrics[:3])
    extra = ""
    if "final_loss" in record and record["final_loss"] is not None:
        fit = record.get("fit_status")
        extra = f" train-nll={record['final_loss']:.3f}{' UNDERTRAINED' if fit == 'undertrained' else ''}"
        if record.get("prior_share") is not None:
            extra += f" prior share {record['prior_share']:.2g}{' (off)' if record.get('prior_off') else ''}"
    if record.get("selected_kind"):
        name = f"selected: {record['selected_kind']}"
    return f"  n={n:<4d} seed={seed} {name:<14s} {scores}  {status}{extra}  {record['wall_time_s']:.1f}s"
