"""Batched, seed-deterministic image augmentations in plain torch (no torchvision).

Every function takes a float image batch ``x`` of shape ``[B, C, H, W]`` and an explicit
``generator`` (a :class:`torch.Generator`, an ``int`` seed, or ``None`` for torch's global RNG).
Random parameters are drawn *per sample* on the generator's device and then moved to ``x``'s device,
so the same seed gives bit-identical parameters on CPU and GPU. Geometric transforms are one
``F.affine_grid`` + ``F.grid_sample`` call for the whole batch (zero padding, i.e. black background,
which suits digits). Outputs keep ``x``'s shape (unless a crop ``size`` is asked for), dtype and
device; :class:`SimCLRAugment` clamps its output to ``[0, 1]``.

Horizontal flips are OFF by default for digits: mirroring changes a digit's identity (e.g. a
mirrored 2 or 3 is not a valid digit), so it is not a label-preserving view for these data sets.

The composition follows SimCLR's recipe (Chen et al., ICML 2020, https://arxiv.org/abs/2002.05709):
random resized crop + (for grey-scale digits) small affine jitter, brightness/contrast jitter in place
of colour jitter, and Gaussian noise in place of blur.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ptyl.errors import InvalidValueError

Generator = torch.Generator | int | None

__all__ = [
    "SimCLRAugment",
    "gaussian_noise",
    "random_affine",
    "random_brightness_contrast",
    "random_erasing",
    "random_horizontal_flip",
    "random_resized_crop",
]


# ---------------------------------------------------------------------------- helpers
def _as_generator(generator: Generator) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise InvalidValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """n draws from U(low, high): sampled on the generator's device, returned on ``like``'s device/dtype."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    return (low + (high - low) * u).to(device=like.device, dtype=like.dtype)


