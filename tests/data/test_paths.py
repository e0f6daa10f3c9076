"""A path where a data set name is expected: image folders (one set split 80/20, or train/ + test/ sub-trees,
grey or RGB), .npz files and idx pairs load through load_dataset, so every task and CLI command takes them."""

import numpy as np
import pytest
import torch
from PIL import Image

from ptyl.data import load_dataset, write_idx
from ptyl.errors import DataError


def _folder(root, classes=("a", "b"), n=5, rgb=False):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (6, 6, 3) if rgb else (6, 6)
            Image.fromarray((rng.random(shape) * 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


def test_one_folder_is_split_80_20_by_class(tmp_path):
    root = _folder(tmp_path / "pets")
    train, test, full = (load_dataset(str(root), s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(full)) == (8, 2, 10) and train.classes == ["a", "b"]
    assert train.image_shape == (1, 6, 6) and train.name == "pets-train"
    seen = {tuple(x.flatten().tolist()) for x in torch.cat([train.images, test.images])}
    assert len(seen) == 10  # disjoint, nothing lost


def test_train_and_test_sub_folders_are_the_splits_and_rgb_is_kept(tmp_path):
    _folder(tmp_path / "d" / "train", n=4, rgb=True)
    _folder(tmp_path / "d" / "test", n=2, rgb=True)
    train, test = load_dataset(str(tmp_path / "d"), "train"), load_dataset(str(tmp_path / "d"), "test", image_size=8)
    assert len(train) == 8 and len(test) == 4 and train.image_shape == (3, 6, 6) and test.image_shape == (3, 8, 8)


def test_npz_and_idx_pair(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (20, 5, 5), dtype=np.uint8)
    labels = np.arange(20) % 4
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    assert len(load_dataset(str(tmp_path / "x.npz"), "all")) == 20
    write_idx(tmp_path / "img.idx.gz", images)
    write_idx(tmp_path / "lab.idx.gz", labels.astype(np.uint8))
    data = load_dataset(f"{tmp_path / 'img.idx.gz'},{tmp_path / 'lab.idx.gz'}", "train")
    assert len(data) == 16 and data.num_classes == 4


def test_a_rewritten_folder_is_reloaded(tmp_path):
    root = _folder(tmp_path / "d")
    assert len(load_dataset(str(root), "all")) == 10
    (root / "c").mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((6, 6), np.uint8)).save(root / "c" / f"{i}.png")
    assert load_dataset(str(root), "all").num_classes == 3


def test_bad_paths_name_what_was_expected(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(str(tmp_path / "missing"), "train")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="image folder"):
        load_dataset(str(tmp_path / "file.txt"), "train")
    with pytest.raises(DataError, match="or a path"):
        load_dataset("no-such-name", "train")
