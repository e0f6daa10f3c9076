"""Import priors saved by the public reference implementation of Shwartz-Ziv et al. (2022),
https://github.com/hsouri/BayesianTransferLearning.

The reference's downstream code reads four files next to each other::

    <prefix>_mean.pt       flat [P] tensor: SWA mean of the backbone parameters, in ``backbone.parameters()`` order
    <prefix>_variance.pt   flat [P] tensor: diagonal variance sigma^2 (clamped at 1e-6)
    <prefix>_covmat.pt     [K, P] tensor: the low-rank rows
    <prefix>_model.pt      the backbone's state_dict (parameters AND buffers, head removed)

Positions in the flat vectors are meaningless without the state dict, so we walk the state dict's parameters in order
and cut the vectors into named tensors. Files are read with ``torch.load(weights_only=True)``: no arbitrary code from
a downloaded pickle is run.

**Which rows** (``covmat=``). No code in the reference repository writes the four files, so what ``_covmat.pt``
holds is read from the code that makes and uses them:

- ``"scaled"`` (the default): the rows are SWAG's deviations already divided by sqrt(K - 1). The reference's SWAG
  exports mean, variance and low-rank factor together through one method, ``SWAG.get_space()``, whose factor is
  the covariance subspace's ``get_space()``: the K deviation rows divided by sqrt(K - 1) (``priorBox/swag/
  subspaces.py``). Its downstream loss then uses the rows as they are, as the factor of
  ``LowRankMultivariateNormal(mean, covmat.T, variance)`` (``priorBox/sghmc/losses.py``, loaded by
  ``load_prior`` in ``priorBox/sghmc/utils.py``), which is SWAG's ``D D^T / (K - 1)`` only if they are scaled.
  ptyl stores raw deviations and divides by (k - 1) itself, so the rows are multiplied by sqrt(K - 1) here.
- ``"deviations"``: the rows are raw deviations ``theta_i - mean`` (how ptyl's own files store them, and how some
  re-implementations read the released files). Read as ``"scaled"``, such rows give a low-rank part K - 1 times
  too large; scaled rows read as deviations give one 1/(K - 1) of the reference's (1/11 with 12 rows).

A :class:`UserWarning` says when the rows' scale suggests the other reading. The ratio of the rows' mean squared
norm to the total variance ``sum(sigma^2)`` is of order 1 for raw deviations (the variance is the snapshots' mean
square deviation; measured 1.4 - 2.5 on SGD trajectories still drifting, whose late rows sit off the running mean)
and 1/(K - 1) of that for scaled rows. Allowing raw ratios anywhere in [1/2, 4], rows with a ratio >= 1/2 look
raw and rows with a ratio <= 4/(K - 1) look scaled; the two ranges are apart for K >= 10 rows, and with fewer rows
nothing is said (for K = 2 the readings are the same matrix).

**What differs downstream.** The reference's loss has a prior term over the backbone only: the new head has no
prior (its optimizers' ``weight_decay`` defaults to 0). ptyl's :func:`ptyl.priors.make_prior` gives the head
N(0, head_variance I), default 1: pass ``head_variance=None`` to leave the head unregularised as the reference does.
ptyl's low-rank prior is ``lam * 1/2 (diag sigma^2 + D_k D_k^T / (k - 1)) + eps I`` (SWAG's covariance, Maddox et
al. 2019); the reference's is ``prior_scale * sigma^2 + prior_eps`` plus the first k rows' ``R_k^T R_k`` (times
``prior_scale^2`` with ``scale_low_rank``): with all K rows and ``scale=2`` the two agree exactly (tested); a
different split between the diagonal and the low-rank part is absorbed by tuning the strength.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn

from ptyl.errors import PriorFileError, PtylError
from ptyl.posterior.gaussian import SourcePosterior
from ptyl.validation import check_choice

__all__ = ["COVMAT_READINGS", "import_reference"]

COVMAT_READINGS = ("scaled", "deviations")  # what the rows of <prefix>_covmat.pt are (the module docstring)
# buffers a state dict holds next to the parameters, by the last part of their name (BatchNorm, Swin / ViT
# attention, Hugging Face position ids, rotary embeddings)
_BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked", "relative_position_index", "attn_mask",
                 "position_ids", "token_type_ids", "inv_freq")
_RAW_RATIOS = (0.5, 4.0)  # mean squared row norm / total variance of raw deviations (the module docstring)


def _load(path: Path) -> object:
    if not path.is_file():
        raise PriorFileError(f"reference prior file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise PriorFileError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from err


def _is_buffer(name: str, tensor: torch.Tensor) -> bool:
    """A state-dict entry that cannot be a trainable parameter: an integer tensor, or a known buffer name."""
    return not tensor.is_floating_point() or name.rsplit(".", 1)[-1] in _BUFFER_NAMES


def _parameter_names(prefix: str, state: dict[str, torch.Tensor], model: nn.Module | None, size: int) -> list[str]:
    """The state dict's parameters in order: ``model``'s named parameters, else every entry but the buffers."""
    if model is not None:
        names = [n for n, _ in model.named_parameters() if n in state]
    else:
        names = [n for n, t in state.items() if not _is_buffer(n, t)]
    total = sum(state[n].numel() for n in names)
    if total != size and model is None:
        unsure = [n for n in names if n.rsplit(".", 1)[-1] not in ("weight", "bias")]
        hint = f" (entries that may be buffers: {unsure[:6]})" if unsure else ""
        raise PriorFileError(f"{prefix}_model.pt: its {len(names)} tensors taken for parameters hold {total} values, "
                             f"the mean {size}: the state dict holds buffers ptyl cannot tell from parameters by "
                             f"name{hint}; pass model= (the backbone) so that its named_parameters() decide")
    if total != size:
        raise PriorFileError(f"{prefix}: sizes disagree: the mean holds {size} values, the model's parameters in "
                             f"{prefix}_model.pt {total}")
    return names


def _row_scale(cov: torch.Tensor, var: torch.Tensor) -> float:
    """Mean squared row norm / total variance, over the coordinates whose variance is above its clamp floor
    (about 1 for raw deviations, 1/(K - 1) for scaled rows)."""
    var = var.double()
    keep = var > 1.5 * var.min()
    if not bool(keep.any()):
        keep = torch.ones_like(var, dtype=torch.bool)
    rows = cov.double()[:, keep]
    return float(rows.square().sum(dim=1).mean() / var[keep].sum())


def _check_reading(prefix: str, cov: torch.Tensor, var: torch.Tensor, covmat: str) -> None:
    """Warn when the rows' scale suggests the other reading (K >= 10: see the module docstring)."""
    k = cov.shape[0]
    low, high = _RAW_RATIOS
    if (k - 1) * low <= high:  # too few rows: the two readings' ranges overlap
        return
    ratio = _row_scale(cov, var)
    looks = "deviations" if ratio >= low else "scaled" if ratio <= high / (k - 1) else covmat
    if looks == covmat:
        return
    what = {"deviations": "raw deviations (theta_i - mean)", "scaled": "deviations divided by sqrt(K - 1)"}[looks]
    warnings.warn(f"{prefix}_covmat.pt: its rows look like {what}, not covmat={covmat!r}: their mean squared norm is "
                  f"{ratio:.3g} x the total variance (raw deviations give 1/2 to 4, scaled rows 1/(K - 1) = "
                  f"{1 / (k - 1):.3g} of that); pass covmat={looks!r} if they are", UserWarning, stacklevel=3)


