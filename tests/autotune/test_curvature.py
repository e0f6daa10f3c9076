"""Curvature against the exact GGN (sum_n J_n^T Lambda_n J_n by torch.func.jacrev, float64).

K-FAC is exact in the known special cases and there it is tested to 1e-10; elsewhere it is an approximation and the
tests state its measured accuracy (relative Frobenius error ||G_kfac - G|| / ||G|| of each layer's block; median /
max over 20 random draws of weights and data, and the bound asserted):

=============================================  ==========================================================
case                                            K-FAC block vs exact GGN block
=============================================  ==========================================================
single nn.Linear, Gaussian likelihood, any N    exact (B_n = I / s2 is the same for every example)
MLP, categorical, one example                   exact, every layer
single Conv2d, Gaussian per output location     exact ("expand" setting: no cross-location terms)
CNN whose conv has one output location, N = 1   exact, every layer
any network: the bias-bias block of a Linear    exact (A's bias entry is 1)
MLP 4-6-3, categorical, 16 examples             first layer 34 % / 57 % (<= 60 %), last layer 9 % / 15 % (<= 20 %)
CNN conv-relu-linear, categorical, 16 examples  conv 77 % / 79 % (<= 85 %: cross-location terms dropped),
                                                linear 8 % / 12 % (<= 15 %)
=============================================  ==========================================================
"""

import math

import pytest
import torch
from torch import nn

from ptyl.autotune import Categorical, Gaussian, compute_curvature
from ptyl.autotune.blocks import KronBlock
from ptyl.errors import ConfigError, DataError
from tests.autotune.problems import F64, exact_ggn
from tests.helpers import TinyNet


def names_shapes(model):
    return [n for n, _ in model.named_parameters()], [tuple(p.shape) for p in model.parameters()]


def blockwise(model, x, y, likelihood, **kw):
    """(exact GGN, curvature as dense, list of (start, stop) of each block in names order)."""
    names, shapes = names_shapes(model)
    curv = compute_curvature(model, [(x, y)], likelihood, names, **kw)
    sizes = dict(zip(names, (math.prod(s) for s in shapes), strict=False))
    spans, start = [], 0
    for block in curv.blocks:
        stop = start + sum(sizes[n] for n in block.names)
        spans.append((start, stop))
        start = stop
    return exact_ggn(model, x, likelihood), curv.dense(names, shapes), spans, curv


def rel_error(exact, approx):
    return float((exact - approx).norm() / exact.norm())


def assert_blocks_exact(exact, dense, spans):
    for a, b in spans:
        torch.testing.assert_close(dense[a:b, a:b], exact[a:b, a:b], rtol=1e-10, atol=1e-12)


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_single_linear_gaussian_is_exact():
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(20, 4, dtype=F64), torch.randn(20, 3, dtype=F64)
    exact, dense, spans, curv = blockwise(model, x, y, Gaussian(0.5))
    assert isinstance(curv.blocks[0], KronBlock)
    assert_blocks_exact(exact, dense, spans)


def test_mlp_one_example_is_exact():
    exact, dense, spans, _ = blockwise(mlp(), torch.randn(1, 4, dtype=F64), torch.tensor([1]), Categorical())
    assert len(spans) == 2
    assert_blocks_exact(exact, dense, spans)


class PerLocationConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_single_conv_per_location_gaussian_is_exact():
    x = torch.randn(3, 2, 5, 5, dtype=F64)
    y = torch.randn(3, 3 * 3 * 3, dtype=F64)
    exact, dense, spans, _ = blockwise(PerLocationConv().double(), x, y, Gaussian(2.0))
    assert_blocks_exact(exact, dense, spans)


def small_cnn(size_out: int = 1):
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * size_out**2, 4)).double()


def test_cnn_with_one_location_and_one_example_is_exact():
    exact, dense, spans, _ = blockwise(small_cnn(1), torch.randn(1, 2, 3, 3, dtype=F64), torch.tensor([2]),
                                       Categorical())
    assert_blocks_exact(exact, dense, spans)


def test_linear_bias_block_is_exact_for_any_batch():
    exact, dense, spans, curv = blockwise(mlp(), torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,)),
                                          Categorical())
    for (_, b), block in zip(spans, curv.blocks, strict=False):
        out = block.b.shape[0]
        torch.testing.assert_close(dense[b - out:b, b - out:b], exact[b - out:b, b - out:b], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make,x,bounds", [
    (mlp, lambda: torch.randn(16, 4, dtype=F64), (0.60, 0.20)),
    (lambda: small_cnn(3), lambda: torch.randn(16, 2, 5, 5, dtype=F64), (0.85, 0.15)),
])
def test_kfac_accuracy_on_a_batch(make, x, bounds):
    exact, dense, spans, _ = blockwise(make(), x(), torch.randint(0, 3, (16,)), Categorical())
    errors = [rel_error(exact[a:b, a:b], dense[a:b, a:b]) for a, b in spans]
    assert errors[0] <= bounds[0] and errors[1] <= bounds[1], errors


