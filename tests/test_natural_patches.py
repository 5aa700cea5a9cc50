"""natural_patches: the out-of-domain unlabeled set cut from scikit-learn's sample photographs."""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from nsjax.data import embedded, natural_patches


def test_builds_offline_into_the_data_dir_with_the_mnist5k_shape(tmp_path):
  embedded.build("natural_patches", str(tmp_path))
  builder = tfds.builder("natural_patches", data_dir=str(tmp_path))
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == {
      "unlabeled": natural_patches.NUM_PATCHES}
  data = tfds.as_numpy(builder.as_dataset(split="unlabeled", batch_size=-1))
  assert data["image"].shape == (natural_patches.NUM_PATCHES, 28, 28, 1)
  assert sorted(data["id"].tolist()) == list(range(natural_patches.NUM_PATCHES))
  by_id = data["image"][np.argsort(data["id"])]
  np.testing.assert_array_equal(by_id[:50], natural_patches.patches(50))  # the documented recipe
  assert "label" not in builder.info.features


def test_patches_are_fixed_and_varied():
  first, again = natural_patches.patches(200), natural_patches.patches(200)
  np.testing.assert_array_equal(first, again)
  assert len({p.tobytes() for p in first}) == 200
  assert 40 < first.mean() < 200 and first.std() > 30  # natural images, not blank or saturated
  assert embedded.is_embedded("natural_patches") and embedded.is_embedded("mnist5k/labels_50")
  assert not embedded.is_embedded("cifar10")
