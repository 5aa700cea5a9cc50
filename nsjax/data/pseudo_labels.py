"""Pseudo-labeled shards: TFRecords with per-shard sidecars, read by random access.

A record (tf.train.Example) holds
  image       -- the source's encoded image bytes (decoded again by the student's pipeline);
  probs       -- the teacher's probabilities as float16 bytes: all classes, or the top-k values;
  classes     -- the top-k class indices (absent when all classes are stored);
  label       -- argmax class;  confidence -- top-1 probability;  id -- the source id.
The labeling step computes these fields on the device (`nsjax.stages.label.pseudo_label_fields`);
the writer only packs them.

Layout of a label stage's directory (format 2), and why:
  shard-h<host>-<index>.tfrecord   records, written to a temporary name and renamed. Shards are cut
                                   by size (label.shard_bytes, ~256 MB), not by batches: at 256
                                   hosts, batch-sized shards would be millions of tiny files.
  shard-h<host>-<index>.meta.npz   the shard's sidecar, written last (the shard's commit point):
                                   each record's length (so any record can be read by offset),
                                   label, confidence bin and id, plus the pass's progress. Bytes
                                   written grow linearly with the shards: nothing is rewritten.
  done-h<host>.json                a host's summary when its pass is complete (its shard list and
                                   class histogram), written once.
  manifest.json                    all hosts' summaries merged, once, by process 0.
  balanced/shard-...npz            per shard, the records' byte offsets and how many times the
                                   balance plan reads each one (`write_read_tables`, once per plan).
A rerun lists this host's sidecars and resumes after the last one, so a killed job loses at most
the shard in flight. Directories of the earlier format (one manifest rewritten after every shard)
are refused with the fix.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

from nsjax.data import balance
from nsjax.data.random_access import RECORD_FRAMING
from nsjax.data.example_proto import Feature, serialize_example
from nsjax.files import atomic_write, atomic_write_json, read_json

FORMAT = 2
MANIFEST = "manifest.json"
BALANCED_DIR = "balanced"
MAX_SHARD_BYTES = 2**31  # byte offsets are stored as uint32 with headroom for the last batch

FIELDS = ("label", "confidence", "probs")  # + "classes" with top-k storage


class OldFormatError(ValueError):
  """A label directory written by nsjax before random-access shards."""


def shard_file(host: int, index: int) -> str:
  return f"shard-h{host:03d}-{index:05d}.tfrecord"


def _stem(file: str) -> str:
  return file[:-len(".tfrecord")]


def meta_path(directory: str, file: str) -> str:
  return os.path.join(directory, _stem(file) + ".meta.npz")


def done_path(directory: str, host: int) -> str:
  return os.path.join(directory, f"done-h{host:03d}.json")


def table_path(directory: str, file: str) -> str:
  return os.path.join(directory, BALANCED_DIR, _stem(file) + ".npz")


def refuse_old_format(directory: str) -> None:
  """Raises OldFormatError, naming the fix, if `directory` holds format-1 pseudo labels."""
  old = tf.io.gfile.glob(os.path.join(directory, "manifest-h*.json"))
  manifest = os.path.join(directory, MANIFEST)
  if not old and tf.io.gfile.exists(manifest):
    old = [] if read_json(manifest).get("format") == FORMAT else [manifest]
  if old:
    raise OldFormatError(
        f"{directory} holds pseudo labels written by an older nsjax ({os.path.basename(old[0])}: "
        "one manifest rewritten per shard, no per-record offsets), which the random-access reader "
        f"cannot read. Relabel: delete {directory} and rerun the label stage (python -m "
        "nsjax.main --config=... --workdir=... --stage=label-N; the teacher's export is kept).")


def encode_record(image: bytes, source_id: bytes, label: int, confidence: float,
                  probs: np.ndarray, classes: np.ndarray | None = None) -> bytes:
  """One serialised example: `probs` float16 (all classes, or the top-k values of `classes`)."""
  feature = {"image": Feature.bytes_list([image]), "id": Feature.bytes_list([source_id]),
             "label": Feature.int64_list([label]), "confidence": Feature.float_list([confidence]),
             "probs": Feature.bytes_list([np.asarray(probs, np.float16).tobytes()])}
  if classes is not None:
    feature["classes"] = Feature.int64_list(classes)
  return serialize_example(feature)  # not tf.train.Example: see nsjax.data.example_proto


def check_fields(fields: dict[str, np.ndarray], count: int, num_classes: int, top_k: int) -> None:
  """Raises ValueError unless `fields` holds `count` records' fields for this storage format."""
  expected = set(FIELDS) | ({"classes"} if top_k else set())
  if set(fields) != expected:
    raise ValueError(f"Pseudo-label fields must be exactly {sorted(expected)} (top_k={top_k}), got "
                     f"{sorted(fields)}; compute them with nsjax.stages.label.pseudo_label_fields.")
  width = top_k or num_classes
  shapes = {"label": (count,), "confidence": (count,), "probs": (count, width)}
  if top_k:
    shapes["classes"] = (count, top_k)
  for key, shape in shapes.items():
    if np.shape(fields[key]) != shape:
      raise ValueError(f"Pseudo-label field {key!r} has shape {np.shape(fields[key])}, expected "
                       f"{shape} for {count} images, num_classes={num_classes}, top_k={top_k}.")
  if np.asarray(fields["probs"]).dtype != np.float16:
    raise ValueError(f"Pseudo-label probs must be float16 (as stored), got "
                     f"{np.asarray(fields['probs']).dtype}; use nsjax.stages.label.pseudo_label_fields.")


