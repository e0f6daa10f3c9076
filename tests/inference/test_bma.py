"""SampleBank (memory / disk), predict_probs and bma_predict (softmax averaging, BatchNorm recompute, restore)."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.errors import DataError, InvalidValueError, ParameterMismatchError, PtylError
from ptyl.inference import SampleBank, bma_predict, collect_targets, predict_probs, recompute_batchnorm


class BNNet(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def loader(n=20, batch_size=8, shift=0.0):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 4, generator=gen) * 2 + shift
    y = torch.randint(0, 3, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def perturbed(model: nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.5 * torch.randn(v.shape, generator=gen)) if v.is_floating_point() else v.clone()
            for k, v in model.state_dict().items()}


def assert_state_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------------------------------------------- SampleBank


def test_memory_bank_copies_params_and_buffers():
    model = BNNet()
    bank = SampleBank()
    bank.add(model)
    reference = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.head.weight.add_(1.0)
        model.body[1].running_mean.add_(1.0)
    assert len(bank) == 1
    stored = next(iter(bank))
    assert "body.1.running_mean" in stored and "body.1.num_batches_tracked" in stored
    assert_state_equal(stored, reference)  # a copy, not a view of the live model


def test_memory_bank_fifo_eviction_and_state_dict():
    model = BNNet()
    bank = SampleBank(max_samples=2)
    samples = [perturbed(model, seed) for seed in range(4)]
    for sample in samples:
        bank.add(sample)
    assert len(bank) == 2
    for got, expected in zip(bank, samples[2:], strict=False):
        assert_state_equal(got, expected)
    restored = SampleBank(max_samples=2)
    restored.load_state_dict(bank.state_dict())
    assert len(restored) == 2
    for got, expected in zip(restored, samples[2:], strict=False):
        assert_state_equal(got, expected)
    restored.add(samples[0])  # numbering and eviction continue
    assert_state_equal(restored[0], samples[3])


def test_disk_bank_atomic_files_eviction_and_resume(tmp_path):
    model = BNNet()
    bank = SampleBank(max_samples=3, directory=tmp_path / "samples")
    samples = [perturbed(model, seed) for seed in range(5)]
    for sample in samples:
        bank.add(sample)
    files = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert files == ["sample_000002.safetensors", "sample_000003.safetensors", "sample_000004.safetensors"]
    assert len(bank) == 3
    for got, expected in zip(bank, samples[2:], strict=False):
        assert_state_equal(got, expected)
    assert bank.state_dict()["files"] == files

    resumed = SampleBank(max_samples=3, directory=tmp_path / "samples")
    resumed.load_state_dict(bank.state_dict())
    resumed.add(samples[0])
    assert sorted(p.name for p in (tmp_path / "samples").iterdir())[-1] == "sample_000005.safetensors"
    assert len(resumed) == 3 and not (tmp_path / "samples" / "sample_000002.safetensors").exists()
    assert_state_equal(resumed[-1], samples[0])


def test_disk_bank_handles_tied_weights_and_reports_missing_files(tmp_path):
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight  # tied: shared storage, which safetensors refuses unless copied
    bank = SampleBank(directory=tmp_path)
    bank.add(model)
    assert_state_equal(bank[0], {k: v.detach() for k, v in model.state_dict().items()})
    state = bank.state_dict()
    (tmp_path / state["files"][0]).unlink()
    with pytest.raises(DataError, match="missing"):
        SampleBank(directory=tmp_path).load_state_dict(state)
    with pytest.raises(InvalidValueError):
        SampleBank().load_state_dict(state)  # disk state into an in-memory bank


def test_bank_rejects_bad_input():
    with pytest.raises(InvalidValueError):
        SampleBank(max_samples=0)
    with pytest.raises(InvalidValueError):
        SampleBank().add([1, 2, 3])
    with pytest.raises(InvalidValueError, match="step"):
        SampleBank().add({"step": 3})


# ---------------------------------------------------------------------------------------------------- prediction


def test_predict_probs_matches_softmax_and_restores_mode():
    model = BNNet().train()
    data = loader()
    probs = predict_probs(model, data)
    assert model.training
    model.eval()
    x = torch.cat([b[0] for b in data])
    torch.testing.assert_close(probs, torch.softmax(model(x), 1).detach())
    assert torch.equal(collect_targets(data), torch.cat([b[1] for b in data]))


def test_predict_probs_segmentation_shape():
    model = nn.Conv2d(2, 4, 1)
    data = DataLoader(TensorDataset(torch.randn(5, 2, 3, 3), torch.randint(0, 4, (5, 3, 3))), batch_size=2)
    probs = predict_probs(model, data)
    assert probs.shape == (5, 4, 3, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(5, 3, 3))
    bma = bma_predict(model, [model.state_dict()] * 2, data)
    torch.testing.assert_close(bma, probs)


def test_predict_rejects_shuffled_loader_and_empty_samples():
    model = BNNet()
    shuffled = DataLoader(loader().dataset, batch_size=4, shuffle=True)
    with pytest.raises(InvalidValueError, match="shuffle"):
        predict_probs(model, shuffled)
    with pytest.raises(InvalidValueError, match="at least one sample"):
        bma_predict(model, [], loader())


def test_bma_of_identical_samples_equals_single_model():
    model = BNNet().eval()
    data = loader()
    single = predict_probs(model, data)
    bank = SampleBank()
    for _ in range(3):
        bank.add(model)
    torch.testing.assert_close(bma_predict(model, bank, data), single)


def test_bma_averages_probabilities_and_restores_model():
    model = BNNet().train()
    original = copy.deepcopy(model.state_dict())
    data = loader()
    samples = [perturbed(model, seed) for seed in range(3)]
    expected = torch.zeros(20, 3, dtype=torch.float64)
    for sample in samples:
        twin = BNNet()
        twin.load_state_dict(sample)
        expected += predict_probs(twin, data).double() / 3
    got = bma_predict(model, samples, data)
    torch.testing.assert_close(got, expected.float())
    torch.testing.assert_close(got.sum(1), torch.ones(20))
    assert model.training
    assert_state_equal(model.state_dict(), original)


def test_bma_recomputes_batchnorm_statistics():
    model = BNNet()
    original = copy.deepcopy(model.state_dict())
    data, bn_data = loader(), loader(n=32, shift=3.0)
    sample = perturbed(model, 1)  # running stats perturbed too, i.e. wrong for these weights
    without = bma_predict(model, [sample], data)
    with_bn = bma_predict(model, [sample], data, bn_loader=bn_data)
    assert not torch.allclose(without, with_bn)
    assert_state_equal(model.state_dict(), original)  # the model's own buffers are restored

    # Reference: load the sample, recompute with update_bn on the inputs only, predict.
    twin = BNNet()
    twin.load_state_dict(sample)
    torch.optim.swa_utils.update_bn((x for x, _ in bn_data), twin)
    hidden = twin.body[0](torch.cat([x for x, _ in bn_data])).detach()
    torch.testing.assert_close(twin.body[1].running_mean, hidden.mean(0))  # cumulative stats = full-data mean
    assert not torch.allclose(twin.body[1].running_mean, sample["body.1.running_mean"])
    torch.testing.assert_close(with_bn, predict_probs(twin, data))


def test_batchnorm_recompute_weights_every_example_equally():
    """A short last batch (10 examples at batch size 4: 4, 4, 2) gets its share of the examples, not a third of the
    weight: the running mean is the full-data mean and the running variance the example-weighted mean of the batches'
    (unbiased) variances. torch's update_bn weights batches equally and misses both (the defect behind +0.015 BMA NLL
    on MNIST at 10 per class)."""
    torch.manual_seed(0)
    model = BNNet()
    x = torch.randn(10, 4) * torch.linspace(0.5, 3.0, 10)[:, None] + torch.arange(10.0)[:, None]
    batches = DataLoader(TensorDataset(x, torch.zeros(10)), batch_size=4)
    model.eval()
    momentum = model.body[1].momentum
    assert recompute_batchnorm(model, batches) == 10
    assert not model.training and model.body[1].momentum == momentum  # mode and momentum restored
    hidden = model.body[0](x).detach().double()
    parts = hidden.split(4)
    expected_var = sum(len(p) * p.var(0) for p in parts) / 10
    stats = model.body[1]
    torch.testing.assert_close(stats.running_mean.double(), hidden.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.running_var.double(), expected_var, rtol=1e-5, atol=1e-6)
    twin = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, twin)
    assert not torch.allclose(twin.body[1].running_mean.double(), hidden.mean(0), atol=1e-3)  # equal batch weights


def test_batchnorm_recompute_without_batchnorm_or_batches():
    assert recompute_batchnorm(nn.Linear(3, 2), [torch.zeros(2, 3)]) == 0
    with pytest.raises(DataError, match="no batches"):
        recompute_batchnorm(BNNet(), [])


def test_bma_input_fn_and_dict_inputs():
    class DictNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = BNNet()

        def forward(self, features):
            return self.net(features)

    model = DictNet()
    data = loader()
    probs = bma_predict(model, [model.state_dict()], data, input_fn=lambda batch: {"features": batch[0]},
                        bn_loader=data)
    assert probs.shape == (20, 3)
    torch.testing.assert_close(probs.sum(1), torch.ones(20))


def test_bma_sample_mismatch_raises_and_restores():
    model = BNNet()
    original = copy.deepcopy(model.state_dict())
    bad = perturbed(model, 0)
    bad.pop("head.bias")
    with pytest.raises(PtylError, match="sample 1"):
        bma_predict(model, [perturbed(model, 1), bad], loader())
    assert_state_equal(model.state_dict(), original)


def test_a_sample_of_another_model_is_a_named_mismatch():
    model = BNNet()
    original = copy.deepcopy(model.state_dict())
    other = BNNet(num_classes=4).state_dict()
    with pytest.raises(ParameterMismatchError, match=r"sample 1: .*head.weight \(expected \(3, 6\), found \(4, 6\)\)"):
        bma_predict(model, [perturbed(model, 0), other], loader())
    assert_state_equal(model.state_dict(), original)
