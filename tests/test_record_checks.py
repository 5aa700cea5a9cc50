"""Every record read by offset is verified: one flipped byte in a stored probability, an image or a
length field, in a pseudo-label shard or a labeled TFDS file, stops the stream with one message
naming the file, the record and the fix, before any batch read after it is handed out; intact
files read the same batches, bit for bit, as without the checks."""
from __future__ import annotations

import glob
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nsjax.data import input_pipeline as ip
from nsjax.data import mnist5k, random_access, student_input, synthetic
from nsjax.data.random_access import DamagedRecord

LOCAL, SEED, WINDOW = 8, 3, 300


def view(image, seed):
  del seed
  return tf.cast(image, tf.float32)


def flip(path, at):
  data = bytearray(open(path, "rb").read())
  data[at] ^= 0x10
  open(path, "wb").write(bytes(data))


def payload(path, offsets, record):
  with open(path, "rb") as f:
    f.seek(int(offsets[record]) + random_access.PAYLOAD_START)
    return f.read(int(offsets[record + 1] - offsets[record]) - random_access.RECORD_FRAMING)


def byte_of(path, offsets, record, field):
  """The file offset of a byte in the middle of `field`'s value (a bytes feature) in a record."""
  data = payload(path, offsets, record)
  value = tf.io.parse_single_example(data, {field: tf.io.FixedLenFeature([], tf.string)})[field]
  value = value.numpy()
  assert data.count(value) == 1
  return int(offsets[record]) + random_access.PAYLOAD_START + data.find(value) + len(value) // 2


# --- Pseudo-label shards ------------------------------------------------------------------------

@pytest.fixture
def label_set(tmp_path):
  directory = str(tmp_path / "labels")
  plan, _ = synthetic.write_label_set(directory, 300, num_classes=5, shard_bytes=40_000,
                                      batch=50, block_size=64)
  return directory, plan


def pseudo_batches(label_set, n):
  directory, plan = label_set
  it = student_input.pseudo_label_batches(directory, plan, local_batch_size=LOCAL, view_fn=view,
                                          seed=SEED, shuffle_buffer=WINDOW, process_index=0,
                                          process_count=1)
  return [next(it) for _ in range(n)]


def first_read(label_set):
  """(shard path, its record offsets, record) of the stream's first position."""
  directory, plan = label_set
  order, blocks, reader, _ = student_input.open_stream(directory, plan, SEED, WINDOW)
  shard, record = student_input.locate_records(order, blocks, np.arange(1))
  offsets = reader.table(int(shard[0]))[0]
  return reader.paths[int(shard[0])], offsets, int(record[0])


@pytest.mark.parametrize("where, problem", [
    ("probs", "its payload does not match its checksum"),
    ("image", "its payload does not match its checksum"),
    ("length", "its length field does not match its checksum")])
def test_a_flipped_byte_in_a_shard_stops_the_stream_naming_the_record(label_set, where, problem):
  path, offsets, record = first_read(label_set)
  flip(path, int(offsets[record]) if where == "length" else byte_of(path, offsets, record, where))
  with pytest.raises(DamagedRecord) as error:
    pseudo_batches(label_set, 1)  # the damaged record is in the first batch: none is handed out
  assert str(error.value) == (
      f"{path}: record {record} (at byte {offsets[record]}) is damaged: {problem} (TFRecord's "
      f"masked CRC-32C); nothing is trained on it. Relabel: delete {label_set[0]} and rerun the "
      "label stage that wrote it.")


def test_intact_shards_read_the_same_batches_as_without_the_checks(label_set, monkeypatch):
  checked = pseudo_batches(label_set, 8)
  monkeypatch.setattr(random_access, "record_problem", lambda framed: None)
  unchecked = pseudo_batches(label_set, 8)
  for a, b in zip(checked, unchecked):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].tobytes() == b[key].tobytes(), key