def save_npz(path: str, **arrays) -> int:
  """Writes arrays atomically (local or gs://); returns the bytes written."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  data = buffer.getvalue()

  def write(tmp):
    with tf.io.gfile.GFile(tmp, "wb") as f:
      f.write(data)

  atomic_write(path, write)
  return len(data)


def load_npz(path: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
  with tf.io.gfile.GFile(path, "rb") as f:
    data = np.load(io.BytesIO(f.read()))
    return {k: data[k] for k in keys}


def _info(meta: dict[str, np.ndarray]) -> dict[str, Any]:
  return json.loads(str(meta["info"]))


class HostShardWriter:
  """Writes one host's shards in order, each committed by its sidecar (resumable, append-only)."""

  def __init__(self, directory: str, host: int, num_classes: int, top_k: int = 0):
    self.directory, self.host = directory, host
    tf.io.gfile.makedirs(directory)
    refuse_old_format(directory)
    self.num_classes, self.top_k = num_classes, top_k
    self.shards: list[dict[str, Any]] = []  # each recorded shard's info, in order
    self.histogram = np.zeros((num_classes, balance.NUM_BINS), np.int64)
    self.bytes_written = 0  # metadata bytes (sidecars, done file) written by this writer
    for info, labels, bins in self._recorded():
      if (info["num_classes"], info["top_k"]) != (num_classes, top_k):
        raise ValueError(
            f"{meta_path(directory, info['file'])} was written with num_classes="
            f"{info['num_classes']}, top_k={info['top_k']}, but this run uses num_classes="
            f"{num_classes}, top_k={top_k}. Use a fresh workdir or delete {directory} to relabel.")
      self.shards.append(info)
      self.histogram += balance.bin_histograms(labels, bins, num_classes)
    self.complete = tf.io.gfile.exists(done_path(directory, host))

  def _recorded(self):
    """(info, labels, bins) of this host's committed shards: sidecars 0, 1, ... without a gap."""
    pattern = re.compile(rf"shard-h{self.host:03d}-(\d+)\.meta\.npz$")
    names = tf.io.gfile.glob(os.path.join(self.directory, f"shard-h{self.host:03d}-*.meta.npz"))
    indices = sorted(int(m.group(1)) for m in map(pattern.search, names) if m)
    if indices != list(range(len(indices))):
      raise ValueError(f"Shard sidecars of host {self.host} in {self.directory} are not "
                       f"numbered 0..{len(indices) - 1} ({indices[:10]}...): the directory was "
                       f"edited by hand. Delete {self.directory} to relabel.")
    for index in indices:
      meta = load_npz(meta_path(self.directory, shard_file(self.host, index)),
                      ("info", "label", "bin"))
      yield _info(meta), meta["label"], meta["bin"]

  @property
  def progress_path(self) -> str:
    return os.path.join(self.directory, f"shard-h{self.host:03d}-*.meta.npz")

  @property
  def num_examples_done(self) -> int:
    return sum(s["count"] for s in self.shards)

  @property
  def num_batches_done(self) -> int:
    """Batches of the labeling pass that the recorded shards cover (a rerun starts after them)."""
    return int(self.shards[-1]["num_batches_done"]) if self.shards else 0

  @property
  def num_shards_done(self) -> int:
    return len(self.shards)

  @property
  def num_skipped(self) -> int:
    return sum(s["num_skipped"] for s in self.shards)

  def write_shard(self, images: list[bytes], fields: dict[str, np.ndarray], ids: list[bytes],
                  num_skipped: int = 0, num_batches_done: int | None = None) -> str:
    """Writes shard number `num_shards_done`, then its sidecar (recording that the pass is done up
    to batch `num_batches_done`); returns the shard's file name.

    `fields`: the records' `nsjax.stages.label.pseudo_label_fields` as numpy arrays, one row per image.
    """
    if len(ids) != len(images):
      raise ValueError(f"{len(images)} images but {len(ids)} ids; each image needs one id.")
    check_fields(fields, len(images), self.num_classes, self.top_k)
    name = shard_file(self.host, self.num_shards_done)
    columns = [fields[k] for k in FIELDS] + ([fields["classes"]] if self.top_k else [])
    lengths = np.zeros(len(images), np.uint32)

    def write(tmp):
      with tf.io.TFRecordWriter(tmp) as w:
        for n, (image, i, *row) in enumerate(zip(images, ids, *columns)):
          record = encode_record(image, i, *row)
          lengths[n] = len(record)
          w.write(record)

    atomic_write(os.path.join(self.directory, name), write)
    labels = np.asarray(fields["label"], np.int32)
    bins = balance.confidence_bins(fields["confidence"]).astype(np.uint8)
    info = {"format": FORMAT, "host": self.host, "index": self.num_shards_done, "file": name,
            "count": len(images), "bytes": int(lengths.sum(dtype=np.int64)) + RECORD_FRAMING * len(images),
            "num_skipped": int(num_skipped), "num_classes": self.num_classes, "top_k": self.top_k,
            "num_batches_done": int(self.num_batches_done if num_batches_done is None
                                    else num_batches_done)}
    self.bytes_written += save_npz(meta_path(self.directory, name), info=json.dumps(info),
                                   length=lengths, label=labels, bin=bins,
                                   id=np.asarray(ids, dtype=np.bytes_))
    self.shards.append(info)
    self.histogram += balance.bin_histograms(labels, bins, self.num_classes)
    return name

  def finish(self, num_batches: int | None = None, num_skipped: int = 0) -> None:
    """Marks this host's pass complete (`num_skipped`: records skipped after the last shard)."""
    summary = {"format": FORMAT, "host": self.host, "num_classes": self.num_classes,
               "top_k": self.top_k,
               "num_batches_done": self.num_batches_done if num_batches is None else int(num_batches),
               "shards": [{k: s[k] for k in ("file", "count", "bytes")} for s in self.shards],
               "num_skipped": self.num_skipped + int(num_skipped),
               "histogram": self.histogram.tolist()}
    text = json.dumps(summary, sort_keys=True)
    atomic_write_json(done_path(self.directory, self.host), summary, indent=None)
    self.bytes_written += len(text)
    self.complete = True


