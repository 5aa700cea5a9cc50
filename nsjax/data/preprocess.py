"""Image preprocessing of the official EfficientNet / Noisy Student recipe, as tf.data-friendly functions.

Small pure functions over one image that run inside `tf.data.Dataset.map(num_parallel_calls=AUTOTUNE)`:
- `decode(bytes) -> (image, ok)`: any JPEG/PNG/GIF/BMP/WebP to uint8 RGB; corrupt bytes give ok=False
  and a 1x1 placeholder instead of an error (see `decode` for how), so the pipeline can skip and count them.
- `train_view`: the student's noised view -- random-sized crop, bicubic resize, flip, RandAugment -- or,
  for 32 px data, the small-image recipe (RandAugment, cutout, reflect-pad 4 + random crop, no flip).
- `eval_view`: the un-noised view -- centre crop S/(S+32) of the short side, bicubic resize to S.
- `teacher_and_student_views`: both from one decoded record, for the online-teacher mode, where the
  teacher labels an un-noised view at its own resolution while the student trains on a noised one.
- `normalize`: ImageNet mean/std in pixel units, the input the models expect.

Every random choice is stateless and derived from a per-example seed tensor (`example_seed`), so the
images depend only on (seed, epoch, example index), never on thread scheduling.
"""
from __future__ import annotations

import numbers

import tensorflow as tf

from nsjax.data import randaugment as ra
from nsjax.models.inputs import MEAN_RGB, STDDEV_RGB  # noqa: F401  (re-exported)

CROP_PADDING = 32
SMALL_IMAGE_PAD = 4
PLACEHOLDER_SHAPE = (1, 1, 3)


# --- decoding and format ----------------------------------------------------------------------------


