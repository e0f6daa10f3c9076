"""Load your own images: idx files (the MNIST format), npz arrays, and class-per-folder image trees.

Every loader returns an :class:`~ptyl.data.datasets.ImageDataset` (float32 ``[N,C,H,W]``, int64 targets),
except :func:`read_idx`/:func:`write_idx`, which read/write one raw array. No pickle is ever used.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ptyl.data.images import ImageDataset, resize_images, to_image_tensor
from ptyl.errors import DataError
from ptyl.io.atomic import atomic_write_bytes

__all__ = ["read_idx", "write_idx", "load_idx_pair", "load_npz", "load_image_folder", "load_path", "is_data_path",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")

# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}

_IMAGE_KEYS = ("images", "image", "imgs", "x", "X", "data", "inputs", "x_train", "X_train", "arr_0")
_LABEL_KEYS = ("labels", "label", "targets", "target", "y", "Y", "y_train", "arr_1")


# --- idx ---------------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file extension
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (plain or gzip-compressed) into a native-endian numpy array.

    Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64), the number of dimensions, then each dimension as a big-endian uint32, then the data.
    Raises :class:`DataError` on a bad magic number, and when the data is shorter (truncated) or longer
    than the dimensions say.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short to be an idx file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000TTDD)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    if ndim == 0:
        raise DataError(f"{path}: idx file declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got < expected:
        raise DataError(f"{path}: truncated idx file, dims {dims} need {expected} data bytes but found {got}")
    if got > expected:
        raise DataError(f"{path}: {got - expected} unexpected bytes after the idx data of dims {dims}")
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray | torch.Tensor) -> None:
    """Write ``array`` as an idx file (gzip-compressed if ``path`` ends in ``.gz``), atomically.

    int64 arrays (typical labels) are stored as int32 when their values fit.
    """
    path = Path(path)
    array = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if array.dtype == np.int64:
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise DataError("int64 values out of the int32 range cannot be stored in an idx file")
        array = array.astype(np.int32)
    code = _IDX_CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise DataError(f"idx cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64")
    if not 1 <= array.ndim <= 255:
        raise DataError(f"idx needs 1..255 dimensions, got {array.ndim}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime=0: identical bytes for identical data
    atomic_write_bytes(path, payload)


def load_idx_pair(
    images_path: str | os.PathLike,
    labels_path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    name: str | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` from an idx images file ``[N,H,W]`` and an idx labels file ``[N]``."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim not in (3, 4):
        raise DataError(f"{images_path}: expected images of shape [N,H,W] or [N,C,H,W], got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected labels of shape [N], got {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return ImageDataset(images, labels, classes, name=name or Path(images_path).name.split(".")[0])


# --- npz ---------------------------------------------------------------------------------------------


def _pick_key(files: list[str], key: str | None, candidates: Sequence[str], what: str, path: Path) -> str:
    if key is not None:
        if key not in files:
            raise DataError(f"{path}: no array named {key!r} for the {what}; arrays in the file: {files}")
        return key
    for candidate in candidates:
        if candidate in files:
            return candidate
    raise DataError(
        f"{path}: cannot guess which array holds the {what} (tried {list(candidates)}); arrays in the file: "
        f"{files}; pass {what}_key="
    )


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise DataError(f"{path}: a .npy array, not an .npz archive")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{path}: not a readable npz file ({err})") from err


def _to_nchw(images: np.ndarray, path: Path) -> np.ndarray:
    """Accept [N,H,W], [N,C,H,W], [N,H,W,C] (C in 1,3,4) and flat square [N,H*W]."""
    if images.ndim == 2:
        side = math.isqrt(images.shape[1])
        if side * side != images.shape[1]:
            raise DataError(f"{path}: flat images of {images.shape[1]} pixels are not square; reshape them first")
        return images.reshape(images.shape[0], 1, side, side)
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        channels = (1, 3, 4)
        # NHWC when only the last axis looks like channels, or both do and the last is smaller
        # (e.g. [N,4,4,3]); ties such as [N,3,3,3] follow torch's NCHW convention.
        last, second = images.shape[-1], images.shape[1]
        if last in channels and (second not in channels or last < second):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # NHWC -> NCHW
        if images.shape[1] in channels:
            return images
    raise DataError(f"{path}: cannot interpret images of shape {images.shape} as [N,H,W], NCHW or NHWC")


def load_npz(
    path: str | os.PathLike,
    images_key: str | None = None,
    labels_key: str | None = None,
    *,
    labels_path: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
    name: str | None = None,
) -> ImageDataset:
    """An :class:`ImageDataset` from an ``.npz`` file (loaded with ``allow_pickle=False``).

    Keys are guessed when not given: images from ``images, image, imgs, x, X, data, inputs, x_train,
    X_train, arr_0``; labels from ``labels, label, targets, target, y, Y, y_train, arr_1``. Labels may live in
    a second file ``labels_path`` (as in KMNIST's ``*-imgs.npz`` / ``*-labels.npz``). A string array
    ``classes`` in the file names the classes. Layouts ``[N,H,W]``, NCHW, NHWC and flat square ``[N,H*W]``
    are accepted; ``uint8`` (and other integer types in 0..255) is scaled to [0, 1], floats are kept as is.
    """
    path = Path(path)
    arrays = _read_npz(path)
    images = arrays[_pick_key(list(arrays), images_key, _IMAGE_KEYS, "images", path)]
    label_source = Path(labels_path) if labels_path is not None else path
    label_arrays = _read_npz(label_source) if labels_path is not None else arrays
    label_candidates = _LABEL_KEYS + (("arr_0",) if labels_path is not None else ())
    labels = label_arrays[_pick_key(list(label_arrays), labels_key, label_candidates, "labels", label_source)]
    if classes is None and "classes" in arrays and arrays["classes"].dtype.kind in "US":
        classes = [str(c) for c in arrays["classes"].tolist()]
    images = _to_nchw(images, path)
    if images.dtype.kind == "f" and images.size and float(images.max()) > 1.0:
        warnings.warn(
            f"{path}: float images range up to {float(images.max()):g}; ptyl expects [0, 1] "
            "(store uint8 or divide by 255)",
            stacklevel=2,
        )
    labels = np.asarray(labels).reshape(-1) if np.asarray(labels).ndim == 2 and 1 in labels.shape else labels
    return ImageDataset(images, labels, classes, name=name or path.stem)


# --- image folders -----------------------------------------------------------------------------------


def _read_image(path: Path, grayscale: bool) -> torch.Tensor:
    # optional dependency (Pillow): only image folders need it
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            array = np.array(image.convert("L" if grayscale else "RGB"), dtype=np.uint8)  # a writable copy
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def load_image_folder(
    root: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    grayscale: bool | None = True,
    *,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    name: str | None = None,
    progress: bool = False,
) -> ImageDataset:
    """An :class:`ImageDataset` from ``root/<class>/**/<image>`` (the torchvision ``ImageFolder`` layout).

    Classes are the sorted sub-folder names (hidden folders such as ``.ipynb_checkpoints`` are skipped) and
    label ``k`` is ``classes[k]``; files are read in sorted order with PIL, as 1-channel (``grayscale``) or
    RGB images in [0, 1] (``grayscale=None``: 1-channel when the first image is a grey-level image). Without
    ``image_size`` all images must have the same size.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected root/<class>/<image files>)")
    suffixes = tuple(e.lower() for e in extensions)
    files: list[tuple[Path, int]] = []
    empty = []
    for label, cls in enumerate(classes):
        found = sorted(
            p
            for p in (root / cls).rglob("*")
            if p.is_file() and p.suffix.lower() in suffixes and not _hidden(p.relative_to(root))
        )
        if not found:
            empty.append(cls)
        files.extend((p, label) for p in found)
    if empty:
        raise DataError(f"{root}: no image files ({', '.join(suffixes)}) in class folders {empty}")
    if grayscale is None:
        grayscale = _is_grey(files[0][0])

    images = []
    for path, _ in tqdm(files, desc=f"reading {root.name}", disable=not progress):
        image = _read_image(path, grayscale)
        if image_size is not None:
            image = resize_images(to_image_tensor(image[None]), image_size)[0]
        images.append(image)
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) > 1:
        raise DataError(f"{root}: images have different sizes {sorted(sizes)[:5]}; pass image_size to resize them")
    targets = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(torch.stack(images), targets, classes, name=name or root.name)


