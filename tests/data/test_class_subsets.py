"""Class subsets of the embedded sets: ``kmnist:0-4`` / ``kmnist:5-9`` are class-disjoint tasks of one domain."""

import pytest
import torch

from ptyl.data import load_dataset
from ptyl.errors import DataError


def test_class_disjoint_subsets_are_relabelled_and_keep_the_split():
    full = load_dataset("kmnist", "train")
    first, second = load_dataset("kmnist:0-4", "train"), load_dataset("kmnist:5-9", "train")
    assert first.num_classes == second.num_classes == 5 and len(first) + len(second) == len(full)
    assert second.classes == full.classes[5:] and sorted(second.targets.unique().tolist()) == [0, 1, 2, 3, 4]
    # the same images as the full set's classes 5..9, in order, relabelled
    torch.testing.assert_close(second.images, full.images[full.targets >= 5])
    assert torch.equal(second.targets, full.targets[full.targets >= 5] - 5)
    test = load_dataset("kmnist:5-9", "test")
    assert len(test) == 1000 and test.name == "kmnist:5-9-test"
    assert load_dataset("mnist:7,1", "test").classes == ["7", "1"]


def test_bad_class_lists_are_named():
    with pytest.raises(DataError, match="at least 2 distinct classes among 0..9"):
        load_dataset("kmnist:3-12")
    with pytest.raises(DataError, match="ranges like 0-4"):
        load_dataset("kmnist:a-b")
