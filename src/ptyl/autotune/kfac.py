"""K-FAC factors of the GGN for ``nn.Linear`` and ``nn.Conv2d`` layers, from forward inputs and output gradients.

For a layer ``s = W a`` (bias: a constant 1 appended to ``a``) evaluated at locations t (one for a plain linear
layer; the output pixels of a convolution, with ``a_nt`` the unfolded input patch; the positions of a sequence), the
GGN block is ``sum_n sum_{t,t'} (L_n^T J_nt)^T (L_n^T J_nt') (x) a_nt a_nt'^T``. K-FAC ("expand" setting, Martens &
Grosse 2015, https://arxiv.org/abs/1503.05671; Grosse & Martens 2016, https://arxiv.org/abs/1602.01407; Eschenhagen
et al. 2023, https://arxiv.org/abs/2311.00636) keeps t = t' and factorises the sum over examples:

    G ~= B (x) A,   A = 1/(N T) sum_{n,t} a_nt a_nt^T,   B = sum_{n,t} sum_c g_ntc g_ntc^T

where ``g_ntc = d <f_n, L_n[:, c]> / d s_nt`` is the output gradient for column c of the likelihood's Hessian square
root (``fisher="exact"``, one backward pass per column) or for a sampled target (``fisher="mc"``).
Exact when: one example (N = 1) with one location; or a single linear layer with a Gaussian likelihood (B_n is the
same for every n); or, in the expand setting, a single convolution with a per-location Gaussian likelihood.

The forward hooks keep each layer's input and output; ``torch.autograd.grad`` w.r.t. the outputs gives the g's.
The same pass gives the *exact diagonal* of these layers' GGN blocks (``structure="diag"``): the per-example
gradient for column c is ``sum_t g_ntc a_nt^T``, so ``diag G = sum_{n,c} (sum_t g_ntc a_nt^T)^2`` elementwise
(for one location: ``sum_n (sum_c g_nc^2) (a_n^2)^T``, one matrix product) — C backward passes per batch instead of
one per example and class. Normalisation layers (BatchNorm in eval mode, LayerNorm) get their exact diagonal from
the same pass (:mod:`ptyl.autotune.affine`), in either structure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ptyl.autotune.affine import affine_grads, supported_affine
from ptyl.autotune.blocks import DiagBlock, KronBlock
from ptyl.autotune.data import checked_batches, model_outputs, num_examples
from ptyl.autotune.likelihoods import Likelihood
from ptyl.errors import ConfigError
from ptyl.params import normalize_name


def supported(module: nn.Module) -> bool:
    """Layers with a Kronecker block: Linear, and Conv2d without groups and with zero padding."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def plan_layers(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[nn.Module, tuple[str, ...]]]:
    """module name -> (module, its parameter names in the block) for every Linear / Conv2d layer whose weight is in
    ``names`` (a layer whose weight is held fixed but whose bias is not leaves the bias to the diagonal GGN), and
    every normalisation layer with a parameter in ``names``."""
    wanted, plan = set(names), {}
    for mod_name, module in model.named_modules():
        prefix = normalize_name(f"{mod_name}.") if mod_name else ""
        w, b = prefix + "weight", prefix + "bias"
        trainable = lambda p: p is not None and p.requires_grad  # noqa: E731
        if supported_affine(module):
            kept = tuple(n for n, p in ((w, module.weight), (b, module.bias)) if n in wanted and trainable(p))
            if kept:
                plan[mod_name] = (module, kept)
            continue
        if not supported(module) or w not in wanted or not trainable(module.weight):
            continue
        plan[mod_name] = (module, (w, b) if b in wanted and trainable(module.bias) else (w,))
    return plan


def _inputs(module: nn.Module, x: torch.Tensor, has_bias: bool) -> torch.Tensor:
    """The layer's inputs a_nt as [N, T, in'] (the model's dtype: the factor products run in it and are summed in
    float64; bias column of ones appended)."""
    if isinstance(module, nn.Conv2d):
        a = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if has_bias else a


