"""The loop's contracts: divergence is reported with its step, the hot loop does not read device values, checkpoints
fail with a named file, SWAG collection works in a hand-written loop too, and a strategy of your own plugs in."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptyl.errors import CheckpointError, ConfigError, DivergenceError, PtylError
from ptyl.inference import SampleBank
from ptyl.io import load_checkpoint, save_checkpoint
from ptyl.posterior import SWAGCollector
from ptyl.priors import make_prior
from ptyl.training import Callback, Strategy, SWAGCollection, TrainConfig, fit
from ptyl.training.strategies import make_optimizer, param_groups


def blobs(n: int = 64) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    return TensorDataset(torch.randn(n, 3, generator=gen) + 2 * y[:, None].float(), y)


def net() -> nn.Module:
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 8))
    model.add_module("head", nn.Linear(8, 2))
    return model


def test_nonfinite_loss_raises_a_divergence_error_naming_the_step():
    calls = []

    def objective(model, batch):  # the loss becomes NaN at step 7 (0-based)
        calls.append(1)
        loss = F.cross_entropy(model(batch[0]), batch[1])
        return loss * float("nan") if len(calls) == 8 else loss

    with pytest.raises(DivergenceError, match="step 7") as caught:
        fit(net(), blobs(), objective=objective, epochs=3, batch_size=4, check_every=5, progress=False)
    assert isinstance(caught.value, FloatingPointError) and isinstance(caught.value, PtylError)
    assert len(calls) == 10  # noticed at the end of the window (steps 5..9), not at every step


def test_nonfinite_parameters_are_caught_after_the_epoch():
    class Poison(Callback):  # breaks a parameter the loss does not see: only the parameter check can notice
        def on_step_end(self, trainer):
            if trainer.step == 3:
                with torch.no_grad():
                    trainer.model.spare.fill_(float("inf"))

    model = net()
    model.spare = nn.Parameter(torch.zeros(2))
    with pytest.raises(DivergenceError, match=r"after epoch 1 \(step 8\).*spare"):
        fit(model, blobs(), epochs=2, batch_size=8, callbacks=[Poison()], progress=False)


def test_the_hot_loop_does_not_read_device_values(monkeypatch):
    """Reading a tensor's value into Python (item, bool, float, tolist) waits for the device: count them."""
    counts = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def reads(n: int) -> int:
        counts["n"] = 0
        model = net()
        prior = make_prior(model, "standard", variance=1.0)
        fit(model, blobs(n), prior, epochs=1, batch_size=4, check_every=1000, progress=False)
        return counts["n"]

    assert reads(16) == reads(64)  # 4 vs 16 steps: the same few reads per epoch, none per step


def test_checkpoint_failures_name_the_file(tmp_path):
    good = save_checkpoint({"epoch": 1}, tmp_path / "good.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)

    class Hostile:
        def __reduce__(self):
            return (print, ("pwned",))

    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps({"epoch": Hostile()}))
    for path in (truncated, garbage, hostile, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=path.name):
            load_checkpoint(path)
    with pytest.raises(CheckpointError, match="lacks"):
        load_checkpoint(good, required=("epoch", "model"))
    # a training run asked to resume from a damaged checkpoint says which file is damaged
    with pytest.raises(CheckpointError, match="garbage.pt"):
        fit(net(), blobs(), epochs=1, checkpoint=garbage, resume=True, progress=False)


