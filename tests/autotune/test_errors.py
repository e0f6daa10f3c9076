"""Bad input gets a clear ptyl error (a PtylError subclass naming what is wrong), before any training happens."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.autotune import Gaussian, build_family, compute_curvature, evidence_part
from ptyl.errors import ConfigError, DataError, InvalidValueError
from tests.autotune.problems import F64, random_posterior
from tests.helpers import TinyNet


@pytest.fixture
def net():
    return TinyNet().double()


@pytest.mark.parametrize("kwargs,match", [
    (dict(kind="none"), "declares no differentiable family"),
    (dict(kind="grid"), "unknown prior kind 'grid'"),
    (dict(kind="lowrank"), "needs the source posterior"),
    (dict(kind="lowrank", posterior="P", head_variance=None, learn=("variance",)), "no usable scale"),
    (dict(kind="standard", learn=()), "no usable scale"),
    (dict(kind="standard", learn=("lambda",)), "unknown hyper-parameter"),
    (dict(kind="diag", posterior="P", eps=0.0, learn=("scale", "eps")), "positive initial value"),
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
        evidence_part(family, "last-layer")


def test_curvature_data_errors_name_the_batch():
    model = nn.Linear(3, 1).double()
    good = (torch.randn(4, 3, dtype=F64), torch.randn(4, 1, dtype=F64))
    bad = (torch.randn(4, 3, dtype=F64), torch.tensor([[0.0], [float("nan")], [1.0], [2.0]], dtype=F64))
    with pytest.raises(DataError, match="batch 1 .*NaN/Inf"):
        compute_curvature(model, [good, bad], Gaussian(1.0), ["weight", "bias"])
    for empty in ([], DataLoader(TensorDataset(torch.zeros(0, 3), torch.zeros(0, 1)), batch_size=4)):
        with pytest.raises(DataError, match="no batches"):
            compute_curvature(model, empty, Gaussian(1.0), ["weight", "bias"])
    with pytest.raises(InvalidValueError, match="noise_variance"):
        Gaussian(0.0)
