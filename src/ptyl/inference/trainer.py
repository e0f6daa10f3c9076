"""Downstream training: MAP fine-tuning, SGLD / cyclical SGLD sampling and downstream SWAG, in one plain loop.

Every method minimises (or samples) the same objective (Shwartz-Ziv et al. 2022, eq. 2):

    U(theta) = mean_batch loss(f(x; theta), y) - log p(theta) / N

with N the number of training examples. ``method`` picks what happens to it:

- ``map``:   SGD, Nesterov momentum, cosine learning-rate decay -> one model.
- ``sgld``:  SGLD (Welling & Teh 2011) at a constant step; after burn-in, ``num_samples`` evenly spaced samples.
- ``csgld``: cyclical SGLD (Zhang et al. 2020): cosine cycles, SGD while exploring, noise while sampling.
- ``swag``:  SGD, then a constant step while SWAG (Maddox et al. 2019) collects once per epoch; ``num_samples``
             models drawn from it.
Sampling methods predict by Bayesian model averaging (:meth:`FitResult.predict`).

The loop checkpoints after each epoch (model, optimiser, scheduler, RNG streams, samples) and ``resume=True``
continues a run exactly where it stopped: the final weights equal an uninterrupted run's.

Under ``torchrun`` (a process group initialised, e.g. by :func:`ptyl.distributed.init_from_env`) the same loop runs
data-parallel: the model is wrapped in DistributedDataParallel, a Dataset is sharded with a DistributedSampler
(``batch_size`` stays the GLOBAL batch), N stays the global dataset size (so the prior is counted once, see
:mod:`ptyl.distributed`), the logged loss is averaged over ranks, SWAG collects on rank 0 and is broadcast at the end,
and only rank 0 writes checkpoints. Marked ``# DDP:`` below; in one process these lines change nothing.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl import distributed as ddp
from ptyl.errors import ConfigError, DataError
from ptyl.inference.bma import SampleBank, _to_device, bma_predict, predict_probs
from ptyl.inference.schedules import CyclicalSchedule
from ptyl.inference.sgld import SGLD
from ptyl.io.atomic import atomic_write
from ptyl.params import as_name_list, name_matches, named_parameters
from ptyl.posterior.swag import SWAGCollector
from ptyl.priors.base import Prior

METHODS = ("map", "sgld", "csgld", "swag")
Objective = Callable[[nn.Module, Any], torch.Tensor]


def supervised_objective(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean cross-entropy of an ``(x, y)`` batch (classification ``[B, C]`` or segmentation ``[B, C, H, W]``)."""
    x, y = batch[0], batch[1]
    return F.cross_entropy(model(x), y)


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`fit`. Learning rates apply to the per-example objective U."""

    method: str = "map"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.01
    head_lr: float | None = None  # None: same as lr
    optimizer: str = "sgd"  # map / swag: sgd | adam (sgld / csgld always use the SGLD sampler)
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"  # map: cosine | constant; swag: cosine/constant (constant after burn-in) | cyclical
    grad_clip: float | None = None
    temperature: float = 1.0  # sgld / csgld
    num_cycles: int = 4  # csgld
    samples_per_cycle: int = 3  # csgld
    exploration_fraction: float = 0.5  # csgld
    burn_in_fraction: float = 0.5  # sgld / swag: share of epochs before collection starts
    num_samples: int = 10  # sgld samples kept / swag models drawn
    swag_rank: int = 10
    swag_lr: float | None = None  # swag collection step (None: lr)
    swag_collect_every: int | None = None  # swag: collect every n steps after burn-in (None: once per epoch)
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.optimizer not in ("sgd", "adam"):
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose 'sgd' or 'adam'")
        if self.optimizer == "adam" and self.method in ("sgld", "csgld"):
            raise ConfigError("method sgld/csgld samples with SGLD; optimizer 'adam' is for map and swag")
        if self.schedule not in ("cosine", "constant", "cyclical"):
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose 'cosine', 'constant' or 'cyclical'")
        if self.schedule == "cyclical" and self.method != "swag":
            raise ConfigError("schedule 'cyclical' is for method 'swag' (csgld has its own cycles)")
        for key in ("epochs", "batch_size", "num_samples"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not (self.lr > 0 and (self.head_lr is None or self.head_lr > 0)):
            raise ConfigError("learning rates must be > 0")
        if not 0 <= self.burn_in_fraction < 1:
            raise ConfigError("burn_in_fraction must be in [0, 1)")


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, per-epoch history, and samples for BMA (sampling methods)."""

    model: nn.Module
    config: TrainConfig
    history: list[dict[str, float]] = field(default_factory=list)
    samples: SampleBank | None = None
    swag: SWAGCollector | None = None
    train_loader: DataLoader | None = None

    def predict(self, data: Dataset | Iterable, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Class probabilities: BMA over the samples (BatchNorm statistics recomputed on the training data per
        sample) for sampling methods, the single model otherwise."""
        loader = data if not isinstance(data, Dataset) else DataLoader(data, batch_size=batch_size, shuffle=False)
        if self.samples is not None and len(self.samples) > 0:
            return bma_predict(self.model, self.samples, loader, bn_loader=self._bn_loader(), progress=progress)
        return predict_probs(self.model, loader)

    def _bn_loader(self) -> DataLoader | None:
        if self.train_loader is None:
            return None
        ds = self.train_loader.dataset
        return DataLoader(ds, batch_size=self.train_loader.batch_size, shuffle=False)


def _loader(data: Dataset | DataLoader, batch_size: int, seed: int) -> tuple[DataLoader, torch.Generator]:
    if isinstance(data, DataLoader):
        gen = data.generator if data.generator is not None else torch.Generator().manual_seed(seed)
        return data, gen
    if len(data) == 0:
        raise DataError("the training set is empty")
    gen = torch.Generator().manual_seed(seed)
    if ddp.is_distributed():  # DDP: each rank reads its shard; together the ranks read one global batch
        per_rank = ddp.per_rank_batch_size(batch_size, len(data))
        if per_rank * ddp.world_size() != min(batch_size, len(data)):
            warnings.warn(f"global batch {min(batch_size, len(data))} is not divisible by {ddp.world_size()} ranks; "
                          f"using {per_rank} per rank", stacklevel=3)
        return ddp.distributed_loader(data, per_rank, seed), gen
    return DataLoader(data, batch_size=min(batch_size, len(data)), shuffle=True, generator=gen), gen


def _param_groups(model: nn.Module, head: str | Sequence[str] | None, lr: float, head_lr: float | None):
    heads = as_name_list(head)
    head_params, body = [], []
    for name, p in named_parameters(model).items():
        if not p.requires_grad:
            continue
        (head_params if any(name_matches(name, h) for h in heads) else body).append(p)
    groups = [{"params": body, "lr": lr, "name": "backbone"}]
    if head_params:
        groups.append({"params": head_params, "lr": head_lr or lr, "name": "head"})
    return [g for g in groups if g["params"]]


class _Run:
    """State of one training run: built once, checkpointed each epoch."""

    def __init__(self, model, data, prior, config, objective, num_data, head, collector, checkpoint):
        self.model, self.prior, self.config = model, prior, config
        self.net = model  # DDP: fit() replaces this by the DDP wrapper; forward/backward go through it
        self.objective = objective or supervised_objective
        self.device = torch.device(config.device) if config.device else next(model.parameters()).device
        # before the optimiser, SWAG moments and noise generator are built, so all of them live on this device
        model.to(self.device)
        if isinstance(prior, nn.Module):  # a prior built on another device (e.g. before config.device moved the model)
            prior.to(self.device)
        self.loader, self.loader_gen = _loader(data, config.batch_size, config.seed)
        self.num_data = int(num_data or len(self.loader.dataset))
        self.steps_per_epoch = len(self.loader)
        self.total_steps = config.epochs * self.steps_per_epoch
        groups = _param_groups(model, head, config.lr, config.head_lr)
        # on the model's device: SGLD noise drawn on a CPU generator would be copied to the GPU every step
        self.noise_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        if config.method in ("sgld", "csgld"):
            self.optimizer = SGLD(groups, lr=config.lr, num_data=self.num_data, temperature=config.temperature,
                                  momentum=config.momentum, generator=self.noise_gen)
        elif config.optimizer == "adam":  # same objective, adaptive steps (dense prediction trains poorly with SGD)
            self.optimizer = torch.optim.Adam(groups, lr=config.lr)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                                             nesterov=config.nesterov and config.momentum > 0)
        self.scheduler = self._scheduler()
        self.bank = SampleBank() if config.method in ("sgld", "csgld", "swag") else None
        self.swag = collector
        if config.method == "swag" and self.swag is None:
            self.swag = SWAGCollector(model, rank=config.swag_rank)
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.epoch = 0
        self.step = 0
        self.history: list[dict[str, float]] = []

    def _scheduler(self):
        c = self.config
        if c.method == "csgld":
            return CyclicalSchedule(self.optimizer, self.total_steps, c.num_cycles, c.exploration_fraction)
        if c.method == "map" and c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(self.total_steps, 1))
        if c.method == "swag":
            # cosine from lr to swag_lr during burn-in, then constant while collecting
            # (cyclical: after burn-in, one cosine cycle from swag_lr to ~0 per epoch; snapshots at cycle ends)
            burn = max(int(c.burn_in_fraction * self.total_steps), 1)
            ratio = (c.swag_lr or c.lr) / c.lr
            per_epoch = self.steps_per_epoch

            def factor(step: int) -> float:
                if step >= burn and c.schedule == "cyclical":
                    pos = (step % per_epoch + 1) / per_epoch
                    return ratio * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * pos)))
                if step >= burn:
                    return ratio
                return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * step / burn))

            return torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        return None

    def _sgld_collect_steps(self) -> set[int]:
        start = int(self.config.burn_in_fraction * self.total_steps)
        span = self.total_steps - start
        n = min(self.config.num_samples, span)
        return {start + (i + 1) * span // n - 1 for i in range(n)}

    # --- checkpointing -------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "loader_rng": self.loader_gen.get_state(),
            "noise_rng": self.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "bank": self.bank.state_dict() if self.bank is not None else None,
            "swag": self.swag.state_dict() if self.swag is not None else None,
            "history": self.history,
            # stateful objectives (SimCLR's augmentation stream) resume where they stopped
            "objective": self.objective.state_dict() if hasattr(self.objective, "state_dict") else None,
        }

    def save(self) -> None:
        if self.checkpoint is None:
            return
        if ddp.is_main_process():  # DDP: one writer; the barrier keeps the others from reading a half-written file
            state = self.state()
            atomic_write(self.checkpoint, lambda tmp: torch.save(state, tmp))
        ddp.barrier()

    def load(self) -> bool:
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if state["config"] != asdict(self.config):
            changed = [k for k in state["config"] if state["config"][k] != asdict(self.config).get(k)]
            raise ConfigError(f"checkpoint {self.checkpoint} was made with other settings ({changed}); "
                              "remove it or pass the same settings to resume")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.loader_gen.set_state(state["loader_rng"])
        self.noise_gen.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if self.bank is not None:
            self.bank.load_state_dict(state["bank"])
        if self.swag is not None and state["swag"] is not None:
            self.swag.load_state_dict(state["swag"])
        if state.get("objective") is not None and hasattr(self.objective, "load_state_dict"):
            self.objective.load_state_dict(state["objective"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], list(state["history"])
        return True

    # --- the loop ------------------------------------------------------------------------------------------
    def train_step(self, batch: Any) -> tuple[float, float]:
        batch = _to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        data_loss = self.objective(self.net, batch)
        loss = data_loss
        prior_term = torch.zeros(())
        if self.prior is not None:
            # DDP: every rank adds penalty/N and DDP averages gradients over ranks -> the prior counts once
            prior_term = self.prior.penalty(self.net) / self.num_data
            loss = loss + prior_term
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}: lower the learning rate")
        loss.backward()
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        return float(data_loss.detach()), float(prior_term.detach())

    def after_step(self, sgld_steps: set[int]) -> None:
        c = self.config
        if c.method == "sgld" and self.step in sgld_steps:
            self.bank.add(self.model)
        if c.method == "csgld" and self.scheduler.should_collect(c.samples_per_cycle):
            self.bank.add(self.model)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        every = c.swag_collect_every
        if c.method == "swag" and every and self.step > c.burn_in_fraction * self.total_steps and self.step % every == 0:
            if ddp.is_main_process():  # DDP: weights are identical on all ranks; rank 0 collects (see finish_swag)
                self.swag.collect(self.model)

    def after_epoch(self) -> None:
        c = self.config
        if c.method == "swag" and not c.swag_collect_every and self.epoch >= int(c.burn_in_fraction * c.epochs):
            if ddp.is_main_process():  # DDP: rank 0 collects (see finish_swag)
                self.swag.collect(self.model)

    def finish_swag(self) -> None:
        """DDP: copy rank 0's SWAG moments to every rank, so each returns the same posterior / samples."""
        if self.swag is not None and ddp.is_distributed():
            self.swag.load_state_dict(ddp.broadcast_state(self.swag.state_dict()))


def fit(
    model: nn.Module,
    data: Dataset | DataLoader,
    prior: Prior | None = None,
    config: TrainConfig | None = None,
    *,
    objective: Objective | None = None,
    num_data: int | None = None,
    head: str | Sequence[str] | None = "head",
    collector: SWAGCollector | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
    **overrides: Any,
) -> FitResult:
    """Train ``model`` on ``data`` under ``prior`` (see the module docstring for the methods).

    Args:
        data: a Dataset (shuffled with the config's seed) or your own DataLoader.
        prior: e.g. from :func:`ptyl.priors.make_prior`; ``None`` trains by maximum likelihood.
        config: a :class:`TrainConfig`; keyword ``overrides`` replace its fields (``fit(..., epochs=5)``).
        objective: ``objective(model, batch) -> loss``; default mean cross-entropy.
        num_data: N in ``-log p(theta)/N`` (default: dataset size).
        head: module name(s) trained with ``head_lr``.
        collector: a :class:`SWAGCollector` to fill (source-side prior learning); default for ``method="swag"``
            tracks every trainable parameter.
        checkpoint: file written after every epoch; with ``resume=True`` an existing one is continued.
        eval_fn: called on the model after each epoch; its numbers go into the history.
    """
    from tqdm.auto import tqdm

    config = TrainConfig(**{**asdict(config or TrainConfig()), **overrides})
    config.validate()
    torch.manual_seed(config.seed)
    # DDP: a model passed already wrapped is trained through its wrapper; checkpoints/SWAG/samples use the module
    run = _Run(ddp.unwrap_model(model), data, prior, config, objective, num_data, head, collector, checkpoint)
    if resume:
        run.load()
    sgld_steps = run._sgld_collect_steps() if config.method == "sgld" else set()
    run.net = ddp.wrap_model(model)  # DDP: identity unless a process group with > 1 rank exists
    show = config.progress and ddp.is_main_process()
    bar = tqdm(total=config.epochs, initial=run.epoch, desc=f"fit[{config.method}]", disable=not show)
    while run.epoch < config.epochs:
        run.net.train()
        ddp.set_epoch(run.loader, run.epoch)  # DDP: a new shard permutation each epoch (no-op otherwise)
        totals = [0.0, 0.0, 0]
        for batch in run.loader:
            data_loss, prior_term = run.train_step(batch)
            totals[0] += data_loss
            totals[1] += prior_term
            totals[2] += 1
            run.after_step(sgld_steps)
        run.after_epoch()
        # DDP: the mean over ranks of per-rank means = the global mean (equal shards)
        record = {"epoch": run.epoch + 1, "loss": ddp.all_reduce_mean(totals[0] / totals[2]),
                  "prior": ddp.all_reduce_mean(totals[1] / totals[2])}
        if eval_fn is not None:
            record.update(eval_fn(model))
        run.history.append(record)
        run.epoch += 1
        run.save()
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
    bar.close()
    run.finish_swag()
    result = FitResult(model, config, run.history, run.bank, run.swag, run.loader)
    if config.method == "swag" and collector is None:
        _draw_swag_samples(run, result)
    return result


def _draw_swag_samples(run: _Run, result: FitResult) -> None:
    """Replace the bank's content with ``num_samples`` models drawn from the downstream SWAG posterior."""
    if run.swag.num_snapshots < 2:
        raise ConfigError("downstream SWAG collected fewer than 2 snapshots: use more epochs or a lower burn_in")
    mean_state = {k: v.clone() for k, v in run.model.state_dict().items()}
    gen = torch.Generator(device=run.device).manual_seed(run.config.seed + 2)  # sample_into draws on this device
    run.bank.clear()
    for _ in range(run.config.num_samples):
        run.swag.sample_into(run.model, generator=gen)
        run.bank.add(run.model)
    run.model.load_state_dict(mean_state)