def test_the_checks_are_tfrecords_own(tmp_path):
  # The same verdicts as TF's sequential reader on a file tf.io wrote.
  path = str(tmp_path / "one.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    writer.write(b"a pseudo label")
  data = open(path, "rb").read()
  assert random_access.record_problem(data) is None
  assert list(tf.data.TFRecordDataset([path]).as_numpy_iterator()) == [b"a pseudo label"]
  for at, problem in ((3, "its length field"), (14, "its payload")):
    damaged = bytearray(data)
    damaged[at] ^= 0x01
    assert random_access.record_problem(bytes(damaged)) == f"{problem} does not match its checksum"
    open(path, "wb").write(bytes(damaged))
    with pytest.raises(tf.errors.DataLossError):
      list(tf.data.TFRecordDataset([path]).as_numpy_iterator())


# --- Labeled TFDS files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built_mnist(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_checks"))
  mnist5k.build(data_dir, "labels_10")
  return data_dir


@pytest.fixture
def labeled(built_mnist, tmp_path):
  """A copy of the dataset (damaged by the test), its train file and that file's offsets."""
  data_dir = str(tmp_path / "tfds")
  shutil.copytree(built_mnist, data_dir)
  (path,) = glob.glob(os.path.join(data_dir, "mnist5k", "labels_10", "*", "mnist5k-train.*"))
  return data_dir, path, random_access.tfrecord_offsets(path)


def labeled_batches(data_dir, index_dir, n):
  it = ip.train_batches(ip.Source("mnist5k/labels_10", "train", data_dir), global_batch_size=20,
                        seed=SEED, index_dir=str(index_dir), process_index=0, process_count=1)
  batches = []
  try:
    for _ in range(n):
      batches.append(next(it))
  except DamagedRecord as error:
    return batches, error
  return batches, None


def record_id(path, offsets, record, data_dir):
  features = tfds.builder("mnist5k/labels_10", data_dir=data_dir).info.features
  example = features.deserialize_example(payload(path, offsets, record),
                                         decoders={"image": tfds.decode.SkipDecoding()})
  return int(example["id"])


@pytest.mark.parametrize("where, problem", [
    ("image", "its payload does not match its checksum"),
    ("length", "its length field does not match its checksum")])
def test_a_flipped_byte_in_a_labeled_file_stops_the_stream_naming_the_record(labeled, tmp_path,
                                                                             where, problem):
  data_dir, path, offsets = labeled
  labeled_batches(data_dir, tmp_path / "index", 1)  # the offsets are indexed while intact
  record = 37
  damaged_id = record_id(path, offsets, record, data_dir)
  flip(path, int(offsets[record]) if where == "length" else byte_of(path, offsets, record, "image"))
  batches, error = labeled_batches(data_dir, tmp_path / "index", 5)  # 5 x 20: the whole split
  assert error is not None, "a damaged record was read without a word"
  assert str(error) == (
      f"{path}: record {record} (at byte {offsets[record]}) is damaged: {problem} (TFRecord's "
      f"masked CRC-32C); nothing is trained on it. Rebuild that TFDS split: delete "
      f"{os.path.dirname(path)} and prepare the dataset again (tfds build with the same name and "
      "data_dir; nsjax's embedded datasets and converted image folders are rebuilt by the next "
      "run on their own), then rerun the same command.")
  # Undecodable images are dropped from this stream; a damaged record is not, nor is any batch
  # read after it handed out.
  assert damaged_id not in np.concatenate([b["id"] for b in batches] or [[]]).tolist()
  assert len(batches) < 5


def test_a_flipped_length_byte_is_found_when_the_file_is_indexed(labeled, tmp_path):
  # Read as a length, a damaged one would end the file there: the rest counted as cut short.
  data_dir, path, offsets = labeled
  flip(path, int(offsets[60]) + 2)
  with pytest.raises(DamagedRecord, match=rf"{path}: record 60 \(at byte {offsets[60]}\) is "
                     "damaged: its length field does not match its checksum.*Rebuild that TFDS"):
    labeled_batches(data_dir, tmp_path / "fresh-index", 1)


def test_intact_labeled_files_read_the_same_batches_as_without_the_checks(labeled, tmp_path,
                                                                         monkeypatch):
  data_dir = labeled[0]
  checked, error = labeled_batches(data_dir, tmp_path / "index", 6)
  assert error is None
  monkeypatch.setattr(random_access, "record_problem", lambda framed: None)
  unchecked, _ = labeled_batches(data_dir, tmp_path / "index", 6)
  for a, b in zip(checked, unchecked, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      assert a[key].tobytes() == b[key].tobytes(), key
