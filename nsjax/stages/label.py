"""The label stage: the un-noised teacher labels the unlabeled split, shard by shard.

The teacher runs as exported (eval mode, EMA weights, no augmentation, the eval center crop at its
own test resolution) through the jitted inference step, data-parallel over every device and host.
Each host writes the shards of its own slice of the split (nsjax.data.pseudo_labels), cut at the
batch where a shard reaches `shard_bytes`; each shard's sidecar records how many batches of the
pass the host's shards cover. Every host runs every batch's inference step
(a jitted step over global arrays needs them all), so a rerun starts at the batch the LEAST
advanced host reached, and hosts further on predict without writing until their own shards end:
hosts killed at different shards resume with exactly the shards of an uninterrupted run. On a
SIGTERM, hosts stop after the same batch (`nsjax.train.preemption.Preempted`), each writing the
shard it had begun: every batch is a step of jax's preemption sync point (a plain flag in a single
process). The record fields (`pseudo_label_fields`) are computed on the device, in the labeling
step, so the host only copies bytes into records.
When all hosts are done, process 0 merges their summaries into the manifest and plans the official
filtering and balancing; every process then writes the read tables of its share of the shards, and
process 0 writes `balance.json` (with each record block's balanced count) and `balance.png`.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from nsjax import exported_model, parallel, report, schedule
from nsjax.data import balance, input_pipeline, pseudo_labels, views
from nsjax.evaluate import inference
from nsjax.files import atomic_write_json, read_json
from nsjax.stages.context import Context
from nsjax.train.preemption import Preempted, PreemptionWatch


BALANCE_FILE = "balance.json"


def pseudo_label_fields(probs: jax.Array, top_k: int = 0) -> dict[str, jax.Array]:
  """A pseudo-label record's fields from float32 probabilities [B, C] (jnp or np arrays).

  {"label": int32 argmax (first on ties), "confidence": float32 top-1 probability, "probs":
  float16 (all classes, or the top-k values, largest first), ["classes": int32 top-k indices,
  lower index first on ties]}. Inside the jitted labeling step the rounding to float16 and the
  top-k run on the device, fused with the softmax, so the host only copies bytes into records.
  """
  probs = jnp.asarray(probs, jnp.float32)
  fields = {"label": jnp.argmax(probs, axis=-1).astype(jnp.int32),
            "confidence": jnp.max(probs, axis=-1)}
  if top_k:
    values, classes = jax.lax.top_k(probs, top_k)
    fields.update(probs=values.astype(jnp.float16), classes=classes.astype(jnp.int32))
  else:
    fields["probs"] = probs.astype(jnp.float16)
  return fields


def make_pseudo_label_step(model: nn.Module, mesh: jax.sharding.Mesh, top_k: int = 0
                           ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """`label_step(variables, pixels) -> pseudo_label_fields(softmax(model(pixels)), top_k)`.

  The teacher in eval mode on pixel-unit eval views (normalised on the device), as the labeling
  stage runs it; outputs stay sharded like the images.
  """
  data = parallel.data_sharding(mesh)

  def label_step(variables, pixels):
    return pseudo_label_fields(inference.probabilities(model, variables, pixels, True), top_k)

  return parallel.jit(label_step, in_shardings=(None, data), out_shardings=data)


def _ids(batch: dict[str, Any], done: int, process: int) -> list[bytes]:
  if "id" in batch:
    ids = batch["id"]  # numeric ids arrive as global arrays; strings as this host's numpy rows
    ids = parallel.process_local_rows(ids) if isinstance(ids, jax.Array) else ids
    return [str(i).encode() if not isinstance(i, bytes) else i for i in ids]
  # Sources without ids: the position in this process's ordered slice is stable across reruns.
  return [f"p{process}-{done + i}".encode() for i in range(len(batch["mask"]))]


def label_unlabeled(teacher_dir: str, source: input_pipeline.Source, out_dir: str, *,
                    global_batch_size: int, mesh, small_image: bool = False,
                    shard_bytes: int = 256 * 2**20, top_k: int = 0,
                    log_every_seconds: float = 30.0) -> dict[str, Any]:
  """Writes pseudo-labeled shards of `source` into `out_dir` and returns the merged manifest."""
  model, variables, _ = exported_model.load_exported(teacher_dir)
  num_classes = model.num_classes
  variables = jax.device_put(variables, parallel.replicated(mesh))
  predict = make_pseudo_label_step(model, mesh, top_k)
  batches = labeling_batches(source, model.test_resolution, global_batch_size=global_batch_size,
                             mesh=mesh, small_image=small_image)
  host = jax.process_index()
  writer = pseudo_labels.HostShardWriter(out_dir, host, num_classes, top_k)
  own_done = batches.num_batches if writer.complete else writer.num_batches_done
  start = agreed_start(own_done)
  if start == batches.num_batches:
    logging.info("Pseudo labels of every host already complete in %s.", out_dir)
  else:
    preemption = PreemptionWatch().start()
    try:
      _label_host(batches, writer, predict, variables, shard_bytes, host, log_every_seconds,
                  preemption, start, own_done)
    finally:
      preemption.stop()
  parallel.sync("pseudo-labels-written")
  if host == 0:
    pseudo_labels.merge_manifests(out_dir, jax.process_count())
  parallel.sync("pseudo-labels-merged")
  return pseudo_labels.read_manifest(out_dir)


def labeling_batches(source: input_pipeline.Source, resolution: int, *, global_batch_size: int,
                     mesh, small_image: bool = False) -> input_pipeline.BatchIterator:
  """What the labeling stage reads: one ordered pass of the teacher's eval view (pixel units, at
  its test `resolution`), with each image's id and its encoded bytes for the pseudo-label records."""
  return input_pipeline.unlabeled_batches(
      source, global_batch_size=global_batch_size, keep_encoded_image=True, mesh=mesh,
      preprocess_fn=views.eval_view_fn(resolution, small_image, source.image_key,
                                        units="pixels", label=False, keep_id=True))


