import pytest
import torch

from ptyl.data import ImageDataset, balanced_split, class_counts, few_shot_subset, load_dataset
from ptyl.errors import DataError, InvalidValueError


@pytest.fixture(scope="module")
def kmnist_train():
    return load_dataset("kmnist", "train")


def _toy(counts):
    targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    images = torch.arange(len(targets), dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, 2, 2) / 100
    return ImageDataset(images, targets, name="toy")


def _ids(ds):  # toy images encode their original index
    return set((ds.images[:, 0, 0, 0] * 100).round().long().tolist())


@pytest.mark.parametrize("n", [1, 5, 25])
def test_few_shot_exact_counts(kmnist_train, n):
    sub = few_shot_subset(kmnist_train, n, seed=0)
    assert len(sub) == 10 * n
    assert set(class_counts(sub).values()) == {n}
    assert sub.classes == kmnist_train.classes


def test_few_shot_seed_dependence(kmnist_train):
    a = few_shot_subset(kmnist_train, 10, seed=1)
    b = few_shot_subset(kmnist_train, 10, seed=1)
    c = few_shot_subset(kmnist_train, 10, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)


def test_few_shot_nested_and_global_rng_untouched():
    ds = _toy([30, 30, 30])
    state = torch.get_rng_state()
    small, large = few_shot_subset(ds, 3, seed=7), few_shot_subset(ds, 10, seed=7)
    assert torch.equal(state, torch.get_rng_state())
    assert _ids(small) <= _ids(large)


def test_few_shot_too_few_examples():
    ds = _toy([10, 2, 10])
    with pytest.raises(DataError, match=r"'1': 2"):
        few_shot_subset(ds, 3, seed=0)
    with pytest.raises(InvalidValueError):
        few_shot_subset(ds, 0, seed=0)


def test_balanced_split_disjoint_and_balanced():
    ds = _toy([10, 20, 2, 1])
    train, val = balanced_split(ds, val_fraction=0.2, seed=0)
    assert not _ids(train) & _ids(val)
    assert _ids(train) | _ids(val) == _ids(ds)
    assert class_counts(val) == {0: 2, 1: 4, 2: 1, 3: 0}
    assert class_counts(train) == {0: 8, 1: 16, 2: 1, 3: 1}
    # each class with >= 2 examples keeps one on each side even for extreme fractions
    _, tiny_val = balanced_split(ds, val_fraction=0.01, seed=0)
    assert class_counts(tiny_val) == {0: 1, 1: 1, 2: 1, 3: 0}
    big_train, _ = balanced_split(ds, val_fraction=0.99, seed=0)
    assert class_counts(big_train) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_balanced_split_seeded():
    ds = _toy([20, 20])
    a, b = balanced_split(ds, seed=3)[1], balanced_split(ds, seed=3)[1]
    c = balanced_split(ds, seed=4)[1]
    assert _ids(a) == _ids(b) and _ids(a) != _ids(c)
    with pytest.raises(InvalidValueError):
        balanced_split(ds, val_fraction=1.0)
    with pytest.raises(DataError, match="empty"):
        balanced_split(_toy([1, 1]))
