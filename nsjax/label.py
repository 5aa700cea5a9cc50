"""The pseudo-labeling stage: the un-noised teacher labels the unlabeled split, shard by shard.

The teacher runs as exported (eval mode, EMA weights, no augmentation, the eval center crop at its
own test resolution) through the jitted inference step, data-parallel over every device and host.
Each host writes the shards of its own slice of the split (nsjax.data.pseudo_labels); a rerun skips
the shards its manifest records (a single-process run stops after the current shard on SIGTERM,
raising `nsjax.train.loop.Preempted`). When all hosts are done, process 0 merges the manifests, plans the
official filtering and balancing, and writes `balance.json` and `balance.png`.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging

from nsjax import checkpoint, parallel, report
from nsjax.data import balance, input_pipeline, preprocess, pseudo_labels
from nsjax.files import atomic_write_json, read_json
from nsjax.train import loop, steps

BALANCE_FILE = "balance.json"


def teacher_view_fn(resolution: int, small_image: bool, image_key: str = "image"):
  """features -> {"image": eval view at the teacher's resolution[, "id"]}: no noise at all."""

  def fn(features, seed):
    del seed
    out = {"image": preprocess.eval_view(features[image_key], resolution, small_image=small_image)}
    for key in ("id", "tfds_id"):
      if key in features:
        out["id"] = features[key]
        break
    return out

  return fn


def _ids(batch: dict[str, Any], done: int, process: int) -> list[bytes]:
  if "id" in batch:
    ids = batch["id"]  # numeric ids arrive as global arrays; strings as this host's numpy rows
    ids = parallel.process_local_rows(ids) if isinstance(ids, jax.Array) else ids
    return [str(i).encode() if not isinstance(i, bytes) else i for i in ids]
  # Sources without ids: the position in this process's ordered slice is stable across reruns.
  return [f"p{process}-{done + i}".encode() for i in range(len(batch["mask"]))]


def label_unlabeled(teacher_dir: str, source: input_pipeline.Source, out_dir: str, *,
                    global_batch_size: int, mesh, small_image: bool = False,
                    shard_batches: int = 8, top_k: int = 0,
                    log_every_seconds: float = 30.0) -> dict[str, Any]:
  """Writes pseudo-labeled shards of `source` into `out_dir` and returns the merged manifest."""
  model, variables, _ = checkpoint.load_exported(teacher_dir)
  num_classes = model.num_classes
  variables = jax.device_put(variables, parallel.replicated(mesh))
  predict = steps.make_predict_step(model, mesh)
  batches = input_pipeline.unlabeled_batches(
      source, global_batch_size=global_batch_size, keep_encoded_image=True, mesh=mesh,
      preprocess_fn=teacher_view_fn(model.test_resolution, small_image, source.image_key))
  host = jax.process_index()
  writer = pseudo_labels.HostShardWriter(out_dir, host, num_classes, top_k)
  if writer.manifest["complete"]:
    logging.info("Pseudo labels of host %d already complete in %s.", host, out_dir)
  else:
    preemption = loop.PreemptionWatch().start()
    try:
      _label_host(batches, writer, predict, variables, shard_batches, host, log_every_seconds,
                  preemption)
    finally:
      preemption.stop()
  parallel.sync("pseudo-labels-written")
  if host == 0:
    merged = pseudo_labels.merge_manifests(out_dir, jax.process_count())
  parallel.sync("pseudo-labels-merged")
  return pseudo_labels.read_manifest(out_dir)


def _label_host(batches, writer, predict, variables, shard_batches, host, log_every_seconds,
                preemption):
  already = writer.num_examples_done
  total = batches.num_batches
  images, probs, ids = [], [], []
  seen, skipped_before, start, last_log = 0, 0, time.time(), time.time()
  labeled_now = 0
  for step, batch in enumerate(batches):
    mask = parallel.process_local_rows(batch["mask"]).astype(bool)
    real = int(mask.sum())
    if seen + real <= already:  # finished in an earlier run: skip without running the teacher
      seen += real
      continue
    out = predict(variables, batch["image"])
    local_probs = parallel.process_local_rows(out["probs"])[mask]
    images += list(np.asarray(batch[input_pipeline.ENCODED_IMAGE_KEY])[mask])
    probs.append(local_probs)
    ids += [i for i, m in zip(_ids(batch, seen, host), mask) if m]
    seen += real
    labeled_now += real
    end_of_data = step + 1 == total
    if len(probs) == shard_batches or end_of_data:
      if images:
        skipped = batches.num_skipped - skipped_before
        skipped_before = batches.num_skipped
        writer.write_shard(images, np.concatenate(probs), ids, num_skipped=skipped)
        if preemption.requested and not end_of_data:  # single process: hosts need no agreement
          preemption.acknowledge()
          raise loop.Preempted(writer.num_shards_done, f"manifest {writer.manifest_path}",
                               unit="pseudo-label shard")
      images, probs, ids = [], [], []
    if time.time() - last_log > log_every_seconds or end_of_data:
      rate = labeled_now / max(time.time() - start, 1e-9)
      remaining = (total - step - 1) * len(mask) / max(rate, 1e-9)
      logging.info("label: batch %d/%d, %d images this run, %.1f img/s, ETA %.0f s", step + 1,
                   total, labeled_now, rate, remaining)
      last_log = time.time()
  writer.manifest["num_skipped"] += batches.num_skipped - skipped_before
  writer.finish()


def plan_and_report(out_dir: str, num_image: int, min_threshold: float, seed: int) -> balance.BalancePlan:
  """Filtering + balancing plan from the merged histograms; writes balance.json and balance.png."""
  manifest = pseudo_labels.read_manifest(out_dir)
  hist = np.asarray(manifest["histogram"])
  plan = balance.plan_balance(hist, num_image, min_threshold, seed)
  if jax.process_index() == 0:
    stats = plan.to_json()
    stats["expected_after"] = [k * f for k, f in zip(plan.kept, plan.factors)]
    stats["num_unlabeled"] = int(hist.sum())
    stats["num_skipped"] = manifest["num_skipped"]
    atomic_write_json(os.path.join(out_dir, BALANCE_FILE), stats)
    report.plot_balance(stats, os.path.join(out_dir, "balance.png"))
  return plan


def read_plan(out_dir: str) -> balance.BalancePlan:
  stats = read_json(os.path.join(out_dir, BALANCE_FILE))
  fields = {k: stats[k] for k in ("num_image", "min_threshold", "seed", "thresholds", "histogram",
                                  "kept", "factors")}
  return balance.BalancePlan(**fields)
