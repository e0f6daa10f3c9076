"""Cyclical step-size schedule for SG-MCMC (cSG-MCMC).

Zhang, Li, Zhang, Chen & Wilson, "Cyclical Stochastic Gradient MCMC for Bayesian Deep Learning", ICLR 2020
(https://arxiv.org/abs/1902.03932), eq. (1): with ``K`` total iterations, ``M`` cycles and ``k = 1..K``

    lr_k = lr0 / 2 * (cos(pi * mod(k - 1, ceil(K / M)) / ceil(K / M)) + 1)

Each cycle starts with an *exploration* phase (the first ``exploration_fraction`` = beta of the cycle; noise off, i.e.
SGD) and ends with a *sampling* phase (noise on, samples collected), decided by
``r(k) = mod(k - 1, ceil(K / M)) / ceil(K / M) < beta``.

Steps here are zero-based: ``step = k - 1``. A training loop looks like::

    sampler = SGLD(model.parameters(), lr=lr0, num_data=N)
    schedule = CyclicalSchedule(sampler, total_steps=K, num_cycles=M)
    for step in range(K):
        loss_fn(model, batch).backward(); sampler.step(); sampler.zero_grad()
        if schedule.should_collect(samples_per_cycle):   # about the step just taken
            bank.add(model)
        schedule.step()                                   # sets lr and temperature for the next step

When ``K`` is not a multiple of ``M`` the last cycle is truncated (as in the paper) and may hold no sampling steps.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ptyl.errors import InvalidValueError

__all__ = ["burn_in_factor", "cyclical_lr", "CyclicalSchedule"]


def _check_schedule_args(total_steps: int, num_cycles: int) -> int:
    """Validate ``K`` and ``M`` and return the cycle length ``ceil(K / M)``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise InvalidValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if isinstance(num_cycles, bool) or not isinstance(num_cycles, numbers.Integral) or num_cycles < 1:
        raise InvalidValueError(f"num_cycles must be an integer >= 1, got {num_cycles!r}")
    if num_cycles > total_steps:
        raise InvalidValueError(f"num_cycles ({num_cycles}) must not exceed total_steps ({total_steps})")
    return math.ceil(int(total_steps) / int(num_cycles))


def burn_in_factor(step: int, burn_in_steps: int, ratio: float) -> float:
    """The learning-rate factor of a sampler that descends, then samples (SGLD, downstream SWAG): half a cosine from 1
    to ``ratio`` over the first ``burn_in_steps`` steps, then ``ratio``.

        factor(step) = ratio + (1 - ratio) (1 + cos(pi step / burn_in_steps)) / 2     (step < burn_in_steps)

    Args:
        step: zero-based step.
        burn_in_steps: steps of the descent (>= 1).
        ratio: the sampling learning rate over the initial one.

    Returns:
        The factor on the initial learning rate.

    >>> [round(burn_in_factor(s, 4, 0.01), 4) for s in range(6)]
    [1.0, 0.855, 0.505, 0.155, 0.01, 0.01]
    """
    if step >= burn_in_steps:
        return ratio
    return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * step / burn_in_steps))


def cyclical_lr(step: int, total_steps: int, num_cycles: int, lr0: float) -> float:
    """Cyclical cosine step size of Zhang et al. (2020), eq. (1), at zero-based ``step`` (= k - 1).

    ``lr = lr0 / 2 * (cos(pi * mod(step, ceil(K / M)) / ceil(K / M)) + 1)`` with ``K = total_steps``,
    ``M = num_cycles``. Steps at or beyond ``total_steps`` continue the periodic pattern (so one extra scheduler
    step at the end of training is harmless).

    Args:
        step: zero-based step.
        total_steps: ``K``.
        num_cycles: ``M``.
        lr0: the peak step size.

    Returns:
        The step size at ``step``.
    """
    cycle_length = _check_schedule_args(total_steps, num_cycles)
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise InvalidValueError(f"step must be an integer >= 0, got {step!r}")
    if not (isinstance(lr0, (int, float)) and math.isfinite(lr0) and lr0 > 0):
        raise InvalidValueError(f"lr0 must be a finite number > 0, got {lr0!r}")
    position = int(step) % cycle_length
    return lr0 / 2.0 * (math.cos(math.pi * position / cycle_length) + 1.0)


