"""RandAugment v1 as in the official Noisy Student code, written as stateless TensorFlow ops.

The student's input noise in Noisy Student is RandAugment (Cubuk et al. 2019) in the form the official TF1
code used: N layers, each picking one of 16 PIL-like ops uniformly at random and ALWAYS applying it at the
shared magnitude M. It runs inside `tf.data` maps on the host CPU, so it is written with TensorFlow ops on
uint8 HxWx3 images of any size. All randomness is stateless and derived from a per-example seed tensor,
so a pipeline gives the same images for the same seeds however many parallel calls it uses.

Differences from the official code, each deliberate:
- Posterize keeps 1..8 bits: the official level mapping int(4 * M / 10) gives 0 bits (a black image) for
  M < 2.5 and more than 8 (an invalid shift) for M > 20.
- Contrast blends towards the mean grey level as PIL does. The official code blends towards
  (number of pixels / 256) instead (it sums the histogram's counts rather than the grey levels); set
  `RandAugmentConfig(contrast_mode="official")` to reproduce that exactly.
- AutoContrast computes (x - lo) * 255 / (hi - lo), so the maximum maps to exactly 255 (the official
  x * scale + offset can land on 254.99 and truncate to 254).
- Sharpness rounds its smoothed image as PIL's filter does (the official code truncates).
Affine ops (Rotate, ShearX/Y, TranslateX/Y) use `ImageProjectiveTransformV3` with nearest-neighbour
sampling and constant fill 128, as the official `contrib.image` calls did via wrap/unwrap.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL_VALUE = 128

# Official order: `cutout_op` (default on) appends Cutout after SolarizeAdd.
OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
    "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "SolarizeAdd", "Cutout",
)
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})

# Magnitudes of the official ImageNet scripts (N = 2); None = no RandAugment.
OFFICIAL_IMAGENET_MAGNITUDE = {
    "efficientnet-b0": None, "efficientnet-b1": None, "efficientnet-b2": 6, "efficientnet-b3": 12,
    "efficientnet-b4": 15, "efficientnet-b5": 18, "efficientnet-b6": 24, "efficientnet-b7": 27,
    "efficientnet-l0": 27, "efficientnet-l1": 27, "efficientnet-l2": 27,
}


@dataclasses.dataclass(frozen=True)
class RandAugmentConfig:
  """RandAugment settings.

  translate_const / cutout_const are the translation (px) and cutout half-size (px) at magnitude 10:
  ImageNet 100 / 40, 32 px data (SVHN) 4 / 4 (the official code uses image_size // 8 for both).
  """
  num_layers: int = 2
  magnitude: float = 10.0
  translate_const: float = 100.0
  cutout_const: float = 40.0
  cutout_op: bool = True
  fill_value: int = FILL_VALUE
  contrast_mode: str = "pil"  # "pil" or "official"

  def __post_init__(self):
    if self.num_layers < 0:
      raise ValueError(f"RandAugment num_layers must be >= 0, got {self.num_layers}.")
    if self.magnitude < 0:
      raise ValueError(f"RandAugment magnitude must be >= 0, got {self.magnitude}; "
                       "magnitudes above 10 are allowed and extrapolate linearly.")
    if self.translate_const < 0 or self.cutout_const < 0:
      raise ValueError("translate_const and cutout_const are pixel sizes and must be >= 0, got "
                       f"{self.translate_const} and {self.cutout_const}.")
    if not 0 <= self.fill_value <= 255:
      raise ValueError(f"fill_value must be a uint8 value 0..255, got {self.fill_value}.")
    if self.contrast_mode not in ("pil", "official"):
      raise ValueError(f"contrast_mode must be 'pil' or 'official', got {self.contrast_mode!r}.")

  @property
  def op_names(self) -> tuple[str, ...]:
    return OP_NAMES if self.cutout_op else OP_NAMES[:-1]

  @classmethod
  def for_small_images(cls, magnitude: float = 5.0, image_size: int = 32,
                       num_layers: int = 2) -> RandAugmentConfig:
    """The official 32 px recipe (SVHN: N=2, M=5): translate and cutout constants image_size // 8."""
    return cls(num_layers=num_layers, magnitude=magnitude, translate_const=image_size // 8,
               cutout_const=image_size // 8)


def imagenet_config(model_name: str) -> RandAugmentConfig | None:
  """The official ImageNet RandAugment of `model_name` (None for B0/B1, which used none)."""
  if model_name not in OFFICIAL_IMAGENET_MAGNITUDE:
    raise ValueError(f"No official RandAugment magnitude for {model_name!r}; known: "
                     f"{sorted(OFFICIAL_IMAGENET_MAGNITUDE)}. Build a RandAugmentConfig yourself.")
  magnitude = OFFICIAL_IMAGENET_MAGNITUDE[model_name]
  return None if magnitude is None else RandAugmentConfig(num_layers=2, magnitude=magnitude)


def op_argument(name: str, magnitude: float, config: RandAugmentConfig = RandAugmentConfig()):
  """The official level -> argument mapping (unsigned; geometric ops get a random sign on top).

  Returns None for ops without an argument (AutoContrast, Equalize, Invert).
  """
  level = magnitude / MAX_LEVEL
  if name in ("AutoContrast", "Equalize", "Invert"):
    return None
  if name == "Rotate":
    return level * 30.0
  if name in ("ShearX", "ShearY"):
    return level * 0.3
  if name in ("TranslateX", "TranslateY"):
    return level * float(config.translate_const)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return level * 1.8 + 0.1
  if name == "Posterize":
    return min(8, max(1, int(level * 4)))
  if name == "Solarize":
    return int(level * 256)
  if name == "SolarizeAdd":
    return int(level * 110)
  if name == "Cutout":
    return int(level * config.cutout_const)
  raise ValueError(f"Unknown RandAugment op {name!r}; known: {OP_NAMES}.")


# --- the ops: uint8 [H, W, 3] -> uint8 [H, W, 3] ---------------------------------------------------


def blend(image1: tf.Tensor, image2: tf.Tensor, factor) -> tf.Tensor:
  """image1 + factor * (image2 - image1), clipped to 0..255 and truncated to uint8 (as PIL's blend)."""
  a = tf.cast(image1, tf.float32)
  b = tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Per channel, stretch [min, max] to [0, 255]; constant channels stay as they are."""
  pixels = tf.cast(image, tf.float32)
  lo = tf.reduce_min(pixels, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(pixels, axis=[0, 1], keepdims=True)
  span = hi - lo
  stretched = (pixels - lo) * 255.0 / tf.where(span > 0, span, 1.0)
  stretched = tf.cast(tf.clip_by_value(stretched, 0.0, 255.0), tf.uint8)
  return tf.where(span > 0, stretched, image)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
  """PIL's ImageOps.equalize lookup table for one uint8 channel."""
  values = tf.cast(channel, tf.int32)
  histogram = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
  last_nonzero_bin = tf.reduce_max(tf.where(histogram > 0, tf.range(256), 0))
  step = (tf.reduce_sum(histogram) - histogram[last_nonzero_bin]) // 255
  safe_step = tf.maximum(step, 1)
  lut = (tf.cumsum(histogram) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], axis=0), 0, 255)
  # step 0 means (almost) a single grey level: PIL leaves the channel unchanged.
  return tf.cast(tf.where(step > 0, tf.gather(lut, values), values), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  return tf.stack([_equalize_channel(image[:, :, c]) for c in range(3)], axis=2)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - tf.convert_to_tensor(image, tf.uint8)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keep the top `bits` bits of every value."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Invert the values >= threshold (a threshold above 255 changes nothing)."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition, threshold=128) -> tf.Tensor:
  """Add `addition` (clipped to 0..255) to the values below threshold."""
  values = tf.cast(image, tf.int32)
  added = tf.cast(tf.clip_by_value(values + addition, 0, 255), tf.uint8)
  return tf.where(values < threshold, added, image)


