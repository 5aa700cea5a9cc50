"""tf.data input pipelines from any TFDS dataset, for training, pseudo-labeling and evaluation.

One code path serves a laptop demo on `mnist5k` and a pod reading ImageNet: each process builds host
batches of global_batch / process_count examples, and `BatchIterator` turns them into global
`jax.Array`s sharded over the mesh's data axis.

Why things are done the way they are:
- Training streams are read by position, not sequentially: the stream is one sequence over the
  whole split, a function of (seed, position) alone (`nsjax.data.balanced_order`: files in a random
  order per epoch, records permuted within windows of `shuffle_block`), and each process reads by
  byte offset (`nsjax.data.random_access`) only the records of its own rows of each global batch.
  So a 2-host run trains exactly what a 1-host run trains, each host reads 1/P of the data, and a
  resume at step k reads nothing before it. Each example's augmentation seed is a function of its
  stream position.
- Images are decoded after the records are chosen, so nothing else is decoded. Records whose image
  does not decode (or has the wrong shape), and records missing from a file cut short, are dropped
  right after decoding -- before `preprocess_fn`, whose own errors must still surface -- and
  counted: every record carries its stream position, so `BatchIterator.num_skipped` is the gap
  between positions read and examples seen, and `BatchIterator.position()` resumes exactly past
  them.
- Single-pass pipelines (evaluation, and the unlabeled pass that the teacher labels) pad with masked
  examples up to a number of batches that every process computes alike from split sizes, so all hosts
  run the same number of steps without communicating and each real example counts exactly once.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any, Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from nsjax import parallel
from nsjax.data import balanced_order, random_access
from nsjax.data import mnist5k  # Also registers the mnist5k builder with TFDS.

# TF only feeds the host; it must not claim accelerator memory that jax needs (a no-op with
# tensorflow-cpu, the pinned package).
try:
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices; nothing left to change.
  pass

# preprocess_fn(features, seed) -> features: `features` holds the decoded uint8 image and the
# dataset's other features; `seed` is a shape-[2] int64 tensor for tf's stateless random ops.
PreprocessFn = Callable[[dict[str, tf.Tensor], tf.Tensor], dict[str, tf.Tensor]]

RECORD_KEY = "_record"  # Stream position of each example; BatchIterator strips it.
MASK_KEY = "mask"
ENCODED_IMAGE_KEY = "image_encoded"
_SHUFFLE_STREAM, _EXAMPLE_STREAM = 0, 1  # Keep shuffle and augmentation randomness independent.


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset has not been downloaded and prepared in the given data_dir."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Which TFDS data to read: `name` may carry a config ("mnist5k/labels_50"); `split` may be a
  TFDS split expression ("train[:90%]"). data_dir None: TFDS's default (for mnist5k,
  `mnist5k.default_data_dir()`)."""
  name: str
  split: str
  data_dir: str | None = None
  image_key: str = "image"


def identity_preprocess(features: dict[str, tf.Tensor], seed: tf.Tensor) -> dict[str, tf.Tensor]:
  del seed
  return dict(features)


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """`tfds.builder(name)`. data_dir None: TFDS's default, except for mnist5k, which lives where
  `mnist5k.build` puts it by default."""
  if data_dir is None and name.split("/")[0] == "mnist5k":
    data_dir = mnist5k.default_data_dir()
  return tfds.builder(name, data_dir=data_dir)


def not_prepared_message(name: str, builder: tfds.core.DatasetBuilder) -> str:
  data_dir = builder.data_dir_root
  message = (f"TFDS dataset '{name}' is not prepared in data_dir '{data_dir}' "
             f"(no {builder.data_dir}). ")
  if builder.name == "mnist5k":
    config = builder.builder_config.name
    return message + (f"Build it (offline, seconds) with: python -c \"from nsjax.data import "
                      f"mnist5k; mnist5k.build('{data_dir}', '{config}')\"")
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    instructions = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
    return message + (
        f"It needs a manual download: {instructions} Put those files in "
        f"'{data_dir}/downloads/manual', then run: tfds build {name} --data_dir={data_dir}")
  return message + (f"Prepare it once with: tfds build {name} --data_dir={data_dir} "
                    "(needs network access; or copy a prepared data_dir from a machine that has it).")


def host_iterator(dataset: tf.data.Dataset) -> Iterator[Any]:
  """Numpy batches of `dataset`, without tf.data's autotuning thread: every host pipeline's
  iterator starts here.

  Autotuning's optimization thread sleeps for its period, which grows to 60 s, and deleting an
  iterator waits for that sleep to end: a stage's end stalls while its input pipelines are
  destroyed (benchmarks/README.md). Without it, parallel maps run at the cores this process may
  use (the most autotuning would choose) and prefetch buffers still adapt, and the pseudo-label
  stream reads no slower."""
  return untuned(dataset).as_numpy_iterator()