def _is_grey(path: Path) -> bool:
    # optional dependency (Pillow): only image folders need it
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.mode in ("1", "L", "LA", "I", "I;16", "F")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err


# --- a path given where a data set name is expected ----------------------------------------------------


def is_data_path(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names data of your own rather than an embedded data set: an existing path, or something
    shaped like one (a ``/``, an ``.npz`` / idx suffix, an ``images,labels`` idx pair)."""
    text = str(spec)
    return (Path(text).exists() or "/" in text or "," in text or os.sep in text
            or text.lower().endswith((".npz", ".gz", "-ubyte", ".idx")))


def load_path(spec: str | os.PathLike, *, progress: bool = False) -> tuple[ImageDataset | None, ImageDataset | None,
                                                                             ImageDataset | None]:
    """Your own labelled images, as ``(all, train, test)`` (``all`` when the data has no split of its own).

    Args:
        spec: a class-per-folder image tree (``root/<class>/<image>``; with ``root/train`` and ``root/test``
            sub-trees those are the splits), an ``.npz`` file (:func:`load_npz`), or an idx pair
            ``images.idx[.gz],labels.idx[.gz]`` (:func:`load_idx_pair`).
        progress: a progress bar while reading image files.

    Returns:
        ``(dataset, None, None)`` or ``(None, train, test)``.

    Raises:
        DataError: the path does not exist or holds nothing loadable (the message says what was expected).
    """
    text = str(spec)
    if "," in text and not Path(text).exists():
        images, labels = text.split(",", 1)
        return load_idx_pair(images, labels), None, None
    path = Path(text)
    if path.is_dir():
        if (path / "train").is_dir() and (path / "test").is_dir():
            train = load_image_folder(path / "train", grayscale=None, name=path.name, progress=progress)
            test = load_image_folder(path / "test", grayscale=None, name=path.name, progress=progress)
            if train.classes != test.classes:
                raise DataError(f"{path}: train classes {train.classes} differ from test classes {test.classes}")
            return None, train, test
        return load_image_folder(path, grayscale=None, progress=progress), None, None
    if path.is_file() and path.suffix.lower() == ".npz":
        return load_npz(path), None, None
    if not path.exists():
        raise DataError(f"data path not found: {path}")
    raise DataError(f"{path}: not an image folder, an .npz file or an 'images.idx,labels.idx' pair")
