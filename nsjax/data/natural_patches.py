"""`natural_patches`: out-of-domain unlabeled images for mnist5k, built offline in seconds.

scikit-learn ships two photographs inside its wheel (`sklearn.datasets.load_sample_images`:
china.jpg and flower.jpg, 427 x 640 RGB, Flickr photographs under CC BY 2.0, credited in
sklearn/datasets/images/README.txt; nobody here made them). This TFDS dataset cuts them into 28 x 28 grey patches, the shape of an mnist5k digit, so a
schedule can swap `config.data.unlabeled` for images that hold no digit at all: the paper's
out-of-domain unlabeled data (section 5), in miniature.

One split, `unlabeled`, of NUM_PATCHES patches (as many as mnist5k/labels_10's unlabeled split).
Patch k comes from photo k % 2: a square crop of side 28..112 px at a position drawn from one fixed
seed (PATCH_SEED), turned grey (ITU-R 601 luma) and resized to 28 x 28 with a box filter. Each
record holds `image` (uint8 [28, 28, 1], PNG) and `id` (k). There are no labels.

  config.data.unlabeled = config_lib.data_source("natural_patches", "unlabeled")

The pipeline builds it into the run's TFDS data_dir like mnist5k (nsjax.data.embedded).
"""
from __future__ import annotations

import functools
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_PATCHES = 3900
IMAGE_SHAPE = (28, 28, 1)
MIN_SIDE, MAX_SIDE = 28, 112
# Fixes every patch; changing it (or the recipe) changes the dataset (bump VERSION).
PATCH_SEED = 20260521
PHOTOS = ("china.jpg", "flower.jpg")
# sha256 of the JPEG files scikit-learn ships: the patches are defined on exactly these files.
SOURCE_SHA256 = {
    "china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
}


@functools.cache
def load_photos() -> tuple[np.ndarray, ...]:
  """The two photographs as uint8 grey arrays [427, 640], checked against SOURCE_SHA256."""
  import sklearn.datasets  # Imported lazily: only building needs it.
  from PIL import Image
  folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
  photos = []
  for name in PHOTOS:
    path = os.path.join(folder, name)
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SOURCE_SHA256[name]:
      raise ValueError(
          f"{path} has sha256 {digest}, expected {SOURCE_SHA256[name]}: natural_patches is defined "
          "on the photographs of scikit-learn 1.x (sklearn.datasets.load_sample_images). Install "
          "a scikit-learn that ships them unchanged.")
    with Image.open(path) as image:
      photos.append(np.asarray(image.convert("L"), dtype=np.uint8))
  return tuple(photos)


def patches(count: int = NUM_PATCHES) -> np.ndarray:
  """uint8 [count, 28, 28, 1]: the dataset's images, in id order."""
  from PIL import Image
  photos = load_photos()
  rng = np.random.default_rng(PATCH_SEED)
  out = np.empty((count,) + IMAGE_SHAPE, np.uint8)
  for k in range(count):
    photo = photos[k % len(photos)]
    side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    top = int(rng.integers(0, photo.shape[0] - side + 1))
    left = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    out[k, :, :, 0] = np.asarray(crop.resize(IMAGE_SHAPE[:2], Image.Resampling.BOX))
  return out


class NaturalPatches(tfds.core.GeneratorBasedBuilder):
  """28 x 28 grey patches of scikit-learn's two sample photographs (out-of-domain for MNIST)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="png"),
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        homepage="https://scikit-learn.org/stable/modules/generated/"
                 "sklearn.datasets.load_sample_images.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is inside the scikit-learn wheel.
    return {"unlabeled": self._generate_examples(patches())}

  def _generate_examples(self, images):
    for k, image in enumerate(images):
      yield k, {"image": image, "id": k}


def build(data_dir: str, config: str = "") -> tfds.core.DatasetBuilder:
  """Builds (once; later calls reuse it) and returns the `natural_patches` builder."""
  del config  # one configuration
  builder = tfds.builder("natural_patches", data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