def _grey(image: tf.Tensor) -> tf.Tensor:
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation: 0 = grey, 1 = unchanged."""
  return blend(_grey(image), image, factor)


def contrast(image: tf.Tensor, factor, mode: str = "pil") -> tf.Tensor:
  """Blend towards a constant grey: the rounded mean grey level (PIL), or the official code's value."""
  grey = tf.cast(tf.image.rgb_to_grayscale(image), tf.float32)
  if mode == "pil":
    level = tf.floor(tf.reduce_mean(grey) + 0.5)
  elif mode == "official":
    level = tf.floor(tf.minimum(tf.cast(tf.size(grey), tf.float32) / 256.0, 255.0))
  else:
    raise ValueError(f"contrast mode must be 'pil' or 'official', got {mode!r}.")
  return blend(tf.fill(tf.shape(image), tf.cast(level, tf.uint8)), image, factor)


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """Blend with PIL's SMOOTH-filtered image (3x3, centre 5, others 1, /13); the border stays unfiltered."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  pixels = tf.cast(image, tf.float32)
  smooth = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], padding="SAME")[0]
  smooth = tf.cast(tf.clip_by_value(tf.round(smooth), 0.0, 255.0), tf.uint8)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  rows = tf.range(height)[:, None, None]
  cols = tf.range(width)[None, :, None]
  interior = (rows > 0) & (rows < height - 1) & (cols > 0) & (cols < width - 1)
  return blend(tf.where(interior, smooth, image), image, factor)


def affine(image: tf.Tensor, transform, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Projective transform, nearest-neighbour, constant fill.

  `transform` = [a0, a1, a2, b0, b1, b2, c0, c1] maps each OUTPUT pixel (x, y) to the input point
  ((a0 x + a1 y + a2) / k, (b0 x + b1 y + b2) / k) with k = c0 x + c1 y + 1 (x = column, y = row).
  """
  transform = tf.reshape(tf.cast(tf.stack(transform), tf.float32), [1, 8])
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(fill_value, tf.float32), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def rotate(image: tf.Tensor, degrees, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Rotate about the image centre (positive = counter-clockwise on screen)."""
  radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(radians), tf.sin(radians)
  height = tf.cast(tf.shape(image)[0], tf.float32) - 1.0
  width = tf.cast(tf.shape(image)[1], tf.float32) - 1.0
  x_offset = (width - (cos * width - sin * height)) / 2.0
  y_offset = (height - (sin * width + cos * height)) / 2.0
  return affine(image, [cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0], fill_value)


def shear_x(image: tf.Tensor, level, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + level * y, y), as PIL's affine shear."""
  return affine(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], fill_value)


