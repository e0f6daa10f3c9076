"""Models from the ecosystem: timm-style ``reset_classifier``, Hugging Face ``num_labels``, PEFT parameter names
(real ``peft`` LoRA, skipped when it is not installed), ``learn_prior(include=...)``, and one head name everywhere."""

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from ptyl.errors import ConfigError
from ptyl.models import replace_head
from ptyl.models.hf import LORA_PATTERNS, add_lora, lora_parameter_names
from ptyl.params import check_head_matches, name_matches, named_parameters, normalize_name
from ptyl.pipeline import learn_prior
from ptyl.posterior import SWAGCollector
from ptyl.priors import make_prior


class TimmLike(nn.Module):
    """The timm classifier interface: ``get_classifier`` / ``reset_classifier`` (here with a dropout in front)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head_drop = nn.Dropout(0.0)
        self.fc = nn.Linear(8, num_classes)
        self.num_classes = num_classes
        self.resets = []

    def get_classifier(self):
        return self.fc

    def reset_classifier(self, num_classes: int):
        self.resets.append(num_classes)
        self.num_classes = num_classes
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.head_drop(self.features(x)))


def test_replace_head_uses_reset_classifier():
    model = TimmLike()
    old = model.fc
    replace_head(model, 4, head_name="fc")
    assert model.resets == [4] and model.fc is not old and model.fc.out_features == 4 and model.num_classes == 4
    assert model(torch.randn(2, 6)).shape == (2, 4)


def test_replace_head_names_the_linear_layers_when_the_head_is_wrong():
    with pytest.raises(ConfigError, match="'fc'"):
        replace_head(TimmLike(), 4, head_name="head")


def _tiny_bert(num_labels: int = 3):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def test_replace_head_updates_hugging_face_num_labels():
    model = _tiny_bert(num_labels=2)
    replace_head(model, 5, head_name="classifier")
    assert model.config.num_labels == 5 and model.num_labels == 5 and len(model.config.id2label) == 5
    ids = torch.randint(0, 40, (4, 7))
    out = model(input_ids=ids, labels=torch.tensor([0, 4, 3, 1]))  # the model's own loss sees 5 classes
    assert out.logits.shape == (4, 5) and torch.isfinite(out.loss)


# --- PEFT ---------------------------------------------------------------------------------------------------------
class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _peft_plain():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    return peft.get_peft_model(Plain(), peft.LoraConfig(r=2, target_modules=["body"], modules_to_save=["head"]))


def test_peft_names_normalise_to_the_plain_model_and_ptyl_lora():
    model = _peft_plain()
    names = [n for n, p in named_parameters(model).items() if p.requires_grad]
    assert names == ["body.lora_A", "body.lora_B", "head.weight", "head.bias"]
    assert "body.weight" in named_parameters(model)  # base_layer mapped back, frozen
    ours = Plain()
    add_lora(ours, target="body", rank=2)
    shapes = {n: tuple(p.shape) for n, p in named_parameters(ours).items() if p.requires_grad}
    assert shapes == {n: tuple(named_parameters(model)[n].shape) for n in shapes}
    assert lora_parameter_names(model) == ["body.lora_A", "body.lora_B"]


def test_other_peft_adapters_match_the_lora_patterns():
    assert normalize_name("base_model.model.x.lora_A.task2.weight") == "x.lora_A.task2.weight"
    chosen = [n for n in ["x.lora_A.task2.weight", "x.weight"] if any(name_matches(n, p) for p in LORA_PATTERNS)]
    assert chosen == ["x.lora_A.task2.weight"]


def test_a_prior_over_peft_lora_learned_and_used_on_a_real_peft_model():
    model = _peft_plain()
    data = TensorDataset(torch.randn(32, 4), torch.arange(32) % 2)
    posterior = learn_prior(model, data, epochs=3, lr=0.05, rank=2, collect_every=1, include=LORA_PATTERNS,
                            head="head", batch_size=8, progress=False)
    assert sorted(posterior.mean) == ["body.lora_A", "body.lora_B"]
    prior = make_prior(model, "lowrank", posterior=posterior, scale=1.0, eps=1e-3, head="head")
    assert set(prior.names) == {"body.lora_A", "body.lora_B", "head.weight", "head.bias"}
    penalty = prior.penalty(model)
    penalty.backward()
    assert model.base_model.model.body.lora_A.default.weight.grad is not None


def test_peft_lora_on_a_tiny_hugging_face_model():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(r=2, target_modules=["query", "value"],
                                                              modules_to_save=["classifier"]))
    lora = lora_parameter_names(model)
    assert lora == [f"bert.encoder.layer.0.attention.self.{m}.lora_{f}" for m in ("query", "value") for f in "AB"]
    swag = SWAGCollector(model, rank=2, include=LORA_PATTERNS)
    swag.collect(model)
    assert swag.names == lora


# --- one head name everywhere -------------------------------------------------------------------------------------
def test_learn_prior_with_a_head_that_matches_nothing_is_an_error():
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 2)
    with pytest.raises(ConfigError, match=r"head 'head' matches no parameter.*\['fc'\]"):
        learn_prior(TimmLike(2), data, epochs=1, progress=False)


def test_learn_prior_warns_when_the_prior_covers_a_head_like_parameter():
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 2)
    with pytest.warns(UserWarning, match=r"fc\.weight.*named like a task head"):
        learn_prior(TimmLike(2), data, epochs=2, rank=1, head=None, batch_size=4, progress=False)


def test_make_prior_ignores_entries_for_the_new_head_with_a_warning():
    model = TimmLike(2)
    data = TensorDataset(torch.randn(8, 6), torch.arange(8) % 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        posterior = learn_prior(model, data, epochs=2, rank=1, head=None, batch_size=4, progress=False)
    replace_head(model, 3, head_name="fc")
    with pytest.warns(UserWarning, match=r"covers \['fc.weight', 'fc.bias'\], the head here"):
        prior = make_prior(model, "lowrank", posterior=posterior, head="fc")
    assert set(prior.parts["head"].names) == {"fc.weight", "fc.bias"}


def test_check_head_matches():
    check_head_matches(["fc.weight"], "fc")
    check_head_matches(["fc.weight"], None)
    with pytest.raises(ConfigError, match="classifier"):
        check_head_matches(["body.weight", "classifier.weight"], "head")
