"""Benchmarks of one exported model: clean top-1/top-5, ImageNet-A/-R/-V2, ImageNet-C, CIFAR-10-C,
FGSM/PGD -- the wiring between TFDS datasets and the pure pieces in metrics, robustness and
adversarial.

Everything streams through `nsjax.data.input_pipeline` (per host, padded and masked, any mesh) with
the official eval view (centre crop S/(S+32), bicubic resize) at the resolution asked for, so a
model trained at 475 px can be scored at 800 px (`resolution=`). The results are plain JSON-ready
dicts; `write_results` puts them in `<output>/<benchmark>.json` and in TensorBoard.

ImageNet-A and -R cover 200 classes each: the logits are restricted to the benchmark's own index
list before the argmax (a 1000-way model is never wrong for picking a class outside the subset).
The corrupted suites read one TFDS config per (corruption, severity): `imagenet2012_corrupted/
<c>_<s>` and `cifar10_corrupted/<c>_<s>`; the 75 errors go to `robustness.imagenet_c_summary`
(mCE, relative mCE when the clean error is known) or `robustness.cifar10_c_summary`.
Adversarial attacks perturb [0, 1] pixels (the eval view before normalisation) and normalise
inside the attacked function, so epsilon is in pixel units.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
from clu import metric_writers
from jax.experimental import multihost_utils

from nsjax import exported_model, parallel
from nsjax.data import input_pipeline, views
from nsjax.evaluate import accuracy, adversarial, corruption_suite, metrics, robustness
from nsjax.files import atomic_write_json

BENCHMARKS = ("clean", "imagenet_a", "imagenet_r", "imagenet_v2", "imagenet_c", "imagenet_p",
              "cifar10_c", "fgsm", "pgd")
# (TFDS name, split) read when --dataset / --split are not given.
DEFAULT_DATASETS = {
    "imagenet_a": ("imagenet_a", "test"),
    "imagenet_r": ("imagenet_r", "test"),
    "imagenet_v2": ("imagenet_v2/matched-frequency", "test"),
    "imagenet_c": ("imagenet2012_corrupted", "validation"),
    "cifar10_c": ("cifar10_corrupted", "test"),
}
SUBSET_BENCHMARKS = ("imagenet_a", "imagenet_r")


# --------------------------------------------------------------------------------------------------
# Loading.

def load_model(export: str, resolution: int = 0, mesh=None):
  """(model, replicated variables, metadata); `resolution` (0 = the model's own test resolution)
  sets the eval view's size."""
  model, variables, metadata = exported_model.load_exported(export)
  if resolution:
    model = model.clone(test_resolution=int(resolution))
  mesh = parallel.make_mesh() if mesh is None else mesh
  return model, jax.device_put(variables, parallel.replicated(mesh)), metadata


def eval_batches(model, src: input_pipeline.Source, *, mesh, batch_size: int,
                 normalized: bool = True) -> input_pipeline.BatchIterator:
  return input_pipeline.eval_batches(
      src, global_batch_size=batch_size, mesh=mesh,
      preprocess_fn=views.eval_view_fn(model.test_resolution, model.small_image, src.image_key,
                                       units="normalized" if normalized else "unit"))


# --------------------------------------------------------------------------------------------------
# Accuracy.

@functools.lru_cache(maxsize=8)
def cached_subset_eval_step(model, mesh, subset: str):
  return make_subset_eval_step(model, mesh, metrics.class_subset_indices(subset))


def make_subset_eval_step(model, mesh, indices: np.ndarray):
  """Like `accuracy.make_eval_step`, but top-k among the subset's classes only (labels in the
  model's full label space; a label outside the subset counts as wrong, and is counted)."""
  indices = np.asarray(indices)
  inside = np.zeros(model.num_classes, np.float32)
  inside[indices] = 1

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    counts = metrics.subset_topk_correct(logits, batch["label"], indices, "full", mask=mask)
    outside = jnp.sum((1.0 - jnp.asarray(inside)[batch["label"]]) * mask)
    return {"top1_correct": counts["top1"], "top5_correct": counts["top5"],
            "count": counts["count"], "labels_outside_subset": outside}

  return parallel.jit(eval_step, in_shardings=(None, parallel.data_sharding(mesh)),
                      out_shardings=parallel.replicated(mesh))


def subset_accuracy(model, variables, src: input_pipeline.Source, subset: str, *, mesh,
                    batch_size: int) -> dict[str, Any]:
  """Top-1 / top-5 with the logits restricted to a class subset: "imagenet_a", "imagenet_r" or
  the path of an index file (one sorted 1000-class index per line)."""
  indices = metrics.class_subset_indices(subset)
  if model.num_classes <= int(np.max(indices)):
    raise ValueError(f"The class subset reaches class {int(np.max(indices))} but the model has "
                     f"{model.num_classes} classes; these benchmarks need an ImageNet "
                     "(1000-class) model.")
  step = cached_subset_eval_step(model, mesh, str(subset))
  totals = None
  batches = eval_batches(model, src, mesh=mesh, batch_size=batch_size)
  for batch in batches:
    counts = step(variables, parallel.to_global_batch(batch, mesh))
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError(f"{src.name} split {src.split!r} gave no batches.")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {"top1": float(totals["top1_correct"]) / count,
          "top5": float(totals["top5_correct"]) / count, "num_examples": int(count),
          "num_classes": int(len(indices)), "num_skipped": batches.num_skipped,
          "labels_outside_subset": int(totals["labels_outside_subset"])}


# --------------------------------------------------------------------------------------------------
# Corrupted suites.

def corruption_errors(model, variables, dataset: str, split: str, data_dir: str | None, *, mesh,
                      batch_size: int, corruptions: Sequence[str],
                      severities: Sequence[int] = robustness.SEVERITIES,
                      image_key: str = "image") -> dict[tuple[str, int], float]:
  """{(corruption, severity): top-1 error} from the TFDS configs of `dataset`."""
  names = robustness.tfds_names(dataset, list(corruptions))
  eval_step = accuracy.make_eval_step(model, mesh)  # one compilation for every setting
  errors = {}
  for (corruption, severity), name in sorted(names.items()):
    if severity not in severities:
      continue
    src = input_pipeline.Source(name, split, data_dir, image_key)
    top1 = accuracy.clean_accuracy(model, variables, src, mesh=mesh, batch_size=batch_size,
                                   eval_step=eval_step)["top1"]
    errors[(corruption, severity)] = 1.0 - top1
  return errors


def imagenet_c(model, variables, *, split: str, data_dir: str | None, mesh, batch_size: int,
               corruptions: Sequence[str] = robustness.CORRUPTIONS,
               clean_error: float | None = None, folder: str = "",
               severities: Sequence[int] = robustness.SEVERITIES,
               wnids: Sequence[str] | None = None) -> dict[str, Any]:
  """mCE (and relative mCE given the clean top-1 error) over `imagenet2012_corrupted`, or over
  the official folder release at `folder` (<folder>/<corruption>/<severity>/<wnid>/*.JPEG; class
  index = position of the wnid in the sorted `wnids`, by default the sorted class folders).
  A subset of `severities` gives partial CEs (see `robustness.imagenet_c_summary`)."""
  if folder:
    errors = folder_corruption_errors(model, variables, folder, mesh=mesh, batch_size=batch_size,
                                      corruptions=corruptions, severities=severities, wnids=wnids)
  else:
    errors = corruption_errors(model, variables, "imagenet2012_corrupted", split, data_dir,
                               mesh=mesh, batch_size=batch_size, corruptions=corruptions,
                               severities=severities)
  summary = robustness.imagenet_c_summary(errors, clean_error=clean_error,
                                          corruptions=corruptions, severities=severities)
  summary["per_setting"] = robustness.results_to_json(errors)
  return summary


def read_wnids(path: str) -> list[str]:
  """A class list: one wnid per line (blank lines and `#` comments ignored); the class index is
  the line's position, so the list must be sorted (ImageNet's label order)."""
  with tf.io.gfile.GFile(path) as f:
    wnids = [line.split("#", 1)[0].strip() for line in f]
  wnids = [w for w in wnids if w]
  if not wnids:
    raise ValueError(f"{path}: no wnids (expected one per line).")
  return wnids


def folder_batches(items: Sequence[tuple[Any, int]], model, *, mesh, batch_size: int):
  """[(image path, class index)] -> padded numpy batches {"image", "label", "mask"} of the eval
  view, this process's share (every process yields the same number of batches)."""
  count = jax.process_count()
  local = parallel.local_batch_size(batch_size, mesh)
  start, end = parallel.local_share(len(items), jax.process_index(), count)
  own = items[start:end]
  num_batches = -(-parallel.local_share(len(items), 0, count)[1] // local)  # the largest share
  view = views.eval_view_fn(model.test_resolution, model.small_image)
  res = int(model.test_resolution)

  def load(path, label):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    out = view({"image": image, "label": label}, None)
    out["mask"] = tf.constant(True)
    return out

  examples = tf.data.Dataset.from_tensor_slices(
      (tf.constant([str(p) for p, _ in own], tf.string),
       tf.constant([int(i) for _, i in own], tf.int64))).map(load, tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      "image": tf.zeros([res, res, 3], tf.float32), "label": tf.constant(0, tf.int32),
      "mask": tf.constant(False)}).repeat()
  batches = (examples.concatenate(padding).take(num_batches * local)
             .batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
  return input_pipeline.host_iterator(batches)


def folder_corruption_errors(model, variables, root: str, *, mesh, batch_size: int,
                             corruptions: Sequence[str] = robustness.CORRUPTIONS,
                             severities: Sequence[int] = robustness.SEVERITIES,
                             wnids: Sequence[str] | None = None) -> dict[tuple[str, int], float]:
  """{(corruption, severity): top-1 error} from the ImageNet-C folder release at `root`."""
  listing = robustness.list_imagenet_c(root, corruptions, severities, wnids)
  num_classes = len(wnids) if wnids is not None else 1 + max(
      (i for items in listing.values() for _, i in items), default=-1)
  if num_classes > model.num_classes:
    raise ValueError(f"{root}: {num_classes} classes but the model has {model.num_classes}; pass "
                     "the full sorted wnid list (--imagenet_c_wnids) of the model's classes.")
  eval_step = accuracy.make_eval_step(model, mesh)  # one compilation for every setting
  errors = {}
  for (corruption, severity), items in sorted(listing.items()):
    if not items:
      raise ValueError(f"{root}/{corruption}/{severity}: no images "
                       f"({', '.join(robustness.IMAGE_SUFFIXES)}).")
    batches = folder_batches(items, model, mesh=mesh, batch_size=batch_size)
    errors[(corruption, severity)] = 1.0 - accuracy.evaluate(eval_step, variables, batches,
                                                          mesh)["top1"]
  return errors


def cifar10_c(model, variables, *, split: str, data_dir: str | None, mesh, batch_size: int,
              corruptions: Sequence[str] = robustness.CIFAR10_C_CORRUPTIONS) -> dict[str, Any]:
  """Mean error over `cifar10_corrupted`'s corruptions x severities 1..5."""
  errors = corruption_errors(model, variables, "cifar10_corrupted", split, data_dir, mesh=mesh,
                             batch_size=batch_size, corruptions=corruptions)
  summary = robustness.cifar10_c_summary(errors, corruptions=corruptions)
  summary["per_setting"] = robustness.results_to_json(errors)
  return summary


# --------------------------------------------------------------------------------------------------
# ImageNet-P.

def frame_classifier(model, variables, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
  """uint8 frames [T, H, W, 3] -> top-1 class per frame, on THIS process's devices only.

  Videos differ in length, so hosts cannot step through them in lockstep; each host classifies its
  own videos on a mesh of its local devices (no collective per batch) and the flip statistics are
  summed across hosts once per perturbation. `batch_size` is the global batch size.
  """
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (parallel.DATA_AXIS,))
  local = batch_size // jax.process_count()
  if local < 1 or local % mesh.size:
    raise ValueError(f"batch_size {batch_size} gives {local} frames per process, not a multiple "
                     f"of its {mesh.size} devices; choose a multiple of {jax.device_count()}.")
  variables = jax.device_put(jax.device_get(variables), parallel.replicated(mesh))
  classify = parallel.jit(lambda v, x: jnp.argmax(model.apply(v, x, train=False), axis=-1),
                          in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)))

  def predict(frames: np.ndarray) -> np.ndarray:
    classes = []
    for start in range(0, len(frames), local):
      chunk = corruption_suite.eval_views(frames[start:start + local], model.test_resolution,
                                          model.small_image)
      padded = np.concatenate([chunk, np.zeros((local - len(chunk),) + chunk.shape[1:],
                                               chunk.dtype)])
      classes.append(np.asarray(classify(variables, padded))[:len(chunk)])
    return np.concatenate(classes)
  return predict


