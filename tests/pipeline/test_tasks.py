"""Tasks: the segmentation and text tasks go through the same runner as classification."""

import math
import string

import pytest
import torch
from torch import nn

from ptyl.data import TextDataset
from ptyl.errors import ConfigError
from ptyl.pipeline import (
    ClassificationTask,
    SegmentationTask,
    TextTask,
    build_from_metadata,
    get_task,
    parse_method,
    run_transfer,
)


def test_classification_task_sizes_and_metadata():
    task = ClassificationTask("digits", max_test=50)
    train = task.train_set(3, seed=1)
    assert len(train) == 30 and len(task.test_set()) == 50
    assert get_task(task.metadata()["task"]) is ClassificationTask


def test_segmentation_task_builds_its_model_and_round_trips_its_metadata():
    task = SegmentationTask("digits", n_test=4, decoder_channels=8, canvas_size=16, digits_per_canvas=(1, 1))
    train, test = task.train_set(6, seed=0), task.test_set(seed=0)
    assert len(train) == 6 and len(test) == 4 and task.num_classes == 11
    meta = {"model": "smallcnn", "model_kwargs": {"width": 4, "in_channels": 1}, "num_classes": 10,
            **task.metadata()}
    model = build_from_metadata(meta)
    assert model.decoder is not None and model(test.images[:2]).shape == (2, 11, 16, 16)
    again = SegmentationTask.from_metadata(meta)
    assert torch.equal(again.test_set(seed=0).masks, test.masks)


class _Chars:
    """A character tokenizer with the Hugging Face call signature (enough for TextDataset)."""

    def __call__(self, texts, truncation, max_length, padding, return_tensors):
        ids = [[1 + string.ascii_lowercase.find(c) % 26 for c in t.lower()[:max_length]] for t in texts]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
        return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}


class _BagOfChars(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.EmbeddingBag(28, 8, mode="mean")
        self.head = nn.Linear(8, 2)

    def forward(self, input_ids, attention_mask):
        return self.head(self.embed(input_ids))


def test_text_task_runs_through_the_transfer_runner():
    texts = [("good great fine " * (1 + i % 3)) if i % 2 else ("bad awful poor " * (1 + i % 3)) for i in range(60)]
    labels = [i % 2 for i in range(60)]
    pool = TextDataset(texts[:40], labels[:40], _Chars(), classes=["negative", "positive"], max_length=24)
    test = TextDataset(texts[40:], labels[40:], _Chars(), classes=["negative", "positive"], max_length=24)
    torch.manual_seed(0)
    results = run_transfer(None, task=TextTask(pool, test), pretrained=_BagOfChars(), n_per_class=[5],
                           methods=["standard", "standard-sgld"], budget=2, steps=6, progress=False)
    assert [r["method"] for r in results] == ["standard", "standard-sgld"]
    assert all(0 <= r["accuracy"] <= 1 and math.isfinite(r["nll"]) for r in results)
    with pytest.raises(ConfigError, match="random-initialisation"):  # a text model starts from its encoder
        TextTask(pool, test).scratch({})


def test_the_runner_needs_a_source():
    with pytest.raises(ConfigError, match="prior file or a pretrained model"):
        run_transfer(None, "digits", methods=["standard"], progress=False)
    assert not parse_method("scratch").pretrained
