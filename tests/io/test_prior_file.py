import json
import os

import pytest
import torch
from safetensors.torch import save_file

from ptyl.errors import InvalidValueError, ParameterMismatchError, PriorFileError
from ptyl.io import import_reference, load_posterior, load_prior, read_metadata, save_posterior
from ptyl.io.integrity import tensor_records
from ptyl.posterior import SourcePosterior
from ptyl.priors.learned import learned_prior
from tests.helpers import TinyNet, random_posterior


@pytest.fixture
def post():
    return random_posterior(TinyNet(), rank=3, dtype=torch.float32)


def test_round_trip_fp32_exact(tmp_path, post):
    path = save_posterior(post, tmp_path / "p.safetensors", metadata={"source": "unit"})
    back = load_posterior(path)
    for n in post.names:
        assert torch.equal(back.mean[n], post.mean[n])
        assert torch.equal(back.variance[n], post.variance[n])
        assert torch.equal(back.deviations[n], post.deviations[n])
    meta = read_metadata(path)
    assert meta["format_version"] == 2 and meta["rank"] == 3 and meta["source"] == "unit"
    assert meta["architecture"] == "TinyNet"
    assert [p["name"] for p in meta["parameters"]] == post.names
    assert [f for f in os.listdir(tmp_path)] == ["p.safetensors"]  # no temp file left behind


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_half_precision(tmp_path, post, dtype):
    path = save_posterior(post, tmp_path / "p.safetensors", dtype=dtype)
    back = load_posterior(path, dtype=torch.float32)
    tol = 1e-3 if dtype == "float16" else 1e-2
    for n in post.names:
        assert torch.allclose(back.mean[n], post.mean[n], rtol=tol, atol=tol)
        assert torch.allclose(back.deviations[n], post.deviations[n], rtol=tol, atol=tol)
    half = tmp_path / "p.safetensors"
    assert read_metadata(half)["dtype"] == dtype


def test_load_prior_by_name_regardless_of_order(tmp_path, post):
    path = save_posterior(post, tmp_path / "p.safetensors")
    model = TinyNet()
    prior = load_prior(path, model, scale=0.5, eps=0.01, rank=2)
    ref = learned_prior(post, "lowrank", scale=0.5, eps=0.01, rank=2)
    assert torch.allclose(prior.log_prob(model), ref.log_prob(model))
    # a posterior whose dict order is reversed still maps by name
    rev = SourcePosterior(*(dict(reversed(list(d.items()))) for d in (post.mean, post.variance, post.deviations)))
    path2 = save_posterior(rev, tmp_path / "rev.safetensors")
    assert torch.allclose(load_prior(path2, model, scale=0.5, eps=0.01, rank=2).log_prob(model), ref.log_prob(model))


def test_strict_and_non_strict_matching(tmp_path, post):
    path = save_posterior(post, tmp_path / "p.safetensors")

    class Other(TinyNet):
        def __init__(self):
            super().__init__()
            self.features[2] = torch.nn.Linear(32, 5)  # shape mismatch
            self.head = torch.nn.Linear(5, 3)

    with pytest.raises(ParameterMismatchError, match="features.2.weight"):
        load_prior(path, Other())
    with pytest.warns(UserWarning, match="skipped"):
        prior = load_prior(path, Other(), strict=False)
    assert set(prior.skipped) == {"features.2.weight", "features.2.bias"}


