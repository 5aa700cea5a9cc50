"""An offline ImageNet-C-style corruption suite for uint8 images of any size (28 px to 800 px).

Why write our own: ImageNet-C / CIFAR-10-C exist only for their own images. To measure robustness on
other data (MNIST, SVHN, a private set) we need the same corruption families at 5 severities,
applied deterministically (seeded) to numpy images; the original `imagecorruptions` package depends
on old scikit-image API (`gaussian(..., multichannel=True)`) plus OpenCV, neither usable here. These
functions are written from the published parameter tables with numpy, scipy and PIL only.

Parameters follow ImageNet-C's (defined for 224 px images):

  gaussian_noise   std             .08 .12 .18 .26 .38         (pixel values in [0, 1])
  shot_noise       photons/unit    60  25  12  5   3           (Poisson(x * c) / c)
  impulse_noise    salt&pepper     .03 .06 .09 .17 .27         (fraction of values replaced)
  defocus_blur     (radius, alias) (3,.1) (4,.5) (6,.5) (8,.5) (10,.5)        px at 224
  motion_blur      (radius, sigma) (10,3) (15,5) (15,8) (15,12) (20,15)      px at 224
  contrast         factor          .4  .3  .2  .1  .05         ((x - mean) * c + mean, per channel)
  brightness       +V in HSV       .1  .2  .3  .4  .5
  pixelate         size factor     .6  .5  .4  .3  .25         (BOX down, NEAREST back up)
  jpeg_compression quality         25  18  15  10  7

Adaptation to image size: per-pixel corruptions (noise, contrast, brightness, JPEG quality) do not
depend on size and use the table as is. Pixelate's factor is relative, so it is used as is too (the
reduced side is at least 1 px); it averages with BOX down and copies blocks back up with NEAREST
(practically the same as ImageNet-C's BOX up at 224 px; at 28 px BOX up blends block edges so much
that severity 1 changes the image more than severity 2). Blur radii and sigmas are lengths in pixels
of a 224 px image, so they are multiplied by min(H, W) / 224: a 32 px image gets defocus radii
0.43..1.43 px, close to the values CIFAR-10-C chose by hand (0.3..1.5). Such sub-pixel kernels would
vanish if rasterised on the pixel grid, so both blur kernels are built as continuous shapes (a
filled disk, a Gaussian-weighted line) sampled on a 1/8 px grid and splatted bilinearly onto pixels:
a kernel then changes smoothly with its radius and still acts at 28 px. Caveat for images under ~48
px: pixelate's blocks are 1.7..4 px, so whether they align with the pixel grid matters; averaged
over images the change grows with severity, but for a single image two neighbouring severities can
swap. JPEG on flat, texture-free images (a bare MNIST digit) can also swap neighbouring qualities,
as real JPEG quantisation does.

Not implemented (they need physical models or texture files): glass, zoom, elastic, snow, frost,
fog.

Determinism: `corrupt(image, name, severity, seed)` is a pure function of its arguments. One seed
draws the same underlying random numbers at every severity (the motion-blur angle, the Gaussian and
impulse noise patterns), so those severities differ only in strength; Poisson draws depend on the
rate.
"""
from __future__ import annotations

import functools
import io
from typing import Any, Callable

import numpy as np
from PIL import Image
from scipy import ndimage, signal

REFERENCE_SIZE = 224  # the image side the ImageNet-C parameters were defined for
SUBPIXEL = 8  # samples per pixel when building continuous blur kernels