@pytest.mark.parametrize("method", ["diag", "full"])
def test_diag_and_full_are_exact(method):
    model = small_cnn(3)
    x, y = torch.randn(6, 2, 5, 5, dtype=F64), torch.randint(0, 4, (6,))
    exact, dense, _, _ = blockwise(model, x, y, Categorical(), method=method)
    expected = torch.diag(exact.diagonal()) if method == "diag" else exact
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)


class SequenceNet(nn.Module):
    """A Linear over positions (weight sharing across T = 5) and a LayerNorm (no Kronecker block)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.norm(torch.tanh(self.embed(x))).mean(1))


def test_diag_is_exact_with_weight_sharing_and_other_layers():
    model = SequenceNet().double()
    x, y = torch.randn(6, 5, 3, dtype=F64), torch.randint(0, 3, (6,))
    exact, dense, _, curv = blockwise(model, x, y, Categorical(), method="diag")
    torch.testing.assert_close(dense, torch.diag(exact.diagonal()), rtol=1e-10, atol=1e-12)
    kinds = [type(b).__name__ for b in compute_curvature(model, [(x, y)], Categorical(),
                                                         names_shapes(model)[0]).blocks]
    assert kinds == ["KronBlock", "DiagBlock", "KronBlock"]  # the LayerNorm: its exact diagonal, same pass


class NormNet(nn.Module):
    """Conv -> BatchNorm (running statistics) -> ReLU -> pool -> scale -> Linear; ``scale`` belongs to no layer
    (its diagonal comes from per-example gradients)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.scale = nn.Parameter(torch.ones(3))
        self.head = nn.Linear(3, 4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
        return self.head(h * self.scale)


@pytest.mark.parametrize("method", ["kfac", "diag"])
def test_batchnorm_and_unknown_parameters_get_the_exact_diagonal(method):
    model = NormNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    model.eval()
    x, y = torch.randn(5, 2, 5, 5, dtype=F64), torch.randint(0, 4, (5,))
    exact, dense, _, curv = blockwise(model, x, y, Categorical(), method=method)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets = dict(zip(sizes, torch.tensor([0, *sizes.values()]).cumsum(0).tolist(), strict=False))
    for name in ("scale", "bn.weight", "bn.bias"):  # the other blocks are tested above
        a, b = offsets[name], offsets[name] + sizes[name]
        torch.testing.assert_close(dense.diagonal()[a:b], exact.diagonal()[a:b], rtol=1e-10, atol=1e-12)
    assert {b.names: type(b).__name__ for b in curv.blocks}[("bn.weight", "bn.bias")] == "DiagBlock"


def test_monte_carlo_fisher_converges_to_exact():
    model, x, y = mlp(), torch.randn(8, 4, dtype=F64), torch.randint(0, 3, (8,))
    names, _ = names_shapes(model)
    exact = compute_curvature(model, [(x, y)], Categorical(), names)
    mc = compute_curvature(model, [(x, y)], Categorical(), names, fisher="mc", mc_samples=2000, seed=1)
    for e, m in zip(exact.blocks, mc.blocks, strict=False):
        torch.testing.assert_close(m.a, e.a)  # inputs do not depend on the sampled targets
        assert rel_error(e.b, m.b) < 0.05


def test_held_fixed_bias_leaves_the_weight_block():
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 3, dtype=F64)
    curv = compute_curvature(model, [(x, y)], Gaussian(1.0), ["weight"])
    exact = exact_ggn(model, x, Gaussian(1.0))[:12, :12]
    torch.testing.assert_close(curv.dense(["weight"], [(3, 4)]), exact, rtol=1e-10, atol=1e-12)


def test_log_likelihood_and_count():
    model = mlp()
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    curv = compute_curvature(model, [(x[:6], y[:6]), (x[6:], y[6:])], Categorical(), names_shapes(model)[0])
    with torch.no_grad():
        expected = -torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
    assert curv.num_data == 10
    assert curv.log_likelihood == pytest.approx(float(expected), rel=1e-12)


