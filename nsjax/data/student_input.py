"""The student's unlabeled input: balanced pseudo-labeled shards as an infinite, seekable stream.

The stream is a function of (seed, position) alone (`balanced_order.BalancedOrder`): global batch
k holds positions [k * G, (k + 1) * G), host h of P holds rows [h * G / P, (h + 1) * G / P) of it,
and each host reads by byte offset only the records of its own rows. So the global batches are the
same for any number of hosts, each host reads 1/P of the data, and a stage starts or resumes at any
step by computing where that step's records are -- nothing is read or counted through the epoch.
The epoch size and the balanced count of every block of records come with the balance plan. Each example's noise
seed is derived from its stream position, so a resume replays it. `StageBatches` joins the
stream with the labeled stream into a training stage's global batches.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import tensorflow as tf

from nsjax import parallel
from nsjax.data import balance, balanced_order, input_pipeline, pseudo_labels, random_access

_EXAMPLE_STREAM = 13


class RecordBlocks:
  """The units of the balanced order: blocks of `block_size` consecutive records of the
  concatenated shards. Maps a block to its records' copies, and (block, index) to a shard record."""

  def __init__(self, reader: random_access.RecordReader, starts: np.ndarray, block_size: int):
    self.reader, self.starts, self.block_size = reader, starts, block_size

  def _shard(self, record: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.starts, record, side="right") - 1

  def copies(self, block: int) -> np.ndarray:
    begin = block * self.block_size
    end = min(begin + self.block_size, int(self.starts[-1]))
    parts = []
    for k in range(int(self._shard(begin)), int(self._shard(end - 1)) + 1):
      lo, hi = max(begin, self.starts[k]), min(end, self.starts[k + 1])
      parts.append(self.reader.table(k)[1][lo - self.starts[k]:hi - self.starts[k]])
    return np.concatenate(parts)

  def shard_records(self, blocks: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    record = blocks * self.block_size + index
    shard = self._shard(record)
    return shard, record - self.starts[shard]


def open_stream(directory: str, plan: balance.BalancePlan, seed: int, window: int = 16_384):
  """(order over blocks, RecordBlocks, reader, manifest) of a label stage's shards: nothing is
  read per record."""
  manifest = pseudo_labels.read_manifest(directory)
  files = [s["file"] for s in manifest["shards"]]
  starts = pseudo_labels.shard_starts(manifest["shards"])
  if plan.block_counts is None or len(plan.block_counts) != -(-int(starts[-1]) // plan.block_size):
    raise ValueError(f"The balance plan in {directory} has no per-block counts for its "
                     f"{starts[-1]} records (written by an older nsjax, or interrupted): rerun the "
                     "label stage, which keeps its shards and rewrites the plan.")
  reader = random_access.RecordReader(
      [os.path.join(directory, f) for f in files],
      table=lambda k: pseudo_labels.read_table(directory, files[k]),
      table_bytes=lambda k: tf.io.gfile.stat(pseudo_labels.table_path(directory, files[k])).length)
  blocks = RecordBlocks(reader, starts, plan.block_size)
  order = balanced_order.BalancedOrder(plan.block_counts, blocks.copies, seed, window)
  return order, blocks, reader, manifest


def locate_records(order, blocks, positions) -> tuple[np.ndarray, np.ndarray]:
  """Stream positions -> (shard, record within the shard)."""
  return blocks.shard_records(*order.locate(positions))


def pseudo_label_batches(directory: str, plan: balance.BalancePlan, *, local_batch_size: int,
                         view_fn, seed: int = 0, start_step: int = 0, shuffle_buffer: int = 16_384,
                         process_index: int | None = None, process_count: int | None = None,
                         reader_out: list | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host batches {"image": float32 [b,H,W,3], "probs": float32 [b,C]}.

  `view_fn(image_uint8, seed[2]) -> image` is the student's (noised) view of a decoded image.
  `local_batch_size` is this host's part of a global batch of local_batch_size * process_count.
  `shuffle_buffer`: examples per shuffle window (see balanced_order). `reader_out`, if given,
  receives the RecordReader (for its byte count).
  """
  index, count = input_pipeline.resolve_process(process_index, process_count)
  order, blocks, reader, manifest = open_stream(directory, plan, seed, shuffle_buffer)
  if reader_out is not None:
    reader_out.append(reader)
  global_batch = local_batch_size * count
  parse = pseudo_labels.parse_fn(manifest["num_classes"], manifest["top_k"])
  example_seed = tf.constant([seed + _EXAMPLE_STREAM, 0], tf.int64)

  def decode_and_view(position, record):
    ex = parse(record)
    # The label stage wrote only images that decoded, so one that does not is damage: its error
    # stops the stream (dropping the record would shift every later batch off its step, and a
    # resume would no longer be exact). Decoded directly: preprocess.decode, which never raises,
    # costs more a record, a large share of the student's input pipeline (benchmarks/README.md).
    image = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    image = tf.ensure_shape(image, [None, None, 3])
    noise_seed = tf.random.experimental.stateless_fold_in(example_seed, position)
    return {"image": view_fn(image, noise_seed), "probs": ex["probs"]}

  records = random_access.host_rows(
      lambda positions: reader.read(*locate_records(order, blocks, positions)), start_step,
      global_batch, index, local_batch_size)
  stream = (records
            .map(decode_and_view, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(local_batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))
  return _naming_the_shards(input_pipeline.host_iterator(stream), directory)


def _naming_the_shards(batches: Iterator[dict[str, np.ndarray]], directory: str
                       ) -> Iterator[dict[str, np.ndarray]]:
  """`batches`, whose errors name the label stage's folder and the fix for a damaged record
  (still an InvalidArgumentError, so a student stage also looks for the damaged shard by name)."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as error:
    raise tf.errors.InvalidArgumentError(
        error.node_def, error.op,
        f"Reading the pseudo-labeled records in {directory} failed: {error.message} -- a record "
        f"that does not parse or decode means a damaged shard: delete {directory} and rerun the "
        "label stage that wrote it."
    ) from error


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
    return parallel.to_global_batch(batch, self.mesh)

  def input_position(self) -> dict[str, dict[str, int]]:
    position = {"labeled": self.labeled.position()}
    # Offline pseudo labels are all decodable (the label stage wrote them): placed by the step.
    if isinstance(self.unlabeled, input_pipeline.BatchIterator):
      position["unlabeled"] = self.unlabeled.position()
    return position
