"""The kind selection of ``ptyl finetune --tune``: which kinds are compared, the shared prior fields, the report."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import Any

from ptyl.cli._common import UsageError, info
from ptyl.io import load_posterior
from ptyl.priors import PriorKind


def default_kinds(learned: bool) -> list[str]:
    """The kinds ``--tune`` compares by default: the learned ones with a prior file, and the baselines (the off limit,
    plain fine-tuning, is a point of every kind's search)."""
    return [str(k) for k in PriorKind if k.recipe.axis is not None and (learned or not k.recipe.needs_posterior)
            and k is not PriorKind.BLOCK]


def kinds_spec(args: argparse.Namespace, spec, kinds):
    """The shared fields of a kind selection: the posterior is loaded when a learned kind is compared."""
    learned = [str(k) for k in kinds if k.recipe.needs_posterior]
    if learned and not args.prior:
        raise UsageError(f"--kinds {' '.join(learned)}: learned priors need --prior (a file from 'ptyl learn-prior'); "
                         f"without one compare {' '.join(default_kinds(False))}")
    posterior = spec.posterior if spec.posterior is not None or not learned else load_posterior(args.prior)
    return replace(spec, posterior=posterior)


def report_kinds(args: argparse.Namespace, tuned) -> None:
    """One line per compared kind (validation NLL, its choice, the N-aware share), then the winner."""
    for kind, part in tuned.kinds.items():
        row = part.selected
        share = row.get("prior_share")
        info(args, f"  {kind:<9s} val NLL {row.get('val_nll', math.nan):.4f} at {show_values(part.best)}"
                   + (f", prior share {share:.2g}{' (off)' if row.get('prior_off') else ''}" if share is not None
                      else ""))
    won = "none: plain fine-tuning (the prior off)" if tuned.kind == PriorKind.NONE else tuned.kind
    info(args, f"selected on the validation pool: {won}")


def show_values(selected: dict[str, Any]) -> str:
    """``scale=1.2e+03, head_variance=0.4`` (per-block scales in braces)."""
    def show(v: Any) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {show(x)}" for k, x in v.items()) + "}"
        if v == math.inf:
            return "off"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return ", ".join(f"{k}={show(v)}" for k, v in selected.items())