def agreed_start(own_done: int) -> int:
  """The first batch some host has not written: every host resumes its inference there."""
  if jax.process_count() == 1:
    return own_done
  return int(np.min(multihost_utils.process_allgather(np.int64(own_done))))


def _predicted(batches, predict, variables, start: int):
  """(step, batch, inference output or None before `start`, records skipped up to this batch).

  One step late: batch k+1's inference is dispatched before batch k is handed over, so the host's
  work on batch k (copying the record fields, packing and writing shards) overlaps the next
  inference instead of leaving the devices idle. The skip count is read when its batch arrives,
  before the next one is fetched, so it covers exactly the batches handed over so far.
  """
  pending = None
  for step, batch in enumerate(batches):
    out = predict(variables, batch["image"]) if step >= start else None
    if pending is not None:
      yield pending
    pending = (step, batch, out, batches.num_skipped)
  if pending is not None:
    yield pending


def _label_host(batches, writer, predict, variables, shard_bytes, host, log_every_seconds,
                preemption, start, own_done):
  """Labels batches [start, num_batches); writes this host's shards from batch `own_done` on."""
  total = batches.num_batches
  images, fields, ids = [], [], []
  pending_bytes = skipped_before = 0
  began = last_log = time.time()
  seen = labeled_now = 0

  def write(num_skipped, batches_done):
    writer.write_shard(images, {k: np.concatenate([f[k] for f in fields]) for k in fields[0]},
                       ids, num_skipped=num_skipped - skipped_before, num_batches_done=batches_done)
    images.clear(), fields.clear(), ids.clear()

  for step, batch, out, num_skipped in _predicted(batches, predict, variables, start):
    mask = parallel.process_local_rows(batch["mask"]).astype(bool)
    if step < own_done:  # in this host's shards already (predicted too, if others need it)
      seen += int(mask.sum())
      skipped_before = num_skipped
    else:
      fields.append({k: parallel.process_local_rows(v)[mask] for k, v in out.items()})
      new_images = list(np.asarray(batch[input_pipeline.ENCODED_IMAGE_KEY])[mask])
      images.extend(new_images)
      ids += [i for i, m in zip(_ids(batch, seen, host), mask) if m]
      pending_bytes += sum(map(len, new_images)) + sum(v.nbytes for v in fields[-1].values())
      seen += int(mask.sum())
      labeled_now += int(mask.sum())
    end_of_data = step + 1 == total
    if step >= own_done and images and (pending_bytes >= shard_bytes or end_of_data):
      write(num_skipped, step + 1)
      skipped_before, pending_bytes = num_skipped, 0
    # Every host calls this at every batch (from the agreed start on), so all stop at one batch.
    if step >= start and not end_of_data and preemption.should_stop(step + 1):
      preemption.acknowledge()
      if step >= own_done and images:
        write(num_skipped, step + 1)
      raise Preempted(writer.num_shards_done, f"shard sidecars {writer.progress_path}",
                           unit="pseudo-label shard")
    if time.time() - last_log > log_every_seconds or end_of_data:
      rate = labeled_now / max(time.time() - began, 1e-9)
      logging.info("label: batch %d/%d, %d images this run, %.1f img/s, ETA %.0f s", step + 1,
                   total, labeled_now, rate, (total - step - 1) * len(mask) / max(rate, 1e-9))
      last_log = time.time()
  if not writer.complete:
    writer.finish(total, num_skipped=batches.num_skipped - skipped_before)


