"""PyTorch Lightning callbacks: the prior term in your ``LightningModule``'s training, and SWAG on the source side.

    from ptyl.integrations.lightning import PriorCallback, SWAGCallback

    # downstream: your LightningModule returns the data loss; the callback adds grad(-log p(theta)) / N
    prior = make_prior(module.net, "lowrank", posterior=load_posterior("prior.safetensors"), scale=1e4, eps=1e-4)
    trainer = L.Trainer(max_epochs=20, callbacks=[PriorCallback(prior, submodule="net")])

    # source side: keep training at a high constant lr while SWAG collects, then write the prior file
    trainer = L.Trainer(max_epochs=3, callbacks=[SWAGCallback(rank=20, head="fc", submodule="net",
                                                              every_n_steps=10, out="prior.safetensors")])

:class:`PriorCallback` adds ``grad(penalty) / N`` to the accumulated gradients in ``on_before_optimizer_step`` --
after the backward pass (and after Lightning unscales fp16 gradients), before gradient clipping and the step -- the
same update as adding ``penalty / N`` to the loss (:func:`ptyl.training.fit` does that), computed in full precision.
With gradient accumulation it is added once per optimizer step. Under DDP the hook runs after the gradients were
averaged over ranks, and N is the size of the whole data set (the global N), so the prior counts once. It logs
``prior`` (``-log p(theta) / N`` without the normalising constant, so it is >= 0).

Lightning is imported when a callback is first used (``pip install 'ptyl[lightning]'``): ``lightning.pytorch``, or
the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ptyl.errors import ConfigError
from ptyl.integrations.common import SourceCollection, dataset_size
from ptyl.params import Selector
from ptyl.posterior.swag import SWAGCollector
from ptyl.priors.base import Prior
from ptyl.training.objective import PriorTerm

__all__ = ["PriorCallback", "SWAGCallback", "import_lightning"]  # noqa: F822 - the classes come lazily from __getattr__


def import_lightning() -> Any:
    """The Lightning package: ``lightning.pytorch`` or ``pytorch_lightning``.

    Returns:
        The module (it has ``Callback``, ``Trainer``, ``LightningModule``).

    Raises:
        ConfigError: neither is installed (the message says what to install).
    """
    try:
        # optional dependency (the [lightning] extra)
        import lightning.pytorch as pl
    except ImportError:
        try:
            # optional dependency (the [lightning] extra)
            import pytorch_lightning as pl
        except ImportError:
            raise ConfigError("the Lightning integration needs PyTorch Lightning: pip install 'ptyl[lightning]' "
                              "(installs lightning without changing torch)") from None
    return pl


def _target(pl_module: nn.Module, submodule: str | None) -> nn.Module:
    if not submodule:
        return pl_module
    try:
        return pl_module.get_submodule(submodule)
    except AttributeError:
        children = [name for name, _ in pl_module.named_children()]
        raise ConfigError(f"{type(pl_module).__name__} has no submodule {submodule!r}; its children: "
                          f"{children}") from None


def _train_dataset(trainer: Any) -> Any:
    loader = trainer.train_dataloader
    loader = loader[0] if isinstance(loader, (list, tuple)) and loader else loader
    return getattr(loader, "dataset", None)


@functools.cache
def _classes() -> dict[str, type]:
    pl = import_lightning()

    class PriorCallback(pl.Callback):
        """Add the prior term ``-log p(theta) / N`` to a LightningModule's training (see the module docstring).

        Args:
            prior: e.g. from :func:`ptyl.priors.make_prior`, built on the network the prior covers.
            num_data: N (default: the size of the training data set; needed for an ``IterableDataset``).
            submodule: the attribute of the LightningModule holding that network (e.g. ``"net"``); ``None``: the
                LightningModule itself.
            log: log ``prior`` (``prog_bar`` off) on every step.
        """

        def __init__(self, prior: Prior, *, num_data: int | None = None, submodule: str | None = None,
                     log: bool = True) -> None:
            super().__init__()
            self.prior, self.num_data, self.submodule, self.log_prior = prior, num_data, submodule, log
            self.term: PriorTerm | None = None

        def on_train_start(self, trainer, pl_module) -> None:
            network = _target(pl_module, self.submodule)
            device = next(network.parameters()).device
            self.prior.to(device)
            n = dataset_size(self.num_data, _train_dataset(trainer), "the Lightning train dataloader")
            self.term = PriorTerm(self.prior, n, device)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            # grad(penalty) / N into .grad: the update of loss + penalty / N (DDP's hooks stay out of it)
            term = self.term.add_grad_(_target(pl_module, self.submodule))
            if self.log_prior:
                pl_module.log("prior", self.term.logged(term).float(), on_step=True, on_epoch=True)

    class SWAGCallback(pl.Callback):
        """Collect SWAG while a LightningModule trains on the source task, and write the prior file at the end.

        Args:
            collector: a :class:`~ptyl.posterior.SWAGCollector` of your own (``None``: built when training starts).
            rank, include, exclude, head, every_n_steps, start_step, start_epoch, out, metadata, dtype: see
                :class:`ptyl.integrations.common.SourceCollection`.
            submodule: the attribute of the LightningModule holding the network (``None``: the module itself).

        After ``trainer.fit``, ``callback.posterior`` holds the :class:`~ptyl.posterior.SourcePosterior` (on global
        rank 0, which also writes ``out``). The collection's state is saved in Lightning checkpoints.
        """

        def __init__(self, collector: SWAGCollector | None = None, *, rank: int = 20, include: Selector = None,
                     exclude: Selector = None, head: str | Sequence[str] | None = "head",
                     every_n_steps: int | None = None, start_step: int = 0, start_epoch: int = 0,
                     out: str | os.PathLike | None = None, metadata: dict[str, Any] | None = None,
                     dtype: str | None = None, submodule: str | None = None) -> None:
            super().__init__()
            self.source = SourceCollection(collector, rank=rank, include=include, exclude=exclude, head=head,
                                           every_n_steps=every_n_steps, start_step=start_step,
                                           start_epoch=start_epoch, out=out, metadata=metadata, dtype=dtype)
            self.submodule = submodule
            self._last_step = -1

        @property
        def posterior(self):
            """The learned :class:`~ptyl.posterior.SourcePosterior` (after ``fit``; ``None`` before)."""
            return self.source.posterior

        def on_train_start(self, trainer, pl_module) -> None:
            self.source.start(_target(pl_module, self.submodule))
            self._last_step = trainer.global_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step != self._last_step:  # an optimizer step was taken (not an accumulation batch)
                self._last_step = trainer.global_step
                self.source.step(_target(pl_module, self.submodule), trainer.is_global_zero)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.source.end_epoch(_target(pl_module, self.submodule), trainer.is_global_zero)

        def on_train_end(self, trainer, pl_module) -> None:
            self.source.finish(_target(pl_module, self.submodule), trainer.is_global_zero)

        def state_dict(self) -> dict[str, Any]:
            return {"collection": self.source.state_dict(), "last_step": self._last_step}

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            self.source.load_state_dict(state_dict["collection"])
            self._last_step = int(state_dict["last_step"])

    return {"PriorCallback": PriorCallback, "SWAGCallback": SWAGCallback}


def __getattr__(name: str) -> Any:
    if name in ("PriorCallback", "SWAGCallback"):
        return _classes()[name]  # subclasses of Lightning's Callback: built on first use
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
