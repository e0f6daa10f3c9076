import numpy as np
import pytest
import torch

from ptyl.data import EMBEDDED_DIR, ImageDataset, available_datasets, class_counts, load_dataset, resize_images
from ptyl.errors import DataError, PtylError

EXPECTED = {  # name -> (total images, image side)
    "kmnist": (10_000, 28),
    "mnist": (10_000, 28),
    "mnist5k": (5_000, 28),
    "digits": (1_797, 8),
}


def test_available_datasets():
    assert available_datasets() == ["kmnist", "mnist", "mnist5k", "digits"]


def test_embedded_files_small_and_licensed():
    files = {p.name: p.stat().st_size for p in EMBEDDED_DIR.rglob("*") if p.is_file()}
    assert {"KMNIST-LICENSE.txt", "README.md", "mnist5k.npz"} <= set(files)
    assert sum(files.values()) < 8 * 2**20  # whole embedded tree, other embedded data included


@pytest.mark.parametrize("name", list(EXPECTED))
def test_shapes_dtypes_ranges(name):
    n, side = EXPECTED[name]
    full = load_dataset(name, "all")
    assert len(full) == n
    assert full.images.shape == (n, 1, side, side)
    assert full.images.dtype == torch.float32 and full.targets.dtype == torch.int64
    assert float(full.images.min()) == 0.0 and float(full.images.max()) == 1.0
    assert full.num_classes == 10 and len(full.classes) == 10
    assert set(full.targets.unique().tolist()) == set(range(10))
    image, target = full[0]
    assert image.shape == (1, side, side) and isinstance(target, int)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_train_test_disjoint_balanced_and_deterministic(name):
    full = load_dataset(name, "all")
    train, test = load_dataset(name, "train"), load_dataset(name, "test")
    assert len(train) + len(test) == len(full)
    # disjoint as sets of examples: every image of the full set is in exactly one split
    def key(ds):
        return {(bytes(x.numpy().tobytes()), int(y)) for x, y in zip(ds.images, ds.targets, strict=True)}

    assert not key(train) & key(test)
    full_counts, test_counts = class_counts(full), class_counts(test)
    for c, n_c in full_counts.items():
        assert test_counts[c] == round(0.2 * n_c)
    again = load_dataset(name, "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.targets, test.targets)


def test_known_label_counts():
    assert list(class_counts(load_dataset("mnist", "all")).values()) == [
        980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009
    ]
    assert set(class_counts(load_dataset("kmnist", "all")).values()) == {1000}
    assert set(class_counts(load_dataset("mnist5k", "all")).values()) == {500}
    assert load_dataset("kmnist", "all").classes[0] == "o"


def test_split_returns_independent_copy():
    a = load_dataset("digits", "train")
    a.images.zero_()
    assert load_dataset("digits", "train").images.max() == 1.0


def test_image_size_resizes_digits_to_mnist_size():
    digits = load_dataset("digits", "test", image_size=28)
    assert digits.images.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(digits.images.min()) and float(digits.images.max()) <= 1.0
    small = load_dataset("digits", "test")
    # bilinear upsampling (align_corners=False, integer factor-ish) keeps each image's mean intensity
    assert torch.allclose(digits.images.mean((1, 2, 3)), small.images.mean((1, 2, 3)), atol=1e-4)
    # and downsampling back gives an image strongly correlated with the original
    back = resize_images(digits.images, 8)
    assert torch.corrcoef(torch.stack([back.flatten(), small.images.flatten()]))[0, 1] > 0.9
    # a constant image stays constant
    assert torch.allclose(resize_images(torch.full((1, 1, 8, 8), 0.3), 28), torch.full((1, 1, 28, 28), 0.3))


def test_bad_name_lists_valid_names():
    with pytest.raises(DataError, match="available datasets: kmnist, mnist, mnist5k, digits"):
        load_dataset("cifar10")
    assert issubclass(DataError, PtylError)


def test_bad_split_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="split"):
        load_dataset("kmnist", "validation")
    with pytest.raises(DataError, match="not found"):
        load_dataset("kmnist", root=tmp_path)


def test_root_overrides_embedded_copy(tmp_path):
    rng = np.random.default_rng(0)
    np.savez_compressed(
        tmp_path / "mnist5k.npz",
        images=rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        labels=np.repeat(np.arange(10), 5),
    )
    ds = load_dataset("mnist5k", "test", root=str(tmp_path))
    assert len(ds) == 10 and list(class_counts(ds).values()) == [1] * 10


def test_image_dataset_validation_and_subset():
    images = torch.rand(6, 1, 4, 4)
    ds = ImageDataset(images, [0, 1, 2, 0, 1, 2], classes=["a", "b", "c"], name="toy")
    sub = ds.subset([1, 4])
    assert isinstance(sub, ImageDataset) and sub.classes == ["a", "b", "c"] and len(sub) == 2
    assert torch.equal(sub.images, images[[1, 4]])
    mask = ds.subset(ds.targets == 2)
    assert mask.targets.tolist() == [2, 2]
    with pytest.raises(DataError, match="empty"):
        ds.subset([])
    with pytest.raises(DataError, match="empty"):
        ImageDataset(torch.rand(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        ImageDataset(torch.rand(3, 1, 4, 4), [0, 1])
    with pytest.raises(DataError, match="label 3"):
        ImageDataset(torch.rand(2, 1, 4, 4), [0, 3], classes=["a", "b"])
    with pytest.raises(DataError, match="NaN"):
        ImageDataset(torch.full((2, 1, 4, 4), float("nan")), [0, 1])


def test_uint8_scaled_and_transform_applied():
    raw = np.full((2, 3, 3), 255, dtype=np.uint8)
    ds = ImageDataset(raw, np.array([0, 1]), transform=lambda x: x * 0.5)
    assert ds.images.shape == (2, 1, 3, 3) and float(ds.images.max()) == 1.0
    image, _ = ds[0]
    assert float(image.max()) == 0.5
    assert ds.subset([1]).transform is ds.transform


def test_works_with_dataloader():
    ds = load_dataset("digits", "test")
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    assert x.shape == (16, 1, 8, 8) and y.dtype == torch.int64
