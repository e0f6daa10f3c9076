"""SimCLR: a self-supervised source objective (Chen, Kornblith, Norouzi, Hinton, ICML 2020).

Paper: https://arxiv.org/abs/2002.05709. Two augmented views of each image are encoded,
``z = g(pool(f(x)))`` with ``f`` the classifier's conv trunk and ``g`` a small MLP projection head,
and the NT-Xent loss pulls paired views together. With ``u_k = z_k / ||z_k||`` for the 2B views
(view ``i`` and ``i + B`` come from the same image), ``s_ij = u_i . u_j / tau`` and ``pos(i)`` the
index of ``i``'s partner,

    loss = 1/(2B) sum_i -log( exp(s_{i,pos(i)}) / sum_{k != i} exp(s_ik) ).

:class:`SimCLRModel` reuses the classifier's ``features`` and ``pool`` modules under the *same
attribute names*, so a SWAG posterior collected while training it has parameter names
``features.*`` that match the downstream classifier by name; the ``projection.*`` parameters are
source-only and are excluded from the prior (:meth:`SimCLRModel.excluded_parameter_names`).

:class:`SimCLRObjective` has the same call signature as the supervised loss used by the source loop,
``loss = objective(model, batch)`` with ``batch = (x, y)`` (labels ignored).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError, InvalidValueError

__all__ = ["NTXentLoss", "ProjectionHead", "SimCLRModel", "SimCLRObjective", "nt_xent_loss"]


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy over 2B views; mean over all 2B anchors.

    Args:
        z1, z2: projections of the two views, ``[B, D]``; row ``i`` of ``z1`` and ``z2`` is a positive pair.
        temperature: ``tau > 0``.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise InvalidValueError(f"z1 and z2 must both be [B, D] with equal shapes, "
                                f"got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise InvalidValueError("nt_xent_loss needs at least one pair")
    if not temperature > 0:
        raise InvalidValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    logits = z @ z.T / temperature
    # an anchor is never its own negative: mask self-similarity out of the softmax denominator
    self_mask = torch.eye(2 * b, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`."""

    def __init__(self, temperature: float = 0.5) -> None:
        super().__init__()
        if not temperature > 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent_loss(z1, z2, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class ProjectionHead(nn.Sequential):
    """SimCLR's projection ``g(h) = W2 ReLU(W1 h)`` (the loss is computed on ``g(h)``, transfer uses ``h``)."""

    def __init__(self, in_dim: int, hidden_dim: int = 128, out_dim: int = 64) -> None:
        if min(in_dim, hidden_dim, out_dim) < 1:
            raise InvalidValueError(f"ProjectionHead sizes must be positive, got {in_dim}, {hidden_dim}, {out_dim}")
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SimCLRModel(nn.Module):
    """Classifier trunk + projection head: ``forward(x) = projection(pool(features(x)))``.

    The classifier's ``features`` and ``pool`` modules are *shared* (not copied): training this model
    trains the classifier's trunk, and parameter names ``features.*`` match the classifier's.

    Args:
        classifier: a ptyl classifier exposing ``features``, ``pool`` and ``feature_dim``.
    """

    projection_prefix = "projection."

    def __init__(self, classifier: nn.Module, hidden_dim: int = 128, out_dim: int = 64) -> None:
        super().__init__()
        missing = [a for a in ("features", "pool", "feature_dim") if not hasattr(classifier, a)]
        if missing:
            raise ConfigError(
                f"SimCLRModel needs a classifier with attributes features, pool and feature_dim; "
                f"{type(classifier).__name__} lacks {', '.join(missing)}"
            )
        self.features = classifier.features
        self.pool = classifier.pool
        self.feature_dim = int(classifier.feature_dim)
        self.projection = ProjectionHead(self.feature_dim, hidden_dim, out_dim)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """The transferable representation ``h = pool(features(x))``, ``[B, feature_dim]``."""
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.representation(x))

    def excluded_parameter_names(self) -> list[str]:
        """Names of the source-only projection parameters, to leave out of the prior."""
        return [n for n, _ in self.named_parameters() if n.startswith(self.projection_prefix)]

    def prior_parameter_names(self) -> list[str]:
        """Names of the parameters shared with the downstream classifier (everything but the projection)."""
        return [n for n, _ in self.named_parameters() if not n.startswith(self.projection_prefix)]


class SimCLRObjective:
    """SimCLR source loss with the supervised loss's signature: ``loss = objective(model, batch)``.

    Each call draws two augmented views of ``batch[0]`` (labels are ignored) from its own generator,
    so a run is reproducible from ``seed``; ``state_dict()`` saves the generator state for resuming.

    Args:
        augment: view generator ``(x, generator) -> x_aug`` (e.g. :class:`ptyl.data.augment.SimCLRAugment`).
        temperature: NT-Xent temperature ``tau``.
        seed: seed of the augmentation generator (a CPU generator; views are moved to the model's device).
    """

    name = "simclr"  # recorded as the prior file's "objective"

    def __init__(self, augment: Any, temperature: float = 0.5, seed: int = 0) -> None:
        if not callable(augment):
            raise ConfigError(f"augment must be callable (x, generator) -> x_aug, got {type(augment).__name__}")
        if not temperature > 0:
            raise InvalidValueError(f"temperature must be > 0, got {temperature}")
        self.augment = augment
        self.temperature = float(temperature)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise InvalidValueError("SimCLRObjective expects a batch (x, y) with x an image tensor [B, C, H, W]")
        if x.shape[0] < 2:
            raise InvalidValueError(f"SimCLR needs at least 2 images per batch (negatives), got {x.shape[0]}")
        param = next(model.parameters(), None)
        if param is not None:
            x = x.to(param.device)
        view1 = self.augment(x, self.generator)
        view2 = self.augment(x, self.generator)
        z = model(torch.cat([view1, view2], dim=0))  # one forward pass: BN sees both views together
        z1, z2 = z.chunk(2, dim=0)
        return nt_xent_loss(z1, z2, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "seed": self.seed, "generator_state": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator_state"])

    def __repr__(self) -> str:
        return f"SimCLRObjective(augment={self.augment!r}, temperature={self.temperature}, seed={self.seed})"
