"""Pseudo-labeled shards: self-contained TFRecords written atomically, indexed by manifests.

A record (tf.train.Example) holds
  image       -- the source's encoded image bytes (decoded again by the student's pipeline);
  probs       -- the teacher's probabilities as float16 bytes: all classes, or the top-k values;
  classes     -- the top-k class indices (absent when all classes are stored);
  label       -- argmax class;  confidence -- top-1 probability;  id -- the source id.
The labeling step computes these fields on the device (`nsjax.train.steps.pseudo_label_fields`);
the writer only packs them.
Each host writes its own shards `shard-h<host>-<index>.tfrecord` (temporary name, then rename) and,
after each, rewrites its `manifest-h<host>.json` (also atomically) with the shard list and the
running per-class confidence histogram. A rerun reads the manifest and resumes after the last
recorded shard, so a killed job loses at most the shard in flight. `merge_manifests` sums the hosts.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import numpy as np
import tensorflow as tf

from nsjax.data import balance
from nsjax.data.example_proto import Feature, serialize_example
from nsjax.files import atomic_write, atomic_write_json, read_json

MANIFEST = "manifest.json"


def host_manifest_path(directory: str, host: int) -> str:
  return os.path.join(directory, f"manifest-h{host:03d}.json")


FIELDS = ("label", "confidence", "probs")  # + "classes" with top-k storage


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
                     f"{sorted(fields)}; compute them with nsjax.train.steps.pseudo_label_fields.")
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
                     f"{np.asarray(fields['probs']).dtype}; use steps.pseudo_label_fields.")


class HostShardWriter:
  """Writes one host's shards in order and keeps its manifest current (resumable)."""

  def __init__(self, directory: str, host: int, num_classes: int, top_k: int = 0):
    self.directory, self.host = directory, host
    tf.io.gfile.makedirs(directory)
    path = host_manifest_path(directory, host)
    if tf.io.gfile.exists(path):
      self.manifest = read_json(path)
      if self.manifest["num_classes"] != num_classes or self.manifest["top_k"] != top_k:
        raise ValueError(
            f"{path} was written with num_classes={self.manifest['num_classes']}, "
            f"top_k={self.manifest['top_k']}, but this run uses num_classes={num_classes}, "
            f"top_k={top_k}. Use a fresh workdir or delete {directory} to relabel.")
      if "num_batches_done" not in self.manifest and not self.manifest["complete"]:
        raise ValueError(f"{path} was written by an older nsjax (no num_batches_done), so its "
                         f"shards cannot be resumed. Delete {directory} to relabel.")
    else:
      self.manifest = {"host": host, "num_classes": num_classes, "top_k": top_k, "shards": [],
                       "histogram": np.zeros((num_classes, balance.NUM_BINS), int).tolist(),
                       "num_skipped": 0, "num_batches_done": 0, "complete": False}
    # Summed as numpy, listed for JSON only when the manifest is saved.
    self._histogram = np.asarray(self.manifest["histogram"], np.int64)

  @property
  def manifest_path(self) -> str:
    return host_manifest_path(self.directory, self.host)

  @property
  def num_examples_done(self) -> int:
    return sum(s["count"] for s in self.manifest["shards"])

  @property
  def num_batches_done(self) -> int:
    """Batches of the labeling pass that the recorded shards cover (a rerun starts after them)."""
    return int(self.manifest.get("num_batches_done", 0))

  @property
  def num_shards_done(self) -> int:
    return len(self.manifest["shards"])

  def write_shard(self, images: list[bytes], fields: dict[str, np.ndarray], ids: list[bytes],
                  num_skipped: int = 0, num_batches_done: int | None = None) -> str:
    """Writes shard number `num_shards_done` and records it (and that the pass is done up to batch
    `num_batches_done`, in the same manifest write); returns its file name.

    `fields`: the records' `steps.pseudo_label_fields` as numpy arrays, one row per image.
    """
    num_classes, top_k = self.manifest["num_classes"], self.manifest["top_k"]
    if len(ids) != len(images):
      raise ValueError(f"{len(images)} images but {len(ids)} ids; each image needs one id.")
    check_fields(fields, len(images), num_classes, top_k)
    name = f"shard-h{self.host:03d}-{self.num_shards_done:05d}.tfrecord"
    columns = [fields[k] for k in FIELDS] + ([fields["classes"]] if top_k else [])

    def write(tmp):
      with tf.io.TFRecordWriter(tmp) as w:
        for image, i, *row in zip(images, ids, *columns):
          w.write(encode_record(image, i, *row))

    atomic_write(os.path.join(self.directory, name), write)
    self._histogram += balance.class_histograms(fields["label"], fields["confidence"], num_classes)
    self.manifest["shards"].append({"file": name, "count": len(images)})
    self.manifest["num_skipped"] += int(num_skipped)
    if num_batches_done is not None:
      self.manifest["num_batches_done"] = int(num_batches_done)
    self._save()
    return name

  def finish(self) -> None:
    self.manifest["complete"] = True
    self._save()

  def _save(self):
    # One line: written after every shard, and the [classes, bins] histogram makes it large.
    self.manifest["histogram"] = self._histogram.tolist()
    atomic_write_json(host_manifest_path(self.directory, self.host), self.manifest, indent=None)


