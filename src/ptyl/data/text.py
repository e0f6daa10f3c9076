"""Labelled text for transformer fine-tuning: embedded sentiment data, your own CSV/TSV/JSONL, tokenised datasets.

>>> texts, labels, classes = load_text_dataset("vader-movies")          # shipped, offline
>>> train = TextDataset(texts, labels, tokenizer, classes=classes, max_length=64)   # a HF tokenizer  # doctest: +SKIP
>>> inputs, label = train[0]                     # ({"input_ids", "attention_mask"}, int)   # doctest: +SKIP

Embedded sets (``src/ptyl/data/embedded/text/README.md`` gives source, licence and citation): the human-rated
sentences of VADER (Hutto & Gilbert, ICWSM 2014) — ``"vader-movies"`` (rotten tomatoes snippets),
``"vader-amazon"`` (product review snippets) and ``"vader-tweets"``. Each mean rating in [-4, 4] becomes a binary
label (``negative`` <= -margin, ``positive`` >= margin; the near-neutral rest is dropped). Movies -> Amazon is a
natural domain-transfer pair.

A :class:`TextDataset` behaves like :class:`ptyl.data.ImageDataset` where it matters (``targets``, ``classes``,
``num_classes``, ``name``, ``subset``), so :func:`ptyl.data.few_shot_subset` and :func:`ptyl.data.balanced_split`
work on it, and its items collate with torch's default collate (every item is padded to the dataset's longest
sequence); :func:`collate_text` additionally trims each batch to its own longest sequence.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import lzma
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ptyl.errors import DataError, InvalidValueError

TEXT_DIR = Path(__file__).resolve().parent / "embedded" / "text"

_VADER_FILES = {
    "vader-movies": "movieReviewSnippets_GroundTruth.txt.xz",
    "vader-amazon": "amazonReviewSnippets_GroundTruth.txt.xz",
    "vader-tweets": "tweets_GroundTruth.txt.xz",
}
SENTIMENT_CLASSES = ["negative", "positive"]

__all__ = [
    "SENTIMENT_CLASSES",
    "TEXT_DIR",
    "TextDataset",
    "available_text_datasets",
    "collate_text",
    "load_text_dataset",
]


def available_text_datasets() -> list[str]:
    """Names of the embedded text datasets accepted by :func:`load_text_dataset`."""
    return list(_VADER_FILES)


def load_text_dataset(
    name_or_path: str | Path,
    *,
    margin: float = 0.5,
    text_column: str = "text",
    label_column: str = "label",
    classes: Sequence[str] | None = None,
) -> tuple[list[str], list[int], list[str]]:
    """Texts, integer labels and class names of an embedded dataset or a file of your own.

    Your own file: UTF-8 text, one example per row, a header row naming the columns (a CSV, a TSV, ``.txt`` read as
    TSV) or one JSON object per line (JSONL), e.g. ``reviews.tsv``::

        label<TAB>text
        positive<TAB>A gripping, beautifully shot film.
        negative<TAB>Two hours I will not get back.

    Labels are class names (classes sorted by name) or integers ``0..C-1``; every class needs an example and there
    must be two or more. A missing column, an empty text or label, or an empty class is a
    :class:`~ptyl.errors.DataError` naming the file and the column.

    Args:
        name_or_path: an embedded name (:func:`available_text_datasets`) or a ``.csv``/``.tsv``/``.txt``/``.jsonl``
            file (optionally ``.gz``/``.xz`` compressed) with a text and a label column.
        margin: embedded sets only: ratings in (-margin, margin) are dropped as neutral.
        text_column / label_column: column (CSV/TSV header) or key (JSONL) names of your file.
        classes: your file only: class names in label order (default: the sorted distinct labels). Integer labels
            ``0..C-1`` are kept as they are when ``classes`` is not given.
    """
    key = str(name_or_path).lower()
    if key in _VADER_FILES:
        return _load_vader(TEXT_DIR / _VADER_FILES[key], margin)
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(
            f"unknown text dataset {str(name_or_path)!r}: not an embedded name ({', '.join(_VADER_FILES)}) "
            "and no such file"
        )
    records = _read_records(path)
    return _records_to_examples(records, path, text_column, label_column, classes)


def _open_text(path: Path) -> io.TextIOBase:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".xz":
        return io.TextIOWrapper(lzma.open(path, "rb"), encoding="utf-8", newline="")
    if suffixes and suffixes[-1] == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _file_kind(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".xz")]
    ext = suffixes[-1].lower() if suffixes else ""
    if ext in (".csv", ".tsv", ".jsonl", ".json", ".txt"):
        return {".json": ".jsonl", ".txt": ".tsv"}.get(ext, ext)
    raise DataError(f"{path}: unsupported text file type {ext!r}; use .csv, .tsv or .jsonl (optionally .gz/.xz)")


def _read_records(path: Path) -> list[dict[str, Any]]:
    kind = _file_kind(path)
    with _open_text(path) as fh:
        if kind == ".jsonl":
            records = []
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {i}: not valid JSON ({err.msg})") from err
                if not isinstance(item, dict):
                    raise DataError(f"{path}, line {i}: each JSONL line must be an object")
                records.append(item)
            return records
        return list(csv.DictReader(fh, delimiter="\t" if kind == ".tsv" else ","))


def _records_to_examples(
    records: list[dict[str, Any]], path: Path, text_column: str, label_column: str, classes: Sequence[str] | None
) -> tuple[list[str], list[int], list[str]]:
    if not records:
        raise DataError(f"{path} holds no examples")
    for column in (text_column, label_column):
        if column not in records[0]:
            raise DataError(f"{path}: no column {column!r}; found {sorted(records[0])}")
    texts, raw = [], []
    for i, rec in enumerate(records):
        text, label = rec.get(text_column), rec.get(label_column)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}: example {i} has an empty or missing {text_column!r}")
        if label is None or (isinstance(label, str) and not label.strip()):
            raise DataError(f"{path}: example {i} has no {label_column!r}")
        texts.append(text)
        raw.append(label)
    if classes is None and all(_is_int(v) for v in raw):
        ints = [int(v) for v in raw]
        if min(ints) < 0:
            raise DataError(f"{path}: integer labels must be >= 0, found {min(ints)}")
        names = [str(c) for c in range(max(ints) + 1)]
        _check_classes(path, ints, names, label_column)
        return texts, ints, names
    names = [str(v).strip() for v in raw]
    class_list = list(classes) if classes is not None else sorted(set(names))
    index = {c: i for i, c in enumerate(class_list)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are not in classes {class_list}")
    labels = [index[n] for n in names]
    _check_classes(path, labels, class_list, label_column)
    return texts, labels, class_list


def _check_classes(path: Path, labels: list[int], classes: list[str], label_column: str) -> None:
    """At least two classes, and none without an example (a typo in ``classes``, a gap in integer labels)."""
    if len(classes) < 2:
        raise DataError(f"{path}: column {label_column!r} holds one class only ({classes}); classification needs "
                        "at least two")
    counts = [0] * len(classes)
    for label in labels:
        counts[label] += 1
    empty = [c for c, n in zip(classes, counts, strict=False) if n == 0]
    if empty:
        raise DataError(f"{path}: class(es) {empty[:5]} of column {label_column!r} have no example (classes: "
                        f"{classes})")


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _load_vader(path: Path, margin: float) -> tuple[list[str], list[int], list[str]]:
    if not 0 <= margin < 4:
        raise InvalidValueError(f"margin must be in [0, 4) on VADER's -4..4 rating scale, got {margin!r}")
    texts, labels = [], []
    with _open_text(path) as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
        if header != ["id", "sentiment", "text"]:
            raise DataError(f"{path}: unexpected header {header}")
        for i, line in enumerate(fh, start=2):
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                raise DataError(f"{path}, line {i}: expected 3 tab-separated fields, got {len(parts)}")
            rating = float(parts[1])
            if rating >= margin and rating > 0:
                labels.append(1)
            elif rating <= -margin and rating < 0:
                labels.append(0)
            else:
                continue  # near-neutral: no clear polarity
            texts.append(parts[2])
    return texts, labels, list(SENTIMENT_CLASSES)


class TextDataset(Dataset):
    """Tokenised texts with integer labels; item ``i`` is ``({"input_ids", "attention_mask"}, label)``.

    Everything is tokenised once here (truncated to ``max_length`` and padded to the longest sequence of the
    dataset), so the default DataLoader collate works and epochs do not re-tokenise.

    Args:
        texts / labels: equal-length sequences; labels are ``0..C-1``.
        tokenizer: a Hugging Face tokenizer (``tokenizer(texts, truncation=..., padding=..., return_tensors="pt")``).
        classes: class names (default ``"0".."C-1"``).
    """

    def __init__(
        self,
        texts: Sequence[str],
        labels: Sequence[int] | torch.Tensor,
        tokenizer: Any,
        *,
        classes: Sequence[str] | None = None,
        max_length: int = 64,
        name: str = "text",
    ):
        texts = list(texts)
        targets = torch.as_tensor(labels, dtype=torch.int64)
        if len(texts) != targets.numel():
            raise DataError(f"{len(texts)} texts but {targets.numel()} labels")
        if not texts:
            raise DataError("a TextDataset needs at least one text")
        if int(targets.min()) < 0:
            raise DataError(f"labels must be >= 0, found {int(targets.min())}")
        if max_length < 2:
            raise InvalidValueError(f"max_length must be >= 2, got {max_length}")
        num_classes = len(classes) if classes is not None else int(targets.max()) + 1
        if int(targets.max()) >= num_classes:
            raise DataError(f"label {int(targets.max())} out of range for {num_classes} classes")
        encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
        self._init_tensors(encoded["input_ids"], encoded["attention_mask"], targets)
        self.texts = texts
        self.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
        self.name = name

    def _init_tensors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor) -> None:
        self.input_ids = input_ids.long()
        self.attention_mask = attention_mask.long()
        self.targets = targets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __getitem__(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        inputs = {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index]}
        return inputs, int(self.targets[index])

    def subset(self, indices: Sequence[int] | torch.Tensor) -> TextDataset:
        """A new dataset of the given examples (shares nothing mutable with this one)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        out = TextDataset.__new__(TextDataset)
        Dataset.__init__(out)
        out._init_tensors(self.input_ids[idx].clone(), self.attention_mask[idx].clone(), self.targets[idx].clone())
        out.texts = [self.texts[i] for i in idx.tolist()]
        out.classes = list(self.classes)
        out.name = self.name
        return out

    def __repr__(self) -> str:
        return (f"TextDataset({self.name!r}, n={len(self)}, classes={self.classes}, "
                f"seq_len={self.input_ids.shape[1]})")


def collate_text(
    batch: Sequence[tuple[Mapping[str, torch.Tensor], int]],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stack ``(inputs, label)`` items and cut the padding columns no example of the batch uses.

    Use as ``DataLoader(dataset, batch_size=32, collate_fn=collate_text)``: shorter batches make a transformer
    forward pass proportionally cheaper.
    """
    if not batch:
        raise DataError("cannot collate an empty batch")
    keys = list(batch[0][0])
    stacked = {k: torch.stack([item[0][k] for item in batch]) for k in keys}
    labels = torch.as_tensor([int(item[1]) for item in batch], dtype=torch.int64)
    if "attention_mask" in stacked:
        used = stacked["attention_mask"].any(dim=0)
        length = int(used.nonzero().max()) + 1 if used.any() else 1
        stacked = {k: v[:, :length] for k, v in stacked.items()}
    return stacked, labels