def untuned(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` with autotuning off and its parallel maps at this process's cores (host_iterator)."""
  options = tf.data.Options()
  options.autotune.enabled = False
  options.autotune.initial_parallelism = len(os.sched_getaffinity(0))
  return dataset.with_options(options)


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """Defaults to this jax process; explicit values let tests simulate several hosts in one."""
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f"process_index {index} is outside [0, process_count={count}).")
  return index, count


def process_split(split: str, process_index: int, process_count: int):
  """This process's even slice of `split` (sizes differ by at most one, larger slices first)."""
  return tfds.even_splits(split, n=process_count)[process_index]


def _read_records(builder, name: str, split, image_key: str) -> tf.data.Dataset:
  """Records in their stored order, images still encoded."""
  options = tf.data.Options()
  options.deterministic = True
  # No assert_cardinality: a record file cut short (a truncated copy, a bad disk) ends early, and
  # that assertion's error would repeat forever under `ignore_errors`; the missing records are
  # counted as skipped instead (see BatchIterator).
  read_config = tfds.ReadConfig(try_autocache=False, options=options, assert_cardinality=False)
  try:
    records = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config,
                                 decoders={image_key: tfds.decode.SkipDecoding()})
  except AssertionError as error:  # TFDS's way of saying "no data in data_dir".
    if builder.is_prepared():
      raise
    raise DatasetNotPreparedError(not_prepared_message(name, builder)) from error
  return records


def _readable(records: tf.data.Dataset) -> tf.data.Dataset:
  """Drops read errors (a truncated file, a corrupt record) record by record, before anything
  groups records: one error inside a shuffle block would otherwise discard the whole block."""
  return records.ignore_errors()


def _num_examples(builder, split, records: tf.data.Dataset | None = None) -> int:
  """Examples in a (sub)split, from the dataset info; else from the dataset's known cardinality
  (`tfds.testing.mock_data` knows no split sizes)."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError):
    if records is None:
      raise
  cardinality = int(records.cardinality())
  if cardinality < 0:
    raise ValueError(f"The number of examples in split {split!r} of {builder.name} is unknown.")
  return cardinality


def _seed_pair(seed: int, process_index: int, stream: int) -> tf.Tensor:
  base = tf.constant([int(seed), int(process_index)], tf.int64)
  return tf.random.experimental.stateless_fold_in(base, stream)


def _fold(seed_pair: tf.Tensor, data) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(seed_pair, tf.cast(data, tf.int64))


def _image_spec(builder, image_key: str) -> tuple[int, list[int | None]]:
  """(channels, static shape) that decoded images must have, from the dataset's Image feature."""
  feature = builder.info.features[image_key]
  shape = list(feature.shape)
  channels = shape[-1] if shape and shape[-1] is not None else 3
  return channels, [None, None, channels] if None in shape[:2] else shape[:2] + [channels]


def _decode_fn(image_key: str, channels: int, shape: list[int | None], keep_encoded: bool,
               parse: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None):
  """Decodes one image; raises (-> skipped by ignore_errors) on bytes that do not decode.
  `parse`: serialized record -> features, for streams of serialized records (its errors are
  skipped alike)."""

  def decode(record, features):
    features = dict(parse(features) if parse else features)
    encoded = features[image_key]
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    features[image_key] = tf.ensure_shape(image, shape)
    if keep_encoded:
      features[ENCODED_IMAGE_KEY] = encoded
    return record, features

  # Graph ops only: AutoGraph need not convert it, nor TFDS's parsing under it (a cost per process).
  return tf.autograph.experimental.do_not_convert(decode)


def image_decoder(builder, image_key: str):
  """(index, features with encoded image) -> decoded; raises on bad bytes (use ignore_errors)."""
  channels, shape = _image_spec(builder, image_key)
  return _decode_fn(image_key, channels, shape, keep_encoded=False)


def _preprocess_with_seed(preprocess_fn: PreprocessFn, example_seed: tf.Tensor,
                          keep_encoded: bool, mask: bool | None):

  def apply(record, features):
    encoded = features.pop(ENCODED_IMAGE_KEY, None)
    out = dict(preprocess_fn(features, _fold(example_seed, record)))
    if keep_encoded:
      out[ENCODED_IMAGE_KEY] = encoded
    if mask is not None:
      out[MASK_KEY] = tf.constant(mask)
    out[RECORD_KEY] = record
    return out

  return apply


def _decoded_examples(records: tf.data.Dataset, builder, source: Source, preprocess_fn,
                      example_seed, *, keep_encoded: bool = False, mask: bool | None = None,
                      parse: Callable[[tf.Tensor], dict[str, tf.Tensor]] | None = None
                      ) -> tf.data.Dataset:
  """(record, encoded features) -> decoded, bad images dropped, preprocessed examples. With
  `parse`, records hold serialized examples, parsed in the decoding map (one parallel map less:
  each costs an image tens of microseconds of thread hand-offs)."""
  channels, shape = _image_spec(builder, source.image_key)
  decoded = records.map(_decode_fn(source.image_key, channels, shape, keep_encoded, parse),
                        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  decoded = decoded.ignore_errors()
  return decoded.map(_preprocess_with_seed(preprocess_fn, example_seed, keep_encoded, mask),
                     num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


@dataclasses.dataclass
class _Opened:
  builder: Any
  records: tf.data.Dataset
  split: Any
  process_index: int
  process_count: int
  local_batch_size: int


def _open(source: Source, global_batch_size: int, mesh, process_index, process_count) -> _Opened:
  """Opens this process's slice of the split, for the ordered single-pass pipelines."""
  index, count = resolve_process(process_index, process_count)
  builder, local = _builder_and_local_batch(source, global_batch_size, mesh, index, count)
  split = process_split(source.split, index, count)
  records = _read_records(builder, source.name, split, source.image_key)
  return _Opened(builder, records, split, index, count, local)


def default_index_dir(builder) -> str:
  """Where record offsets of a TFDS dataset's files are cached when the caller names no place
  (a run uses its workdir's record_index/, shared by its hosts)."""
  root = os.environ.get("NSJAX_INDEX_DIR", os.path.expanduser("~/.cache/nsjax/record_index"))
  return os.path.join(root, builder.data_dir.strip("/").replace("://", "/"))


def split_files(builder, source: Source) -> tuple[list[str], list[int], list[int]]:
  """(paths, records skipped at the start of each file, records taken from each) of a split."""
  try:
    instructions = builder.info.splits[source.split].file_instructions
  except (KeyError, ValueError, AssertionError) as error:
    if not builder.is_prepared():
      raise DatasetNotPreparedError(not_prepared_message(source.name, builder)) from error
    raise
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if file_format not in (None, "tfrecord"):
    raise ValueError(f"{source.name} is stored as {file_format}; nsjax's training "
                     "streams read TFRecord files by offset. Prepare it with tfds build "
                     "--file_format=tfrecord.")
  instructions = [i for i in instructions if i.take > 0]
  return ([i.filename for i in instructions], [int(i.skip) for i in instructions],
          [int(i.take) for i in instructions])


def train_batches(source: Source, *, global_batch_size: int,
                  preprocess_fn: PreprocessFn = identity_preprocess, seed: int = 0,
                  start_step: int = 0, shuffle_block: int = 16_384, mesh=None,
                  process_index: int | None = None, process_count: int | None = None,
                  position: dict[str, int] | None = None, index_dir: str | None = None
                  ) -> BatchIterator:
  """Infinite, shuffled, repeated batches of labeled (or unlabeled) training data.

  The stream is one sequence for the whole split, a function of (seed, position) alone
  (nsjax.data.balanced_order over the split's files, each record once per epoch, windows of
  `shuffle_block` records); global batch k is positions [k * G, (k + 1) * G) and each process
  reads, by byte offset, only the records of its rows of it. So the global batches are the same
  for any number of processes, each reads 1/P of the data, and `start_step=k` resumes at batch k
  without reading anything before it -- as long as every record decodes. Undecodable records are
  dropped (and counted), so after one the process's batches start later in the stream: resume
  from `position`, this process's `BatchIterator.position()` saved after step k. Record offsets
  of the split's files are computed once and cached in `index_dir` (see nsjax.data.random_access).
  """
  index, count = resolve_process(process_index, process_count)
  builder, local = _builder_and_local_batch(source, global_batch_size, mesh, index, count)
  paths, skips, takes = split_files(builder, source)
  epoch_size = sum(takes)
  if epoch_size == 0:
    raise ValueError(f"Split {source.split!r} of {source.name} has no examples.")
  index_dir = index_dir or default_index_dir(builder)
  index_paths = random_access.index_tfds_files(paths, index_dir, index, count)
  reader = random_access.RecordReader(
      paths, table=lambda k: (random_access.load_offsets(index_paths[k]), None),
      table_bytes=lambda k: tf.io.gfile.stat(index_paths[k]).length, first_record=skips)
  order = balanced_order.BalancedOrder(takes, lambda k: np.ones(takes[k], np.int64),
                                       seed=seed * 1009 + _SHUFFLE_STREAM, window=shuffle_block)
  first_record, skipped_before = _resume_point(position, int(start_step) * global_batch_size)
  # Positions are read in chunks of one global batch; a resumed stream starts at its chunk and
  # drops this process's rows before `first_record`.
  chunk_start = first_record - first_record % global_batch_size

  features = builder.info.features
  skip_image = {source.image_key: tfds.decode.SkipDecoding()}
  stream = (random_access.host_rows(lambda positions: reader.read(*order.locate(positions)),
                                    chunk_start // global_batch_size, global_batch_size, index,
                                    local)
            .filter(lambda record, serialized: record >= first_record))
  examples = _decoded_examples(
      stream, builder, source, preprocess_fn, _seed_pair(seed, 0, _EXAMPLE_STREAM),
      parse=lambda serialized: features.deserialize_example(serialized, decoders=skip_image))
  batches = examples.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  iterator = BatchIterator(batches, mesh=mesh, first_record=first_record,
                           first_step=int(start_step), num_skipped_before=skipped_before,
                           own_rows=_own_rows_fn(global_batch_size, local, index))
  iterator.reader = reader
  return iterator


def _builder_and_local_batch(source: Source, global_batch_size: int, mesh, index: int,
                             count: int):
  if mesh is not None and count != jax.process_count():
    raise ValueError(f"With a mesh, batches are fed by the {jax.process_count()} real jax process(es); "
                     f"process_count={count} is only for simulating hosts with mesh=None.")
  if global_batch_size % count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by process_count {count}.")
  local = (parallel.local_batch_size(global_batch_size, mesh) if mesh is not None
           else global_batch_size // count)
  return load_builder(source.name, source.data_dir), local


def _resume_point(position: dict[str, int] | None, step_record: int) -> tuple[int, int]:
  """(first record, records skipped before it) from a saved `BatchIterator.position()`."""
  if position is None:
    return step_record, 0
  try:
    record, skipped = int(position["next_record"]), int(position["num_skipped"])
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"Invalid input position {position!r}: expected {{'next_record': int, "
                     "'num_skipped': int}} as saved by BatchIterator.position().") from error
  if record < 0 or skipped < 0 or skipped > record:
    raise ValueError(f"Invalid input position {position!r}: counts must satisfy 0 <= num_skipped "
                     "<= next_record; the checkpoint's input_position file is damaged.")
  return record, skipped


def _own_rows_fn(stream_batch: int, local_batch: int, host: int) -> Callable[[int, int], int]:
  """(a, b) -> how many stream positions in [a, b) belong to this host: all of them, unless the
  host keeps rows [host * local, (host + 1) * local) of each chunk of `stream_batch` ("global")."""
  if stream_batch == local_batch:
    return lambda a, b: b - a
  begin, end = host * local_batch, (host + 1) * local_batch

  def below(n):  # own positions in [0, n)
    whole, rest = divmod(n, stream_batch)
    return whole * local_batch + min(max(rest - begin, 0), end - begin)

  return lambda a, b: below(b) - below(a)


def _padding(element_spec: dict[str, tf.TensorSpec]) -> dict[str, tf.Tensor]:
  padding = {}
  for key, spec in element_spec.items():
    if not spec.shape.is_fully_defined():
      raise ValueError(f"preprocess_fn must return fixed-shape tensors so batches can be padded; "
                       f"'{key}' has shape {spec.shape}.")
    padding[key] = tf.zeros(spec.shape, spec.dtype)
  padding[MASK_KEY] = tf.constant(False)
  padding[RECORD_KEY] = tf.constant(-1, tf.int64)
  return padding


def single_pass_batches(source: Source, *, global_batch_size: int,
                        preprocess_fn: PreprocessFn = identity_preprocess, seed: int = 0,
                        keep_encoded_image: bool = False, mesh=None,
                        process_index: int | None = None,
                        process_count: int | None = None) -> BatchIterator:
  """One ordered pass over the split; the last batches are padded with `mask == False` examples.

  Every process runs the same `num_batches` steps (computed from split sizes alone), so jitted steps
  over global arrays line up across hosts; every real example appears exactly once with mask True.
  `keep_encoded_image` adds the original image bytes (as "image_encoded") for writing them back out.
  """
  opened = _open(source, global_batch_size, mesh, process_index, process_count)
  own_size = _num_examples(opened.builder, opened.split, opened.records)
  sizes = [own_size] + [
      _num_examples(opened.builder, process_split(source.split, i, opened.process_count),
                    opened.records)
      for i in range(opened.process_count) if i != opened.process_index]
  num_batches = math.ceil(max(sizes) / opened.local_batch_size)
  examples = _decoded_examples(_readable(opened.records).enumerate(), opened.builder, source, preprocess_fn,
                               _seed_pair(seed, opened.process_index, _EXAMPLE_STREAM),
                               keep_encoded=keep_encoded_image, mask=True)
  padding = tf.data.Dataset.from_tensors(_padding(examples.element_spec)).repeat()
  batches = (examples.concatenate(padding).take(num_batches * opened.local_batch_size)
             .batch(opened.local_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  return BatchIterator(batches, mesh=mesh, first_record=0, num_records=own_size,
                       num_batches=num_batches)


def eval_batches(source: Source, *, global_batch_size: int,
                 preprocess_fn: PreprocessFn = identity_preprocess, mesh=None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> BatchIterator:
  """Evaluation: one pass, padded, with `mask` (count only masked-in examples in metrics)."""
  return single_pass_batches(source, global_batch_size=global_batch_size,
                             preprocess_fn=preprocess_fn, mesh=mesh, process_index=process_index,
                             process_count=process_count)


def unlabeled_batches(source: Source, *, global_batch_size: int,
                      preprocess_fn: PreprocessFn = identity_preprocess,
                      keep_encoded_image: bool = False, mesh=None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> BatchIterator:
  """Unlabeled data for the teacher to pseudo-label: one ordered pass, nothing dropped (padding is
  masked out, like evaluation, so the batches shard evenly over any mesh)."""
  return single_pass_batches(source, global_batch_size=global_batch_size,
                             preprocess_fn=preprocess_fn, keep_encoded_image=keep_encoded_image,
                             mesh=mesh, process_index=process_index, process_count=process_count)


def _is_numeric(array: np.ndarray) -> bool:
  return array.dtype.kind in "biuf"


class BatchIterator(Iterator[dict[str, Any]]):
  """Iterates host batches; with a mesh, numeric entries become global jax.Arrays sharded over the
  data axis (strings, e.g. file names or encoded images, stay per-process numpy arrays).

  Counters (this process): `step` (next step), `num_examples` (real examples yielded), `next_record`
  (stream position after the last yielded example) and `num_skipped` (records dropped because their
  image did not decode, including `num_skipped_before` from before a resume). Single-pass iterators
  also know `num_batches` and count trailing bad records once the last batch is out. `position()`
  is what a resumed `train_batches(position=...)` continues from.
  """

  def __init__(self, dataset: tf.data.Dataset, *, mesh=None, first_record: int = 0,
               first_step: int = 0, num_records: int | None = None,
               num_batches: int | None = None, num_skipped_before: int = 0,
               own_rows: Callable[[int, int], int] | None = None):
    self.dataset = dataset
    self.mesh = mesh
    self.num_batches = num_batches
    self.step = first_step
    self.num_examples = 0
    self.next_record = first_record
    self._first_record = first_record
    self._first_step = first_step
    self._end_record = None if num_records is None else first_record + num_records
    self._skipped_before = num_skipped_before
    # Stream positions that were this process's to read ("global" hosts read only their rows).
    self._own_rows = own_rows or (lambda a, b: b - a)
    self._iterator = None

  @property
  def num_skipped(self) -> int:
    read = self._own_rows(self._first_record, self.next_record)
    return self._skipped_before + read - self.num_examples

  def position(self) -> dict[str, int]:
    """This process's place in the stream after the last yielded batch (JSON-able)."""
    return {"next_record": int(self.next_record), "num_skipped": int(self.num_skipped)}

  def __iter__(self) -> BatchIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._iterator is None:
      self._iterator = host_iterator(self.dataset)
    try:
      batch = next(self._iterator)
    except StopIteration:
      self._finish()
      raise
    records = batch.pop(RECORD_KEY)
    real = records >= 0
    self.num_examples += int(real.sum())
    if real.any():
      self.next_record = int(records[real].max()) + 1
    self.step += 1
    if self.num_batches is not None and self.step - self._first_step >= self.num_batches:
      self._finish()
    return self._to_global(batch)

  def _finish(self) -> None:
    """All records have been read: any after the last yielded example were bad ones."""
    if self._end_record is not None:
      self.next_record = self._end_record

  def _to_global(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    if self.mesh is None:
      return batch
    numeric = {k: v for k, v in batch.items() if _is_numeric(v)}
    other = {k: v for k, v in batch.items() if not _is_numeric(v)}
    return {**parallel.global_batch_from_local(numeric, self.mesh), **other}