def plan_and_report(out_dir: str, num_image: int, min_threshold: float, seed: int) -> balance.BalancePlan:
  """Filtering + balancing plan from the merged histograms: every process writes the read tables
  of its share of the shards (the plan's one pass over the records' sidecars), then process 0
  writes balance.json (with each record block's balanced count) and balance.png."""
  manifest = pseudo_labels.read_manifest(out_dir)
  hist = np.asarray(manifest["histogram"])
  plan = balance.plan_balance(hist, num_image, min_threshold, seed)
  counts = pseudo_labels.write_read_tables(out_dir, plan, manifest["shards"], jax.process_index(),
                                           jax.process_count())
  if jax.process_count() > 1:
    counts = np.sum(multihost_utils.process_allgather(counts), axis=0)
  plan.block_counts = [int(c) for c in counts]
  if jax.process_index() == 0:
    stats = plan.to_json()
    stats["expected_after"] = [k * f for k, f in zip(plan.kept, plan.factors)]
    stats["num_unlabeled"] = int(hist.sum())
    stats["num_skipped"] = manifest["num_skipped"]
    stats["epoch_size"] = int(counts.sum())
    atomic_write_json(os.path.join(out_dir, BALANCE_FILE), stats)
    report.plot_balance(stats, os.path.join(out_dir, "balance.png"))
  parallel.sync("balance-plan-written")
  return plan


def read_plan(out_dir: str) -> balance.BalancePlan:
  stats = read_json(os.path.join(out_dir, BALANCE_FILE))
  fields = {k: stats[k] for k in ("num_image", "min_threshold", "seed", "thresholds", "histogram",
                                  "kept", "factors")}
  return balance.BalancePlan(**fields, block_counts=stats.get("block_counts"),
                             block_size=stats.get("block_size", 1024))


def run(stage: schedule.Stage, ctx: Context) -> dict:
  """Labels the unlabeled split with the previous model, then plans filtering and balancing."""
  config = ctx.config
  teacher_dir = schedule.teacher_export_of(stage, config, ctx.workdir)
  out = ctx.stage_dir(stage.name)
  lcfg = config.label
  manifest = label_unlabeled(
      teacher_dir, ctx.source("unlabeled"), out,
      global_batch_size=int(lcfg.batch_size), mesh=ctx.mesh, small_image=config.data.small_image,
      shard_bytes=int(lcfg.shard_bytes), top_k=int(lcfg.top_k))
  bcfg = config.balance
  num_image = int(bcfg.num_image_per_class) or max(
      1, manifest["num_examples"] // config.data.num_classes)
  plan = plan_and_report(out, num_image, float(bcfg.min_threshold), int(config.seed))
  return {"num_examples": manifest["num_examples"], "num_skipped": manifest["num_skipped"],
          "kept": int(sum(plan.kept)), "num_image_per_class": num_image}