def _decode_rgb(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  return tf.ensure_shape(image, [None, None, 3]), tf.constant(True)


def decode(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """Encoded image bytes -> (uint8 [H, W, 3], ok). Never raises on bad data.

  Grayscale and palette images come out as RGB, RGBA loses alpha, animations give their first frame.
  A decode error cannot be caught inside a graph function, and checking magic bytes misses truncated
  or bit-flipped files (a PNG with a bad CRC passes every header check). So the decode runs in a
  one-element inner dataset with `ignore_errors()`, followed by a fallback element: the first element
  out is the decoded image with ok=True, or a 1x1 zero placeholder with ok=False (a small cost per
  record on the host); the placeholder goes through every view function without error, so
  records can be filtered (and counted, see `drop_bad_records`) before or after preprocessing.
  """
  image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
  attempt = tf.data.Dataset.from_tensors(image_bytes).map(_decode_rgb).ignore_errors()
  fallback = tf.data.Dataset.from_tensors(
      (tf.zeros(PLACEHOLDER_SHAPE, tf.uint8), tf.constant(False)))
  image, ok = attempt.concatenate(fallback).take(1).get_single_element()
  return tf.ensure_shape(image, [None, None, 3]), ok


def drop_bad_records(dataset: tf.data.Dataset, ok_key: str = "ok",
                     skipped_key: str = "num_skipped") -> tf.data.Dataset:
  """Drop dict records whose `ok_key` is False; each kept record gets `skipped_key`: int64 running
  count of records dropped so far in this iteration (bad records after the last good one are not seen).
  """
  def count(skipped, record):
    skipped = skipped + tf.cast(tf.logical_not(record[ok_key]), tf.int64)
    return skipped, {**record, skipped_key: skipped}
  return dataset.scan(tf.constant(0, tf.int64), count).filter(lambda record: record[ok_key])


def to_rgb_uint8(image: tf.Tensor) -> tf.Tensor:
  """[H, W] or [H, W, C] with C in 1..4 -> uint8 [H, W, 3] (grey is repeated, alpha dropped).

  Integer dtypes are saturate-cast; float images are refused because their range (0..1 or 0..255)
  cannot be told from the dtype.
  """
  image = tf.convert_to_tensor(image)
  if image.dtype.is_floating:
    raise TypeError(f"Expected an integer image with values 0..255, got {image.dtype.name}; cast first, "
                    "e.g. tf.cast(tf.round(x), tf.uint8) for 0..255 floats or x * 255 for 0..1 floats.")
  if image.dtype != tf.uint8:
    image = tf.saturate_cast(image, tf.uint8)
  if image.shape.rank == 2:
    image = image[:, :, None]
  if image.shape.rank != 3:
    raise ValueError(f"Expected an image of shape [H, W] or [H, W, C], got rank {image.shape.rank} "
                     f"(shape {image.shape}); batch dimensions are not supported here, map per image.")
  # Known channel counts skip the gather below: a per-pixel gather costs more than decoding and
  # preparing a photo's eval view.
  if image.shape[2] == 3:
    return image
  if image.shape[2] == 4:
    return image[:, :, :3]
  if image.shape[2] in (1, 2):
    return tf.tile(image[:, :, :1], [1, 1, 3])
  channels = tf.shape(image)[2]
  tf.debugging.assert_less_equal(channels, 4, message="images may have at most 4 channels (RGBA)")
  # 1 (grey) or 2 (grey + alpha) channels -> repeat channel 0; 3 or 4 -> the first three.
  source_channels = tf.where(channels < 3, tf.zeros([3], tf.int32), tf.range(3))
  return tf.ensure_shape(tf.gather(image, source_channels, axis=2), [None, None, 3])


def normalize(image: tf.Tensor) -> tf.Tensor:
  """Pixels (0..255) [..., W, 3] -> float32 (x - mean) / std with the ImageNet statistics."""
  image = tf.cast(image, tf.float32)
  mean, std = tf.constant(MEAN_RGB, tf.float32), tf.constant(STDDEV_RGB, tf.float32)
  if image.shape.rank is None or image.shape.rank < 2 or image.shape[-1] != 3:
    return (image - mean) / std  # the general broadcast (raises for other channel counts)
  # The same values, computed on rows of W * 3: TF broadcasts a row of that length fast, but a
  # 3-vector over [H, W, 3] element by element, several times slower (the labeling pipeline's host
  # time).
  shape = tf.shape(image)
  rows = tf.reshape(image, [-1, shape[-2] * 3])
  out = tf.reshape((rows - tf.tile(mean, [shape[-2]])) / tf.tile(std, [shape[-2]]), shape)
  return tf.ensure_shape(out, image.shape)


def denormalize(image: tf.Tensor) -> tf.Tensor:
  """Inverse of `normalize`: float32 pixels in 0..255 units."""
  return tf.cast(image, tf.float32) * tf.constant(STDDEV_RGB, tf.float32) + tf.constant(
      MEAN_RGB, tf.float32)


def example_seed(seed: int, index, epoch=0) -> tf.Tensor:
  """The per-example seed for example `index` in `epoch` of a run seeded with `seed` (int64 [2])."""
  base = tf.stack([tf.cast(seed, tf.int64), tf.constant(0, tf.int64)])
  per_epoch = tf.random.experimental.stateless_fold_in(base, tf.cast(epoch, tf.int64))
  return tf.random.experimental.stateless_fold_in(per_epoch, tf.cast(index, tf.int64))


# --- crops ------------------------------------------------------------------------------------------


def _resize(image: tf.Tensor, resolution: int) -> tf.Tensor:
  """Bicubic resize to [resolution, resolution] (float32 out, not clipped: bicubic can overshoot)."""
  return tf.image.resize(tf.cast(image, tf.float32), [resolution, resolution], method="bicubic")


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def center_crop_window(height, width, resolution: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(offset [y, x], size) of the eval crop: side S/(S+32) * min(h, w), centred (at least 1 px)."""
  fraction = resolution / (resolution + CROP_PADDING)
  short_side = tf.cast(tf.minimum(height, width), tf.float32)
  size = tf.maximum(tf.cast(fraction * short_side, tf.int32), 1)
  offset = tf.stack([(height - size + 1) // 2, (width - size + 1) // 2])
  return offset, size


def random_crop_window(image_shape, seed) -> tuple[tf.Tensor, tf.Tensor]:
  """(offset [y, x], size [h, w]) of the train crop: a sampled distorted bounding box (area 0.08-1,
  aspect 3/4-4/3, min_object_covered 0.1, 10 attempts) or, when sampling fails and returns the
  whole image, the eval centre crop -- as the official code does."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      image_shape, bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), area_range=(0.08, 1.0),
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  return begin[:2], size[:2]


def _crop(image: tf.Tensor, offset, size) -> tf.Tensor:
  return tf.slice(image, tf.concat([offset, [0]], 0), tf.concat([size, [-1]], 0))


def _check_resolution(resolution: int, small_image: bool) -> None:
  if not isinstance(resolution, numbers.Integral) or resolution < 1:
    raise ValueError(f"resolution must be a positive int, got {resolution!r}.")
  if small_image and resolution <= SMALL_IMAGE_PAD:
    raise ValueError(f"The small-image recipe reflect-pads {SMALL_IMAGE_PAD} px, so it needs a "
                     f"resolution above {SMALL_IMAGE_PAD}, got {resolution}.")


# --- views ------------------------------------------------------------------------------------------


def eval_view(image: tf.Tensor, resolution: int, small_image: bool = False,
              normalized: bool = True) -> tf.Tensor:
  """The un-noised view: float32 [S, S, 3], normalised unless `normalized=False` (then 0..255 units).

  Large images: centre crop S/(S+32) of the short side, bicubic resize to S. Small-image recipe: the
  whole image, resized to S only if it has another size (e.g. 28 px MNIST into a 32 px model).
  """
  _check_resolution(resolution, small_image)
  image = to_rgb_uint8(image)
  shape = tf.shape(image)
  if small_image:
    pixels = tf.cond(tf.reduce_all(shape[:2] == resolution),
                     lambda: tf.cast(image, tf.float32), lambda: _resize(image, resolution))
  else:
    offset, size = center_crop_window(shape[0], shape[1], resolution)
    pixels = _resize(_crop(image, offset, tf.stack([size, size])), resolution)
  pixels = tf.ensure_shape(pixels, [resolution, resolution, 3])
  return normalize(pixels) if normalized else pixels


def _flip(image: tf.Tensor, seed) -> tf.Tensor:
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def _large_train_pixels(image, seeds, resolution, randaugment, cutout, flip):
  shape = tf.shape(image)
  offset, size = random_crop_window(shape, seeds[0])
  sampling_failed = tf.reduce_all(size == shape[:2])
  center_offset, center_size = center_crop_window(shape[0], shape[1], resolution)
  offset = tf.where(sampling_failed, center_offset, offset)
  size = tf.where(sampling_failed, tf.stack([center_size, center_size]), size)
  pixels = _resize(_crop(image, offset, size), resolution)
  if flip:
    pixels = _flip(pixels, seeds[1])
  if randaugment is not None or cutout:
    noised = _to_uint8(pixels)
    if randaugment is not None:
      noised = ra.randaugment(noised, seeds[2], randaugment)
    if cutout:
      noised = ra.random_cutout(noised, cutout // 2, seeds[3])
    pixels = tf.cast(noised, tf.float32)
  return pixels


def _small_train_pixels(image, seeds, resolution, randaugment, cutout, flip):
  """Official 32 px order: RandAugment, cutout, reflect-pad + random crop, then flip (off for SVHN)."""
  shape = tf.shape(image)
  image = tf.cond(tf.reduce_all(shape[:2] == resolution),
                  lambda: image, lambda: _to_uint8(_resize(image, resolution)))
  image = tf.ensure_shape(image, [resolution, resolution, 3])
  if randaugment is not None:
    image = ra.randaugment(image, seeds[2], randaugment)
  if cutout:
    image = ra.random_cutout(image, cutout // 2, seeds[3])
  pad = SMALL_IMAGE_PAD
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
  image = tf.image.stateless_random_crop(padded, [resolution, resolution, 3], seed=seeds[0])
  if flip:
    image = _flip(image, seeds[1])
  return tf.cast(image, tf.float32)


def train_view(image: tf.Tensor, seed, resolution: int,
               randaugment: ra.RandAugmentConfig | None = None, small_image: bool = False,
               cutout: int = 0, flip: bool | None = None, normalized: bool = True) -> tf.Tensor:
  """The noised training view: float32 [S, S, 3], normalised unless `normalized=False`.

  image: [H, W] or [H, W, C] integer image of any size. seed: int32/int64 [2] per-example seed.
  randaugment: None (no RandAugment) or its config; applied on uint8 before normalisation.
  cutout: side of an extra random square cut out (filled with 128) after RandAugment, e.g. 16 for
    SVHN; 0 = none. flip: random horizontal flip; default on for large images, off for small_image.
  small_image: the 32 px recipe (no random-sized crop; reflect-pad 4 + random crop instead).
  """
  _check_resolution(resolution, small_image)
  if cutout < 0:
    raise ValueError(f"cutout is the side of the cut-out square in pixels, >= 0; got {cutout}.")
  if flip is None:
    flip = not small_image
  image = to_rgb_uint8(image)
  seeds = tf.random.experimental.stateless_split(seed, 4)  # crop, flip, RandAugment, cutout
  build = _small_train_pixels if small_image else _large_train_pixels
  pixels = build(image, seeds, resolution, randaugment, cutout, flip)
  pixels = tf.ensure_shape(pixels, [resolution, resolution, 3])
  return normalize(pixels) if normalized else pixels


def teacher_and_student_views(image: tf.Tensor, seed, teacher_resolution: int,
                              student_resolution: int,
                              randaugment: ra.RandAugmentConfig | None = None,
                              small_image: bool = False, cutout: int = 0,
                              flip: bool | None = None,
                              normalized: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """(teacher view, student view) of one decoded image, for the online-teacher mode.

  The teacher sees the un-noised `eval_view` at its own resolution (as the official code's
  teacher_image); the student sees `train_view` at its resolution with the given noise.
  """
  teacher = eval_view(image, teacher_resolution, small_image=small_image, normalized=normalized)
  student = train_view(image, seed, student_resolution, randaugment=randaugment,
                       small_image=small_image, cutout=cutout, flip=flip, normalized=normalized)
  return teacher, student