def imagenet_p(model, variables, root: str, *, batch_size: int,
               perturbations: Sequence[str] = robustness.PERTURBATIONS,
               wnids: Sequence[str] | None = None,
               alexnet_flip_probabilities: dict[str, float] | None = None,
               difficulty: int = 1) -> dict[str, Any]:
  """Flip probabilities over the official release `<root>/<perturbation>/<wnid>/<video>.mp4` (or
  frame folders), each host scoring its contiguous share of the videos; mFR when AlexNet's flip
  probabilities are given (a {perturbation: FP} table), else the unnormalised mean FP."""
  listing = robustness.list_imagenet_p(root, perturbations, wnids)
  predict = frame_classifier(model, variables, batch_size)
  totals = []
  for p in perturbations:
    start, end = parallel.local_share(len(listing[p]), jax.process_index(), jax.process_count())
    rates = [robustness.video_flip_rate(predict(robustness.read_video(video)),
                                        p in robustness.NOISE_PERTURBATIONS, difficulty)
             for video, _ in listing[p][start:end]]
    totals.append([sum(rates), len(rates)])
  totals = np.asarray(totals, np.float64)
  if jax.process_count() > 1:
    totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0)
  empty = [p for p, (_, n) in zip(perturbations, totals) if n == 0]
  if empty:
    raise ValueError(f"{root}: no videos for {empty} (expected <perturbation>/<wnid>/*.mp4).")
  fp = {p: float(total / n) for p, (total, n) in zip(perturbations, totals)}
  summary = robustness.imagenet_p_summary(fp, alexnet_flip_probabilities, perturbations)
  summary.update(num_videos={p: int(n) for p, (_, n) in zip(perturbations, totals)},
                 difficulty=int(difficulty))
  return summary


