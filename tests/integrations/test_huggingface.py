"""Hugging Face Trainer: PriorTrainer gives the parameters of ptyl's own fit on a tiny BERT (same seed, prior, data
order, optimizer), also with gradient accumulation; SWAGTrainerCallback learns what learn_prior learns and writes the
prior file. Skipped without transformers."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ptyl.io import load_posterior
from ptyl.pipeline import learn_prior
from ptyl.posterior import SourcePosterior
from ptyl.priors import make_prior
from ptyl.training import TrainConfig, fit
from tests.integrations.common import CLIP, LR, flat, sgd

transformers = pytest.importorskip("transformers", reason="the 'hf' extra is not installed")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
from ptyl.integrations.huggingface import PriorTrainer, SWAGTrainerCallback  # noqa: E402

N, BATCH, EPOCHS = 32, 8, 2


class Tokens(Dataset):
    """Tokenised sentences as Hugging Face datasets give them: dicts with input_ids, attention_mask, labels."""

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 40, (N, 6), generator=gen)
        self.labels = (self.ids[:, 0] > 20).long()

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(6, dtype=torch.long), "labels": self.labels[i]}


def tiny_bert():
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=2,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def posterior():
    """A posterior over the encoder (everything but ``classifier``), learned by ptyl's source stage."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return learn_prior(tiny_bert(), DataLoader(Tokens(), batch_size=BATCH), epochs=3, lr=0.05, rank=3,
                           collect_every=2, head="classifier", progress=False)


def _args(tmp_path, **extra):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS,
                    learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=CLIP, weight_decay=0.0,
                    train_sampling_strategy="sequential", report_to=[], save_strategy="no", logging_steps=2,
                    use_cpu=True, seed=0, disable_tqdm=True)
    return transformers.TrainingArguments(**{**settings, **extra})


class SummedLoss(torch.nn.Module):
    """A model normalising its loss by the Trainer's ``num_items_in_batch`` (as causal LMs do): with gradient
    accumulation the Trainer then does not divide the loss, and the mixin divides the prior term itself."""

    accepts_loss_kwargs = True

    def __init__(self):
        super().__init__()
        self.bert = tiny_bert()

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        logits = self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
        count = kwargs.get("num_items_in_batch") or len(labels)
        return {"loss": F.cross_entropy(logits, labels, reduction="sum") / count, "logits": logits}


def _model(kind: str) -> torch.nn.Module:
    return SummedLoss() if kind == "summed" else tiny_bert()


def _prior(model, posterior):
    if isinstance(model, SummedLoss):
        posterior = SourcePosterior({f"bert.{k}": v for k, v in posterior.mean.items()},
                                    {f"bert.{k}": v for k, v in posterior.variance.items()},
                                    {f"bert.{k}": v for k, v in posterior.deviations.items()}, posterior.metadata)
    return make_prior(model, "lowrank", posterior=posterior, scale=0.5, eps=1e-3, head=_head(model))


def _head(model) -> str:
    return "bert.classifier" if isinstance(model, SummedLoss) else "classifier"


def _reference(kind: str, posterior) -> torch.nn.Module:
    model = _model(kind)
    fit(model, DataLoader(Tokens(), batch_size=BATCH), _prior(model, posterior),
        TrainConfig(epochs=EPOCHS, lr=LR, schedule="constant", grad_clip=CLIP, prior_step="gradient", progress=False),
        head=_head(model))
    return model


# (model, accumulation steps): BertForSequenceClassification takes **kwargs but ignores num_items_in_batch, so with
# accumulation the Trainer would not divide its loss (doubling the data gradient, the Trainer's own behaviour without
# ptyl); model_accepts_loss_kwargs=False is the Trainer's switch for such models: it divides the whole loss, prior
# term included. The "summed" model normalises by num_items_in_batch: the mixin divides the prior term itself.
@pytest.mark.parametrize("kind, accumulate", [("bert", 1), ("bert", 2), ("summed", 2)])
def test_prior_trainer_equals_fit(tmp_path, posterior, kind, accumulate):
    expected = _reference(kind, posterior)
    model = _model(kind)
    trainer = PriorTrainer(model=model, args=_args(tmp_path, per_device_train_batch_size=BATCH // accumulate,
                                                   gradient_accumulation_steps=accumulate),
                           train_dataset=Tokens(), optimizers=(sgd(model), None), prior=_prior(model, posterior))
    if kind == "bert":
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    torch.testing.assert_close(flat(model), flat(expected), rtol=1e-5, atol=1e-6)
    logged = [h for h in trainer.state.log_history if "prior" in h]
    assert logged and all(h["prior"] >= 0 and h["loss"] >= h["prior"] for h in logged)
    assert all(h["data_loss"] == pytest.approx(h["loss"] - h["prior"]) for h in logged)


def test_evaluation_loss_has_no_prior_term(tmp_path, posterior):
    model = tiny_bert()
    trainer = PriorTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), eval_dataset=Tokens(),
                           prior=_prior(model, posterior))
    plain = transformers.Trainer(model=model, args=_args(tmp_path), eval_dataset=Tokens())
    assert trainer.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"])


def test_swag_callback_learns_what_learn_prior_learns(tmp_path):
    expected = learn_prior(tiny_bert(), DataLoader(Tokens(), batch_size=BATCH), epochs=2, lr=LR, rank=3,
                           collect_every=2, head="classifier", progress=False)
    model = tiny_bert()
    callback = SWAGTrainerCallback(rank=3, head="classifier", every_n_steps=2, out=tmp_path / "prior.safetensors",
                                   metadata={"source": "tokens"})
    transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=0.0), train_dataset=Tokens(),
                         optimizers=(sgd(model), None), callbacks=[callback]).train()
    saved = load_posterior(tmp_path / "prior.safetensors")
    assert saved.metadata["source"] == "tokens" and saved.metadata["architecture"] == "BertForSequenceClassification"
    assert sorted(saved.mean) == sorted(expected.mean) and not any(n.startswith("classifier") for n in saved.mean)
    for name in expected.mean:
        torch.testing.assert_close(saved.mean[name], expected.mean[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(saved.deviations[name], expected.deviations[name], rtol=1e-4, atol=1e-6)
