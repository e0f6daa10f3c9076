import numpy as np
import pytest
import torch
from torch import nn

from ptyl.data.augment import SimCLRAugment
from ptyl.errors import ConfigError, InvalidValueError
from ptyl.posterior.simclr import NTXentLoss, ProjectionHead, SimCLRModel, SimCLRObjective, nt_xent_loss


class TinyClassifier(nn.Module):
    """Follows the ptyl model contract: features / pool / head / feature_dim / forward_features."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = width
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return self.pool(self.features(x))

    def forward(self, x):
        return self.head(self.forward_features(x))


def _nt_xent_reference(z1, z2, tau):
    """Explicit loops in float64, straight from the paper's definition of l(i, j)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n, b = len(z), len(z1)
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        denom = sum(np.exp(z[i] @ z[k] / tau) for k in range(n) if k != i)
        total += -np.log(np.exp(z[i] @ z[j] / tau) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_nt_xent_matches_hand_computed_loops(tau):
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    ours = nt_xent_loss(z1, z2, tau)
    assert ours.item() == pytest.approx(_nt_xent_reference(z1.numpy(), z2.numpy(), tau), rel=1e-10)
    assert NTXentLoss(tau)(z1, z2).item() == pytest.approx(ours.item(), rel=1e-12)


def test_nt_xent_symmetric_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    assert torch.allclose(nt_xent_loss(z1, z2), nt_xent_loss(z2, z1), atol=1e-6)
    assert torch.allclose(nt_xent_loss(z1, z2), nt_xent_loss(3 * z1, 0.5 * z2), atol=1e-6)  # cosine similarity
    # identical views with orthogonal images give the minimum: only the positive has similarity 1
    eye = torch.eye(4)
    expected = -np.log(np.exp(2.0) / (np.exp(2.0) + 6 * np.exp(0.0)))
    assert nt_xent_loss(eye, eye, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_bad_input():
    with pytest.raises(InvalidValueError):
        nt_xent_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(InvalidValueError):
        nt_xent_loss(torch.randn(3, 4), torch.randn(3, 4), temperature=0.0)


def test_simclr_model_shares_modules_and_names():
    clf = TinyClassifier()
    model = SimCLRModel(clf, hidden_dim=16, out_dim=8)
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith(("features.", "projection.")) for n in names)
    assert model.features is clf.features and model.pool is clf.pool
    excluded = model.excluded_parameter_names()
    assert excluded and all(n.startswith("projection.") for n in excluded)
    # the prior's names are exactly the classifier's trunk names
    clf_trunk = [n for n, _ in clf.named_parameters() if n.startswith("features.")]
    assert model.prior_parameter_names() == clf_trunk
    assert model(torch.rand(5, 1, 12, 12)).shape == (5, 8)
    assert isinstance(model.projection, ProjectionHead)


def test_simclr_model_rejects_non_contract_model():
    with pytest.raises(ConfigError, match="features"):
        SimCLRModel(nn.Linear(3, 3))


def _tiny_digits(n=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[:n] / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target[:n])


def test_simclr_steps_reduce_loss():
    torch.manual_seed(0)
    x, y = _tiny_digits(64)
    model = SimCLRModel(TinyClassifier(width=16), hidden_dim=32, out_dim=16)
    objective = SimCLRObjective(SimCLRAugment(8, noise_std=0.02), temperature=0.5, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)

    def eval_loss():  # fixed views so the comparison is not augmentation noise
        probe = SimCLRObjective(objective.augment, 0.5, seed=123)
        model.eval()
        with torch.no_grad():
            value = probe(model, (x, y)).item()
        model.train()
        return value

    before = eval_loss()
    for _ in range(60):
        loss = objective(model, (x, y))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.3, (before, after)


def test_objective_is_reproducible_and_resumable():
    x = torch.rand(6, 1, 8, 8)
    model = SimCLRModel(TinyClassifier(), hidden_dim=8, out_dim=4).eval()
    a = SimCLRObjective(SimCLRAugment(8), seed=5)
    b = SimCLRObjective(SimCLRAugment(8), seed=5)
    with torch.no_grad():
        first = a(model, (x, None))
        assert torch.equal(first, b(model, [x, None]))
        state = a.state_dict()
        second = a(model, (x, None))
        assert not torch.equal(first, second)
        c = SimCLRObjective(SimCLRAugment(8), seed=0)
        c.load_state_dict(state)
        assert torch.equal(c(model, (x, None)), second)
    with pytest.raises(InvalidValueError):
        a(model, (x[:1], None))
