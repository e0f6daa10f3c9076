"""The DE-ELBO training strategy: on Bayesian linear regression with orthogonal features and kappa = 1 it lands at
the exact posterior and the evidence maximiser; on a classifier it learns, records its path, checkpoints and
resumes exactly, and returns draws of q for Bayesian model averaging."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

from ptyl.autotune import Gaussian, IsotropicFamily, build_family
from ptyl.errors import ConfigError
from ptyl.training import TrainConfig, Trainer, fit
from ptyl.tuning import DEELBOStrategy
from tests.autotune.test_deelbo import NOISE, exact_maximiser, exact_posterior, setup
from tests.helpers import TinyNet
from tests.tuning.engines import StopAfter, StopTraining, run_deelbo


@pytest.mark.parametrize("kind", ["standard", "diag"])
def test_lands_at_exact_posterior_and_maximiser(kind):
    x, y, model, family, leaf, base, center = setup(kind)
    best = exact_maximiser(x, y, base, center)
    strategy, result = run_deelbo(model, family, x, y[:, None], Gaussian(NOISE), kappa=1.0, epochs=400, lr=0.05,
                                  hyper_lr=0.05, hyper_every=1, num_samples=8, init_std=0.05)
    key = "scale" if kind == "diag" else "variance"
    assert family.hyper_values()[key] == pytest.approx(best, rel=0.05)
    m, s2 = exact_posterior(x, y, best * base, center)
    assert (model.weight.detach()[0] - m).abs().max() < 0.25 * s2.sqrt().min()
    torch.testing.assert_close(strategy.q.std()["weight"].detach()[0], s2.sqrt(), rtol=0.1, atol=0)
    assert [h["epoch"] for h in result.history] == list(range(1, 401))
    assert strategy.kappa == 1.0 and result.history[-1][key] == family.hyper_values()[key]


def classification():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 6, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return TensorDataset(x, y)


def deelbo_run(data, epochs=4, checkpoint=None, resume=False, bma_samples=0, callbacks=()):
    torch.manual_seed(0)
    model = TinyNet()
    family = build_family(model, "standard", variance=0.1, head_variance=1.0)
    config = TrainConfig(epochs=epochs, batch_size=8, lr=0.05, progress=False)
    strategy = DEELBOStrategy(config, family, hyper_lr=0.1, hyper_every=2, bma_samples=bma_samples)
    return strategy, fit(model, data, None, config, strategy=strategy, checkpoint=checkpoint, resume=resume,
                         callbacks=callbacks)


def test_classification_learns_records_and_averages_over_q():
    data = classification()
    strategy, result = deelbo_run(data, 3, bma_samples=4)
    assert strategy.kappa == pytest.approx(strategy.family.num_parameters / 24)  # P > N: kappa = P / N
    hyper = strategy.family.hyper_values()
    assert set(hyper) == {"variance", "head_variance"} and hyper["variance"] != pytest.approx(0.1)
    assert all(math.isfinite(h["deelbo"]) and h["variance"] > 0 for h in result.history)
    assert len(result.samples) == 4
    probs = result.predict(data)
    torch.testing.assert_close(probs.sum(1), torch.ones(24))
    with torch.no_grad():
        mean_probs = torch.softmax(result.model(data.tensors[0]), 1)
        assert not torch.allclose(probs, mean_probs)  # an average over draws of q, not the variational mean
        prior = strategy.family.to_prior()
        assert float(prior.log_prob(result.model)) == pytest.approx(float(strategy.family.log_prob(result.model)),
                                                                     rel=1e-5)


def test_exact_hyper_update_lands_at_the_closed_form_minimiser():
    """hyper_solver="exact": after an update each isotropic variance is argmin_v KL(q || N(c, v I)) =
    (|m - c|^2 + sum s^2) / P (the reference code's closed form); the Adam solver only steps towards it."""
    data = classification()
    strategy, result = deelbo_run(data, 2)
    assert strategy.hyper_solver == "exact"
    strategy._hyper_step(result.model)
    means, variances = strategy.q.means(result.model), strategy.q.variances()
    leaves = strategy.family.leaves()
    assert len(leaves) == 2  # backbone and head
    for leaf in leaves:
        center = leaf.center()
        residual = leaf.flatten(means).detach() - (0.0 if center is None else center)
        expected = (residual.square().sum() + leaf.flatten(variances).sum()) / leaf.num_parameters
        assert float(leaf.variance()) == pytest.approx(float(expected), rel=1e-4)


def test_gradients_equal_autograd_of_the_deelbo():
    """The closed-form KL gradients in m and log s plus the data term through a draw equal autograd of the whole
    per-example objective (:func:`ptyl.autotune.deelbo_loss`, the reference form), for a learned low-rank prior
    with eps > 0 and a head prior."""
    from ptyl.autotune import SampledModel, deelbo_loss
    from tests.helpers import random_posterior

    data = classification()
    torch.manual_seed(0)
    model = TinyNet().double()
    family = build_family(model, "lowrank", posterior=random_posterior(model), scale=3.0, eps=0.01)
    config = TrainConfig(epochs=1, batch_size=24, progress=False)
    strategy, batch = DEELBOStrategy(config, family, init_std=0.05), (data.tensors[0].double(), data.tensors[1])
    trainer = Trainer(model, data, None, config, strategy=strategy)
    state = strategy.generator.get_state()
    strategy.data_loss(trainer, batch).backward()
    strategy.add_prior_grad(trainer)
    ours = [p.grad.clone() for p in model.parameters()] + [s.grad.clone() for s in strategy.q.log_std]
    for p in [*model.parameters(), *strategy.q.log_std]:
        p.grad = None
    strategy.generator.set_state(state)
    loss, _, _ = deelbo_loss(model, SampledModel(model), strategy.q, family, batch, trainer.objective,
                             strategy.weight, 1, strategy.generator)
    loss.backward()
    reference = [p.grad for p in model.parameters()] + [s.grad for s in strategy.q.log_std]
    for a, b in zip(ours, reference, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_resume_from_checkpoint_is_exact(tmp_path):
    data = classification()
    full, reference = deelbo_run(data)
    with pytest.raises(StopTraining):
        deelbo_run(data, checkpoint=tmp_path / "ck.pt", callbacks=[StopAfter(2)])
    resumed, result = deelbo_run(data, checkpoint=tmp_path / "ck.pt", resume=True)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    for name, value in reference.model.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], value, rtol=0, atol=0)
    assert resumed.family.hyper_values() == full.family.hyper_values()
    for a, b in zip(resumed.q.parameters(), full.q.parameters(), strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_rejects_a_family_without_learnable_values():
    fixed = IsotropicFamily({"weight": (1, 3), "bias": (1,)}, 1.0, learn=False)  # a fixed value: nothing to learn
    with pytest.raises(ConfigError, match="no learnable hyper-parameter"):
        DEELBOStrategy(TrainConfig(), fixed)


def test_rejects_an_unknown_hyper_solver():
    family = IsotropicFamily({"weight": (1, 3)}, 1.0)
    with pytest.raises(ConfigError, match="hyper_solver"):
        DEELBOStrategy(TrainConfig(), family, hyper_solver="newton")