def read_flip_probabilities(path: str) -> dict[str, float]:
  """A JSON object {perturbation: AlexNet's flip probability} (the mFR normalisers)."""
  with tf.io.gfile.GFile(path) as f:
    table = json.load(f)
  if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
    raise ValueError(f"{path}: expected a JSON object {{perturbation: flip probability}}.")
  return {str(k): float(v) for k, v in table.items()}


# --------------------------------------------------------------------------------------------------
# Adversarial.

def adversarial_sweep(model, variables, src: input_pipeline.Source, *, mesh, batch_size: int,
                      method: str, epsilons: Sequence[float] = adversarial.DEFAULT_EPSILONS,
                      pgd_steps: int = 10, seed: int = 0) -> dict[str, Any]:
  """Accuracy under FGSM / PGD at each epsilon (pixel units in [0, 1]) on the eval view."""
  batches = eval_batches(model, src, mesh=mesh, batch_size=batch_size, normalized=False)
  return adversarial.epsilon_sweep(adversarial.model_apply_fn(model), variables, batches,
                                   epsilons=epsilons, method=method, steps=pgd_steps, seed=seed)


# --------------------------------------------------------------------------------------------------
# One benchmark, end to end.

def run_benchmark(export: str, benchmark: str = "clean", *, dataset: str = "", split: str = "",
                  data_dir: str | None = None, resolution: int = 0, batch_size: int = 256,
                  mesh=None, corruptions: Sequence[str] | None = None,
                  clean_error: float | None = None, clean_dataset: str = "",
                  clean_split: str = "validation",
                  epsilons: Sequence[float] = adversarial.DEFAULT_EPSILONS, pgd_steps: int = 10,
                  seed: int = 0, imagenet_c_dir: str = "",
                  imagenet_c_wnids: Sequence[str] | None = None,
                  severities: Sequence[int] = robustness.SEVERITIES, imagenet_p_dir: str = "",
                  imagenet_p_wnids: Sequence[str] | None = None,
                  perturbations: Sequence[str] | None = None,
                  alexnet_flip_probabilities: dict[str, float] | None = None,
                  difficulty: int = 1) -> dict[str, Any]:
  """Scores the export at `export` on one benchmark; returns a JSON-ready dict (with the model,
  dataset and resolution it used).

  ImageNet-C's relative mCE needs the clean error: pass `clean_error`, or `clean_dataset` (e.g.
  "imagenet2012") to measure it here on `clean_split`. `imagenet_c_dir`: read ImageNet-C from its
  official folder release instead of TFDS (class order: `imagenet_c_wnids`, by default the sorted
  class folders); `severities`: ImageNet-C over a subset of 1..5 (partial CEs). ImageNet-P reads
  its official release at `imagenet_p_dir` (mp4 videos or frame folders; class order
  `imagenet_p_wnids`) and gives mFR with `alexnet_flip_probabilities`, else the unnormalised mFP.
  """
  if benchmark not in BENCHMARKS:
    raise ValueError(f"Unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}.")
  if (imagenet_c_dir or imagenet_c_wnids) and benchmark != "imagenet_c":
    raise ValueError("imagenet_c_dir / imagenet_c_wnids are for benchmark=imagenet_c only.")
  if imagenet_c_wnids and not imagenet_c_dir:
    raise ValueError("imagenet_c_wnids needs imagenet_c_dir (the TFDS sets carry their labels).")
  if (imagenet_p_dir or imagenet_p_wnids) and benchmark != "imagenet_p":
    raise ValueError("imagenet_p_dir / imagenet_p_wnids are for benchmark=imagenet_p only.")
  if benchmark == "imagenet_p":
    if not imagenet_p_dir:
      raise ValueError("benchmark=imagenet_p needs imagenet_p_dir (--imagenet_p_dir), the official "
                       "release <dir>/<perturbation>/<wnid>/<video>.mp4: TFDS has no ImageNet-P.")
    model, variables, metadata = load_model(export, resolution, mesh)
    result = imagenet_p(model, variables, imagenet_p_dir, batch_size=batch_size,
                        perturbations=perturbations or robustness.PERTURBATIONS,
                        wnids=imagenet_p_wnids,
                        alexnet_flip_probabilities=alexnet_flip_probabilities,
                        difficulty=difficulty)
    return _describe(result, benchmark, str(imagenet_p_dir), "folder", export, model, metadata)
  default_name, default_split = DEFAULT_DATASETS.get(benchmark, ("", ""))
  dataset, split = dataset or default_name, split or default_split
  if not dataset or not split:
    raise ValueError(f"--benchmark={benchmark} needs --dataset and --split (a TFDS name and "
                     "split, e.g. --dataset=imagenet2012 --split=validation).")
  mesh = parallel.make_mesh() if mesh is None else mesh
  if batch_size % jax.device_count():
    raise ValueError(f"batch_size {batch_size} is not divisible by the {jax.device_count()} "
                     "devices; use a multiple of it.")
  model, variables, metadata = load_model(export, resolution, mesh)
  src = input_pipeline.Source(dataset, split, data_dir)
  common = dict(mesh=mesh, batch_size=batch_size)
  if benchmark in ("clean", "imagenet_v2"):
    result = accuracy.clean_accuracy(model, variables, src, **common)
  elif benchmark in SUBSET_BENCHMARKS:
    result = subset_accuracy(model, variables, src, benchmark, **common)
  elif benchmark == "imagenet_c":
    if clean_error is None and clean_dataset:
      clean_src = input_pipeline.Source(clean_dataset, clean_split, data_dir)
      clean_error = 1.0 - accuracy.clean_accuracy(model, variables, clean_src, **common)["top1"]
    result = imagenet_c(model, variables, split=split, data_dir=data_dir,
                        corruptions=corruptions or robustness.CORRUPTIONS,
                        clean_error=clean_error, folder=imagenet_c_dir, severities=severities,
                        wnids=imagenet_c_wnids, **common)
    if imagenet_c_dir:
      dataset, split = str(imagenet_c_dir), "folder"
  elif benchmark == "cifar10_c":
    result = cifar10_c(model, variables, split=split, data_dir=data_dir,
                       corruptions=corruptions or robustness.CIFAR10_C_CORRUPTIONS, **common)
  else:
    result = adversarial_sweep(model, variables, src, method=benchmark, epsilons=epsilons,
                               pgd_steps=pgd_steps, seed=seed, **common)
  return _describe(result, benchmark, dataset, split, export, model, metadata)