PARAMETERS: dict[str, tuple[Any, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "shot_noise": (60, 25, 12, 5, 3),
    "impulse_noise": (0.03, 0.06, 0.09, 0.17, 0.27),
    "defocus_blur": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
    "jpeg_compression": (25, 18, 15, 10, 7),
}
CORRUPTIONS = tuple(PARAMETERS)
SPATIAL = ("defocus_blur", "motion_blur")  # parameters in pixels, scaled with the image size


def severity_parameters(name: str, severity: int, image_shape: tuple[int, ...]) -> Any:
  """The parameters `corrupt` uses for this corruption, severity and image size (blurs scaled)."""
  _check(name, severity)
  params = PARAMETERS[name][severity - 1]
  if name in SPATIAL:
    scale = min(image_shape[:2]) / REFERENCE_SIZE
    return tuple(p * scale for p in params)
  return params


def corrupt(image: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
  """One corrupted copy of a uint8 image (H x W, H x W x 1 or H x W x 3); same shape and dtype."""
  return _corrupt(image, name, severity, np.random.default_rng(seed))


def corrupt_batch(images: np.ndarray, name: str, severity: int, seed: int = 0,
                  first_index: int = 0) -> np.ndarray:
  """Corrupts each image of a uint8 [N, H, W(, C)] batch with its own random stream
  (seed, first_index + i): a host corrupting rows [first_index, ...) of a dataset draws exactly
  what a single process corrupting the whole dataset draws for them."""
  images = np.asarray(images)
  if images.ndim not in (3, 4):
    raise ValueError(f"Expected a batch [N, H, W] or [N, H, W, C], got shape {images.shape}.")
  return np.stack([_corrupt(image, name, severity, np.random.default_rng([seed, first_index + i]))
                   for i, image in enumerate(images)])


def _corrupt(image: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
  _check(name, severity)
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 image, got {image.dtype}; convert with np.uint8 first.")
  if image.ndim == 2:
    return _corrupt(image[..., None], name, severity, rng)[..., 0]
  if image.ndim != 3 or image.shape[2] not in (1, 3):
    raise ValueError(f"Expected an image H x W, H x W x 1 or H x W x 3, got shape {image.shape}.")
  params = severity_parameters(name, severity, image.shape)
  if name in _UINT8_OPS:
    return _UINT8_OPS[name](image, params)
  out = _FLOAT_OPS[name](image.astype(np.float64) / 255.0, params, rng)
  return np.round(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


def _check(name: str, severity: int) -> None:
  if name not in PARAMETERS:
    raise ValueError(f"Unknown corruption {name!r}; available: {', '.join(CORRUPTIONS)}.")
  if severity not in (1, 2, 3, 4, 5):
    raise ValueError(f"severity must be an integer 1..5, got {severity!r}.")


# --------------------------------------------------------------------------------------------------
# Per-pixel corruptions on float images in [0, 1].

def _gaussian_noise(x: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
  return x + std * rng.standard_normal(x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
  return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
  # Drawing both uniforms at every severity makes the replaced set grow with `amount`.
  replace = rng.random(x.shape) < amount
  salt = rng.random(x.shape) < 0.5
  return np.where(replace, salt.astype(x.dtype), x)


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
  mean = x.mean(axis=(0, 1), keepdims=True)
  return (x - mean) * factor + mean


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
  # Adding to HSV value with hue and saturation fixed scales every channel by V'/V (as
  # rgb = V * f(H, S)), so no explicit HSV round trip is needed. Black pixels (V = 0, S = 0) become
  # grey V'.
  value = x.max(axis=2, keepdims=True)
  new_value = np.clip(value + shift, 0.0, 1.0)
  ratio = np.divide(new_value, value, out=np.ones_like(value), where=value > 0)
  return np.where(value > 0, x * ratio, new_value)


# --------------------------------------------------------------------------------------------------
# Blurs: continuous kernels splatted onto the pixel grid.

def _splat(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """A normalised kernel from weighted sub-pixel points (offsets [N, 2] as (row, col)), bilinear."""
  half = int(np.ceil(np.abs(points).max())) + 1
  kernel = np.zeros((2 * half + 1, 2 * half + 1))
  base = np.floor(points).astype(int)
  frac = points - base
  for dr in (0, 1):
    for dc in (0, 1):
      row_weight = frac[:, 0] if dr else 1 - frac[:, 0]
      col_weight = frac[:, 1] if dc else 1 - frac[:, 1]
      w = weights * row_weight * col_weight
      np.add.at(kernel, (base[:, 0] + dr + half, base[:, 1] + dc + half), w)
  return kernel / kernel.sum()


@functools.lru_cache(maxsize=16)
def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
  """The defocus kernel of a setting: the same for every image, so made once (building it took
  as long as convolving a 28 px image with it). Read-only, as it is shared."""
  half = int(np.ceil(radius))
  grid = np.arange(-half * SUBPIXEL, half * SUBPIXEL + 1) / SUBPIXEL
  rows, cols = np.meshgrid(grid, grid, indexing="ij")
  inside = rows ** 2 + cols ** 2 <= radius ** 2
  kernel = _splat(np.stack([rows[inside], cols[inside]], axis=1), np.ones(inside.sum()))
  # ImageNet-C softens the disk's edge with a small Gaussian ("alias blur").
  kernel = ndimage.gaussian_filter(kernel, alias_sigma, mode="constant")
  kernel = kernel / kernel.sum()
  kernel.setflags(write=False)
  return kernel


def _motion_kernel(radius: float, sigma: float, angle_degrees: float) -> np.ndarray:
  # A one-sided streak of length 2 * radius whose weights fall off as a Gaussian of `sigma`.
  length = 2.0 * radius
  t = np.linspace(0.0, length, max(2, int(np.ceil(length * SUBPIXEL)) + 1))
  angle = np.deg2rad(angle_degrees)
  points = np.stack([-np.sin(angle) * t, np.cos(angle) * t], axis=1)
  return _splat(points, np.exp(-t ** 2 / (2.0 * sigma ** 2)))


def _convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Per-channel 'same' convolution with mirrored borders (FFT: fast for big kernels at 224+ px)."""
  half = kernel.shape[0] // 2
  padded = np.pad(x, ((half, half), (half, half), (0, 0)), mode="symmetric")
  return np.stack([signal.fftconvolve(padded[..., c], kernel, mode="valid")
                   for c in range(x.shape[2])], axis=2)


def _defocus_blur(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator
                  ) -> np.ndarray:
  radius, alias_sigma = params
  return _convolve(x, _disk_kernel(radius, alias_sigma))


def _motion_blur(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator
                 ) -> np.ndarray:
  radius, sigma = params
  angle = rng.uniform(-45.0, 45.0)
  return _convolve(x, _motion_kernel(radius, sigma, angle))


# --------------------------------------------------------------------------------------------------
# Corruptions that are defined on uint8 images (PIL).

def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)


def _from_pil(pil: Image.Image, like: np.ndarray) -> np.ndarray:
  return np.asarray(pil, dtype=np.uint8).reshape(like.shape)


def _pixelate(image: np.ndarray, factor: float) -> np.ndarray:
  height, width = image.shape[:2]
  small = (max(1, int(width * factor)), max(1, int(height * factor)))
  pil = _to_pil(image).resize(small, Image.Resampling.BOX).resize((width, height),
                                                                    Image.Resampling.NEAREST)
  return _from_pil(pil, image)


def _jpeg_compression(image: np.ndarray, quality: int) -> np.ndarray:
  buffer = io.BytesIO()
  _to_pil(image).save(buffer, format="JPEG", quality=int(quality))
  with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
    return _from_pil(decoded.convert("L" if image.shape[2] == 1 else "RGB"), image)


_FLOAT_OPS: dict[str, Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur, "motion_blur": _motion_blur, "contrast": _contrast,
    "brightness": _brightness,
}
_UINT8_OPS: dict[str, Callable[[np.ndarray, Any], np.ndarray]] = {
    "pixelate": _pixelate, "jpeg_compression": _jpeg_compression,
}
