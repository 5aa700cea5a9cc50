"""An exported model on a TFDS split, clean and under the offline corruptions (the eval stage's).

Clean accuracy streams the split through the input pipeline (nsjax.evaluate.accuracy). The
corruption suite needs raw pixels: this process's slice of the split is read once as uint8 arrays,
corrupted with nsjax.evaluate.corruptions at each severity, and fed through the same eval view and
jitted eval step; counts are global sums, so every host sees the same numbers.
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from jax.experimental import multihost_utils

from nsjax import exported_model, parallel
from nsjax.data import input_pipeline, preprocess
from nsjax.evaluate import accuracy
from nsjax.evaluate import corruptions as corruption_lib


def load_local_arrays(src: input_pipeline.Source, max_examples: int = 0):
  """(uint8 images [n,H,W,C], int labels [n], first row) of this process's contiguous share of the
  split's first `max_examples` (0: all) examples: the same examples, whatever the process count.

  Images that do not decode are dropped (logged), as in every other pipeline: one bad test image
  must not stop the corruption suite. The kept rows are then numbered from `first row` on.
  """
  builder = input_pipeline.load_builder(src.name, src.data_dir)
  total = int(builder.info.splits[src.split].num_examples)
  if max_examples:
    total = min(total, int(max_examples))
  start, end = parallel.local_share(total, jax.process_index(), jax.process_count())
  # No autocache: TFDS would cache a small split in memory, then discard it with a warning when
  # the take() below stops early (every evaluation of the demo did).
  ds = builder.as_dataset(split=src.split, shuffle_files=False,
                          decoders={src.image_key: tfds.decode.SkipDecoding()},
                          read_config=tfds.ReadConfig(try_autocache=False))
  decode = input_pipeline.image_decoder(builder, src.image_key)
  ds = ds.skip(start).take(end - start).enumerate().map(decode).ignore_errors()
  images, labels = [], []
  for _, ex in input_pipeline.host_iterator(ds):
    images.append(ex[src.image_key])
    labels.append(ex["label"])
  if len(images) < end - start:
    logging.warning("Corruption suite: %d of rows [%d, %d) of %s %s do not decode; skipped.",
                    end - start - len(images), start, end, src.name, src.split)
  if not images:
    shape = tuple(d or 1 for d in builder.info.features[src.image_key].shape)
    return np.zeros((0,) + shape, np.uint8), np.zeros(0, np.int32), start
  return np.stack(images), np.asarray(labels, np.int32), start


def accuracy_on_arrays(model, variables, images: np.ndarray, labels: np.ndarray, *, mesh,
                       batch_size: int, small_image: bool) -> dict[str, float]:
  """Top-1/top-5 of uint8 images through the eval view; pads with masked examples."""
  return accuracy.evaluate(accuracy.make_eval_step(model, mesh), variables,
                           _array_batches(model, images, labels, batch_size, small_image), mesh)


def _array_batches(model, images: np.ndarray, labels: np.ndarray, batch_size: int,
                   small_image: bool):
  """This process's padded numpy batches {"image", "label", "mask"} of the eval view."""
  local = batch_size // jax.process_count()
  # Every host runs the same number of steps: the largest slice decides (and every host must join
  # the all-gather, even one without images).
  num_batches = int(math.ceil(np.max(_all_process_sizes(len(images))) / local))
  for b in range(num_batches):
    chunk, chunk_labels = images[b * local:(b + 1) * local], labels[b * local:(b + 1) * local]
    # bool, as eval_batches' mask: one compiled eval program serves the clean split and these.
    mask = np.zeros(local, bool)
    mask[:len(chunk)] = True
    pad = local - len(chunk)
    if len(chunk):
      views = eval_views(chunk, model.test_resolution, small_image)
    else:
      views = np.zeros((0, model.test_resolution, model.test_resolution, 3), np.float32)
    views = np.concatenate([views, np.zeros((pad,) + views.shape[1:], np.float32)])
    chunk_labels = np.concatenate([chunk_labels, np.zeros(pad, np.int32)])
    yield {"image": views, "label": chunk_labels, "mask": mask}


def eval_views(images: np.ndarray, resolution: int, small_image: bool) -> np.ndarray:
  """uint8 [n,H,W,C] -> float32 eval views [n,S,S,3], as preprocess.eval_view makes each.

  Small images already at the model's resolution only need normalising: done in numpy on the
  whole batch instead of a TF loop over the images (a per-image loop is a large share of a small
  model's corruption suite), with the float32 operations of the TF path, whose
  graph optimiser turns the division by the standard deviation into a product with its
  reciprocal: the same views, bit for bit."""
  if small_image and images.ndim == 4 and images.shape[1:3] == (resolution, resolution) and (
      images.dtype == np.uint8 and images.shape[3] in (1, 3)):
    pixels = images.astype(np.float32)
    if pixels.shape[3] == 1:  # grey, repeated (preprocess.to_rgb_uint8)
      pixels = np.repeat(pixels, 3, axis=3)
    inverse_std = np.float32(1) / np.asarray(preprocess.STDDEV_RGB, np.float32)
    return (pixels - np.asarray(preprocess.MEAN_RGB, np.float32)) * inverse_std
  return batch_view(resolution, small_image)(tf.constant(images)).numpy()


