"""The source stage: pretrain on the source task, keep training while SWAG collects (Shwartz-Ziv et al. 2022,
arXiv 2205.10279, Sec. 3.1), save the posterior as a prior file and the SWA-mean weights next to it.

Two levels: :func:`pretrain` / :func:`learn_prior` work on any model and data (the building blocks), and
:func:`pretrain_source` / :func:`learn_source_prior` run the whole stage on a named data set and architecture (what
``ptyl learn-prior``, the demo and the benchmarks call). The paper's recipe: start from the pretrained weights,
continue the source objective (supervised cross-entropy, or SimCLR) at a *high constant* or *cyclical* learning rate,
and take a SWAG snapshot at regular intervals; the task head (or SimCLR's projection head) is left out of the prior.

>>> path = learn_source_prior("kmnist", "smallcnn", out="runs/prior.safetensors")   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.data.augment import SimCLRAugment
from ptyl.errors import ConfigError
from ptyl.io.atomic import atomic_files
from ptyl.io.prior_file import save_posterior
from ptyl.io.weights import save_weights
from ptyl.params import Selector, as_name_list, check_head_matches, head_like_names, named_parameters
from ptyl.pipeline.artifacts import load_weights, pretrained_weights_path
from ptyl.pipeline.tasks import get_task
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.posterior.simclr import SimCLRModel, SimCLRObjective
from ptyl.posterior.swag import SWAGCollector
from ptyl.sharding import module_class_name
from ptyl.training.config import TrainConfig
from ptyl.training.fitting import fit
from ptyl.training.objective import Objective
from ptyl.training.registry import Inference
from ptyl.validation import check_choice

__all__ = ["OBJECTIVES", "SCHEDULES", "learn_prior", "learn_source_prior", "pretrain", "pretrain_source"]

OBJECTIVES = ("supervised", "simclr")
SCHEDULES = ("constant", "cyclical")


def pretrain(model: nn.Module, data: Dataset | DataLoader, *, epochs: int = 10, lr: float = 0.05,
             batch_size: int = 128, objective: Objective | None = None, seed: int = 0, progress: bool = True,
             checkpoint: str | os.PathLike | None = None, resume: bool = False,
             collate_fn: Callable | None = None) -> nn.Module:
    """Ordinary training on the source task (SGD, Nesterov, cosine): produces the "pretrained" weights.

    Args:
        model: trained in place (and returned).
        data: the source data.
        epochs, lr, batch_size, seed, progress: as in :class:`~ptyl.training.TrainConfig`.
        objective: ``objective(model, batch) -> loss``; default cross-entropy.
        checkpoint, resume: see :func:`ptyl.training.fit`.
        collate_fn: how examples become batches (e.g. :func:`ptyl.data.collate_text`).

    Returns:
        ``model``.
    """
    fit(model, data, None, TrainConfig(inference=Inference.MAP, epochs=epochs, lr=lr, batch_size=batch_size,
                                       seed=seed, progress=progress),
        objective=objective, head=None, checkpoint=checkpoint, resume=resume, collate_fn=collate_fn)
    return model


def learn_prior(
    model: nn.Module,
    data: Dataset | DataLoader,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    schedule: str = "constant",
    rank: int = 20,
    collect_every: int | None = None,
    head: str | Sequence[str] | None = "head",
    include: Selector = None,
    exclude: Selector = None,
    batch_size: int = 128,
    objective: Objective | None = None,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    metadata: dict[str, Any] | None = None,
    collate_fn: Callable | None = None,
) -> SourcePosterior:
    """Continue training from the current (pretrained) weights and fit SWAG over the backbone.

    The SWAG strategy of :mod:`ptyl.training` with no burn-in, filling a collector over the backbone: the same
    :class:`~ptyl.training.SWAGCollection` callback as downstream SWAG.

    Args:
        model, data: the pretrained model (trained in place) and the source data.
        epochs, lr, batch_size, seed, progress: as in :class:`~ptyl.training.TrainConfig`.
        schedule: ``"constant"`` (a high constant learning rate, snapshots every ``collect_every`` steps or once per
            epoch) or ``"cyclical"`` (one cosine cycle per epoch, a snapshot at the end of each cycle).
        rank: K, deviation columns kept.
        collect_every: snapshot interval in steps (``"constant"`` only; ``None``: once per epoch).
        head: the task head's module name(s), left out of the prior (a :class:`ConfigError` when it matches no
            parameter; a warning when the prior would cover a parameter named like a head, e.g. ``fc.weight``).
        include / exclude: names, prefixes or globs of the parameters the prior covers / leaves out (e.g.
            :data:`ptyl.models.hf.LORA_PATTERNS`, SimCLR's ``projection``).
        objective: ``objective(model, batch) -> loss``; default cross-entropy, or
            :class:`ptyl.posterior.simclr.SimCLRObjective`.
        checkpoint, resume: see :func:`ptyl.training.fit`.
        metadata: recorded in the prior file (source dataset, architecture, objective...).
        collate_fn: how examples become batches.

    Returns:
        The :class:`SourcePosterior` (save it with :func:`ptyl.io.save_posterior`); for a model sharded with FSDP2's
        ``fully_shard``, a :class:`~ptyl.posterior.ShardedPosterior` of this rank's rows (saved by all ranks
        together).
    """
    check_choice(schedule, SCHEDULES, "source schedule")
    check_head_matches(named_parameters(model), head, type(model).__name__)
    collector = SWAGCollector(model, rank=rank, include=include, head=head, exclude=exclude)
    suspicious = head_like_names(collector.names, head)
    if suspicious:
        warnings.warn(f"the prior will cover {suspicious[:4]}, named like a task head; pass head=<its module name> "
                      f"(now {head!r}) to leave the head out", stacklevel=2)
    config = TrainConfig(
        inference=Inference.SWAG, epochs=epochs, lr=lr, swag_lr=lr, batch_size=batch_size, burn_in_fraction=0.0,
        schedule=schedule, swag_collect_every=collect_every if schedule == "constant" else None, seed=seed,
        progress=progress,
    )
    fit(model, data, None, config, objective=objective, head=None, collector=collector, checkpoint=checkpoint,
        resume=resume, collate_fn=collate_fn)
    if collector.num_snapshots < rank:
        warnings.warn(f"SWAG took {collector.num_snapshots} snapshot(s), fewer than the requested rank {rank}: "
                      f"the prior has rank {collector.num_snapshots}; train longer or collect more often for rank "
                      f"{rank}",
                      stacklevel=2)
    meta = {
        "architecture": module_class_name(model),
        "objective": getattr(objective, "name", "supervised") if objective is not None else "supervised",
        "source_schedule": schedule,
        "source_lr": lr,
        "source_epochs": epochs,
        "excluded": as_name_list(head),
        **(metadata or {}),
    }
    return collector.posterior(metadata=meta)


def _source_objective(objective: str, model: nn.Module, image_size: int | None, seed: int):
    """``(model to train, objective callable or None, parameters to exclude)`` for the source objective."""
    check_choice(objective, OBJECTIVES, "source objective")
    if objective == "supervised":
        return model, None, None
    if image_size is None:
        raise ConfigError(f"the source objective {objective!r} needs images; this task's source data are not")

    return SimCLRModel(model), SimCLRObjective(SimCLRAugment(image_size), seed=seed), "projection"


def _source_setup(task: str, source: str, model: str | None, n_per_class: int | None,
                  model_kwargs: dict[str, Any] | None, seed: int, head: str, options: dict[str, Any] | None):
    """The task's :class:`~ptyl.pipeline.tasks.SourceSetup` (data, fresh model, metadata)."""
    task_class = get_task(task)
    return task_class.source_setup(source or task_class.default_source, model or task_class.default_model,
                                   n_per_class=n_per_class, model_kwargs=model_kwargs, seed=seed, head=head,
                                   **(options or {}))