def test_swag_collection_in_a_hand_written_loop_matches_the_trainer():
    config = TrainConfig(inference="swag", epochs=3, batch_size=16, lr=0.05, swag_lr=0.05, burn_in_fraction=0.0,
                         schedule="constant", swag_collect_every=2, progress=False, seed=4)
    torch.manual_seed(0)
    model = net()
    trained = SWAGCollector(model, rank=2, head="head")
    fit(model, blobs(), None, config, head=None, collector=trained)

    torch.manual_seed(0)
    model = net()
    collection = SWAGCollection(SWAGCollector(model, rank=2, head="head"), every_steps=2)
    optimizer = make_optimizer(param_groups(model, None, config.lr, None), config)
    torch.manual_seed(config.seed)
    loader = DataLoader(blobs(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(config.seed))
    for _ in range(config.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            collection.step(model)
    assert collection.collector.num_snapshots == trained.num_snapshots == 6
    for name, mean in trained.posterior().mean.items():
        torch.testing.assert_close(collection.collector.posterior().mean[name], mean, rtol=0, atol=0)


def test_a_strategy_of_your_own_plugs_into_the_loop():
    class EveryEpoch(Strategy):
        """Plain SGD keeping the model at the end of every epoch."""

        collects_samples = True

        def setup(self, trainer):
            self.optimizer = make_optimizer(param_groups(trainer.model, trainer.head, self.config.lr, None),
                                            self.config)
            self.bank = SampleBank()

        def on_epoch(self, trainer):
            self.bank.add(trainer.model)

    config = TrainConfig(epochs=3, lr=0.05, progress=False)
    result = fit(net(), blobs(), None, config, strategy=EveryEpoch(config))
    assert len(result.samples) == 3 and result.predict(blobs()).shape == (64, 2)


def test_a_swag_collector_is_only_for_swag():
    with pytest.raises(ConfigError, match="swag"):
        fit(net(), blobs(), collector=SWAGCollector(net(), rank=2), epochs=1, progress=False)
    with pytest.raises(ConfigError, match="fewer than 2 snapshots"):  # before training, not after
        fit(net(), blobs(), inference="swag", epochs=1, burn_in_fraction=0.5, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_between_checks_on_cuda():
    """With CUDA's sync debug mode set to error, the steps between two loss checks must not synchronise."""
    from ptyl.training import Trainer

    data = blobs(256)
    model = net().cuda()
    trainer = Trainer(model, data, None, TrainConfig(epochs=1, batch_size=8, check_every=1000, progress=False))
    trainer.net = trainer.env.wrap(model)
    batches = [(x.cuda(), y.cuda()) for x, y in DataLoader(data, batch_size=8)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches:
            trainer._train_step(batch)
            trainer.strategy.on_step(trainer)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 8))
    model.add_module("act", nn.ReLU())
    model.add_module("head", nn.Linear(8, 2))
    return model


def test_a_model_whose_loss_is_nonfinite_after_the_last_step_is_an_error():
    """Issue 25: lr 1e6, constant schedule, no clipping, 4 full-batch steps, no prior. After step 3 the weights are
    finite but the logits overflow; 5 steps named step 4 (the loss window), so must 4 (the final check)."""
    settings = dict(batch_size=64, lr=1e6, schedule="constant", grad_clip=None, progress=False)
    for steps in (4, 5, 8):
        with pytest.raises(DivergenceError, match=r"non-finite loss at step 4\b"):
            fit(mlp(), blobs(), None, max_steps=steps, **settings)
    result = fit(mlp(), blobs(), None, max_steps=3, **settings)  # the model after 3 steps is huge but finite
    x, y = blobs().tensors
    with torch.no_grad():
        assert torch.isfinite(F.cross_entropy(result.model(x), y))


def test_swag_draws_whose_loss_is_nonfinite_are_an_error():
    class Inflate(Callback):  # a SWAG posterior so wide that its draws overflow the logits (the iterates are fine)
        def on_fit_end(self, trainer):
            collector = trainer.strategy.collector
            state = collector.state_dict()
            state["m2"] = state["m2"] * 1e60
            collector.load_state_dict(state)

    settings = dict(inference="swag", epochs=4, batch_size=16, lr=0.05, burn_in_fraction=0.5, num_samples=3,
                    progress=False)
    assert len(fit(net(), blobs(), None, **settings).samples) == 3
    with pytest.raises(DivergenceError, match=r"sample 1 of 3.*step 16"):
        fit(net(), blobs(), None, callbacks=[Inflate()], **settings)


def test_kept_samples_whose_loss_is_nonfinite_are_an_error():
    class KeepsABadOne(Strategy):
        """Plain SGD keeping the model at the end of every epoch, the second one overflowing."""

        collects_samples = True

        def setup(self, trainer):
            self.optimizer = make_optimizer(param_groups(trainer.model, trainer.head, 0.05, None), self.config)
            self.bank = SampleBank()

        def on_epoch(self, trainer):
            state = trainer.model.state_dict()
            if trainer.epoch == 1:
                state = {k: v * 1e30 for k, v in state.items()}
            self.bank.add(state)

    config = TrainConfig(epochs=3, progress=False)
    with pytest.raises(DivergenceError, match=r"sample 2 of 3.*step 6"):
        fit(net(), blobs(), None, config, strategy=KeepsABadOne(config), batch_size=32)


def test_a_checkpoint_of_another_model_names_its_tensors(tmp_path):
    checkpoint = tmp_path / "run.pt"
    fit(net(), blobs(), epochs=1, checkpoint=checkpoint, progress=False)
    wider = nn.Sequential()
    wider.add_module("body", nn.Linear(3, 16))
    wider.add_module("head", nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"run.pt.*body.weight \(expected \(16, 3\), found \(8, 3\)\)"):
        fit(wider, blobs(), epochs=1, checkpoint=checkpoint, resume=True, progress=False)
