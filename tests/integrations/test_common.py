"""The framework-free parts of the integrations: N from the data set, source-side collection to a prior file or a
shared prior directory, and its checkpointed state."""

import pytest
import torch

from ptyl.errors import ConfigError
from ptyl.integrations.common import SourceCollection, dataset_size
from ptyl.io import from_pretrained, load_posterior
from tests.integrations.common import make_net


def _run(collection, model, steps=6):
    collection.start(model)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        collection.step(model, is_main=True)


@pytest.mark.parametrize("out", ["prior.safetensors", "shared-prior"])
def test_source_collection_writes_a_file_or_a_directory(tmp_path, out):
    model = make_net()
    collection = SourceCollection(rank=2, head="fc", every_n_steps=2, out=tmp_path / out,
                                  metadata={"source": "noise"})
    _run(collection, model)
    posterior = collection.finish(model, is_main=True)
    assert posterior.metadata["num_snapshots"] == 3 and not any(n.startswith("fc.") for n in posterior.mean)
    saved = (load_posterior(tmp_path / out) if out.endswith(".safetensors")
             else from_pretrained(tmp_path / out).posterior)
    assert saved.metadata["source"] == "noise" and saved.metadata["architecture"] == "Net"


def test_other_ranks_neither_collect_nor_write(tmp_path):
    model = make_net()
    collection = SourceCollection(rank=2, head="fc", every_n_steps=1, out=tmp_path / "p.safetensors")
    collection.start(model)
    collection.step(model, is_main=False)
    assert collection.collection.collector.num_snapshots == 0
    assert collection.finish(model, is_main=False) is None and not (tmp_path / "p.safetensors").exists()


def test_state_restored_before_the_collector_exists():
    model = make_net()
    first = SourceCollection(rank=2, head="fc", every_n_steps=1)
    _run(first, model, steps=3)
    second = SourceCollection(rank=2, head="fc", every_n_steps=1)
    second.load_state_dict(first.state_dict())  # a framework restores callbacks before training starts
    second.start(model)
    assert second.collection.collector.num_snapshots == 3 and second.collection.steps == 3


def test_head_that_names_nothing_and_dataset_size():
    with pytest.raises(ConfigError, match="head 'head' matches no parameter"):
        SourceCollection(rank=2).start(make_net())
    assert dataset_size(None, list(range(7)), "x") == 7 and dataset_size(5, None, "x") == 5
    with pytest.raises(ConfigError, match="pass num_data"):
        dataset_size(None, iter(range(3)), "the loader")
