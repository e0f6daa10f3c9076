"""Mixed precision for the training loop: the data term under ``torch.autocast`` (bf16 or fp16), the prior term in
full precision outside it, and a gradient scaler for fp16 (whose small exponent range underflows gradients).

One step with ``precision="fp16"`` (Micikevicius et al. 2018, https://arxiv.org/abs/1710.03740)::

    with precision.autocast():
        data_loss = objective(model, batch)          # matmuls / convolutions in fp16
    loss = data_loss.float() + prior.penalty(model) / N   # the prior in the parameters' dtype (fp32)
    precision.backward(loss)                          # scaler.scale(loss).backward()
    precision.unscale_(optimizer)                     # true gradients before clipping
    precision.step(optimizer)                         # skipped when a gradient is inf/nan; the scale adapts

``"bf16"`` has fp32's exponent range, so it needs no scaler; ``"fp32"`` changes nothing.

>>> MixedPrecision("bf16", torch.device("cpu")).dtype
torch.bfloat16
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ptyl.validation import check_choice

__all__ = ["PRECISIONS", "MixedPrecision", "full_precision"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A block computed in the tensors' own dtype even inside an autocast region (the prior term).

    Args:
        device: the device whose autocast is switched off.

    Returns:
        The context manager.
    """
    return torch.autocast(device.type, enabled=False)


class MixedPrecision:
    """Autocast and (fp16) gradient scaling for one training run.

    Args:
        precision: ``"fp32"`` (nothing changes), ``"bf16"`` or ``"fp16"`` (autocast; fp16 with a GradScaler).
        device: where the model trains.
    """

    def __init__(self, precision: str, device: torch.device) -> None:
        self.precision = check_choice(str(precision), PRECISIONS, "precision")
        self.device = device
        self.dtype = _DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The region where the model computes the data term (a no-op for fp32).

        Returns:
            The context manager.
        """
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled under fp16.

        Args:
            loss: the full objective of the batch (data term + prior term).
        """
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the current scale (before clipping or reading them; fp16 only).

        Args:
            optimizer: whose parameters' gradients are unscaled.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 skipped when a gradient is not finite, and the scale is updated.

        Args:
            optimizer: the run's optimizer.
        """
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state (``None`` without one)."""
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore ``state``, what :meth:`state_dict` returned."""
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
