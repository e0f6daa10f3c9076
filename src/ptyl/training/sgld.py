"""Stochastic gradient Langevin dynamics (SGLD) and its momentum variant (SGHMC) as a ``torch.optim.Optimizer``.

Convention (shared with :func:`ptyl.training.fit`): the loss the user back-propagates is the *per-example*
objective

    U(theta) = -(1/N) sum_i log p(y_i | x_i, theta) - (1/N) log p(theta)      (CE batch mean - log prior / N)

so that the (tempered) posterior is ``p_T(theta | D) ∝ exp(-N U(theta) / T)``.

Langevin dynamics on the potential ``N U / T`` with step ``eps`` is
``theta <- theta - eps (N/T) grad U + sqrt(2 eps) xi``. Writing ``lr = eps N / T`` (so that ``lr`` is the usual SGD step
on ``U``) gives the update implemented here (Welling & Teh, ICML 2011,
https://www.stat.ucl.ac.uk/~ywteh/research/compstats/WelTeh2011a.pdf):

    theta <- theta - lr * grad U(theta) + sqrt(2 * lr * T / N) * xi,        xi ~ N(0, I)

For small ``lr`` the iterates are distributed as ``exp(-N U / T)``. ``T = 1`` is the Bayes posterior, ``T < 1`` the
"cold" posteriors of Wenzel et al. (2020, https://arxiv.org/abs/2002.02405), and ``T = 0`` turns the noise off: the
update is then bit-for-bit :class:`torch.optim.SGD` (same weight decay and momentum semantics).

With ``momentum = mu > 0`` and ``T > 0`` the update is stochastic gradient Hamiltonian Monte Carlo in its
"SGD with momentum" form (Chen, Fox & Guestrin, 2014, https://arxiv.org/abs/1402.4102, eq. 15) with friction
``alpha = 1 - mu`` and ``eta = lr T / N``. The velocity is ``v = -lr * buf + n``: ``buf`` is torch.optim.SGD's momentum
buffer (gradient units) and ``n`` a noise velocity kept in parameter units:

    buf <- mu * buf + grad U
    n   <- mu * n + sqrt(2 * (1 - mu) * lr * T / N) * xi
    theta <- theta - lr * buf + n

For a constant ``lr`` this is exactly ``v <- mu v - lr grad U + N(0, 2 alpha eta)``, ``theta <- theta + v``. Keeping the
noise in parameter units means a learning-rate schedule that jumps from a tiny to a large step (cyclical schedules)
does not amplify stale noise. A step with ``T = 0`` drops ``n``, so temperature 0 is always exactly SGD.
``weight_decay`` adds ``weight_decay/2 * ||theta||^2`` to ``U`` exactly as in SGD.

Every hyper-parameter (``lr``, ``num_data``, ``temperature``, ``momentum``, ``weight_decay``) may be set per parameter
group; schedules change ``group["lr"]`` and ``group["temperature"]`` between steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from ptyl.errors import InvalidValueError

__all__ = ["SGLD"]


class SGLD(Optimizer):
    """SGLD / SGHMC sampler; ``temperature=0`` is plain SGD. See the module docstring for the update equations.

    Args:
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: step size on the per-example loss ``U`` (the SGD learning rate), > 0.
        num_data: ``N``, the number of training examples the loss is averaged over, >= 1.
        temperature: posterior temperature ``T >= 0`` (1 = Bayes posterior, 0 = no noise, i.e. SGD).
        momentum: ``mu`` in [0, 1); with ``T > 0`` the sampler is SGHMC with friction ``1 - mu``.
        weight_decay: L2 coefficient added to the gradient, as in :class:`torch.optim.SGD`.
        generator: optional ``torch.Generator`` for reproducible noise. Noise is drawn on the generator's device and
            moved to the parameter's device when they differ; without a generator it is drawn directly on the
            parameter's device and dtype.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        num_data: int,
        temperature: float = 1.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, num_data=num_data, temperature=temperature, momentum=momentum, weight_decay=weight_decay
        )
        _validate_group(defaults, where="SGLD")
        self.generator = generator
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1], where=f"SGLD param_groups[{len(self.param_groups) - 1}]")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """Perform one SGLD/SGHMC step (SGD when the group's temperature is 0)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for index, group in enumerate(self.param_groups):
            _validate_group(group, where=f"SGLD param_groups[{index}]")  # schedules may have changed values
            lr = float(group["lr"])
            temperature = float(group["temperature"])
            momentum = float(group["momentum"])
            weight_decay = float(group["weight_decay"])
            # Std of the injected noise per step (parameter units); identical formula with or without momentum.
            noise_std = math.sqrt(2.0 * (1.0 - momentum) * lr * temperature / int(group["num_data"]))

            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if grad.is_sparse:
                    raise InvalidValueError("SGLD does not support sparse gradients")
                state = self.state[param]

                # --- exactly torch.optim.SGD (_single_tensor_sgd with dampening=0, nesterov=False) ---
                if weight_decay != 0:
                    grad = grad.add(param, alpha=weight_decay)
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = grad.detach().clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1)
                    grad = buf
                param.add_(grad, alpha=-lr)

                # --- Langevin noise ---
                if temperature == 0:
                    state.pop("noise_velocity", None)
                    continue
                noise = self._standard_normal(param)
                if momentum == 0:
                    param.add_(noise, alpha=noise_std)
                else:
                    velocity = state.get("noise_velocity")
                    if velocity is None:
                        velocity = torch.zeros_like(param, memory_format=torch.preserve_format)
                        state["noise_velocity"] = velocity
                    velocity.mul_(momentum).add_(noise, alpha=noise_std)
                    param.add_(velocity)
        return loss

    def _standard_normal(self, param: torch.Tensor) -> torch.Tensor:
        generator = self.generator
        if generator is None or generator.device == param.device:
            return torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)
        # A generator only draws on its own device; draw there and move for reproducibility across devices.
        noise = torch.randn(param.shape, generator=generator, device=generator.device, dtype=param.dtype)
        return noise.to(param.device)

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the generator's RNG state (when a generator was given), for exact resume."""
        state = super().state_dict()
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        super().load_state_dict(state_dict)
        if generator_state is not None and self.generator is not None:
            if isinstance(generator_state, torch.Tensor):
                generator_state = generator_state.cpu()
            self.generator.set_state(generator_state)


def _validate_group(group: dict[str, Any], where: str) -> None:
    """Raise InvalidValueError naming the bad hyper-parameter."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = lr.item()
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidValueError(f"{where}: lr must be a finite number > 0, got {group['lr']!r}")
    num_data = group["num_data"]
    if isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1:
        raise InvalidValueError(f"{where}: num_data must be an integer >= 1, got {num_data!r}")
    temperature = group["temperature"]
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InvalidValueError(f"{where}: temperature must be a finite number >= 0, got {temperature!r}")
    momentum = group["momentum"]
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise InvalidValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    weight_decay = group["weight_decay"]
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise InvalidValueError(f"{where}: weight_decay must be a finite number >= 0, got {weight_decay!r}")
