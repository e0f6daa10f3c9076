"""What an automatic strategy selected: the prior at the selected values (the off limit without a backbone prior
term, as the grid's off-limit trial) and its strength diagnostics, as every grid trial reports them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import nn

from ptyl.autotune.share import prior_share
from ptyl.priors.registry import PriorKind
from ptyl.priors.strength import prior_strength
from ptyl.tuning.trials import BACKBONE_KEYS, is_off_limit

if TYPE_CHECKING:
    from ptyl.tuning.automatic import AutomaticRun

__all__ = ["selected_prior", "selection_diagnostic"]


def selected_prior(spec, model: nn.Module, values: Mapping[str, Any]):
    """The prior of ``spec`` at selected ``values`` for a fresh ``model``; the off limit (the strength axis at
    ``inf``) is the head prior alone, as the grid's off-limit trial (no backbone prior term).

    Args:
        spec: the :class:`~ptyl.tuning.PriorSpec`.
        model: the freshly built model (before training: L2-SP centres on it).
        values: :func:`ptyl.priors.make_prior` keyword arguments (``TuneResult.best`` without training axes).

    Returns:
        The :class:`~ptyl.priors.CompositePrior`.
    """
    if is_off_limit(values):
        spec = replace(spec, kind=PriorKind.NONE)
        values = {k: v for k, v in values.items() if k not in BACKBONE_KEYS}
    return spec.build_prior(model, **values)


def selection_diagnostic(run: AutomaticRun, model: nn.Module) -> dict[str, Any]:
    """The strength diagnostics of the selected prior, as every grid trial has them: the N-aware curvature share
    (:func:`ptyl.autotune.prior_share` at the selected, trained ``model`` on the training set: ``prior_share``,
    ``prior_share_total``, ``prior_share_blocks``, ``prior_off``) and the std ratio against the starting weights
    (:func:`ptyl.priors.prior_strength`, descriptive). The one place an automatic result's diagnostic is computed.

    Args:
        run: the :class:`AutomaticRun` (its selected prior: :meth:`AutomaticRun.prior`).
        model: the selected model.

    Returns:
        The diagnostic fields of the result's last row.
    """
    chosen = run.prior()
    share = prior_share(chosen, model, run.train_set, likelihood=run.likelihood, collate_fn=run.collate_fn)
    return {"std_ratio": prior_strength(chosen, run.start_weights).std_ratio, "prior_share": share.share,
            "prior_share_total": share.total, "prior_share_blocks": share.blocks, "prior_off": share.off,
            "off_limit": run.off}