def _check_batch(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InvalidValueError(f"{name} must be an image batch [B, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise InvalidValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _check_range(name: str, value: Sequence[float], low: float = -math.inf,
                 high: float = math.inf) -> tuple[float, float]:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise InvalidValueError(f"{name} must be (min, max) with {low} <= min <= max <= {high}, got {tuple(value)}")
    return float(value[0]), float(value[1])


def _size_2d(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise InvalidValueError(f"image size must be positive, got {size}")
    return int(h), int(w)


def _warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resample ``x`` with per-sample affine maps ``theta`` [B,2,3] (output coords -> input coords)."""
    h, w = size if size is not None else x.shape[-2:]
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], h, w], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# ---------------------------------------------------------------------------- transforms
def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: Generator = None,
    size: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Crop a random box of area fraction ``s ~ U(scale)`` and aspect ``r ~ logU(ratio)``; resize to ``size``.

    Box side fractions are ``w = sqrt(s r)``, ``h = sqrt(s / r)``, clipped to 1 (instead of
    torchvision's rejection sampling); the box centre is uniform among positions keeping it inside.
    """
    _check_batch(x)
    lo, hi = _check_range("scale", scale, 0.0, 1.0)
    if lo <= 0:
        raise InvalidValueError(f"scale must be in (0, 1], got {tuple(scale)}")
    r_lo, r_hi = _check_range("ratio", ratio, 0.0)
    if r_lo <= 0:
        raise InvalidValueError(f"ratio must be positive, got {tuple(ratio)}")
    g = _as_generator(generator)
    b = x.shape[0]
    area = _uniform(b, lo, hi, g, x)
    log_r = _uniform(b, math.log(r_lo), math.log(r_hi), g, x)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    # centre in normalised coords [-1, 1]: the box half-width is w, so the centre lies in [-(1-w), 1-w]
    cx = (1 - w) * _uniform(b, -1.0, 1.0, g, x)
    cy = (1 - h) * _uniform(b, -1.0, 1.0, g, x)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return _warp(x, theta, _size_2d(size) if size is not None else None)


def random_horizontal_flip(x: torch.Tensor, p: float = 0.5, generator: Generator = None) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``. Not label-preserving for digits (see module doc)."""
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise InvalidValueError(f"flip probability p must be in [0, 1], got {p}")
    flip = _uniform(x.shape[0], 0.0, 1.0, _as_generator(generator), x) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_affine(
    x: torch.Tensor,
    degrees: float = 10.0,
    translate: tuple[float, float] = (0.1, 0.1),
    scale: tuple[float, float] = (0.9, 1.1),
    generator: Generator = None,
) -> torch.Tensor:
    """Rotate by ``U(-degrees, degrees)``, scale by ``U(scale)``, shift by up to ``translate`` x (W, H).

    The forward map in pixel coordinates (origin at the centre) is ``p_out = s R p_in + t``; grid_sample
    needs its inverse ``p_in = R^T (p_out - t) / s``, expressed in normalised coordinates. With the image
    y axis pointing down, a positive angle turns the content clockwise on screen; positive shifts move it
    right/down (the sampled ranges are symmetric, so this only matters for reading the code).
    """
    _check_batch(x)
    if degrees < 0:
        raise InvalidValueError(f"degrees must be >= 0, got {degrees}")
    tx_max, ty_max = (float(translate[0]), float(translate[1]))
    if not (0 <= tx_max <= 1 and 0 <= ty_max <= 1):
        raise InvalidValueError(f"translate fractions must be in [0, 1], got {tuple(translate)}")
    s_lo, s_hi = _check_range("scale", scale, 0.0)
    if s_lo <= 0:
        raise InvalidValueError(f"scale must be positive, got {tuple(scale)}")
    g = _as_generator(generator)
    b, (h, w) = x.shape[0], x.shape[-2:]
    angle = _uniform(b, -degrees, degrees, g, x) * (math.pi / 180)
    s = _uniform(b, s_lo, s_hi, g, x)
    # translation in normalised units: a shift of f * W pixels is 2f in [-1, 1] coordinates
    tx = 2 * _uniform(b, -tx_max, tx_max, g, x)
    ty = 2 * _uniform(b, -ty_max, ty_max, g, x)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # inverse rotation in pixel space, conjugated by the pixel<->normalised scaling diag(W/2, H/2)
    a = torch.stack([torch.stack([cos, sin * h / w], -1), torch.stack([-sin * w / h, cos], -1)], -2) / s[:, None, None]
    t = torch.stack([tx, ty], -1)
    theta = torch.cat([a, -(a @ t[:, :, None])], dim=2)
    return _warp(x, theta)


def random_brightness_contrast(
    x: torch.Tensor, brightness: float = 0.2, contrast: float = 0.2, generator: Generator = None
) -> torch.Tensor:
    """Grey-scale stand-in for colour jitter: ``x' = (x - m) c + m + b``, ``c ~ U(1±contrast)``, ``b ~ U(±brightness)``.

    ``m`` is each image's mean intensity. The result is not clamped (compose with a clamp).
    """
    _check_batch(x)
    if brightness < 0 or contrast < 0:
        raise InvalidValueError(f"brightness and contrast must be >= 0, got {brightness}, {contrast}")
    g = _as_generator(generator)
    b = x.shape[0]
    c = _uniform(b, 1 - contrast, 1 + contrast, g, x)[:, None, None, None]
    shift = _uniform(b, -brightness, brightness, g, x)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * c + mean + shift


def gaussian_noise(x: torch.Tensor, std: float = 0.05, generator: Generator = None) -> torch.Tensor:
    """Add i.i.d. ``N(0, std^2)`` noise to every pixel (not clamped)."""
    _check_batch(x)
    if std < 0:
        raise InvalidValueError(f"noise std must be >= 0, got {std}")
    g = _as_generator(generator)
    device = g.device if g is not None else x.device
    noise = torch.randn(x.shape, generator=g, device=device, dtype=torch.float32)
    return x + std * noise.to(device=x.device, dtype=x.dtype)


def random_erasing(
    x: torch.Tensor,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.2),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
    generator: Generator = None,
) -> torch.Tensor:
    """With probability ``p`` per image, fill one random box (area fraction ~ U(scale)) with ``value``.

    Zhong et al., AAAI 2020 (https://arxiv.org/abs/1708.04896). Box sides are clipped to the image.
    """
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise InvalidValueError(f"erasing probability p must be in [0, 1], got {p}")
    lo, hi = _check_range("scale", scale, 0.0, 1.0)
    r_lo, r_hi = _check_range("ratio", ratio, 0.0)
    if r_lo <= 0:
        raise InvalidValueError(f"ratio must be positive, got {tuple(ratio)}")
    g = _as_generator(generator)
    b, (h, w) = x.shape[0], x.shape[-2:]
    apply = _uniform(b, 0.0, 1.0, g, x) < p
    area = _uniform(b, lo, hi, g, x)
    log_r = _uniform(b, math.log(r_lo), math.log(r_hi), g, x)
    bw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)  # fractions of W / H
    bh = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    x0 = (1 - bw) * _uniform(b, 0.0, 1.0, g, x)
    y0 = (1 - bh) * _uniform(b, 0.0, 1.0, g, x)
    # pixel centres in [0, 1] coordinates; a pixel is erased if its centre falls inside the box
    cols = (torch.arange(w, device=x.device, dtype=x.dtype) + 0.5) / w
    rows = (torch.arange(h, device=x.device, dtype=x.dtype) + 0.5) / h
    in_x = (cols[None, :] >= x0[:, None]) & (cols[None, :] < (x0 + bw)[:, None])
    in_y = (rows[None, :] >= y0[:, None]) & (rows[None, :] < (y0 + bh)[:, None])
    box = in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None]
    return torch.where(box[:, None], torch.as_tensor(value, dtype=x.dtype, device=x.device), x)


# ---------------------------------------------------------------------------- composition
class SimCLRAugment:
    """SimCLR view generator for grey-scale images: ``(x, generator) -> x_aug``, same shape/dtype, in [0, 1].

    Order: random resized crop -> (optional) horizontal flip -> random affine -> brightness/contrast
    -> Gaussian noise -> (optional) random erasing -> clamp to [0, 1]. Each op is skipped when its
    strength is zero. Calling twice with the same generator *state* gives the same views; with one
    generator advanced between calls (as :class:`ptyl.posterior.simclr.SimCLRObjective` does) the two
    views differ.

    Args:
        image_size: side (or ``(H, W)``) of the output; input batches must already have this size.
        flip_p: horizontal flip probability, 0 by default because mirrored digits change identity.
    """

    def __init__(
        self,
        image_size: int | Sequence[int],
        crop_scale: tuple[float, float] = (0.5, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.0,
        degrees: float = 10.0,
        translate: tuple[float, float] = (0.1, 0.1),
        affine_scale: tuple[float, float] = (0.9, 1.1),
        brightness: float = 0.2,
        contrast: float = 0.2,
        noise_std: float = 0.05,
        erasing_p: float = 0.0,
    ) -> None:
        self.image_size = _size_2d(image_size)
        self.crop_scale = _check_range("crop_scale", crop_scale, 0.0, 1.0)
        self.crop_ratio = _check_range("crop_ratio", crop_ratio, 0.0)
        if not 0.0 <= flip_p <= 1.0 or not 0.0 <= erasing_p <= 1.0:
            raise InvalidValueError(f"flip_p and erasing_p must be in [0, 1], got {flip_p}, {erasing_p}")
        if min(degrees, brightness, contrast, noise_std) < 0:
            raise InvalidValueError("degrees, brightness, contrast and noise_std must be >= 0")
        self.flip_p, self.erasing_p = float(flip_p), float(erasing_p)
        self.degrees, self.translate, self.affine_scale = float(degrees), tuple(translate), tuple(affine_scale)
        self.brightness, self.contrast, self.noise_std = float(brightness), float(contrast), float(noise_std)

    def __call__(self, x: torch.Tensor, generator: Generator = None) -> torch.Tensor:
        _check_batch(x)
        if tuple(x.shape[-2:]) != self.image_size:
            raise InvalidValueError(f"SimCLRAugment expects images of size {self.image_size}, "
                                    f"got {tuple(x.shape[-2:])}")
        g = _as_generator(generator)
        x = random_resized_crop(x, self.crop_scale, self.crop_ratio, generator=g)
        if self.flip_p > 0:
            x = random_horizontal_flip(x, self.flip_p, generator=g)
        if self.degrees > 0 or self.translate != (0, 0) or self.affine_scale != (1, 1):
            x = random_affine(x, self.degrees, self.translate, self.affine_scale, generator=g)
        if self.brightness > 0 or self.contrast > 0:
            x = random_brightness_contrast(x, self.brightness, self.contrast, generator=g)
        if self.noise_std > 0:
            x = gaussian_noise(x, self.noise_std, generator=g)
        if self.erasing_p > 0:
            x = random_erasing(x, self.erasing_p, generator=g)
        return x.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"SimCLRAugment(image_size={self.image_size}, crop_scale={self.crop_scale}, flip_p={self.flip_p}, "
            f"degrees={self.degrees}, translate={self.translate}, affine_scale={self.affine_scale}, "
            f"brightness={self.brightness}, contrast={self.contrast}, noise_std={self.noise_std}, "
            f"erasing_p={self.erasing_p})"
        )