def _grads(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    """Output gradients g_nt as [N, T, out] (the model's dtype)."""
    if isinstance(module, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


_BUDGET = 2**24  # per-example gradient entries held at once for the diagonal of a weight-shared layer


def _diag_update(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """sum_n (sum_t g_nt a_nt^T)^2 over one column's gradients: [out, in']."""
    g, a = g.to(a.dtype), a
    if g.shape[1] == 1:
        return (g[:, 0].pow(2).T @ a[:, 0].pow(2)).double()
    chunk = max(1, _BUDGET // (g.shape[2] * a.shape[2]))
    return sum(torch.einsum("nto,nti->noi", g[i:i + chunk], a[i:i + chunk]).pow(2).sum(0).double()
               for i in range(0, g.shape[0], chunk))


class _Recorder:
    """Forward hooks keeping each planned layer's input and output of the current forward pass."""

    def __init__(self, plan):
        self.plan, self.inputs, self.outputs, self.handles = plan, {}, {}, []
        for name, (module, _) in plan.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.outputs:
                raise ConfigError(f"layer {name!r} runs more than once per forward pass (shared weights): K-FAC does "
                                  "not support it; use curvature='diag'")
            self.inputs[name], self.outputs[name] = args[0].detach(), output
        return hook

    def clear(self):
        self.inputs, self.outputs = {}, {}

    def remove(self):
        for h in self.handles:
            h.remove()


def _columns(likelihood: Likelihood, out: torch.Tensor, fisher: str, mc_samples: int, generator):
    """The vectors v [B, O] to back-propagate: columns of L (exact) or sampled gradients / sqrt(m) (mc)."""
    if fisher == "exact":
        root = likelihood.hessian_sqrt(out)
        return [root[:, :, c] for c in range(root.shape[2])]
    return [likelihood.sample_gradient(out, generator) / math.sqrt(mc_samples) for _ in range(mc_samples)]


def _structures(plan, structure: str, max_factor: int | None) -> dict[str, str]:
    """Per layer: ``structure``, or ``"diag"`` for a layer whose Kronecker factor would exceed ``max_factor`` rows
    (its eigendecomposition, once per evidence update, would cost more than the training it serves)."""
    out = {}
    for name, (module, block_names) in plan.items():
        size = 0 if supported_affine(module) else max(module.weight.shape[0],
                                                      module.weight[0].numel() + int(len(block_names) == 2))
        out[name] = "diag" if structure == "kron" and max_factor is not None and size > max_factor else structure
    return out


def layer_blocks(model: nn.Module, data: Iterable, likelihood: Likelihood, names: Sequence[str], *, fisher: str,
                mc_samples: int, generator, structure: str = "kron",
                max_factor: int | None = None) -> tuple[list, list[str], float, int]:
    """K-FAC blocks (``structure="kron"``) or exact diagonal blocks (``"diag"``) for the supported layers among
    ``names`` (with ``max_factor``: the exact diagonal for layers with a Kronecker factor larger than that); returns
    (blocks, names left over, summed log-likelihood, number of examples)."""
    plan = plan_layers(model, names)
    structures = _structures(plan, structure, max_factor)
    covered = {n for _, block_names in plan.values() for n in block_names}
    rest = [n for n in names if n not in covered]
    stats = {name: {"a": 0.0, "b": 0.0, "diag": 0.0, "rows": 0} for name in plan}
    log_lik, count = torch.zeros((), dtype=torch.float64), 0
    device = next(model.parameters()).device
    recorder = _Recorder(plan)
    try:
        for x, y in checked_batches(data, device):
            recorder.clear()
            with torch.enable_grad():
                out = model_outputs(model, x)
            f = likelihood.outputs(out)
            log_lik += likelihood.log_prob(out.detach().double(), y).sum().cpu()
            count += num_examples(x)
            if plan:
                _accumulate(plan, recorder, f, out, likelihood, stats, structures, fisher, mc_samples, generator)
    finally:
        recorder.remove()
    return [_block(module, block_names, stats[name], structures[name], device)
            for name, (module, block_names) in plan.items()], rest, float(log_lik), count


def _accumulate(plan, recorder, f, out, likelihood, stats, structures, fisher, mc_samples, generator) -> None:
    layer_names = list(plan)
    affine = {n for n in layer_names if supported_affine(plan[n][0])}
    inputs = {n: recorder.inputs[n] if n in affine else _inputs(plan[n][0], recorder.inputs[n], len(plan[n][1]) == 2)
              for n in layer_names}
    outputs = [recorder.outputs[n] for n in layer_names]
    for v in _columns(likelihood, out, fisher, mc_samples, generator):
        grads = torch.autograd.grad(f, outputs, grad_outputs=v.to(f.dtype), retain_graph=True, allow_unused=True)
        for name, g in zip(layer_names, grads, strict=False):
            if g is None:
                continue
            if name in affine:
                per_example = affine_grads(plan[name][0], inputs[name], g)
                for key, value in per_example.items():
                    stats[name][key] = stats[name].get(key, 0.0) + value.pow(2).sum(0)
                continue
            g = _grads(plan[name][0], g)
            if structures[name] == "diag":
                stats[name]["diag"] = stats[name]["diag"] + _diag_update(g, inputs[name])
            else:
                g = g.reshape(-1, g.shape[-1])
                stats[name]["b"] = stats[name]["b"] + (g.T @ g).double()
    for name in (n for n in layer_names if n not in affine and structures[n] != "diag"):
        a = inputs[name].reshape(-1, inputs[name].shape[-1])
        stats[name]["a"] = stats[name]["a"] + (a.T @ a).double()
        stats[name]["rows"] += a.shape[0]


def _block(module: nn.Module, block_names, stat, structure: str, device):
    shapes = tuple(tuple(getattr(module, n.rsplit(".", 1)[-1]).shape) for n in block_names)
    if supported_affine(module):
        parts = [stat.get(n.rsplit(".", 1)[-1], 0.0) for n in block_names]
        flat = [p.reshape(-1) if torch.is_tensor(p) else torch.zeros(math.prod(s), dtype=torch.float64, device=device)
                for p, s in zip(parts, shapes, strict=False)]
        return DiagBlock(block_names, shapes, torch.cat(flat))
    out_dim, has_bias = module.weight.shape[0], len(block_names) == 2
    if structure == "diag":
        d = stat["diag"]
        if not torch.is_tensor(d):  # the layer never influenced the outputs
            d = torch.zeros(out_dim, module.weight[0].numel() + int(has_bias), dtype=torch.float64, device=device)
        flat = d[:, : d.shape[1] - int(has_bias)].reshape(-1)
        return DiagBlock(block_names, shapes, torch.cat([flat, d[:, -1]]) if has_bias else flat)
    b = stat["b"] if torch.is_tensor(stat["b"]) else torch.zeros(out_dim, out_dim, dtype=torch.float64,
                                                                 device=device)
    return KronBlock(block_names, shapes, has_bias, stat["a"] / stat["rows"], b)


__all__ = ["layer_blocks", "plan_layers", "supported"]