def merge_manifests(directory: str, num_hosts: int) -> dict[str, Any]:
  """Merges the hosts' summaries into manifest.json, once (call on one process after all hosts
  finish): the shard list in (host, index) order, the summed histogram and counts."""
  refuse_old_format(directory)
  incomplete = [h for h in range(num_hosts) if not tf.io.gfile.exists(done_path(directory, h))]
  if incomplete:
    raise RuntimeError(f"Pseudo-labeling in {directory} is incomplete on hosts {incomplete}; "
                       "rerun the label stage to finish it.")
  hosts = [read_json(done_path(directory, h)) for h in range(num_hosts)]
  merged = {"format": FORMAT, "num_classes": hosts[0]["num_classes"], "top_k": hosts[0]["top_k"],
            "shards": [s for h in hosts for s in h["shards"]],
            "histogram": np.sum([h["histogram"] for h in hosts], axis=0).tolist(),
            "num_skipped": sum(h["num_skipped"] for h in hosts)}
  merged["num_examples"] = sum(s["count"] for s in merged["shards"])
  atomic_write_json(os.path.join(directory, MANIFEST), merged, indent=None)
  return merged


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"No pseudo-label manifest at {path}: run the label stage first.")
  refuse_old_format(directory)
  return read_json(path)


def shard_starts(shards: Sequence[dict[str, Any]]) -> np.ndarray:
  """Index of each shard's first record in the concatenated record sequence, plus the total."""
  return np.concatenate([[0], np.cumsum([s["count"] for s in shards])]).astype(np.int64)


