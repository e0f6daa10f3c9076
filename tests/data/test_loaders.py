import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from ptyl.data import (
    EMBEDDED_DIR,
    class_counts,
    load_dataset,
    load_idx_pair,
    load_image_folder,
    load_npz,
    read_idx,
    write_idx,
)
from ptyl.errors import DataError


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    """Reference writer straight from the format spec (independent of ptyl.write_idx)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def test_read_idx_spec_file_plain_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    (tmp_path / "img.idx").write_bytes(_idx_bytes(images, 0x08))
    (tmp_path / "img.idx.gz").write_bytes(gzip.compress(_idx_bytes(images, 0x08)))
    floats = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
    (tmp_path / "f.idx").write_bytes(_idx_bytes(floats, 0x0D))
    np.testing.assert_array_equal(read_idx(tmp_path / "img.idx"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "img.idx.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), floats)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64, np.int64])
@pytest.mark.parametrize("suffix", [".idx", ".idx.gz"])
def test_write_read_round_trip(tmp_path, dtype, suffix):
    array = (np.arange(60).reshape(3, 4, 5) % 100).astype(dtype)
    path = tmp_path / f"a{suffix}"
    write_idx(path, array)
    back = read_idx(path)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == (np.int32 if dtype == np.int64 else dtype)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_read_embedded_mnist_header():
    images = read_idx(EMBEDDED_DIR / "mnist-t10k-images-idx3-ubyte.gz")
    labels = read_idx(EMBEDDED_DIR / "mnist-t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels[:5].tolist() == [7, 2, 1, 0, 4]  # first t10k labels


def test_truncated_and_malformed_idx(tmp_path):
    good = _idx_bytes(np.zeros((4, 3, 3), np.uint8), 0x08)
    cases = {
        "trunc_data.idx": (good[:-5], "truncated idx file"),
        "trunc_header.idx": (good[:9], "truncated idx header"),
        "extra.idx": (good + b"\x00", "unexpected bytes"),
        "magic.idx": (b"\x01\x02" + good[2:], "magic"),
        "tiny.idx": (b"\x00", "too short"),
    }
    for name, (payload, message) in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(DataError, match=message):
            read_idx(tmp_path / name)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(DataError, match="gzip"):
        read_idx(tmp_path / "trunc.gz")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing.idx")


def test_load_idx_pair_matches_embedded_mnist(tmp_path):
    ds = load_idx_pair(
        EMBEDDED_DIR / "mnist-t10k-images-idx3-ubyte.gz", EMBEDDED_DIR / "mnist-t10k-labels-idx1-ubyte.gz"
    )
    ref = load_dataset("mnist", "all")
    assert torch.equal(ds.images, ref.images) and torch.equal(ds.targets, ref.targets)
    write_idx(tmp_path / "l.idx", np.zeros(3, np.uint8))
    with pytest.raises(DataError, match="10000 images but .* 3 labels"):
        load_idx_pair(EMBEDDED_DIR / "mnist-t10k-images-idx3-ubyte.gz", tmp_path / "l.idx")


def test_load_npz_guessed_keys_and_layouts(tmp_path):
    rng = np.random.default_rng(0)
    nhw = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    expected = torch.from_numpy(nhw).float().div(255).unsqueeze(1)
    layouts = {
        "nhw": dict(x=nhw, y=labels),
        "nchw": dict(images=nhw[:, None], labels=labels),
        "nhwc": dict(images=nhw[..., None], targets=labels),
        "flat": dict(data=nhw.reshape(6, 25), label=labels),
        "arr": dict(arr_0=nhw, arr_1=labels),
    }
    for name, arrays in layouts.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        ds = load_npz(tmp_path / f"{name}.npz")
        assert torch.equal(ds.images, expected), name
        assert ds.targets.tolist() == labels.tolist() and ds.targets.dtype == torch.int64
    rgb = rng.integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=rgb, labels=[0, 1], classes=np.array(["cat", "dog"]))
    ds = load_npz(tmp_path / "rgb.npz")
    assert ds.images.shape == (2, 3, 4, 4) and ds.classes == ["cat", "dog"]
    assert float(ds.images[1, 2, 3, 0]) == pytest.approx(rgb[1, 3, 0, 2] / 255)


def test_load_npz_explicit_keys_separate_labels_and_errors(tmp_path):
    ds = load_npz(
        EMBEDDED_DIR / "kmnist-test-imgs.npz", labels_path=EMBEDDED_DIR / "kmnist-test-labels.npz"
    )
    assert len(ds) == 10_000 and set(class_counts(ds).values()) == {1000}
    np.savez(tmp_path / "odd.npz", pics=np.zeros((2, 3, 3), np.uint8), cls=np.array([0, 1]))
    with pytest.raises(DataError, match=r"cannot guess .* images.*\['pics', 'cls'\]"):
        load_npz(tmp_path / "odd.npz")
    assert len(load_npz(tmp_path / "odd.npz", images_key="pics", labels_key="cls")) == 2
    with pytest.raises(DataError, match="no array named 'nope'"):
        load_npz(tmp_path / "odd.npz", images_key="nope")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        load_npz(tmp_path / "junk.npz")


def _write_pngs(root, sizes=None):
    rng = np.random.default_rng(0)
    arrays = {}
    for cls, n in (("cat", 3), ("dog", 2), ("emu", 4)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            array = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            path = root / cls / f"{i}.png"
            Image.fromarray(array).save(path)
            arrays[path] = array
    return arrays


def test_load_image_folder(tmp_path):
    arrays = _write_pngs(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    ds = load_image_folder(tmp_path)
    assert ds.classes == ["cat", "dog", "emu"]
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert ds.images.shape == (9, 1, 6, 6) and ds.images.dtype == torch.float32
    gray = np.array(Image.fromarray(arrays[tmp_path / "dog" / "1.png"]).convert("L"))
    assert torch.allclose(ds.images[4, 0], torch.from_numpy(gray).float() / 255)
    rgb = load_image_folder(tmp_path, grayscale=False)
    assert torch.equal(rgb.images[0], torch.from_numpy(arrays[tmp_path / "cat" / "0.png"]).permute(2, 0, 1) / 255.0)
    resized = load_image_folder(tmp_path, image_size=12)
    assert resized.images.shape == (9, 1, 12, 12) and 0 <= float(resized.images.min())


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_image_folder(tmp_path)
    _write_pngs(tmp_path)
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(tmp_path / "cat" / "big.png")
    with pytest.raises(DataError, match="different sizes"):
        load_image_folder(tmp_path)
    assert load_image_folder(tmp_path, image_size=8).images.shape == (10, 1, 8, 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"class folders \['empty'\]"):
        load_image_folder(tmp_path, image_size=8)
    (tmp_path / "empty" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_image_folder(tmp_path, image_size=8)
