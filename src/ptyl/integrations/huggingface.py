"""The Hugging Face ``Trainer``: the prior term in ``compute_loss``, and SWAG on the source side as a
``TrainerCallback``.

    from ptyl.integrations.huggingface import PriorTrainer, SWAGTrainerCallback

    prior = make_prior(model, "lowrank", posterior=load_posterior("prior.safetensors"), scale=1e4, eps=1e-4,
                       head="classifier")
    trainer = PriorTrainer(model=model, args=args, train_dataset=train, prior=prior)   # a transformers.Trainer
    trainer.train()

    class MyTrainer(PriorTrainerMixin, MyOwnTrainer): ...   # or mix it into your own Trainer subclass

    # source side: SWAG while the model trains, then the prior file
    trainer = Trainer(model=model, args=args, train_dataset=source,
                      callbacks=[SWAGTrainerCallback(rank=20, head="classifier", every_n_steps=10,
                                                     out="prior.safetensors")])

:class:`PriorTrainerMixin` adds ``(-log p(theta) - c) / N`` to the training loss the ``Trainer`` computes (``c`` the
normalising constant, which changes no gradient: the logged loss stays >= 0), in full precision outside autocast,
before the backward pass -- so gradient clipping and the optimizer see the full gradient, as in
:func:`ptyl.training.fit`. N is ``len(train_dataset)`` (the global N under DDP, where the ``Trainer`` averages
gradients over ranks). With gradient accumulation the term is divided as the ``Trainer`` divides the data loss, so it
counts once per optimizer step. Evaluation losses are left as they are. The logs get ``prior`` (the term without
``c``) and ``data_loss``.

PEFT models work as they are: their parameter names (``base_model.model.``, ``lora_A.default``) are normalised
(:func:`ptyl.params.normalize_name`), so a prior built on the PEFT model, or on the plain one, matches.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ptyl.errors import ConfigError
from ptyl.integrations.common import SourceCollection, dataset_size
from ptyl.params import Selector
from ptyl.posterior.swag import SWAGCollector
from ptyl.priors.base import Prior
from ptyl.training.objective import PriorTerm

__all__ = ["PriorTrainer", "PriorTrainerMixin", "SWAGTrainerCallback", "import_transformers"]  # noqa: F822 - the classes come lazily from __getattr__


def import_transformers() -> Any:
    """The ``transformers`` package.

    Returns:
        The module.

    Raises:
        ConfigError: it is not installed (the message says what to install).
    """
    try:
        # optional dependency (the [hf] extra)
        import transformers
    except ImportError:
        raise ConfigError("the Hugging Face integration needs transformers: pip install 'ptyl[hf]'") from None
    return transformers


class PriorTrainerMixin:
    """Mix into a ``transformers.Trainer`` (first in the bases): the prior term in the training loss.

    Args:
        *args, **kwargs: the ``Trainer``'s own arguments.
        prior: e.g. from :func:`ptyl.priors.make_prior` on the model (``None``: an ordinary ``Trainer``).
        prior_num_data: N (default: ``len(train_dataset)``; needed for an ``IterableDataset``).
    """

    def __init__(self, *args: Any, prior: Prior | None = None, prior_num_data: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prior, self.prior_num_data = prior, prior_num_data
        self._prior_term: PriorTerm | None = None
        self._prior_logged: list[torch.Tensor] = []

    def _term(self, model: nn.Module) -> PriorTerm:
        if self._prior_term is None:
            device = next(model.parameters()).device
            self.prior.to(device)
            n = dataset_size(self.prior_num_data, self.train_dataset, "the Trainer's train_dataset")
            self._prior_term = PriorTerm(self.prior, n, device)
        return self._prior_term

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether the ``Trainer`` leaves this loss undivided by the accumulation steps (as its training_step
        decides: a loss normalised by ``num_items_in_batch`` is not divided again)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = ((getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
                      or getattr(self, "compute_loss_func", None) is not None)
        return bool(scaled)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The ``Trainer``'s loss plus ``(-log p(theta) - c) / N`` while training.

        Args:
            model: the (possibly wrapped) model.
            inputs: the batch.
            return_outputs: also return the model outputs.
            num_items_in_batch: as the ``Trainer`` passes it.

        Returns:
            The loss (and the outputs with ``return_outputs``).
        """
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                   num_items_in_batch=num_items_in_batch)
        if self.prior is None or not model.training:
            return out
        loss, outputs = out if return_outputs else (out, None)
        prior_term = self._term(model)
        term = prior_term(model)
        self._prior_logged.append(prior_term.logged(term))
        term = term - prior_term.constant(term.device).to(term.dtype)  # the same gradient; a loss that stays >= 0
        if self._loss_is_scaled_for_ga(num_items_in_batch):
            steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
            term = term / max(int(steps), 1)
        loss = loss + term.to(loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``prior`` (the mean prior term since the last log) and ``data_loss`` to the training logs.

        Args:
            logs: the ``Trainer``'s logs.
            *args, **kwargs: passed on.
        """
        if "loss" in logs and self._prior_logged:
            prior = float(torch.stack(self._prior_logged).mean())
            self._prior_logged = []
            logs = {**logs, "prior": prior, "data_loss": logs["loss"] - prior}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]


@functools.cache
def _classes() -> dict[str, type]:
    transformers = import_transformers()

    class PriorTrainer(PriorTrainerMixin, transformers.Trainer):
        """A ``transformers.Trainer`` with the prior term (:class:`PriorTrainerMixin`).

        Args:
            *args, **kwargs: the ``Trainer``'s arguments, plus ``prior`` and ``prior_num_data``.
        """

    class SWAGTrainerCallback(transformers.TrainerCallback):
        """Collect SWAG while a ``Trainer`` trains on the source task, and write the prior file at the end.

        Args:
            collector, rank, include, exclude, head, every_n_steps, start_step, start_epoch, out, metadata, dtype:
                see :class:`ptyl.integrations.common.SourceCollection`.

        After ``trainer.train()``, ``callback.posterior`` holds the posterior (on the main process, which also
        writes ``out``).
        """

        def __init__(self, collector: SWAGCollector | None = None, *, rank: int = 20, include: Selector = None,
                     exclude: Selector = None, head: str | Sequence[str] | None = "head",
                     every_n_steps: int | None = None, start_step: int = 0, start_epoch: int = 0,
                     out: str | os.PathLike | None = None, metadata: dict[str, Any] | None = None,
                     dtype: str | None = None) -> None:
            self.source = SourceCollection(collector, rank=rank, include=include, exclude=exclude, head=head,
                                           every_n_steps=every_n_steps, start_step=start_step,
                                           start_epoch=start_epoch, out=out, metadata=metadata, dtype=dtype)

        @property
        def posterior(self):
            """The learned :class:`~ptyl.posterior.SourcePosterior` (after training; ``None`` before)."""
            return self.source.posterior

        @staticmethod
        def _model(kwargs: dict[str, Any]) -> nn.Module:
            if kwargs.get("model") is None:
                raise ConfigError("SWAGTrainerCallback needs the Trainer to pass the model to its callbacks")
            return kwargs["model"]

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            self.source.start(self._model(kwargs))

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.source.step(self._model(kwargs), state.is_world_process_zero)

        def on_epoch_end(self, args, state, control, **kwargs) -> None:
            self.source.end_epoch(self._model(kwargs), state.is_world_process_zero)

        def on_train_end(self, args, state, control, **kwargs) -> None:
            self.source.finish(self._model(kwargs), state.is_world_process_zero)

    return {"PriorTrainer": PriorTrainer, "SWAGTrainerCallback": SWAGTrainerCallback}


def __getattr__(name: str) -> Any:
    if name in ("PriorTrainer", "SWAGTrainerCallback"):
        return _classes()[name]  # subclasses of transformers' classes: built on first use
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