def pretrain_source(
    source: str | None = None,
    model: str | None = None,
    *,
    epochs: int = 5,
    lr: float = 0.05,
    batch_size: int = 128,
    objective: str = "supervised",
    n_per_class: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    head: str = "head",
    seed: int = 0,
    out: str | Path | None = None,
    progress: bool = True,
    task: str = "classification",
    task_options: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``model`` on the source train split (optionally ``n_per_class`` examples per class).

    Args:
        source, model: data set (a name, or a path to your images or text file) and architecture (a name, or a
            ``module:factory`` returning an ``nn.Module``); default the task's (``kmnist`` and ``smallcnn`` for
            classification, ``vader-movies`` and ``minilm`` for text).
        epochs, lr, batch_size, seed, progress: training settings.
        objective: ``"supervised"`` or ``"simclr"``.
        n_per_class: use only this many source examples per class.
        model_kwargs: architecture options (e.g. ``{"width": 16}``).
        head: module name of the classifier's head.
        out: also save the weights there (:func:`ptyl.io.save_weights`).
        task: the task whose source stage this is (:data:`ptyl.pipeline.TASKS`: ``classification``, ``text``).
        task_options: the task's own settings (e.g. ``{"layers": [-1]}`` for text).

    Returns:
        ``(classifier, metadata)``.
    """
    setup = _source_setup(task, source, model, n_per_class, model_kwargs, seed, head, task_options)
    data, classifier, meta = setup.data, setup.model, setup.meta
    trained, obj, _ = _source_objective(objective, classifier, setup.image_size, seed)
    if epochs > 0:
        pretrain(trained, data, epochs=epochs, lr=lr, batch_size=batch_size, objective=obj, seed=seed,
                 progress=progress, collate_fn=setup.collate_fn)
    meta.update({"objective": objective, "pretrain_epochs": epochs, "pretrain_lr": lr})
    if out is not None:
        save_weights(classifier, out, meta)
    return classifier, meta


def learn_source_prior(
    source: str | None = None,
    model: str | None = None,
    *,
    pretrain_epochs: int = 5,
    swag_epochs: int = 3,
    rank: int = 20,
    lr: float = 0.05,
    swag_lr: float | None = None,
    batch_size: int = 128,
    objective: str = "supervised",
    n_per_class: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    head: str = "head",
    init: str | Path | None = None,
    dtype: str | None = None,
    out: str | Path = "prior.safetensors",
    seed: int = 0,
    progress: bool = True,
    task: str = "classification",
    task_options: dict[str, Any] | None = None,
) -> Path:
    """Pretrain on the source task, learn the SWAG posterior, save it as a prior file.

    The SWAG phase continues from the pretrained weights at the high constant learning rate ``swag_lr`` (default
    ``lr``) for ``swag_epochs`` epochs, taking about ``2 * rank`` evenly spaced snapshots (so the last ``rank``
    deviations span the second half of the run). The SWA mean, with BatchNorm statistics recomputed on the source
    data, is saved next to the prior (:func:`~ptyl.pipeline.pretrained_weights_path`): downstream methods start from it.

    Args:
        source, model, n_per_class, model_kwargs, head, lr, batch_size, seed, progress: as in
            :func:`pretrain_source` (the head is left out of the prior).
        pretrain_epochs, swag_epochs: epochs of ordinary training, then of SWAG collection.
        rank: SWAG rank K.
        swag_lr: the constant learning rate while SWAG collects (default ``lr``).
        objective: ``"supervised"`` (cross-entropy) or ``"simclr"`` (:mod:`ptyl.posterior.simclr`; the projection
            head is trained with the trunk and left out of the prior).
        init: a weights file (``ptyl pretrain``) to start from instead of pretraining here.
        dtype: storage dtype of the prior file (``"float32"`` default, ``"bfloat16"`` halves it).
        out: the prior file to write.
        task, task_options: as in :func:`pretrain_source` (text: the prior covers the trained transformer layers).

    Returns:
        The prior file's path.
    """
    if swag_epochs < 1:
        raise ConfigError(f"swag_epochs must be >= 1, got {swag_epochs}")
    setup = _source_setup(task, source, model, n_per_class, model_kwargs, seed, head, task_options)
    data, classifier, meta, image_size = setup.data, setup.model, setup.meta, setup.image_size
    if init is not None:
        if setup.include is not None:
            raise ConfigError(f"init= is for image tasks; the {task} task starts from its pretrained model")
        classifier, init_meta = load_weights(init)
        if init_meta.get("image_size") not in (None, image_size):
            raise ConfigError(f"{init} was trained on {init_meta['image_size']}px images, {source!r} has "
                              f"{image_size}px")
        meta.update({k: init_meta[k] for k in ("model", "architecture", "model_kwargs", "head") if k in init_meta})
        meta.update({"init": str(init), "pretrain_epochs": init_meta.get("pretrain_epochs")})
    trained, obj, exclude = _source_objective(objective, classifier, image_size, seed)
    if init is None and pretrain_epochs > 0:  # the same wrapper (SimCLR: same projection head) goes on to SWAG
        pretrain(trained, data, epochs=pretrain_epochs, lr=lr, batch_size=batch_size, objective=obj, seed=seed,
                 progress=progress, collate_fn=setup.collate_fn)
        meta["pretrain_epochs"] = pretrain_epochs
    steps = swag_epochs * math.ceil(len(data) / min(batch_size, len(data)))
    collect_every = max(1, steps // max(2 * rank, 2))
    meta.update({"objective": objective, "swag_epochs": swag_epochs, "swag_lr": swag_lr or lr, "swag_rank": rank})
    posterior = learn_prior(trained, data, epochs=swag_epochs, lr=swag_lr or lr, rank=rank, collect_every=collect_every,
                            head=meta["head"] if exclude is None else None, include=setup.include, exclude=exclude,
                            batch_size=batch_size, objective=obj, seed=seed + 1, progress=progress,
                            metadata=dict(meta), collate_fn=setup.collate_fn)
    posterior.load_mean_into(classifier)
    _recompute_batchnorm(classifier, data, batch_size)
    out = Path(out)
    weights = pretrained_weights_path(out)
    with atomic_files():  # the weights and the prior appear together or not at all
        save_weights(classifier, weights, {**meta, "swa_mean": True})
        return save_posterior(posterior, out, dtype=dtype, metadata={"pretrained_weights": weights.name})


def _recompute_batchnorm(model: nn.Module, data: Dataset, batch_size: int) -> None:
    """BatchNorm running statistics of the SWA mean (the stored ones belong to the last SGD iterate)."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(((x.to(device),) for x, _ in loader), model)