class CyclicalSchedule(LRScheduler):
    """cSG-MCMC schedule: cyclical cosine learning rate, exploration/sampling phases and sample-collection steps.

    The learning rate of every parameter group is ``initial_lr * cyclical_lr(last_epoch, K, M, 1)``. With
    ``control_temperature=True`` (default) each :meth:`step` also sets ``group["temperature"]`` of groups that have one
    (e.g. :class:`ptyl.training.sgld.SGLD`) to ``initial_temperature * temperature_factor()``: 0 (SGD) while
    exploring, the group's original temperature while sampling. The original temperature is stored in the group as
    ``"initial_temperature"`` (like torch stores ``"initial_lr"``), so it survives optimizer checkpoints.

    Args:
        optimizer: the wrapped optimizer (typically SGLD).
        total_steps: ``K``, the total number of optimizer steps.
        num_cycles: ``M``, the number of cycles.
        exploration_fraction: ``beta`` in [0, 1), the fraction of each cycle spent exploring.
        control_temperature: set the groups' temperature from the phase at every step.
        last_epoch: as in :class:`torch.optim.lr_scheduler.LRScheduler`.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        num_cycles: int,
        exploration_fraction: float = 0.5,
        control_temperature: bool = True,
        last_epoch: int = -1,
    ) -> None:
        self.cycle_length = _check_schedule_args(total_steps, num_cycles)
        if not (isinstance(exploration_fraction, (int, float)) and 0.0 <= exploration_fraction < 1.0):
            raise InvalidValueError(f"exploration_fraction must be in [0, 1), got {exploration_fraction!r}")
        self.total_steps = int(total_steps)
        self.num_cycles = int(num_cycles)
        self.exploration_fraction = float(exploration_fraction)
        self.control_temperature = bool(control_temperature)
        # First position (within a cycle) of the sampling phase: smallest j with j / L >= beta.
        self.sampling_start = next(
            (j for j in range(self.cycle_length) if j / self.cycle_length >= self.exploration_fraction),
            self.cycle_length,
        )
        if self.sampling_start >= self.cycle_length:
            raise InvalidValueError(
                f"cycles of {self.cycle_length} steps have no sampling step with exploration_fraction="
                f"{exploration_fraction}; use more steps per cycle or a smaller exploration_fraction"
            )
        for group in optimizer.param_groups:
            if "temperature" in group:
                group.setdefault("initial_temperature", group["temperature"])
        super().__init__(optimizer, last_epoch)  # calls self.step(), which applies the first step's temperature

    # --- learning rate ---
    def get_lr(self) -> list[Any]:
        factor = cyclical_lr(max(self.last_epoch, 0), self.total_steps, self.num_cycles, 1.0)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[Any]:
        return self.get_lr()

    def step(self, epoch: int | None = None) -> None:
        super().step(epoch)
        if self.control_temperature:
            self.apply_to_sgld()

    # --- phases ---
    @property
    def cycle(self) -> int:
        """Zero-based index of the cycle the current step belongs to."""
        return max(self.last_epoch, 0) // self.cycle_length

    @property
    def position(self) -> int:
        """Zero-based position of the current step inside its cycle."""
        return max(self.last_epoch, 0) % self.cycle_length

    def in_sampling_phase(self) -> bool:
        """True when the current step lies in the last ``1 - exploration_fraction`` of its cycle (r(k) >= beta)."""
        return self.position >= self.sampling_start

    def temperature_factor(self) -> float:
        """The factor on the temperature of the current step.

        Returns:
            0.0 while exploring (noise off: SGD), 1.0 while sampling.
        """
        return 1.0 if self.in_sampling_phase() else 0.0

    def apply_to_sgld(self, optimizer: Optimizer | None = None) -> None:
        """Set ``group["temperature"] = group["initial_temperature"] * temperature_factor()`` in every group of
        ``optimizer`` (default: the scheduled one) that has a temperature."""
        optimizer = self.optimizer if optimizer is None else optimizer
        factor = self.temperature_factor()
        for group in optimizer.param_groups:
            if "temperature" in group:
                base = group.setdefault("initial_temperature", group["temperature"])
                group["temperature"] = base * factor

    # --- sample collection ---
    def collection_positions(self, samples_per_cycle: int) -> list[int]:
        """Where in a cycle samples are stored: evenly spaced over the sampling phase, the last at the cycle's end.

        Args:
            samples_per_cycle: samples per cycle, in ``[1, length of the sampling phase]``.

        Returns:
            Zero-based positions within a cycle.
        """
        num_sampling_steps = self.cycle_length - self.sampling_start
        if isinstance(samples_per_cycle, bool) or not isinstance(samples_per_cycle, numbers.Integral):
            raise InvalidValueError(f"samples_per_cycle must be an integer, got {samples_per_cycle!r}")
        if not 1 <= samples_per_cycle <= num_sampling_steps:
            raise InvalidValueError(
                f"samples_per_cycle must be in [1, {num_sampling_steps}] (the sampling phase has "
                f"{num_sampling_steps} steps per cycle), got {samples_per_cycle}"
            )
        spc = int(samples_per_cycle)
        return [self.sampling_start - 1 + ((s + 1) * num_sampling_steps) // spc for s in range(spc)]

    def collection_steps(self, samples_per_cycle: int) -> list[int]:
        """Every step at which :meth:`should_collect` is true.

        Args:
            samples_per_cycle: as in :meth:`collection_positions`.

        Returns:
            Zero-based steps in ``[0, total_steps)``.
        """
        positions = self.collection_positions(samples_per_cycle)
        return [
            cycle * self.cycle_length + position
            for cycle in range(math.ceil(self.total_steps / self.cycle_length))
            for position in positions
            if cycle * self.cycle_length + position < self.total_steps
        ]

    def should_collect(self, samples_per_cycle: int) -> bool:
        """Whether to store a sample after the current step (call after ``optimizer.step()``, before ``step()``).

        Args:
            samples_per_cycle: samples per cycle.

        Returns:
            ``True`` at the collection steps.
        """
        return self.position in self.collection_positions(samples_per_cycle)
