"""Bad input gets a clear ptyl error (a PtylError subclass naming what is wrong), before any training happens."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.autotune import Gaussian, build_family, compute_curvature, deelbo_tune, marglik_tune
from ptyl.errors import ConfigError, DataError, InvalidValueError, PtylError
from tests.autotune.problems import F64, random_posterior
from tests.helpers import TinyNet


@pytest.fixture
def net():
    return TinyNet().double()


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="none"), "no scale to learn"),
    (dict(kind="grid"), "no scale to learn"),
    (dict(kind="lowrank"), "needs the source posterior"),
    (dict(kind="lowrank", posterior="P", head_variance=None, learn=("variance",)), "no usable scale"),
    (dict(kind="standard", learn=()), "no usable scale"),
    (dict(kind="standard", learn=("lambda",)), "unknown hyper-parameter"),
    (dict(kind="diag", posterior="P", learn=("scale", "eps")), "positive initial value"),
])
def test_family_without_a_usable_scale(net, kwargs, match):
    if kwargs.get("posterior") == "P":
        kwargs["posterior"] = random_posterior(net, skip="head")
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=match):
        build_family(net, kind, **kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_initial_values(net, bad):
    with pytest.raises(InvalidValueError, match="lambda"):
        build_family(net, "lowrank", posterior=random_posterior(net, skip="head"), scale=bad)
    with pytest.raises(InvalidValueError, match="head_variance"):
        build_family(net, "standard", head_variance=bad)


def test_model_without_the_named_head(net):
    with pytest.raises(ConfigError, match="no parameter belongs to the head 'fc'"):
        build_family(net, "standard", head="fc")
    family = build_family(net, "standard", head="fc", head_variance=None)  # no head prior asked: fine
    with pytest.raises(ConfigError, match="needs a head prior"):
        marglik_tune(net, family, [(torch.randn(2, 1, 6, 6, dtype=F64), torch.tensor([0, 1]))],
                     curvature="last-layer")


def regression():
    model = nn.Linear(3, 1).double()
    return model, build_family(model, "standard", head=None)


@pytest.mark.parametrize("engine", ["deelbo", "marglik"])
def test_data_that_yields_no_batches(engine):
    model, family = regression()
    run = deelbo_tune if engine == "deelbo" else marglik_tune
    for empty in ([], DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=4)):
        with pytest.raises(DataError, match="no batches|empty"):
            run(model, family, empty, Gaussian(1.0), epochs=1)
    with pytest.raises(DataError, match="one-shot iterator"):
        run(model, family, iter([(torch.zeros(2, 3), torch.zeros(2, 1))]), Gaussian(1.0), epochs=1)


@pytest.mark.parametrize("engine", ["deelbo", "marglik", "curvature"])
def test_non_finite_data_names_the_batch(engine):
    model, family = regression()
    good = (torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64))
    bad = (torch.randn(4, 3, dtype=F64), torch.tensor([[0.0], [float("nan")], [1.0], [2.0]], dtype=F64))
    data = [good, bad]
    with pytest.raises(DataError, match="batch 1 .*NaN/Inf"):
        if engine == "deelbo":
            deelbo_tune(model, family, data, Gaussian(1.0), epochs=1)
        elif engine == "marglik":
            marglik_tune(model, family, data, Gaussian(1.0), epochs=1)
        else:
            compute_curvature(model, data, Gaussian(1.0), family.names)


def test_divergence_is_reported():
    model, family = regression()
    x = torch.randn(16, 3, dtype=F64) * 100
    with pytest.raises(InvalidValueError, match="non-finite (in|at) epoch"):
        marglik_tune(model, family, [(x, x.sum(1, keepdim=True))], Gaussian(1.0), epochs=50, lr=10.0,
                     optimizer="sgd")


def test_bad_settings():
    model, family = regression()
    data = [(torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64))]
    with pytest.raises(ConfigError, match="curvature"):
        marglik_tune(model, family, data, Gaussian(1.0), curvature="hessian")
    with pytest.raises(ConfigError, match="epochs"):
        deelbo_tune(model, family, data, Gaussian(1.0), epochs=0)
    with pytest.raises(ConfigError, match="optimizer"):
        deelbo_tune(model, family, data, Gaussian(1.0), optimizer="lbfgs")
    with pytest.raises(ConfigError, match="kappa"):
        deelbo_tune(model, family, data, Gaussian(1.0), kappa=-1.0)
    with pytest.raises(InvalidValueError, match="noise_variance"):
        Gaussian(0.0)
    fixed = build_family(model, "standard", head=None, learn=("variance",))
    for p in fixed.parameters():
        p.requires_grad_(False)
    assert issubclass(ConfigError, PtylError) and issubclass(DataError, PtylError)