@functools.lru_cache(maxsize=8)
def batch_view(resolution: int, small_image: bool):
  """uint8 [n,H,W,C] -> eval views, one traced function per (resolution, small_image): a new
  tf.function per call retraced it for every corruption setting (seconds each on a small CPU)."""
  return tf.function(lambda x: tf.map_fn(
      lambda im: preprocess.eval_view(im, resolution, small_image=small_image), x,
      fn_output_signature=tf.float32), reduce_retracing=True, autograph=False)


def _all_process_sizes(own: int) -> np.ndarray:
  if jax.process_count() == 1:
    return np.asarray([own])
  return np.asarray(multihost_utils.process_allgather(np.asarray([own])))


class CorruptedSets:
  """Corrupted copies of one eval set, kept while they fit in `max_bytes`.

  The pipeline evaluates every model of a schedule on the same corrupted images, and corrupting
  (the blurs above all) costs more than a small model's inference: the teacher's evaluation fills
  the cache and the students' reuse it. Sets that would not fit are recomputed on every call.
  """

  def __init__(self, max_bytes: int = 1 << 30):
    self.max_bytes = max_bytes
    self._sets: dict[tuple, np.ndarray] = {}

  def get(self, key: tuple | None, images: np.ndarray, name: str, severity: int, seed: int,
          first_index: int) -> np.ndarray:
    full_key = None if key is None else (key, images.shape, name, severity, seed, first_index)
    if full_key in self._sets:
      return self._sets[full_key]
    corrupted = corruption_lib.corrupt_batch(images, name, severity, seed=seed,
                                             first_index=first_index)
    if full_key is not None and corrupted.nbytes + self.nbytes <= self.max_bytes:
      self._sets[full_key] = corrupted
    return corrupted

  @property
  def nbytes(self) -> int:
    return sum(a.nbytes for a in self._sets.values())


CORRUPTED_SETS = CorruptedSets()


def corruption_accuracy(model, variables, images, labels, *, mesh, batch_size: int,
                        small_image: bool, names: Sequence[str], severities: Sequence[int],
                        seed: int = 0, first_index: int = 0,
                        cache_key: tuple | None = None) -> dict[str, Any]:
  """{"per_setting": {"name/severity": top1}, "corruptions": {name: mean over severities},
  "corruption_top1": mean over everything}. `cache_key` names `images` (e.g. (source, count)) so
  calls for other models on the same images reuse the corrupted copies (CORRUPTED_SETS)."""
  settings = [(name, severity) for name in names for severity in severities]

  def corrupted(k):
    name, severity = settings[k]
    return CORRUPTED_SETS.get(cache_key, images, name, severity, seed, first_index)

  per_setting = {}
  # One setting is corrupted ahead, in a thread, while the model evaluates the one before: the
  # corruptions are mostly single-threaded Python and numpy, the evaluation mostly XLA, which
  # releases the GIL.
  # One ahead, not all: a set of full-size images takes gigabytes.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    ahead = pool.submit(corrupted, 0) if settings else None
    for k, (name, severity) in enumerate(settings):
      current = ahead.result()
      ahead = pool.submit(corrupted, k + 1) if k + 1 < len(settings) else None
      per_setting[f"{name}/{severity}"] = accuracy_on_arrays(
          model, variables, current, labels, mesh=mesh, batch_size=batch_size,
          small_image=small_image)["top1"]
  per_name = {name: float(np.mean([per_setting[f"{name}/{severity}"] for severity in severities]))
              for name in names}
  return {"per_setting": per_setting, "corruptions": per_name,
          "corruption_top1": float(np.mean(list(per_name.values())))}


def evaluate_export(export: str, src: input_pipeline.Source, *, mesh, batch_size: int,
                    small_image: bool, corruptions: Sequence[str] = (),
                    severities: Sequence[int] = (1, 2, 3, 4, 5), max_corruption_examples: int = 0,
                    seed: int = 0) -> dict[str, Any]:
  model, variables, _ = exported_model.load_exported(export)
  variables = jax.device_put(variables, parallel.replicated(mesh))
  results = accuracy.clean_accuracy(model, variables, src, mesh=mesh, batch_size=batch_size,
                                    small_image=small_image)
  results["params_sha256"] = exported_model.params_sha256(variables["params"])
  if corruptions:
    unknown = sorted(set(corruptions) - set(corruption_lib.CORRUPTIONS))
    if unknown:
      raise ValueError(f"Unknown corruption(s) {unknown}; available: "
                       f"{', '.join(corruption_lib.CORRUPTIONS)}.")
    images, labels, first = load_local_arrays(src, max_corruption_examples)
    results.update(corruption_accuracy(model, variables, images, labels, mesh=mesh,
                                       batch_size=batch_size, small_image=small_image,
                                       names=corruptions, severities=severities, seed=seed,
                                       first_index=first,
                                       cache_key=(src, int(max_corruption_examples))))
  return results