def write_read_tables(directory: str, plan: balance.BalancePlan, shards: Sequence[dict[str, Any]],
                      process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """Writes the reader's table of shards [process_index::process_count] -- each record's byte
  offset and how many times the plan reads it -- and returns their balanced counts per block of
  `plan.block_size` records of the concatenated sequence (sum the processes' arrays).

  This is the one pass over the records' metadata (sidecars, ~20 bytes a record, never the
  images) that balancing needs, done when the plan is made, split over the hosts: a student
  stage then starts and resumes without reading anything per record. Blocks, not shards, are the
  unit of the student's order because the records' sequence is the same whichever hosts labeled
  them, while the shards are not.
  """
  starts = shard_starts(shards)
  num_blocks = -(-int(starts[-1]) // plan.block_size)
  counts = np.zeros(num_blocks, np.int64)
  tf.io.gfile.makedirs(os.path.join(directory, BALANCED_DIR))
  for k in range(process_index, len(shards), process_count):
    meta = load_npz(meta_path(directory, shards[k]["file"]), ("length", "label", "bin", "id"))
    copies = plan.copies_of(meta["label"], meta["bin"], meta["id"])
    offsets = np.concatenate([[0], np.cumsum(meta["length"].astype(np.int64) + RECORD_FRAMING)])
    if offsets[-1] >= 2**32:
      raise ValueError(f"Shard {shards[k]['file']} has {offsets[-1]} bytes, over 4 GiB; lower "
                       "label.shard_bytes and relabel.")
    save_npz(table_path(directory, shards[k]["file"]), offsets=offsets.astype(np.uint32),
             copies=copies.astype(np.min_scalar_type(max(int(copies.max(initial=0)), 1))))
    blocks = (starts[k] + np.arange(len(copies))) // plan.block_size
    counts += np.bincount(blocks, weights=copies, minlength=num_blocks).astype(np.int64)
  return counts


def read_table(directory: str, file: str) -> tuple[np.ndarray, np.ndarray]:
  """(byte offsets [n + 1], copies [n]) of a shard's records under the current plan."""
  path = table_path(directory, file)
  if not tf.io.gfile.exists(path):
    raise FileNotFoundError(f"No balanced read table {path}: the balance plan predates it or was "
                            "interrupted. Rerun the label stage (its shards are kept).")
  table = load_npz(path, ("offsets", "copies"))
  return table["offsets"].astype(np.int64), table["copies"].astype(np.int64)


_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "id": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "confidence": tf.io.FixedLenFeature([], tf.float32),
    "probs": tf.io.FixedLenFeature([], tf.string),
}


def parse_fn(num_classes: int, top_k: int):
  """record -> {image (encoded), id, label, confidence, probs [num_classes] float32}.

  With top-k storage the dense distribution is the stored mass scattered and renormalised.
  """
  features = dict(_FEATURES)
  if top_k:
    features["classes"] = tf.io.FixedLenFeature([top_k], tf.int64)

  def parse(record):
    ex = tf.io.parse_single_example(record, features)
    probs = tf.cast(tf.io.decode_raw(ex.pop("probs"), tf.float16), tf.float32)
    if top_k:
      probs = tf.scatter_nd(ex.pop("classes")[:, None], probs, [num_classes])
    ex["probs"] = probs / tf.reduce_sum(probs)
    ex["label"] = tf.cast(ex["label"], tf.int32)
    return ex

  return parse


def shard_paths(directory: str, files: Iterable[str] | None = None) -> list[str]:
  """Full paths of the shards (all of them, in manifest order, unless `files` names some)."""
  manifest = read_manifest(directory)
  names = list(files) if files is not None else [s["file"] for s in manifest["shards"]]
  return [os.path.join(directory, n) for n in names]


def read_dataset(directory: str, files: Iterable[str] | None = None) -> tf.data.Dataset:
  """All pseudo-labeled records of a finished label stage, in shard order (one sequential pass,
  for inspection and tests; students read by random access, nsjax.data.student_input)."""
  manifest = read_manifest(directory)
  return tf.data.TFRecordDataset(shard_paths(directory, files)).map(
      parse_fn(manifest["num_classes"], manifest["top_k"]), num_parallel_calls=tf.data.AUTOTUNE)