def _describe(result: dict[str, Any], benchmark: str, dataset: str, split: str, export: str,
              model, metadata: dict[str, Any]) -> dict[str, Any]:
  result.update(benchmark=benchmark, dataset=dataset, split=split, export=str(export),
                model=model.model_name, resolution=int(model.test_resolution),
                step=int(metadata.get("step", 0)))
  return result


def scalars(result: dict[str, Any]) -> dict[str, float]:
  """The headline numbers of a result, for TensorBoard."""
  keys = ("top1", "top5", "mCE", "relative_mCE", "mean_error", "mFP", "mFR")
  out = {k: float(result[k]) for k in keys if isinstance(result.get(k), (int, float))}
  if "epsilons" in result:
    for epsilon, top1 in zip(result["epsilons_255"], result["accuracy"]):
      out[f"accuracy_eps{epsilon:g}"] = float(top1)
  return out


def write_results(output_dir: str, result: dict[str, Any]) -> str:
  """`<output_dir>/<benchmark>.json`, TensorBoard scalars `<benchmark>/<metric>` (and a PNG for an
  adversarial sweep); process 0 writes. Returns the JSON path."""
  name = result["benchmark"]
  path = os.path.join(output_dir, f"{name}.json")
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(output_dir)
    atomic_write_json(path, result)
    if "epsilons" in result:
      adversarial.plot_sweep(result, os.path.join(output_dir, f"{name}.png"),
                             title=f"{result['model']} under {name.upper()}")
  writer = metric_writers.create_default_writer(output_dir,
                                                just_logging=jax.process_index() > 0)
  writer.write_scalars(int(result.get("step", 0)),
                       {f"{name}/{k}": v for k, v in scalars(result).items()})
  writer.flush()
  writer.close()
  return path
