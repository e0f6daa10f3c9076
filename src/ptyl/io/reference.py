"""Import priors saved by the public reference implementation of Shwartz-Ziv et al. (2022).

The reference code writes four files next to each other::

    <prefix>_mean.pt       flat [P] tensor: SWA mean of the backbone parameters, in ``model.parameters()`` order
    <prefix>_variance.pt   flat [P] tensor: diagonal variance sigma^2
    <prefix>_covmat.pt     [K, P] tensor: SWAG deviation rows (D^T)
    <prefix>_model.pt      the backbone's state_dict (parameters AND buffers, head removed)

Positions in the flat vectors are meaningless without the state dict, so we walk the state dict's parameters in order
(buffers such as BatchNorm running statistics are skipped) and cut the vectors into named tensors. Files are read with
``torch.load(weights_only=True)``: no arbitrary code from a downloaded pickle is run.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ptyl.errors import PriorFileError, PtylError
from ptyl.posterior.gaussian import SourcePosterior

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def _load(path: Path) -> object:
    if not path.is_file():
        raise PriorFileError(f"reference prior file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        raise PriorFileError(f"{path}: cannot be read with torch.load(weights_only=True): {err}") from err


def import_reference(prefix: str | Path, model: nn.Module | None = None, name_prefix: str = "") -> SourcePosterior:
    """Read ``<prefix>_{mean,variance,covmat,model}.pt`` into a name-keyed :class:`SourcePosterior`.

    Args:
        prefix: path prefix, e.g. ``priors/resnet50_ssl_prior``.
        model: optional backbone; if given, its ``named_parameters()`` (restricted to names in the saved state dict)
            define the order, which tells parameters from buffers exactly. Otherwise parameters are the state-dict
            entries that are not BatchNorm buffers.
        name_prefix: prepended to every name, e.g. ``"features."`` when the saved backbone is ``model.features``.
    """
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
    if model is not None:
        names = [n for n, _ in model.named_parameters() if n in state]
    else:
        names = [n for n in state if not n.endswith(_BUFFER_SUFFIXES)]
    shapes = {n: tuple(state[n].shape) for n in names}
    total = sum(int(torch.Size(s).numel()) for s in shapes.values())
    if not (mean.numel() == var.numel() == cov.shape[1] == total):
        raise PriorFileError(
            f"{prefix}: sizes disagree: mean {mean.numel()}, variance {var.numel()}, covmat {tuple(cov.shape)}, "
            f"parameters in the state dict {total}"
        )
    out: dict[str, dict[str, torch.Tensor]] = {"mean": {}, "variance": {}, "deviations": {}}
    offset = 0
    for n in names:
        size = int(torch.Size(shapes[n]).numel())
        sl = slice(offset, offset + size)
        out["mean"][n] = mean[sl].reshape(shapes[n]).float().clone()
        out["variance"][n] = var[sl].reshape(shapes[n]).float().clone()
        out["deviations"][n] = cov[:, sl].reshape(cov.shape[0], *shapes[n]).float().clone()
        offset += size
    if name_prefix:
        out = {k: {name_prefix + n: t for n, t in d.items()} for k, d in out.items()}
    meta = {"source": f"imported from reference files {Path(prefix).name}_*.pt", "num_snapshots": int(cov.shape[0])}
    try:
        return SourcePosterior(out["mean"], out["variance"], out["deviations"], meta)
    except PtylError as err:  # NaN/Inf or a non-positive variance: say which files
        raise type(err)(f"{prefix}_*.pt: {err}") from err
