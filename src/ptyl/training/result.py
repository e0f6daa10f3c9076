"""What training returns: the model, its history and (sampling strategies) the posterior samples, with one
``predict`` for all of them."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ptyl.inference.bma import bma_predict, predict_probs
from ptyl.inference.samples import SampleBank
from ptyl.posterior.swag import SWAGCollector

__all__ = ["FitResult"]


@dataclass
class FitResult:
    """The outcome of :func:`ptyl.training.fit`.

    Attributes:
        model: the trained model (for SWAG: the last iterate).
        config: the :class:`~ptyl.training.TrainConfig` it was trained with.
        history: one record per epoch: ``epoch``, mean ``loss`` (data term), mean ``prior`` (``penalty / N``) and
            whatever callbacks added.
        samples: the posterior samples of a sampling strategy (``None`` for MAP).
        swag: the SWAG collector of a SWAG run (its moments: ``swag.posterior()``).
        train_loader: the training data loader (BatchNorm statistics of each sample are recomputed on it).
        collate_fn: how examples become batches at prediction time (``None``: the default).
        stop_reason: why training ended: ``"loss"`` / ``"plateau"`` (the convergence rule) or ``"budget"``.
        steps: optimizer steps taken.
        predictive: a predictive built after training (``inference="laplace"``: a
            :class:`~ptyl.inference.LaplacePredictive`), which :meth:`predict` uses; ``None`` otherwise.
        converged: ``True`` when the convergence rule stopped the run, ``False`` when the budget ran out first
            (undertrained), ``None`` when no rule applied (no rule set, or a sampler).
    """

    model: nn.Module
    config: Any
    history: list[dict[str, float]] = field(default_factory=list)
    samples: SampleBank | None = None
    swag: SWAGCollector | None = None
    train_loader: DataLoader | None = None
    collate_fn: Callable | None = None
    stop_reason: str = "budget"
    steps: int = 0
    converged: bool | None = None
    predictive: Any = None

    @property
    def final_loss(self) -> float:
        """The mean training data loss (cross-entropy) of the last epoch (``nan`` without history)."""
        return float(self.history[-1]["loss"]) if self.history else float("nan")

    @property
    def undertrained(self) -> bool:
        """The convergence rule was set and the budget ran out before it was met."""
        return self.converged is False

    def predict(self, data: Dataset | Iterable, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Class probabilities ``[N, C]`` (``[N, C, H, W]`` for segmentation), float32 on the CPU.

        Args:
            data: a Dataset (read in order) or a loader that does not shuffle.
            batch_size: batch size for a Dataset.
            progress: a progress bar.

        Returns:
            BMA over the samples (BatchNorm statistics recomputed on the training data per sample) for sampling
            strategies, the Laplace predictive for ``laplace``, the single model's softmax otherwise.
        """
        extra = {"collate_fn": self.collate_fn} if self.collate_fn is not None else {}
        loader = DataLoader(data, batch_size=batch_size, shuffle=False, **extra) if isinstance(data, Dataset) else data
        if self.predictive is not None:
            return self.predictive.predict(loader, progress=progress)
        if self.samples is not None and len(self.samples) > 0:
            return bma_predict(self.model, self.samples, loader, bn_loader=self._bn_loader(), progress=progress)
        return predict_probs(self.model, loader)

    def _bn_loader(self) -> DataLoader | None:
        if self.train_loader is None:
            return None
        extra = {"collate_fn": self.collate_fn} if self.collate_fn is not None else {}
        return DataLoader(self.train_loader.dataset, batch_size=self.train_loader.batch_size, shuffle=False, **extra)