def shear_y(image: tf.Tensor, level, fill_value: int = FILL_VALUE) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0], fill_value)


def translate_x(image: tf.Tensor, pixels, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Output (x, y) samples input (x + pixels, y): content moves left by `pixels`."""
  return affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0], fill_value)


def translate_y(image: tf.Tensor, pixels, fill_value: int = FILL_VALUE) -> tf.Tensor:
  return affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0], fill_value)


def cutout(image: tf.Tensor, half_size, center, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Fill rows [cy - h, cy + h) x cols [cx - h, cx + h) (clipped to the image) with `fill_value`."""
  center_y, center_x = center[0], center[1]
  rows = tf.range(tf.shape(image)[0])[:, None, None]
  cols = tf.range(tf.shape(image)[1])[None, :, None]
  inside = ((rows >= center_y - half_size) & (rows < center_y + half_size)
            & (cols >= center_x - half_size) & (cols < center_x + half_size))
  return tf.where(inside, tf.constant(fill_value, tf.uint8), image)


def random_cutout(image: tf.Tensor, half_size, seed, fill_value: int = FILL_VALUE) -> tf.Tensor:
  """Cutout centred at a uniformly random pixel (the square may hang over the border, as official)."""
  row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  center_y = tf.random.stateless_uniform([], row_seed, minval=0, maxval=shape[0], dtype=tf.int32)
  center_x = tf.random.stateless_uniform([], col_seed, minval=0, maxval=shape[1], dtype=tf.int32)
  return cutout(image, half_size, (center_y, center_x), fill_value)


# --- the policy -------------------------------------------------------------------------------------


# name -> f(image, argument, cutout_seed, config)
_OPS = {
    "AutoContrast": lambda image, arg, seed, config: autocontrast(image),
    "Equalize": lambda image, arg, seed, config: equalize(image),
    "Invert": lambda image, arg, seed, config: invert(image),
    "Rotate": lambda image, arg, seed, config: rotate(image, arg, config.fill_value),
    "Posterize": lambda image, arg, seed, config: posterize(image, arg),
    "Solarize": lambda image, arg, seed, config: solarize(image, arg),
    "Color": lambda image, arg, seed, config: color(image, arg),
    "Contrast": lambda image, arg, seed, config: contrast(image, arg, config.contrast_mode),
    "Brightness": lambda image, arg, seed, config: brightness(image, arg),
    "Sharpness": lambda image, arg, seed, config: sharpness(image, arg),
    "ShearX": lambda image, arg, seed, config: shear_x(image, arg, config.fill_value),
    "ShearY": lambda image, arg, seed, config: shear_y(image, arg, config.fill_value),
    "TranslateX": lambda image, arg, seed, config: translate_x(image, arg, config.fill_value),
    "TranslateY": lambda image, arg, seed, config: translate_y(image, arg, config.fill_value),
    "SolarizeAdd": lambda image, arg, seed, config: solarize_add(image, arg),
    "Cutout": lambda image, arg, seed, config: random_cutout(image, arg, seed, config.fill_value),
}
assert tuple(_OPS) == OP_NAMES


def apply_op(image: tf.Tensor, name: str, magnitude: float, seed,
             config: RandAugmentConfig = RandAugmentConfig()) -> tf.Tensor:
  """Apply op `name` at `magnitude`; `seed` draws the sign of geometric ops and the cutout centre."""
  argument = op_argument(name, magnitude, config)
  sign_seed, cutout_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if name in GEOMETRIC_OPS:
    positive = tf.random.stateless_uniform([], sign_seed) < 0.5
    argument = tf.where(positive, 1.0, -1.0) * argument
  return _OPS[name](tf.convert_to_tensor(image, tf.uint8), argument, cutout_seed, config)


def check_uint8_rgb(image: tf.Tensor, what: str = "RandAugment") -> tf.Tensor:
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8:
    raise TypeError(f"{what} needs a uint8 image, got {image.dtype.name}; cast with "
                    "tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).")
  if image.shape.rank != 3 or image.shape[-1] not in (3, None):
    raise ValueError(f"{what} needs an [H, W, 3] image, got shape {image.shape}; "
                     "convert grayscale with nsjax.data.preprocess.to_rgb_uint8.")
  return tf.ensure_shape(image, [None, None, 3])


def layer_plan(seed, config: RandAugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
  """(op index into `config.op_names` [N] int32, op seed [N, 2]) of each layer, drawn from `seed`."""
  num_layers = config.num_layers
  seeds = tf.random.experimental.stateless_split(seed, 2 * max(num_layers, 1))
  choices = [tf.random.stateless_uniform([], seeds[2 * i], minval=0, maxval=len(config.op_names),
                                         dtype=tf.int32) for i in range(num_layers)]
  choices = tf.stack(choices) if choices else tf.zeros([0], tf.int32)
  return choices, seeds[1::2][:num_layers]


@functools.lru_cache(maxsize=None)
def op_functions(config: RandAugmentConfig, seed_dtype: tf.DType) -> tuple:
  """`apply_op` of each of `config.op_names`, traced once: (uint8 [H, W, 3], seed [2]) -> uint8."""
  def traced(name):
    fn = tf.function(lambda image, seed: tf.ensure_shape(
        apply_op(image, name, config.magnitude, seed, config), [None, None, 3]), autograph=False)
    return fn.get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8),
                                    tf.TensorSpec([2], seed_dtype))
  return tuple(traced(name) for name in config.op_names)


def randaugment(image: tf.Tensor, seed, config: RandAugmentConfig = RandAugmentConfig()) -> tf.Tensor:
  """RandAugment v1: N layers, each applies one op drawn uniformly (always applied) at magnitude M.

  image: uint8 [H, W, 3], any size. seed: int32/int64 [2] per-example seed. Returns uint8 [H, W, 3].

  Each layer calls the drawn op's function through a `Case` op that stays a call. `tf.switch_case`
  marks its `Case` to be lowered into Switch/Merge, which puts all 16 ops' nodes into the graph
  of every image and sends dead tensors through the 15 not taken, most of a small image's cost
  a layer; called, a layer costs less (benchmarks/README.md), with the same images bit for
  bit.
  """
  image = check_uint8_rgb(image)
  choices, op_seeds = layer_plan(seed, config)
  branches = op_functions(config, op_seeds.dtype) if config.num_layers else ()
  for layer in range(config.num_layers):
    image = tf.raw_ops.Case(branch_index=choices[layer], input=[image, op_seeds[layer]],
                            Tout=[tf.uint8], branches=list(branches))[0]
    image = tf.ensure_shape(image, [None, None, 3])
  return image
