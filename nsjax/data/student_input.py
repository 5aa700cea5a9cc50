"""The student's unlabeled input: balanced pseudo-labeled shards as an infinite, resumable stream.

Pseudo-labeled images come from the label stage's shards, filtered and balanced at read time
(`pseudo_labels.apply_balance`), then decoded and noised by the student's preprocessing. Each host
reads every process_count-th shard file (host_input="split"), or every host reads all shards in
manifest order and keeps its rows of each global batch ("global": the same global batches for any
number of hosts, because hosts write their contiguous slices of the unlabeled split in order, so
the concatenated shards are the same record sequence however many hosts labeled them). The stream is a function of (seed, position) only: per
epoch, the shard order and the shuffle buffer's seed are derived from (seed, epoch), and each
example's augmentation seed from its stream position, so `start_step` resumes exactly. An epoch
(one balanced pass over this host's shards) has a fixed size, counted once up front.
`StageBatches` joins it with the labeled stream into a training stage's global batches.
"""
from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from nsjax.data import balance, input_pipeline, preprocess, pseudo_labels
from nsjax.train import steps

_FILES_STREAM, _SHUFFLE_STREAM, _EXAMPLE_STREAM = 11, 12, 13


def host_shards(directory: str, process_index: int, process_count: int) -> list[str]:
  paths = pseudo_labels.shard_paths(directory)[process_index::process_count]
  if not paths:
    raise ValueError(f"No pseudo-label shards for process {process_index} of {process_count} in "
                     f"{directory}: label more unlabeled data or run on fewer hosts.")
  return paths


def epoch_size(directory: str, plan: balance.BalancePlan, paths: list[str]) -> int:
  """Balanced examples per pass over `paths` (copies depend on ids, not on the epoch)."""
  ds = pseudo_labels.apply_balance(
      pseudo_labels.parse_records(tf.data.TFRecordDataset(paths), directory), plan)
  size = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
  if size == 0:
    raise ValueError(f"Filtering kept no pseudo-labeled images in {directory}; lower "
                     "balance.min_threshold or check the teacher.")
  return size


def _epoch(directory, plan, paths, seed, epoch, shuffle_buffer, shuffle_files=True):
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), epoch])
  files = tf.constant(paths)
  if shuffle_files:  # not in "global" mode: the file boundaries depend on the number of hosts
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(paths)), seed=tf.stack([epoch_seed[0] + _FILES_STREAM, epoch_seed[1]]))
    files = tf.gather(files, order)
  records = tf.data.TFRecordDataset(files)
  examples = pseudo_labels.apply_balance(pseudo_labels.parse_records(records, directory), plan)
  # A stateless block shuffle (not Dataset.shuffle, whose order follows tf.random.set_seed).
  return input_pipeline.block_shuffle(
      examples, tf.stack([epoch_seed[0] + _SHUFFLE_STREAM, epoch_seed[1]]), shuffle_buffer)


def pseudo_label_batches(directory: str, plan: balance.BalancePlan, *, local_batch_size: int,
                         view_fn, seed: int = 0, start_step: int = 0, shuffle_buffer: int = 16_384,
                         process_index: int | None = None, process_count: int | None = None,
                         host_input: str = "split") -> Iterator[dict[str, np.ndarray]]:
  """Infinite host batches {"image": float32 [b,H,W,3], "probs": float32 [b,C]}.

  `view_fn(image_uint8, seed[2]) -> image` is the student's (noised) view of a decoded image.
  `local_batch_size` is this host's part of a global batch of local_batch_size * process_count.
  """
  input_pipeline.check_host_input(host_input)
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  whole = host_input == "global"
  paths = pseudo_labels.shard_paths(directory) if whole else host_shards(directory, index, count)
  size = epoch_size(directory, plan, paths)
  shuffle_buffer = min(shuffle_buffer, size)
  stream_batch = local_batch_size * count if whole else local_batch_size
  start = int(start_step) * stream_batch
  example_seed = tf.constant([seed + _EXAMPLE_STREAM, 0 if whole else index], tf.int64)

  def decode_and_view(position, ex):
    image, ok = preprocess.decode(ex["image"])
    noise_seed = tf.random.experimental.stateless_fold_in(example_seed, position)
    return {"image": view_fn(image, noise_seed), "probs": ex["probs"], "ok": ok}

  stream = (tf.data.Dataset.range(start // size, np.iinfo(np.int64).max)
            .flat_map(lambda e: _epoch(directory, plan, paths, seed, e, shuffle_buffer,
                                       shuffle_files=not whole))
            .skip(start % size)
            .enumerate(start=start))
  if whole:
    stream = input_pipeline.slice_global_batches(stream, stream_batch, index, count)
  stream = (stream
            .map(decode_and_view, num_parallel_calls=tf.data.AUTOTUNE)
            .filter(lambda ex: ex["ok"])  # the label stage wrote only decodable images
            .map(lambda ex: {"image": ex["image"], "probs": ex["probs"]})
            .batch(local_batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))
  return stream.as_numpy_iterator()


class StageBatches:
  """Global batches {"labeled"[, "unlabeled"]} of a model stage, and where its streams stand.

  `input_position()` is what `loop.train` saves with each checkpoint and hands back on resume:
  a stream that drops undecodable records cannot be placed by the step alone."""

  def __init__(self, labeled: input_pipeline.BatchIterator, unlabeled: Iterator | None, mesh):
    self.labeled, self.unlabeled, self.mesh = labeled, unlabeled, mesh

  def __iter__(self) -> StageBatches:
    return self

  def __next__(self) -> dict:
    lb = next(self.labeled)
    batch = {"labeled": {"image": lb["image"], "label": lb["label"]}}
    if self.unlabeled is not None:
      batch["unlabeled"] = next(self.unlabeled)
    return steps.to_global_batch(batch, self.mesh)

  def input_position(self) -> dict[str, dict[str, int]]:
    position = {"labeled": self.labeled.position()}
    # Offline pseudo labels are all decodable (the label stage wrote them): placed by the step.
    if isinstance(self.unlabeled, input_pipeline.BatchIterator):
      position["unlabeled"] = self.unlabeled.position()
    return position