def merge_manifests(directory: str, num_hosts: int) -> dict[str, Any]:
  """Sums the hosts' manifests into manifest.json (call on one process after all hosts finish)."""
  hosts = [read_json(host_manifest_path(directory, h)) for h in range(num_hosts)]
  incomplete = [h["host"] for h in hosts if not h["complete"]]
  if incomplete:
    raise RuntimeError(f"Pseudo-labeling in {directory} is incomplete on hosts {incomplete}; "
                       "rerun the label stage to finish it.")
  merged = {"num_classes": hosts[0]["num_classes"], "top_k": hosts[0]["top_k"],
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
  return read_json(path)


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


def parse_records(records: tf.data.Dataset, directory: str) -> tf.data.Dataset:
  manifest = read_manifest(directory)
  return records.map(parse_fn(manifest["num_classes"], manifest["top_k"]),
                     num_parallel_calls=tf.data.AUTOTUNE)


def read_dataset(directory: str, files: Iterable[str] | None = None) -> tf.data.Dataset:
  """All pseudo-labeled records of a finished label stage, in shard order (single pass)."""
  return parse_records(tf.data.TFRecordDataset(shard_paths(directory, files)), directory)


def apply_balance(examples: tf.data.Dataset, plan: balance.BalancePlan) -> tf.data.Dataset:
  """Filtered and balanced at read time: each example repeated `plan.copies(...)` times (0 = dropped).

  The same arithmetic as `BalancePlan.copies`, in the graph, so nothing is duplicated on disk.
  """
  first_bin = tf.constant(np.round(np.asarray(plan.thresholds) * balance.NUM_BINS), tf.int64)
  factors = tf.constant(plan.factors, tf.float64)

  def num_copies(ex):
    bin_ = tf.minimum(tf.cast(tf.floor(tf.cast(ex["confidence"], tf.float64) * balance.NUM_BINS),
                              tf.int64), balance.NUM_BINS - 1)
    keep = bin_ >= tf.gather(first_bin, ex["label"])
    factor = tf.gather(factors, ex["label"])
    whole = tf.floor(factor)
    extra = balance.uniform_from_id(plan.seed, ex["id"]) < factor - whole
    copies = tf.cast(whole, tf.int64) + tf.cast(extra, tf.int64)
    return tf.where(keep, copies, tf.constant(0, tf.int64))

  return examples.flat_map(lambda ex: tf.data.Dataset.from_tensors(ex).repeat(num_copies(ex)))


def balanced_dataset(directory: str, plan: balance.BalancePlan,
                     files: Iterable[str] | None = None) -> tf.data.Dataset:
  """One balanced pass over the shards in manifest order."""
  return apply_balance(read_dataset(directory, files), plan)
