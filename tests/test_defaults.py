"""Every default of every prior kind lives in the registry (issue 24, item 1): each entry point that builds a prior --
``make_prior``, ``load_prior``, ``learned_prior``, the autotune families, the command line, the tuner's
``PriorSpec`` and the automatic strategies' starting family -- builds the same prior from the same file and flags."""

from __future__ import annotations

import pytest
import torch

from ptyl.autotune import build_family
from ptyl.cli import build_parser
from ptyl.cli.finetune import _prior_spec
from ptyl.io import load_posterior, load_prior, save_posterior
from ptyl.priors import PriorKind, learned_prior, make_prior
from ptyl.priors.registry import HEAD_VARIANCE
from ptyl.tuning import AutoConfig, PriorSpec
from ptyl.tuning.automatic import _family
from tests.helpers import TinyNet, random_posterior

LEARNED = [k for k in PriorKind if k.recipe.needs_posterior]
ISOTROPIC = [k for k in PriorKind if not k.recipe.needs_posterior and k.recipe.axis is not None]
# (command-line flags, the same values as keyword arguments)
FLAGS = [([], {}), (["--scale", "10", "--eps", "0.01", "--rank", "2"], {"scale": 10.0, "eps": 0.01, "rank": 2})]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().double()
    path = tmp_path_factory.mktemp("prior") / "prior.safetensors"
    save_posterior(random_posterior(model), path)
    return model, path


def _point(model) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
            for n, p in model.named_parameters()}


def _same(priors: dict[str, object], theta) -> None:
    """Equal log-density at ``theta`` and equal precision diagonal, entry point by entry point."""
    (first, reference), *rest = priors.items()
    for name, prior in rest:
        torch.testing.assert_close(prior.log_prob(theta).double(), reference.log_prob(theta).double(), rtol=1e-9,
                                   atol=1e-9, msg=lambda m, name=name: f"{name} vs {first}: {m}")
        torch.testing.assert_close(prior.precision_diagonal(), reference.precision_diagonal(), rtol=1e-9,
                                   atol=1e-12, msg=lambda m, name=name: f"{name} vs {first}: {m}")


def _cli_spec(path, kind, flags) -> PriorSpec:
    argv = ["finetune", "--prior", str(path), "--out", "unused"] + flags
    if kind is not PriorKind.LOWRANK:
        argv += ["--baseline", str(kind)]
    return _prior_spec(build_parser().parse_args(argv), "head")


@pytest.mark.parametrize("flags,values", FLAGS)
@pytest.mark.parametrize("kind", LEARNED, ids=str)
def test_every_entry_point_builds_the_same_learned_prior(setup, kind, flags, values):
    model, path = setup
    posterior = load_posterior(path)
    whole = {
        "make_prior": make_prior(model, kind, posterior=posterior, **values),
        "PriorSpec": PriorSpec(kind, posterior=posterior, **values).build_prior(model),
        "cli": _cli_spec(path, kind, flags).build_prior(model),
        "build_family": build_family(model, kind, posterior=posterior, **values).to_prior(),
    }
    if not values:  # the automatic strategies start at the registry's defaults
        whole["automatic"] = _family(model, PriorSpec(kind, posterior=posterior), AutoConfig()).to_prior()
    theta = _point(model)
    _same(whole, theta)
    backbone = {"make_prior": whole["make_prior"].parts["backbone"], "load_prior": load_prior(path, model, kind=kind,
                                                                                               **values)}
    if kind in (PriorKind.LOWRANK, PriorKind.DIAG):
        backbone["learned_prior"] = learned_prior(posterior.matched_to(model, strict=False), kind, **values)
    _same(backbone, theta)


@pytest.mark.parametrize("kind", ISOTROPIC, ids=str)
def test_every_entry_point_builds_the_same_isotropic_prior(setup, kind):
    model, path = setup
    default = kind.recipe.defaults["variance"]
    priors = {
        "make_prior": make_prior(model, kind),
        "PriorSpec": PriorSpec(kind).build_prior(model),
        "cli": _cli_spec(path, kind, []).build_prior(model),
        "build_family": build_family(model, kind).to_prior(),
        "automatic": _family(model, PriorSpec(kind), AutoConfig()).to_prior(),
    }
    _same(priors, _point(model))
    assert priors["make_prior"].parts["backbone"].variance == default
    assert priors["make_prior"].parts["head"].variance == HEAD_VARIANCE


def test_the_defaults_are_the_registry_values():
    lowrank, l2sp, standard = PriorKind.LOWRANK.recipe, PriorKind.L2SP.recipe, PriorKind.STANDARD.recipe
    assert lowrank.defaults == {"scale": 100.0, "eps": 1e-3, "rank": None, "variance": None, "head_variance": 1.0}
    assert l2sp.defaults["variance"] == 1e-3 and standard.defaults["variance"] == 10.0
    resolved = PriorSpec("lowrank").resolved()
    assert (resolved.scale, resolved.eps, resolved.head_variance) == (100.0, 1e-3, HEAD_VARIANCE)
    parser = build_parser()
    assert parser.parse_args(["finetune"]).head_variance == HEAD_VARIANCE


def test_the_shared_card_recommends_the_registry_defaults(tmp_path):
    from ptyl.io import from_pretrained, save_pretrained

    model = TinyNet()
    save_pretrained(tmp_path / "share", random_posterior(model, dtype=torch.float32))
    recommended = from_pretrained(tmp_path / "share").card.recommended
    defaults = PriorKind.LOWRANK.recipe.defaults
    assert (recommended["scale"], recommended["eps"]) == (defaults["scale"], defaults["eps"])
