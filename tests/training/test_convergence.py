"""The convergence budget: max_steps, the stop rule (loss threshold / plateau) checked after each epoch, the anneal
that ends a stopped run at learning rate 0, the unconverged flag, and an exact resume of a stopped run."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError
from ptyl.training import Callback, TrainConfig, Trainer, fit
from ptyl.training.callbacks import improvement


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = 3.0 * (y[:, None].float() * 2 - 1) + torch.randn(n, 4, generator=gen)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("body", nn.Linear(4, 8))
    net.add_module("head", nn.Linear(8, 2))
    return net


class LearningRates(Callback):
    def __init__(self):
        self.lrs = []

    def on_step_end(self, trainer):
        self.lrs.append(trainer.strategy.optimizer.param_groups[0]["lr"])


def test_max_steps_sets_the_budget_in_whole_epochs():
    result = fit(model(), blobs(), config=TrainConfig(max_steps=10, batch_size=16, progress=False))
    assert result.config.epochs == 3 and result.steps == 12  # 4 steps per epoch, rounded up
    assert result.stop_reason == "budget" and result.converged is None  # no rule set


def test_loss_rule_stops_early_then_anneals_to_zero():
    lrs = LearningRates()
    config = TrainConfig(max_steps=400, batch_size=16, lr=0.1, stop_loss=0.05, anneal_fraction=0.5, progress=False)
    result = fit(model(), blobs(), config=config, callbacks=[lrs])
    assert result.stop_reason == "loss" and result.converged and not result.undertrained
    assert result.steps < 400 and result.final_loss <= 0.2
    # the epoch that met the rule, then half as many steps again, annealed to 0 (never above the cosine it left)
    met = next(r["epoch"] for r in result.history if r["loss"] <= 0.05) * 4
    assert result.steps == met + math.ceil(0.5 * met / 4) * 4
    assert lrs.lrs[-1] < 0.01 * lrs.lrs[0]
    assert all(b <= a + 1e-12 for a, b in zip(lrs.lrs[met:], lrs.lrs[met + 1:], strict=False))  # pairwise: n-1 pairs


def test_budget_running_out_is_flagged_undertrained():
    config = TrainConfig(max_steps=4, batch_size=16, lr=1e-4, stop_loss=1e-3, progress=False)
    result = fit(model(), blobs(), config=config)
    assert result.stop_reason == "budget" and result.converged is False and result.undertrained


def test_min_steps_delays_the_stop():
    config = TrainConfig(max_steps=400, batch_size=16, lr=0.1, stop_loss=10.0, min_steps=40, anneal_fraction=0.0,
                         progress=False)
    result = fit(model(), blobs(), config=config)
    assert result.stop_reason == "loss" and result.steps == 40  # met at once, but not before min_steps


def test_plateau_rule_and_its_window():
    history = [{"loss": 1.0, "prior": 0.0}, {"loss": 0.5, "prior": 0.0}, {"loss": 0.5, "prior": 0.1},
               {"loss": 0.45, "prior": 0.1}]
    assert improvement(history, steps_per_epoch=10, window_steps=10) == pytest.approx(0.05)
    assert improvement(history, steps_per_epoch=10, window_steps=20) == pytest.approx(0.75 - 0.575)
    assert improvement(history[:3], steps_per_epoch=10, window_steps=20) == math.inf  # two windows needed
    config = TrainConfig(max_steps=2000, batch_size=64, lr=0.05, stop_plateau=1e-3, plateau_steps=20,
                         anneal_fraction=0.0, progress=False)
    result = fit(model(), blobs(), config=config)
    assert result.stop_reason == "plateau" and result.steps < 2000


def test_samplers_run_the_whole_budget():
    config = TrainConfig(inference="sgld", max_steps=12, batch_size=16, stop_loss=10.0, num_samples=2,
                         temperature=0.01, progress=False)
    result = fit(model(), blobs(), config=config)
    assert result.steps == 12 and result.stop_reason == "budget" and result.converged is None


def test_a_stopped_run_resumes_to_the_same_end(tmp_path):
    config = TrainConfig(max_steps=400, batch_size=16, lr=0.02, stop_loss=0.05, anneal_fraction=1.0, progress=False)
    whole = fit(model(), blobs(), config=config)
    met = next(r["epoch"] for r in whole.history if r["loss"] <= 0.05)
    assert len(whole.history) == 2 * met  # annealed as long again

    class Interrupt(Callback):  # stop the process while it anneals
        def on_epoch_end(self, trainer, record):
            if trainer.epoch == met:
                raise KeyboardInterrupt

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(model(), blobs(), config=config, checkpoint=ckpt, callbacks=[Interrupt()])
    resumed = fit(model(), blobs(), config=config, checkpoint=ckpt, resume=True)
    assert resumed.steps == whole.steps and resumed.stop_reason == whole.stop_reason
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=False):
        torch.testing.assert_close(a, b)
    again = Trainer(model(), blobs(), None, config, checkpoint=ckpt)
    assert again.fit(resume=True).steps == whole.steps  # a finished, stopped run does not train further


def test_bad_budget_settings_are_named():
    for bad, match in (({"max_steps": 0}, "max_steps"), ({"stop_loss": -1.0}, "stop_loss"),
                       ({"plateau_steps": 0}, "plateau_steps"), ({"prior_step": "newton"}, "prior_step")):
        with pytest.raises(Exception, match=match):
            TrainConfig(**bad).validate()
    with pytest.raises(ConfigError, match="proximal"):
        TrainConfig(inference="sgld", prior_step="proximal").validate()
