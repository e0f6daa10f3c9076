"""The implicit hypergradient of a validation loss with respect to the prior's log hyper-parameters.

Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit differentiation", AISTATS 2020,
https://arxiv.org/abs/1911.02590; the one-step form: Luketina, Berglund, Greff & Raiko, "Scalable gradient-based
tuning of continuous regularization hyperparameters", ICML 2016, https://arxiv.org/abs/1511.06727 (T1-T2).

Training minimises ``U(theta, h) = L_train(theta) + R(theta, h) / N`` with ``R = -log p(theta | h)``, whose gradient
is ``grad_theta R = Sigma(h)^-1 (theta - mu)``. At the optimum theta*(h) the implicit function theorem gives

    d L_val(theta*(h)) / dh = -grad L_val^T H^-1 d_h grad_theta U,      H = grad^2_theta U.

With the curvature G of the *summed* training NLL (K-FAC or the diagonal GGN, :mod:`ptyl.autotune.curvature`; the
exact Hessian through Hessian-vector products for small checks), ``H ~= (G + Sigma(h)^-1) / N`` and
``d_h grad_theta U = d_h [Sigma(h)^-1 (theta - mu)] / N``, so the N's cancel:

    d L_val / dh = -d_h [ w^T Sigma(h)^-1 (theta - mu) ],     (G + Sigma(h)^-1 + delta I) w = grad L_val,

with w held fixed while differentiating. The mixed derivative is closed form for the Gaussian families: ``w^T
Sigma(h)^-1 r`` is the family's Woodbury expression (:func:`precision_matvec`: ``Woodbury.solve`` per leaf),
differentiated in h by autograd; e.g. for ``Sigma = lam Sigma_0 + eps I``,
``d/d log lam = w^T Sigma^-1 (lam Sigma_0) Sigma^-1 r`` and ``d/d log eps = eps w^T Sigma^-2 r``.
The linear system is solved matrix-free (K-FAC: ``B X A`` per layer; the prior: Woodbury) by Jacobi-preconditioned
conjugate gradients or a truncated Neumann series. The one-step form replaces ``H^-1`` by the optimizer's step
(``w = step_size * grad L_val``: the change of the validation loss over one training step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ptyl.autotune.blocks import DiagBlock, KronBlock
from ptyl.autotune.curvature import Curvature
from ptyl.autotune.data import checked_batches
from ptyl.autotune.families import Family
from ptyl.errors import ConfigError
from ptyl.params import named_parameters, normalize_name

SOLVERS = ("cg", "neumann", "one-step")


class CurvatureOperator:
    """x -> G x and diag(G) for flat vectors over ``names`` (the block-diagonal curvature of
    :func:`~ptyl.autotune.compute_curvature`; names it does not cover have zero curvature)."""

    def __init__(self, curvature: Curvature, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        self.names, self.sizes = list(names), [math.prod(s) for s in shapes]
        self.blocks = [b for b in (block.restrict(self.names) for block in curvature.blocks) if b is not None]

    def _pieces(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, x.split(self.sizes), strict=False))

    def _flat(self, pieces: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        return torch.cat([pieces[n] if n in pieces else torch.zeros(k, dtype=like.dtype, device=like.device)
                          for n, k in zip(self.names, self.sizes, strict=False)])

    @staticmethod
    def _scatter(block: KronBlock, matrix: torch.Tensor) -> dict[str, torch.Tensor]:
        """The block matrix ``[out, in']`` back to its names' flat pieces (inverse of ``gather``)."""
        if not block.has_bias:
            return {block.names[0]: matrix.reshape(-1)}
        return {block.names[0]: matrix[:, :-1].reshape(-1), block.names[1]: matrix[:, -1]}

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        """G x."""
        pieces, out = self._pieces(x), {}
        for block in self.blocks:
            if isinstance(block, KronBlock):
                y = block.b.to(x.dtype) @ block.gather(pieces) @ block.a.to(x.dtype)
                out.update(self._scatter(block, y))
            else:
                g = block.gather(pieces)
                y = block.h.to(x.dtype) * g if isinstance(block, DiagBlock) else block.h.to(x.dtype) @ g
                out.update(dict(zip(block.names, y.split([math.prod(s) for s in block.shapes]), strict=False)))
        return self._flat(out, x)

    def diagonal(self, like: torch.Tensor) -> torch.Tensor:
        """diag(G) (K-FAC: ``diag B (x) diag A``)."""
        out = {}
        for block in self.blocks:
            if isinstance(block, KronBlock):
                out.update(self._scatter(block, torch.outer(block.b.diagonal(), block.a.diagonal()).to(like.dtype)))
            else:
                d = block.h if isinstance(block, DiagBlock) else block.h.diagonal()
                sizes = [math.prod(s) for s in block.shapes]
                out.update(dict(zip(block.names, d.to(like.dtype).split(sizes), strict=True)))
        return self._flat(out, like)


class HessianOperator:
    """x -> (sum_n Hessian of the training NLL) x by double back-propagation over ``data`` (exact; a pass over the
    data per product: for checks on small problems), over the parameters ``names`` of ``model`` (eval mode)."""

    def __init__(self, model: nn.Module, data: Iterable, loss: Callable, names: Sequence[str]) -> None:
        raw = {normalize_name(n): p for n, p in model.named_parameters()}
        self.model, self.data, self.loss = model, data, loss
        self.params = [raw[n] for n in names]

    def matvec(self, x: torch.Tensor) -> torch.Tensor:
        pieces = [t.reshape(p.shape).to(p.dtype) for t, p in zip(x.split([p.numel() for p in self.params]),
                                                                   self.params, strict=False)]
        total = torch.zeros_like(x)
        device = self.params[0].device
        for batch in checked_batches(self.data, device):
            with torch.enable_grad():
                value = self.loss(self.model, batch) * len(batch[1])  # summed over the batch's examples
                grads = torch.autograd.grad(value, self.params, create_graph=True)
                dot = sum((g * v).sum() for g, v in zip(grads, pieces, strict=False))
                hv = torch.autograd.grad(dot, self.params)
            total += torch.cat([h.reshape(-1) for h in hv]).to(x.dtype)
        return total

    def diagonal(self, like: torch.Tensor) -> None:
        return None  # no cheap diagonal: unpreconditioned CG


@dataclass
class SolveInfo:
    """How the linear solve went: iterations taken and the final relative residual ``|b - A w| / |b|``."""

    iterations: int
    residual: float


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, diagonal: torch.Tensor,
                       steps: int, tol: float = 1e-10) -> tuple[torch.Tensor, SolveInfo]:
    """Jacobi-preconditioned conjugate gradients for ``A w = b`` (A symmetric positive definite), from w = 0.

    Args:
        matvec: x -> A x.
        b: the right-hand side.
        diagonal: diag(A) (the preconditioner; positive).
        steps: at most this many iterations.
        tol: stop once ``|r| <= tol |b|``.

    Returns:
        ``(w, SolveInfo)``.
    """
    w = torch.zeros_like(b)
    r = b.clone()
    inverse = 1.0 / diagonal
    z = inverse * r
    p = z.clone()
    rz = torch.dot(r, z)
    norm_b = float(b.norm()) or 1.0
    done = 0
    for done in range(1, steps + 1):  # noqa: B007 - the count of steps taken is read after the loop
        ap = matvec(p)
        alpha = rz / torch.dot(p, ap)
        w += alpha * p
        r -= alpha * ap
        if float(r.norm()) <= tol * norm_b:
            break
        z = inverse * r
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
    return w, SolveInfo(done, float(r.norm()) / norm_b)


def neumann(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, steps: int,
            power_steps: int = 20) -> tuple[torch.Tensor, SolveInfo]:
    """``A^-1 b ~= alpha sum_{j <= steps} (I - alpha A)^j b`` with ``alpha = 1 / lambda_max(A)`` (power iteration;
    converges for any SPD A, slowly when A is ill-conditioned).

    Returns:
        ``(w, SolveInfo)``.
    """
    v = b / (b.norm() + 1e-300)
    top = 1.0
    for _ in range(power_steps):
        u = matvec(v)
        top = float(u.norm())
        v = u / (top + 1e-300)
    alpha = 1.0 / (1.05 * top)
    term, w = alpha * b, alpha * b
    for _ in range(steps):
        term = term - alpha * matvec(term)
        w = w + term
    residual = float((b - matvec(w)).norm()) / (float(b.norm()) or 1.0)
    return w, SolveInfo(steps, residual)


def precision_matvec(family: Family, x: torch.Tensor) -> torch.Tensor:
    """Sigma(h)^-1 x for a flat vector x over ``family.names`` (block diagonal over the leaves; differentiable in
    the hyper-parameters)."""
    leaves = family.leaves()
    parts = x.split([leaf.num_parameters for leaf in leaves])
    return torch.cat([leaf.woodbury().solve(part.to(leaf.dtype)) for leaf, part in zip(leaves, parts, strict=False)])


def precision_diagonal(family: Family) -> torch.Tensor:
    """diag(Sigma(h)^-1), flat over ``family.names``."""
    return torch.cat([leaf.woodbury().precision_diagonal().expand(leaf.num_parameters) for leaf in family.leaves()])


def prior_gradient(family: Family, params) -> torch.Tensor:
    """grad_theta -log p(theta | h) = Sigma(h)^-1 (theta - mu), flat over ``family.names`` (differentiable in h, not
    in theta)."""
    named = named_parameters(params)
    return torch.cat([leaf.woodbury().solve(leaf.residual(leaf.flatten(named).detach()))
                      for leaf in family.leaves()])


def validation_gradient(model: nn.Module, data: Iterable, loss: Callable, names: Sequence[str]
                        ) -> tuple[torch.Tensor, float, int]:
    """grad_theta of the mean validation loss over ``data`` (evaluation mode), flat over ``names`` in float64; also
    the mean loss and the number of examples. ``loss(model, batch)`` is a batch mean (the training objective)."""
    raw = {normalize_name(n): p for n, p in model.named_parameters()}
    missing = [n for n in names if n not in raw]
    if missing:
        raise ConfigError(f"the model has no parameter(s) {missing[:5]}")
    params = [raw[n] for n in names]
    was_training = model.training
    model.eval()
    try:
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64, device=params[0].device)
        value, count = 0.0, 0
        for batch in checked_batches(data, params[0].device):
            size = len(batch[1])
            with torch.enable_grad():
                batch_loss = loss(model, batch) * size
                grads = torch.autograd.grad(batch_loss, params, allow_unused=True)
            total += torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                for g, p in zip(grads, params, strict=False)])
            value += float(batch_loss.detach())
            count += size
    finally:
        model.train(was_training)
    return total / count, value / count, count


def solve_direction(operator, family: Family, val_grad: torch.Tensor, *, solver: str, steps: int,
                    damping: float = 0.0, step_size: float = 1.0) -> tuple[torch.Tensor, SolveInfo]:
    """w of the module docstring: ``(G + Sigma^-1 + delta I)^-1 grad L_val`` (``cg``, ``neumann``), or
    ``step_size * grad L_val`` (``one-step``). ``damping`` delta is relative to the mean of diag(G + Sigma^-1)."""
    if solver not in SOLVERS:
        raise ConfigError(f"unknown hypergradient solver {solver!r}; choose one of {SOLVERS}")
    if solver == "one-step":
        return step_size * val_grad, SolveInfo(0, math.nan)
    with torch.no_grad():
        precision = precision_diagonal(family).to(val_grad)
        curvature = operator.diagonal(val_grad)
        diagonal = precision + (curvature if curvature is not None else 0.0)
        delta = damping * float(diagonal.mean())

        def matvec(x: torch.Tensor) -> torch.Tensor:
            return operator.matvec(x) + precision_matvec(family, x).to(x) + delta * x

        if solver == "cg":
            jacobi = diagonal + delta if curvature is not None else torch.ones_like(val_grad)
            return conjugate_gradient(matvec, val_grad, jacobi, steps)
        return neumann(matvec, val_grad, steps)


def hypergradient(family: Family, params, direction: torch.Tensor) -> list[torch.Tensor]:
    """``-d_h [w^T Sigma(h)^-1 (theta - mu)]`` for every learnable log hyper-parameter of ``family`` (its
    ``parameters()`` order), w = ``direction`` held fixed.

    Args:
        family: the prior family (its ``nn.Parameter`` s are the log hyper-parameters).
        params: the model or name -> tensor (the current weights theta).
        direction: w, flat over ``family.names``.

    Returns:
        One 0-dim tensor per hyper-parameter.
    """
    hypers = list(family.parameters())
    value = torch.dot(direction.to(family.leaves()[0].dtype), prior_gradient(family, params))
    grads = torch.autograd.grad(value, hypers, allow_unused=True)
    return [-(g if g is not None else torch.zeros_like(h)) for g, h in zip(grads, hypers, strict=False)]


__all__ = ["SOLVERS", "CurvatureOperator", "HessianOperator", "SolveInfo", "conjugate_gradient", "hypergradient",
           "neumann", "precision_diagonal", "precision_matvec", "prior_gradient", "solve_direction",
           "validation_gradient"]
