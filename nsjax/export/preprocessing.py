"""nsjax's eval view for a batch of uint8 images, in TensorFlow ops that TFLite has built in.

The serving graph must do exactly what nsjax's evaluation does to an image
(`nsjax.data.preprocess.eval_view`: grey -> RGB, centre crop S/(S+32) of the short side and bicubic
resize to S, or for small-image models the whole image, resized only when its size differs; then
ImageNet mean/std). `eval_view` itself works on one image and calls `tf.image.resize(...,
"bicubic")`, whose kernel (ResizeBicubic) is not a TFLite builtin: a graph using it converts only
with the Flex delegate, which the TFLite interpreter in the TensorFlow pip package lacks.
So the resize is written here as gathers and multiply-adds that follow TensorFlow's kernel
(tensorflow/core/kernels/image/resize_bicubic_op.cc, half-pixel centres: Keys' cubic with
a = -0.5, the tap weights read from a 1024-entry table, out-of-range taps dropped and the rest
renormalised). Every image of a batch has the same height and width, so the crop window and the
tap weights are computed once per batch. tests/test_export.py checks the views against
`eval_view` image by image (sizes up and down, grey and RGB) and the probabilities end to end.
"""
from __future__ import annotations

import tensorflow as tf

from nsjax.data import preprocess
from nsjax.models.inputs import MEAN_RGB, STDDEV_RGB

KEYS_A = -0.5      # Keys' cubic coefficient TensorFlow uses with half-pixel centres
TABLE_SIZE = 1024  # TensorFlow reads the tap weights from a table at this resolution
INPUT_DESCRIPTION = "uint8 [batch, height, width, channels] with channels 1 (grey) or 3 (RGB)"


def check_images(images: tf.Tensor) -> tf.Tensor:
  """`images` unchanged once they are uint8 of rank 4 with 1-4 channels; else a clear error.

  The dtype is checked when the graph is built (a serving signature's TensorSpec already refuses
  other dtypes); rank and channels are runtime checks, since the signature accepts any shape so
  that a wrong rank reaches this message rather than a shape error deep inside the graph.
  """
  if images.dtype != tf.uint8:
    raise TypeError(f"images must be {INPUT_DESCRIPTION}; got {images.dtype.name}. Cast 0..255 "
                    "pixels with tf.cast(x, tf.uint8) (0..1 floats: multiply by 255 first).")
  rank_ok = tf.debugging.assert_rank(
      images, 4, message=f"images must be {INPUT_DESCRIPTION} (add a batch dimension for one "
                         "image, e.g. images[None])")
  channels = tf.shape(images)[-1]
  channels_ok = tf.debugging.Assert(
      tf.logical_and(channels >= 1, channels <= 4),
      [f"images must be {INPUT_DESCRIPTION} (2 = grey + alpha and 4 = RGBA are accepted too, "
       "alpha dropped); got channels:", channels])
  with tf.control_dependencies([rank_ok, channels_ok]):
    return tf.identity(images)


def to_rgb(images: tf.Tensor) -> tf.Tensor:
  """[B, H, W, C] uint8 with C in 1..4 -> [B, H, W, 3]: grey repeated, alpha dropped (as
  `preprocess.to_rgb_uint8` does per image)."""
  channels = tf.shape(images)[-1]
  source = tf.where(channels < 3, tf.zeros([3], tf.int32), tf.range(3))
  return tf.gather(images, source, axis=3)


def _keys_weight(x: tf.Tensor) -> tf.Tensor:
  """Keys' cubic convolution kernel at distance |x| <= 2 (a = KEYS_A)."""
  a = KEYS_A
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return tf.where(x <= 1.0, near, far)


def bicubic_taps(in_size: tf.Tensor, out_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(indices [out, 4] int32, weights [out, 4] float32) of TensorFlow's half-pixel bicubic resize
  along one axis of length `in_size` to `out_size`."""
  scale = tf.cast(in_size, tf.float32) / float(out_size)
  source = (tf.range(out_size, dtype=tf.float32) + 0.5) * scale - 0.5
  start = tf.floor(source)
  # The kernel quantises the fraction to the table: lrintf(delta * 1024), round half to even.
  t = tf.round((source - start) * TABLE_SIZE) / TABLE_SIZE
  distances = tf.stack([1.0 + t, t, 1.0 - t, 2.0 - t], axis=1)
  weights = _keys_weight(distances)
  unclamped = tf.cast(start, tf.int32)[:, None] + tf.range(-1, 3)[None, :]
  indices = tf.clip_by_value(unclamped, 0, in_size - 1)
  weights = tf.where(tf.equal(indices, unclamped), weights, 0.0)
  return indices, weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def _resize_axis(images: tf.Tensor, axis: int, out_size: int) -> tf.Tensor:
  indices, weights = bicubic_taps(tf.shape(images)[axis], out_size)
  shape = [1, 1, 1, 1]
  shape[axis] = out_size
  total = None
  for k in range(4):
    term = tf.gather(images, indices[:, k], axis=axis) * tf.reshape(weights[:, k], shape)
    total = term if total is None else total + term
  return total


def resize_bicubic(images: tf.Tensor, size: int) -> tf.Tensor:
  """float32 [B, h, w, C] -> [B, size, size, C] like tf.image.resize(..., "bicubic") (columns
  first, then rows, as TensorFlow's kernel interpolates). At equal sizes the taps are (0, 1, 0, 0):
  the images come back unchanged, as `eval_view` leaves same-size small images."""
  return _resize_axis(_resize_axis(images, 2, size), 1, size)


def serving_view(images: tf.Tensor, resolution: int, small_image: bool) -> tf.Tensor:
  """uint8 [B, H, W, C] -> the normalised eval view float32 [B, S, S, 3] of every image."""
  images = to_rgb(check_images(images))
  shape = tf.shape(images)
  if not small_image:
    offset, size = preprocess.center_crop_window(shape[1], shape[2], resolution)
    images = tf.slice(images, tf.stack([0, offset[0], offset[1], 0]),
                      tf.stack([-1, size, size, -1]))
  pixels = resize_bicubic(tf.cast(images, tf.float32), resolution)
  pixels = tf.reshape(pixels, [-1, resolution, resolution, 3])
  mean, std = tf.constant(MEAN_RGB, tf.float32), tf.constant(STDDEV_RGB, tf.float32)
  return (pixels - mean) / std
