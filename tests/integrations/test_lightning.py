"""PyTorch Lightning: PriorCallback gives the parameters of ptyl's own fit (same seed, prior, data order, optimizer);
SWAGCallback learns the posterior learn_prior learns and writes the prior file. Skipped without Lightning."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ptyl.errors import ConfigError
from ptyl.io import load_posterior
from ptyl.pipeline import learn_prior
from tests.integrations.common import (
    BATCH,
    CLIP,
    EPOCHS,
    dataset,
    flat,
    make_net,
    ordered_loader,
    prior_for,
    reference_fit,
    sgd,
    source_posterior,
)

pl = pytest.importorskip("lightning.pytorch", reason="the 'lightning' extra is not installed")
from ptyl.integrations.lightning import PriorCallback, SWAGCallback  # noqa: E402


class Lit(pl.LightningModule):
    """A user's LightningModule: the data loss only; the network lives in ``self.net``."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return sgd(self.net)


def _trainer(callbacks, epochs=EPOCHS, **kwargs):
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks, **kwargs)


@pytest.fixture(scope="module")
def posterior():
    return source_posterior()


def test_prior_callback_equals_fit(posterior):
    data = dataset()
    expected = reference_fit(ordered_loader(data), posterior)
    net = make_net()
    callback = PriorCallback(prior_for(net, posterior), submodule="net")
    trainer = _trainer([callback], gradient_clip_val=CLIP)
    trainer.fit(Lit(net), ordered_loader(data))
    torch.testing.assert_close(flat(net), flat(expected), rtol=0, atol=1e-6)
    assert float(trainer.callback_metrics["prior_epoch"]) >= 0


def test_prior_callback_with_gradient_accumulation_equals_fit_with_the_whole_batch(posterior):
    """Two accumulated half batches: the prior gradient is added once per optimizer step."""
    data = dataset()
    expected = reference_fit(ordered_loader(data), posterior)
    net = make_net()
    _trainer([PriorCallback(prior_for(net, posterior), submodule="net")], gradient_clip_val=CLIP,
             accumulate_grad_batches=2).fit(Lit(net), ordered_loader(data, BATCH // 2))
    torch.testing.assert_close(flat(net), flat(expected), rtol=1e-5, atol=1e-6)


def test_swag_callback_learns_what_learn_prior_learns(tmp_path):
    data = dataset()
    expected = learn_prior(make_net(), ordered_loader(data), epochs=2, lr=0.05, rank=3, collect_every=2, head="fc",
                           progress=False)
    net = make_net()
    callback = SWAGCallback(rank=3, head="fc", every_n_steps=2, submodule="net", out=tmp_path / "prior.safetensors",
                            metadata={"source": "synthetic"})
    _trainer([callback], epochs=2).fit(Lit(net), ordered_loader(data))
    saved = load_posterior(tmp_path / "prior.safetensors")
    assert saved.metadata["source"] == "synthetic" and saved.metadata["num_snapshots"] == expected.metadata[
        "num_snapshots"]
    for name in expected.mean:
        torch.testing.assert_close(saved.mean[name], expected.mean[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(saved.variance[name], expected.variance[name], rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(saved.deviations[name], expected.deviations[name], rtol=0, atol=1e-6)
    assert callback.posterior is not None


def test_n_is_the_whole_data_set_under_a_distributed_sampler(posterior):
    """Under DDP each rank reads a shard; the prior term divides by the size of the whole data set."""
    data = dataset()
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=1, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    net = make_net()
    callback = PriorCallback(prior_for(net, posterior), submodule="net")
    callback.on_train_start(SimpleNamespace(train_dataloader=loader), Lit(net))
    assert callback.term.num_data == len(data) == 2 * len(sampler)


def test_wrong_submodule_is_named():
    net = make_net()
    callback = PriorCallback(prior_for(net, source_posterior()), submodule="model")
    with pytest.raises(ConfigError, match="no submodule 'model'.*'net'"):
        _trainer([callback], epochs=1).fit(Lit(net), ordered_loader(dataset()))


def test_bf16_mixed_precision_trains_with_the_prior_in_full_precision(posterior):
    data = dataset()
    expected = reference_fit(ordered_loader(data), posterior)
    net = make_net()
    _trainer([PriorCallback(prior_for(net, posterior), submodule="net")], gradient_clip_val=CLIP,
             precision="bf16-mixed").fit(Lit(net), ordered_loader(data))
    torch.testing.assert_close(flat(net), flat(expected), rtol=0.05, atol=0.02)