def test_missing_file_truncated_and_foreign(tmp_path, post):
    with pytest.raises(PriorFileError, match="not found"):
        load_posterior(tmp_path / "nope.safetensors")
    path = save_posterior(post, tmp_path / "p.safetensors")
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PriorFileError):
        load_posterior(tmp_path / "trunc.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(PriorFileError):
        load_posterior(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(PriorFileError, match="without ptyl metadata"):
        load_posterior(tmp_path / "plain.safetensors")


def _rewrite(path, out, tensor_fn=None, meta_fn=None):
    """Rewrite a prior file with edited tensors (checksums recomputed: a consistent file with bad values, as another
    tool might write) and/or edited metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["ptyl"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensor_fn:
        tensor_fn(tensors)
        meta["tensors"] = tensor_records(tensors)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(out), metadata={"ptyl": json.dumps(meta)})
    return out


def test_bad_contents(tmp_path, post):
    path = save_posterior(post, tmp_path / "p.safetensors")
    n0 = post.names[0]

    def set_(key, value):
        def fn(t):
            t[key] = t[key].clone()
            t[key].view(-1)[0] = value
        return fn

    cases = [
        (dict(tensor_fn=set_(f"mean::{n0}", float("nan"))), InvalidValueError, "NaN"),
        (dict(tensor_fn=set_(f"deviations::{n0}", float("inf"))), InvalidValueError, "NaN/Inf"),
        (dict(tensor_fn=set_(f"variance::{n0}", 0.0)), InvalidValueError, "non-positive"),
        (dict(tensor_fn=set_(f"variance::{n0}", -1.0)), InvalidValueError, "non-positive"),
        (dict(tensor_fn=lambda t: t.pop(f"variance::{n0}")), PriorFileError, "missing"),
        (dict(tensor_fn=lambda t: t.update({f"mean::{n0}": torch.zeros(7)})), PriorFileError, "shape"),
        (dict(tensor_fn=lambda t: t.update({"mean::extra": torch.zeros(1)})), PriorFileError, "not listed"),
        (dict(meta_fn=lambda m: m.update(format_version=99)), PriorFileError, "version 99"),
        (dict(meta_fn=lambda m: m.update(format="other")), PriorFileError, "format"),
    ]
    for i, (kw, err, msg) in enumerate(cases):
        bad = _rewrite(path, tmp_path / f"bad{i}.safetensors", **kw)
        with pytest.raises(err, match=msg):
            load_posterior(bad)


def test_rank_above_stored_raises(tmp_path, post):
    path = save_posterior(post, tmp_path / "p.safetensors")
    with pytest.raises(InvalidValueError, match="k=9 exceeds"):
        load_prior(path, TinyNet(), rank=9)


def test_half_precision_underflow_is_refused(tmp_path, post):
    post.variance[post.names[0]] = post.variance[post.names[0]] * 0 + 1e-30
    with pytest.raises(InvalidValueError, match="underflows"):
        save_posterior(post, tmp_path / "p.safetensors", dtype="float16")


def test_reference_importer_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    backbone = model.features
    names = [n for n, _ in backbone.named_parameters()]
    sizes = [p.numel() for p in backbone.parameters()]
    P, K = sum(sizes), 4
    mean, var, cov = torch.randn(P), torch.rand(P) + 0.1, torch.randn(K, P)
    prefix = str(tmp_path / "resnet_prior")
    torch.save(mean, prefix + "_mean.pt")
    torch.save(var, prefix + "_variance.pt")
    torch.save(cov, prefix + "_covmat.pt")
    torch.save(backbone.state_dict(), prefix + "_model.pt")
    post = import_reference(prefix, covmat="deviations")  # tests/io/test_reference.py: the readings
    assert post.names == names and post.rank == K and post.metadata["covmat"] == "deviations"
    flat = lambda d: torch.cat([d[n].reshape(-1) for n in names])  # noqa: E731
    assert torch.equal(flat(post.mean), mean) and torch.equal(flat(post.variance), var)
    assert torch.equal(torch.cat([post.deviations[n].reshape(K, -1) for n in names], 1), cov)
    # and it survives our own format
    back = load_posterior(save_posterior(post, tmp_path / "imported.safetensors"))
    assert torch.equal(flat(back.mean), mean)
    scaled = import_reference(prefix)  # the default: rows divided by sqrt(K - 1), multiplied back here
    torch.testing.assert_close(torch.cat([scaled.deviations[n].reshape(K, -1) for n in names], 1), cov * 3**0.5)
    assert import_reference(prefix, name_prefix="features.").names == ["features." + n for n in names]
    torch.save(torch.randn(P + 1), prefix + "_mean.pt")
    with pytest.raises(PriorFileError, match="sizes disagree"):
        import_reference(prefix)
    torch.save(torch.arange(P), prefix + "_mean.pt")  # integers are not a mean
    with pytest.raises(PriorFileError, match="floating-point"):
        import_reference(prefix)
    torch.save(mean, prefix + "_mean.pt")
    torch.save(-var, prefix + "_variance.pt")
    with pytest.raises(InvalidValueError, match="resnet_prior_\\*.pt: .*non-positive"):
        import_reference(prefix)


def test_rank_zero_round_trip_keeps_dtype(tmp_path):
    torch.manual_seed(0)
    post = random_posterior(TinyNet(), rank=0, dtype=torch.float64)
    path = save_posterior(post, tmp_path / "diag.safetensors")
    back = load_posterior(path)
    assert back.rank == 0
    for n in post.names:
        assert back.deviations[n].shape == (0, *post.mean[n].shape)
        # the empty deviations follow the stored tensors (dtype, and device via map_location), not torch defaults
        assert back.deviations[n].dtype == back.mean[n].dtype == torch.float64
        assert back.deviations[n].device == back.mean[n].device
    assert all(torch.equal(back.mean[n], post.mean[n]) for n in post.names)


def test_wrong_kind_of_ptyl_file_is_named(tmp_path, post):
    from ptyl.io.prior_file import read_json_header

    path = save_posterior(post, tmp_path / "p.safetensors")
    with pytest.raises(PriorFileError, match="it is a ptyl prior file, not a weights file"):
        read_json_header(path, "ptyl_weights", what="weights")
