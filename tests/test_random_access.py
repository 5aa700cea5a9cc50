"""Record offsets of TFRecord files: computed once per file, and never reused for a changed file."""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from nsjax.data import random_access


def write_records(path, records):
  with tf.io.TFRecordWriter(path) as writer:
    for record in records:
      writer.write(record)


def read_all(paths, index_paths):
  reader = random_access.RecordReader(
      paths, table=lambda k: (random_access.load_offsets(index_paths[k]), None),
      table_bytes=lambda k: os.path.getsize(index_paths[k]))
  try:
    return [reader.read(np.full(n, k), np.arange(n))
            for k, n in enumerate(len(random_access.load_offsets(i)) - 1 for i in index_paths)]
  finally:
    reader.close()


def index(paths, index_dir):
  return random_access.index_tfds_files(paths, str(index_dir), process_index=0, process_count=1)


def test_offsets_give_back_every_record_and_stop_at_a_cut(tmp_path):
  path = str(tmp_path / "data.tfrecord")
  records = [b"a", b"bb" * 100, b"", b"ccc" * 1000]
  write_records(path, records)
  offsets = random_access.tfrecord_offsets(path)
  assert offsets[-1] == os.path.getsize(path) and len(offsets) == len(records) + 1
  assert read_all([path], index([path], tmp_path / "index")) == [records]

  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 10)  # the last record is cut short
  assert len(random_access.tfrecord_offsets(path)) == len(records)


def test_an_index_is_built_once_per_file(tmp_path):
  paths = [str(tmp_path / f"data-{k}.tfrecord") for k in range(3)]
  for k, path in enumerate(paths):
    write_records(path, [bytes([k]) * (k + 1)] * 5)
  first = index(paths, tmp_path / "index")
  stamps = [os.stat(p).st_mtime_ns for p in first]
  assert index(paths, tmp_path / "index") == first
  assert [os.stat(p).st_mtime_ns for p in first] == stamps  # reused, not rewritten
  assert len(os.listdir(tmp_path / "index")) == 3


def test_a_file_rebuilt_in_place_is_indexed_again(tmp_path):
  # A regenerated split keeps its file names. Read at the old offsets, its records would fail to
  # parse and be dropped as undecodable, silently.
  path = str(tmp_path / "mnist-train.tfrecord-00000-of-00001")
  write_records(path, [b"x" * 10, b"y" * 30, b"z" * 5])
  assert read_all([path], index([path], tmp_path / "index")) == [[b"x" * 10, b"y" * 30, b"z" * 5]]

  rebuilt = [b"p" * 3, b"q" * 50, b"r" * 7, b"s"]
  write_records(path, rebuilt)
  assert read_all([path], index([path], tmp_path / "index")) == [rebuilt]

  # The same size with other record boundaries (the same records shuffled otherwise): only the
  # modification time tells.
  shuffled = [b"q" * 50, b"s", b"p" * 3, b"r" * 7]
  before = os.stat(path)
  write_records(path, shuffled)
  assert os.path.getsize(path) == before.st_size
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
  assert read_all([path], index([path], tmp_path / "index")) == [shuffled]


def test_a_tfds_datasets_files_are_stamped_by_its_dataset_info(tmp_path, monkeypatch):
  # At pod scale a split has thousands of files and every host checks them at every stage start:
  # one stat of dataset_info.json (rewritten whenever TFDS prepares the dataset) stands for all.
  folder = tmp_path / "mnist" / "3.0.1"
  folder.mkdir(parents=True)
  paths = [str(folder / f"mnist-train.tfrecord-0000{k}-of-00004") for k in range(4)]
  for k, path in enumerate(paths):
    write_records(path, [bytes([k]) * 3] * (k + 2))
  (folder / "dataset_info.json").write_text('{"version": 1}')
  first = index(paths, tmp_path / "index")
  assert [len(records) for records in read_all(paths, first)] == [2, 3, 4, 5]
  stats = []  # a later stage or a resume: the indexes exist
  real_stat = tf.io.gfile.stat
  monkeypatch.setattr(tf.io.gfile, "stat", lambda p: stats.append(p) or real_stat(p))
  assert index(paths, tmp_path / "index") == first
  assert stats == [str(folder / "dataset_info.json")]

  # Prepared again in place: other records in the same file names, and a new dataset_info.json.
  for path in paths:
    write_records(path, [b"new record"] * 7)
  before = os.stat(folder / "dataset_info.json")
  (folder / "dataset_info.json").write_text('{"version": 2}')
  os.utime(folder / "dataset_info.json", ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
  again = index(paths, tmp_path / "index")
  assert again != first
  assert read_all(paths, again) == [[b"new record"] * 7] * 4
