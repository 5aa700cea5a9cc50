"""The views a stage feeds its model: the noised training view and the un-noised eval view.

Both map a TFDS features dict (and a per-example seed) to what a batch holds; every pipeline,
evaluation and labeling pass builds its preprocessing from these two.
"""
from __future__ import annotations

import tensorflow as tf

from nsjax.data import preprocess
from nsjax.data import randaugment as ra

# How the eval view's pixels come out: "normalized" (mean/std, what a model takes), "pixels"
# (0..255: the labeling step normalises on the device, fused into the stem, sparing the input
# pipeline's host CPU a pass per image) or "unit" ([0, 1]: what adversarial attacks
# perturb).
EVAL_UNITS = ("normalized", "pixels", "unit")


def eval_view_fn(resolution: int, small_image: bool, image_key: str = "image", *,
                 units: str = "normalized", label: bool = True, keep_id: bool = False):
  """features -> {"image": the un-noised eval view[, "label"][, "id"]}.

  `label`: keep the label (int32); `keep_id`: keep the example's "id" (or TFDS's "tfds_id") as
  "id", when the features have one (pseudo-label records are keyed by it)."""
  if units not in EVAL_UNITS:
    raise ValueError(f"units={units!r}; use one of {EVAL_UNITS}.")

  def fn(features, seed):
    del seed
    image = preprocess.eval_view(features[image_key], resolution, small_image=small_image,
                                 normalized=units == "normalized")
    out = {"image": image / 255.0 if units == "unit" else image}
    if label:
      out["label"] = tf.cast(features["label"], tf.int32)
    if keep_id:
      for key in ("id", "tfds_id"):
        if key in features:
          out["id"] = features[key]
          break
    return out

  return _graph_only(fn)


def randaugment_config(noise, small_image: bool, resolution: int) -> ra.RandAugmentConfig | None:
  """A stage's RandAugment from its `noise` settings (nsjax.config_lib.noise); None when magnitude
  or layers is 0."""
  magnitude = noise.randaugment_magnitude
  if not magnitude or not noise.randaugment_layers:
    return None
  layers = int(noise.randaugment_layers)
  if small_image:
    return ra.RandAugmentConfig.for_small_images(magnitude, resolution, layers)
  return ra.RandAugmentConfig(num_layers=layers, magnitude=magnitude)


def train_view_fn(noise, small_image: bool, resolution: int):
  """(uint8 image, seed) -> the noised, normalised training view of a stage (its `noise`)."""
  ra_cfg = randaugment_config(noise, small_image, resolution)
  cutout = int(noise.cutout)
  flip = noise.flip
  return _graph_only(lambda image, seed: preprocess.train_view(
      image, seed, resolution, randaugment=ra_cfg, small_image=small_image, cutout=cutout,
      flip=flip))


def _graph_only(view):
  """`view`, left alone by AutoGraph when a tf.data map traces it: the views are written with
  graph ops only (tf.cond, tf.where), and converting their call tree costs each process time
  the first time it builds a pipeline."""
  return tf.autograph.experimental.do_not_convert(view)