def import_reference(prefix: str | Path, model: nn.Module | None = None, name_prefix: str = "",
                     covmat: str = "scaled") -> SourcePosterior:
    """Read ``<prefix>_{mean,variance,covmat,model}.pt`` into a name-keyed :class:`SourcePosterior`.

    Args:
        prefix: path prefix, e.g. ``priors/resnet50_ssl_prior``.
        model: optional backbone; if given, its ``named_parameters()`` (restricted to names in the saved state dict)
            define the order, which tells parameters from buffers exactly. Otherwise parameters are the state-dict
            entries that are not buffers (integer tensors; BatchNorm statistics, ``relative_position_index``,
            ``attn_mask``, ``position_ids``... by name); where that does not add up, the error asks for ``model=``.
        name_prefix: prepended to every name, e.g. ``"features."`` when the saved backbone is ``model.features``.
        covmat: what the rows of ``_covmat.pt`` are: ``"scaled"`` (default: divided by sqrt(K - 1), as the
            reference's ``SWAG.get_space()`` returns them) or ``"deviations"`` (raw); see the module docstring for the
            evidence. A warning says when their scale suggests the other reading.

    Returns:
        The posterior (raw deviations, as ptyl stores them; metadata ``covmat`` records the reading). The reference
        puts no prior on the new head: build the prior with ``make_prior(..., head_variance=None)`` to match it.

    Raises:
        PriorFileError: a missing, unreadable or malformed file, or sizes that disagree (naming the files).
    """
    check_choice(covmat, COVMAT_READINGS, "covmat")
    prefix = str(prefix)
    mean = _load(Path(prefix + "_mean.pt"))
    var = _load(Path(prefix + "_variance.pt"))
    cov = _load(Path(prefix + "_covmat.pt"))
    state = _load(Path(prefix + "_model.pt"))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PriorFileError(f"{prefix}_model.pt is not a state dict of tensors")
    for name, t in (("mean", mean), ("variance", var)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise PriorFileError(f"{prefix}_{name}.pt must hold a flat 1-D floating-point tensor")
    if not isinstance(cov, torch.Tensor) or cov.dim() != 2 or not cov.is_floating_point():
        raise PriorFileError(f"{prefix}_covmat.pt must hold a [K, P] floating-point tensor")
    if not (mean.numel() == var.numel() == cov.shape[1]):
        raise PriorFileError(f"{prefix}: sizes disagree: mean {mean.numel()}, variance {var.numel()}, covmat "
                             f"{tuple(cov.shape)}")
    names = _parameter_names(prefix, state, model, mean.numel())
    _check_reading(prefix, cov, var, covmat)
    k = cov.shape[0]
    rows = cov.double() * math.sqrt(max(k - 1, 1)) if covmat == "scaled" else cov
    out: dict[str, dict[str, torch.Tensor]] = {"mean": {}, "variance": {}, "deviations": {}}
    offset = 0
    for n in names:
        shape, size = tuple(state[n].shape), state[n].numel()
        sl = slice(offset, offset + size)
        out["mean"][name_prefix + n] = mean[sl].reshape(shape).float().clone()
        out["variance"][name_prefix + n] = var[sl].reshape(shape).float().clone()
        out["deviations"][name_prefix + n] = rows[:, sl].reshape(k, *shape).float().clone()
        offset += size
    meta = {"source": f"imported from reference files {Path(prefix).name}_*.pt", "num_snapshots": int(k),
            "covmat": covmat}
    try:
        return SourcePosterior(out["mean"], out["variance"], out["deviations"], meta)
    except PtylError as err:  # NaN/Inf or a non-positive variance: say which files
        raise type(err)(f"{prefix}_*.pt: {err}") from err
