"""The reference importer (issue 25) on files written the way the reference code writes them.

``ReferenceSWAG`` below does what the reference's SWAG does (``priorBox/swag/swag.py`` and the covariance subspace
of ``priorBox/swag/subspaces.py`` in hsouri/BayesianTransferLearning), written here from its description: running
first and second moments of the flattened ``backbone.parameters()``, one deviation row ``w - mean`` (from the
updated mean) per snapshot, the last ``max_rank`` rows kept, and ``get_space()`` returning the mean, the variance
clamped at 1e-6 and the rows divided by sqrt(K - 1). The files are ``torch.save`` of those three tensors and of the
backbone's ``state_dict()`` (head removed), which the reference's ``load_prior`` and loss then read: its density is
``LowRankMultivariateNormal(mean, covmat.T, variance)`` over the backbone only.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError, PriorFileError
from ptyl.io import import_reference
from ptyl.priors import make_prior


class ReferenceSWAG:
    """The reference's SWAG moments and covariance subspace (see the module docstring)."""

    def __init__(self, backbone: nn.Module, max_rank: int) -> None:
        size = sum(p.numel() for p in backbone.parameters())
        self.mean, self.sq_mean = torch.zeros(size), torch.zeros(size)
        self.n, self.max_rank, self.rows = 0, max_rank, torch.empty(0, size)

    def collect(self, backbone: nn.Module) -> None:
        w = torch.cat([p.detach().reshape(-1) for p in backbone.parameters()])
        self.mean = self.mean * (self.n / (self.n + 1)) + w / (self.n + 1)
        self.sq_mean = self.sq_mean * (self.n / (self.n + 1)) + w**2 / (self.n + 1)
        self.rows = torch.cat([self.rows, (w - self.mean)[None]])[-self.max_rank:]
        self.n += 1

    def get_space(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        variance = torch.clamp(self.sq_mean - self.mean**2, 1e-6)
        return self.mean.clone(), variance, self.rows.clone() / (self.rows.shape[0] - 1) ** 0.5


class Backbone(nn.Module):
    """Conv + BatchNorm + an attention-style relative position table (a parameter) and its index (a buffer)."""

    def __init__(self, extra_buffer: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(5, 3))
        self.register_buffer("relative_position_index", torch.arange(9).reshape(3, 3))
        self.register_buffer("attn_mask", torch.zeros(3, 3))
        self.fc = nn.Linear(3 * 4 * 4, 6)
        if extra_buffer:  # a float buffer under a name no list knows
            self.register_buffer("smoothing", torch.ones(4))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.relative_position_bias_table.sum(0)[None, :, None, None]
        return torch.relu(self.fc(h.flatten(1)))


def net(extra_buffer: bool = False) -> nn.Module:
    model = nn.Sequential()
    model.add_module("features", Backbone(extra_buffer))
    model.add_module("head", nn.Linear(6, 3))
    return model


def write_reference_files(tmp_path, *, scaled: bool = True, extra_buffer: bool = False, rank: int = 12):
    """Train, collect the reference's SWAG over the backbone, torch.save its get_space() and the backbone's state."""
    torch.manual_seed(0)
    model = net(extra_buffer)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    swag = ReferenceSWAG(model.features, max_rank=rank)
    for step in range(60):
        batch = slice(8 * (step % 8), 8 * (step % 8) + 8)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        if step >= 30:
            swag.collect(model.features)
    mean, variance, rows = swag.get_space()
    if not scaled:
        rows = swag.rows.clone()  # raw deviations, as ptyl (and some re-implementations) store them
    prefix = str(tmp_path / "resnet50_ssl_prior")
    for suffix, value in (("mean", mean), ("variance", variance), ("covmat", rows),
                          ("model", model.features.state_dict())):
        torch.save(value, f"{prefix}_{suffix}.pt")
    return prefix, model, (mean, variance, rows)


def reference_distribution(files) -> torch.distributions.LowRankMultivariateNormal:
    mean, variance, rows = (t.double() for t in files)
    return torch.distributions.LowRankMultivariateNormal(mean, rows.T, variance)


def subdir(path, name):
    (path / name).mkdir()
    return path / name


def no_warnings(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


def test_the_default_reading_gives_the_reference_density(tmp_path):
    """covmat="scaled": with all K rows, scale=2 and no head prior, ptyl's prior is the reference's density."""
    prefix, model, files = write_reference_files(tmp_path)
    post = no_warnings(import_reference, prefix, name_prefix="features.")
    assert post.rank == 12 and post.metadata["covmat"] == "scaled"
    assert post.names == [f"features.{n}" for n, _ in model.features.named_parameters()]  # buffers skipped by name
    reference = reference_distribution(files)
    torch.testing.assert_close(post.dense_covariance(scale=2.0), reference.covariance_matrix, rtol=1e-5, atol=1e-9)
    prior = make_prior(model, "lowrank", posterior=post, scale=2.0, eps=0.0, head_variance=None, dtype=torch.float64)
    assert sorted(prior.parts) == ["backbone"]  # the reference puts no prior on the head
    theta = {n: p.detach().double() for n, p in model.named_parameters()}
    flat = torch.cat([theta[n].reshape(-1) for n in post.names])
    torch.testing.assert_close(prior.log_prob(theta), reference.log_prob(flat), rtol=1e-6, atol=1e-6)
    with_head = make_prior(model, "lowrank", posterior=post, scale=2.0, eps=0.0, dtype=torch.float64)
    assert sorted(with_head.parts) == ["backbone", "head"]  # ptyl's default: N(0, I) on the head


@pytest.mark.parametrize("rank", [10, 20])
def test_each_reading_of_the_other_kind_of_file_warns(tmp_path, rank):
    """K = 20 is the reference's default max_num_models."""
    scaled, _, _ = write_reference_files(subdir(tmp_path, "scaled"), rank=rank)
    raw, _, _ = write_reference_files(subdir(tmp_path, "raw"), rank=rank, scaled=False)
    with pytest.warns(UserWarning, match="divided by sqrt"):
        import_reference(scaled, covmat="deviations")
    with pytest.warns(UserWarning, match="raw deviations"):
        import_reference(raw)
    no_warnings(import_reference, scaled)
    no_warnings(import_reference, raw, covmat="deviations")


def test_reading_scaled_rows_as_deviations_warns_and_shrinks_the_low_rank_part(tmp_path):
    """The issue's measurement: 12 rows read as raw deviations give 1/11 of the reference's low-rank part."""
    prefix, _, (mean, variance, rows) = write_reference_files(tmp_path)
    with pytest.warns(UserWarning, match=r"look like deviations divided by sqrt\(K - 1\).*covmat='scaled'"):
        raw = import_reference(prefix, covmat="deviations")
    low_rank = raw.dense_covariance(scale=2.0) - torch.diag(variance.double())
    torch.testing.assert_close(low_rank * 11, rows.double().T @ rows.double(), rtol=1e-5, atol=1e-9)  # 1/(K-1)


def test_raw_deviation_rows_warn_under_the_default_and_import_under_deviations(tmp_path):
    prefix, _, (mean, variance, rows) = write_reference_files(tmp_path, scaled=False)
    with pytest.warns(UserWarning, match=r"look like raw deviations.*covmat='deviations'"):
        import_reference(prefix)
    post = no_warnings(import_reference, prefix, covmat="deviations")
    deviations = torch.cat([post.deviations[n].reshape(12, -1) for n in post.names], dim=1)
    assert torch.equal(deviations, rows)
    scaled = import_reference(write_reference_files(subdir(tmp_path, "scaled"))[0])
    for name in post.names:  # the same trajectory, either file: the same posterior
        torch.testing.assert_close(scaled.deviations[name], post.deviations[name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="covmat"):
        import_reference(prefix, covmat="raw")


def test_buffers_are_skipped_by_name_or_need_the_model(tmp_path):
    prefix, model, _ = write_reference_files(tmp_path, extra_buffer=True)
    with pytest.raises(PriorFileError, match=r"_model.pt: .*buffers.*'smoothing'.*pass model="):
        import_reference(prefix)
    post = import_reference(prefix, model=model.features)
    assert post.names == [n for n, _ in model.features.named_parameters()] and "smoothing" not in post.names


def test_the_warning_needs_enough_rows(tmp_path):
    """K = 2: both readings are the same matrix (sqrt(K - 1) = 1); K < 10: too few rows to tell them apart."""
    for rank in (2, 5, 9):
        prefix, _, _ = write_reference_files(subdir(tmp_path, f"rank{rank}"), rank=rank)
        for covmat in ("scaled", "deviations"):
            assert no_warnings(import_reference, prefix, covmat=covmat).rank == rank