def test_diag_on_a_cnn_matches_the_exact_ggn_diagonal():
    """The diagonal GGN (hooks for Conv2d / Linear) equals the diagonal of the GGN from per-example Jacobians."""
    model = TinyNet().double()
    x, y = torch.randn(12, 1, 6, 6, dtype=F64), torch.randint(0, 3, (12,))
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    diag = compute_curvature(model, [(x, y)], Categorical(), names, method="diag").dense(names, shapes).diagonal()
    torch.testing.assert_close(diag, exact_ggn(model, x, Categorical()).diagonal(), rtol=1e-10, atol=1e-12)


def test_softmax_regression_ggn_is_the_hessian():
    """Softmax regression is linear in its weights, so its GGN equals the exact Hessian of the summed NLL."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, dtype=F64, generator=gen), torch.randint(0, 4, (12,), generator=gen)
    model = nn.Linear(3, 4).double()
    params = (model.weight.detach(), model.bias.detach())
    hess = torch.autograd.functional.hessian(
        lambda w, b: torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum"), params)
    full = torch.cat([torch.cat([hess[i][j].reshape(params[i].numel(), params[j].numel()) for j in range(2)], 1)
                      for i in range(2)])
    for method in ("full", "diag"):
        curv = compute_curvature(model, [(x[:5], y[:5]), (x[5:], y[5:])], Categorical(), ["weight", "bias"],
                                 method=method)
        dense = curv.dense(["weight", "bias"], [(4, 3), (4,)])
        expected = full if method == "full" else torch.diag(full.diagonal())
        torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-12)


def test_shared_layers_and_bad_choices_are_refused():
    layer = nn.Linear(3, 3).double()
    shared = nn.Sequential(layer, nn.Tanh(), layer)
    with pytest.raises(ConfigError, match="more than once"):
        compute_curvature(shared, [(torch.randn(2, 3, dtype=F64), torch.tensor([0, 1]))], Categorical(),
                          ["0.weight"])
    with pytest.raises(ConfigError, match="curvature method"):
        compute_curvature(mlp(), [], Categorical(), ["0.weight"], method="exact")
    with pytest.raises(DataError, match="no batches"):
        compute_curvature(mlp(), [], Categorical(), ["0.weight"])


class DictInput(nn.Module):
    """A model fed a tokenizer-style dict of tensors (as ptyl's text classifier is)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.ones(5))  # not a Linear: the per-example-gradient path
        self.head = nn.Linear(5, 3)

    def forward(self, inputs):
        return self.head(torch.tanh(self.body(inputs["features"])) * self.scale * inputs["mask"][:, :1])


@pytest.mark.parametrize("method", ["kfac", "diag"])
def test_dict_inputs_give_the_curvature_of_tensor_inputs(method):
    model = DictInput().double()
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    inputs = {"features": x, "mask": torch.ones(10, 2, dtype=F64)}
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for p in model.parameters()]
    ours = compute_curvature(model, [(inputs, y)], Categorical(), names, method=method).dense(names, shapes)

    class Plain(nn.Module):
        def forward(self, features):
            return model({"features": features, "mask": torch.ones(len(features), 2, dtype=F64)})

    wrapped = Plain()
    wrapped.model = model
    plain_names = [f"model.{n}" for n in names]
    plain = compute_curvature(wrapped, [(x, y)], Categorical(), plain_names, method=method).dense(plain_names, shapes)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["kfac", "diag", "full"])
def test_scaled_subset_curvature_is_the_sum_over_copies(method):
    """The curvature of a subset scaled by N / M equals that of the full data when the data are copies of it."""
    model = mlp()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    names, shapes = names_shapes(model)
    once = compute_curvature(model, [(x, y)], Categorical(), names, method=method)
    thrice = compute_curvature(model, [(x, y)] * 3, Categorical(), names, method=method)
    scaled = once.scaled(3.0, 18)
    torch.testing.assert_close(scaled.dense(names, shapes), thrice.dense(names, shapes), rtol=1e-10, atol=1e-12)
    assert scaled.num_data == thrice.num_data == 18
    assert scaled.log_likelihood == pytest.approx(thrice.log_likelihood, rel=1e-12)


def test_layers_with_a_large_factor_get_their_exact_diagonal():
    model = mlp()  # Linear(4, 6) and Linear(6, 3): factors of 5 / 6 and 7 / 3 rows
    x, y = torch.randn(10, 4, dtype=F64), torch.randint(0, 3, (10,))
    names, shapes = names_shapes(model)
    mixed = compute_curvature(model, [(x, y)], Categorical(), names, max_factor=6)
    assert [type(b).__name__ for b in mixed.blocks] == ["KronBlock", "DiagBlock"]
    diag = compute_curvature(model, [(x, y)], Categorical(), names, method="diag")
    torch.testing.assert_close(mixed.blocks[1].h, diag.blocks[1].h, rtol=1e-12, atol=1e-14)
