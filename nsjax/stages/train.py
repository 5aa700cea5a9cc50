"""The train stages: a teacher, a student or a baseline, trained by nsjax.train.loop.

A teacher trains on the labeled data (or is imported from an exported checkpoint); a student
trains on labeled + pseudo-labeled batches (the label stage's shards, or an online teacher's
predictions), both halves noised; a baseline is the final student trained on labeled data only.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from nsjax import artifacts, exported_model, models, schedule
from nsjax.data import input_pipeline, preprocess, pseudo_labels, student_input, views
from nsjax.stages import label, teachers
from nsjax.stages.context import Context, num_examples
from nsjax.train import loop, settings


def run(stage: schedule.Stage, ctx: Context) -> dict:
  """Teacher, student or baseline training; returns a small result dict for the state file."""
  config = ctx.config
  stage_cfg = schedule.stage_config(stage, config)
  if _imported(stage, stage_cfg):
    return import_teacher(stage_cfg, config, ctx.workdir)
  model = build_model(stage_cfg, config)
  cfg = _stage_train_config(stage_cfg, ctx)
  if stage.kind == "student":  # (a smaller student was warned about by validation)
    teachers.check_teacher_export(schedule.teacher_export_of(stage, config, ctx.workdir),
                                  model.num_classes, config.data.get("class_names"),
                                  "the student's labeled data")
  batches, teacher = training_batches(stage, ctx, cfg)
  result = loop.train(cfg, model, batches, ctx.stage_dir(stage.name), eval_fn=ctx.eval_fn(model),
                      teacher=teacher, mesh=ctx.mesh, export_metadata=class_metadata(config))
  return {"step": int(result.step), "export_dir": result.export_dir,
          "final_metrics": {k: float(v) for k, v in result.metrics.items()
                            if np.isscalar(v) or np.ndim(v) == 0},
          **result.skipped_fields()}


def compile_ahead(stage: schedule.Stage, ctx: Context) -> None:
  """Starts compiling the stage's train step in the background (loop.compile_ahead), so that it
  overlaps the stages and set-up before its first step; skipped where the batches are not known
  from the config alone (an online teacher) or nothing is trained (an imported teacher)."""
  config = ctx.config
  stage_cfg = schedule.stage_config(stage, config)
  if _imported(stage, stage_cfg):
    return
  cfg = _stage_train_config(stage_cfg, ctx)
  spec = batch_spec(stage, config, cfg)
  if spec is not None:
    loop.compile_ahead(cfg, build_model(stage_cfg, config), spec, mesh=ctx.mesh)


def batch_spec(stage: schedule.Stage, config, cfg: ml_collections.ConfigDict) -> dict | None:
  """One global batch of the stage's training stream (`training_batches`) as
  jax.ShapeDtypeStructs; None for an online teacher (its batches carry the teacher's view)."""
  stage_cfg = schedule.stage_config(stage, config)
  size = stage_cfg.resolution

  def images(n):
    return jax.ShapeDtypeStruct((n, size, size, 3), np.float32)

  spec = {"labeled": {"image": images(cfg.batch_size),
                      "label": jax.ShapeDtypeStruct((cfg.batch_size,), np.int32)}}
  if stage.kind == "student":
    if stage_cfg.online_teacher:
      return None
    unlabeled = unlabeled_batch_size(cfg)
    spec["unlabeled"] = {"image": images(unlabeled), "probs": jax.ShapeDtypeStruct(
        (unlabeled, int(config.data.num_classes)), np.float32)}
  return spec


def unlabeled_batch_size(cfg: ml_collections.ConfigDict) -> int:
  """Pseudo-labeled images in a student's global batch: round(unlabeled_ratio * batch_size)."""
  return int(round(float(cfg.unlabeled_ratio) * cfg.batch_size))


def build_model(stage_cfg, config) -> models.EfficientNet:
  overrides = dict(stage_cfg.model_overrides or {})
  noise = stage_cfg.noise
  for key in ("dropout_rate", "stochastic_depth_rate"):
    if noise.get(key) is not None:
      overrides[key] = noise[key]
  return models.create_model(stage_cfg.model, config.data.num_classes,
                             small_image=config.data.small_image,
                             train_resolution=stage_cfg.resolution,
                             test_resolution=stage_cfg.test_resolution or stage_cfg.resolution,
                             **overrides)


def _imported(stage: schedule.Stage, stage_cfg) -> bool:
  """A teacher taken from an exported checkpoint: nothing to train."""
  return stage.kind == "teacher" and bool(stage_cfg.get("checkpoint"))


def _stage_train_config(stage_cfg, ctx: Context) -> ml_collections.ConfigDict:
  return train_config(stage_cfg, ctx.config, num_examples(ctx.source("labeled")))


def train_config(stage_cfg, config, num_labeled: int) -> ml_collections.ConfigDict:
  return settings.resolve_config(dict(stage_cfg.train), num_labeled_examples=num_labeled,
                                 seed=int(config.seed) * 1000 + int(stage_cfg.seed_offset))


def class_metadata(config) -> dict[str, Any]:
  """What exported models record about their classes."""
  names = list(config.data.get("class_names") or [])
  return {"class_names": names} if names else {}


def _local(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f"Batch size {batch_size} is not divisible by {jax.process_count()} processes.")
  return batch_size // jax.process_count()


def training_batches(stage: schedule.Stage, ctx: Context, cfg: ml_collections.ConfigDict):
  """(`start_step -> iterator of global batches`, online teacher or None) for a model stage.

  Labeled batches hold cfg.batch_size images; a student's unlabeled part holds
  round(unlabeled_ratio * batch_size) pseudo-labeled (or, online, raw unlabeled) images.
  Both halves get the stage's noise.
  """
  config, workdir = ctx.config, ctx.workdir
  stage_cfg = schedule.stage_config(stage, config)
  labeled_src = ctx.source("labeled")
  view = views.train_view_fn(stage_cfg.noise, config.data.small_image, stage_cfg.resolution)

  def labeled_fn(features, seed):
    return {"image": view(features[labeled_src.image_key], seed),
            "label": tf.cast(features["label"], tf.int32)}

  teacher, unlabeled = None, None
  if stage.kind == "student":
    unlabeled_batch = unlabeled_batch_size(cfg)
    if stage_cfg.online_teacher:
      teacher = loop.Teacher.load(schedule.teacher_export_of(stage, config, workdir))
      unlabeled = _online_unlabeled(ctx, stage_cfg, teacher.model, unlabeled_batch, cfg.seed)
    else:
      labels_dir = schedule.labels_dir(workdir, stage.iteration)
      check_shards(labels_dir)
      plan = label.read_plan(labels_dir)
      unlabeled = lambda start, position: student_input.pseudo_label_batches(
          labels_dir, plan, local_batch_size=_local(unlabeled_batch), view_fn=view,
          seed=cfg.seed, start_step=start)

  def batches(start_step: int, input_position: dict | None = None) -> student_input.StageBatches:
    position = input_position or {}
    labeled = input_pipeline.train_batches(
        labeled_src, global_batch_size=cfg.batch_size, preprocess_fn=labeled_fn, seed=cfg.seed,
        start_step=start_step, position=position.get("labeled"),
        index_dir=ctx.record_index_dir)
    pseudo = None
    if unlabeled is not None:
      pseudo = unlabeled(start_step, position.get("unlabeled"))
    return student_input.StageBatches(labeled, pseudo, ctx.mesh)

  return batches, teacher


def _online_unlabeled(ctx: Context, stage_cfg, teacher_model, unlabeled_batch: int, seed: int):
  """Raw unlabeled images, each as (teacher view, student view), for the in-step teacher."""
  src = ctx.source("unlabeled")
  small = ctx.config.data.small_image
  ra_cfg = views.randaugment_config(stage_cfg.noise, small, stage_cfg.resolution)
  index_dir = ctx.record_index_dir

  def both_views(features, example_seed):
    teacher_view, student_view = preprocess.teacher_and_student_views(
        features[src.image_key], example_seed, teacher_model.test_resolution, stage_cfg.resolution,
        randaugment=ra_cfg, small_image=small, cutout=int(stage_cfg.noise.cutout),
        flip=stage_cfg.noise.flip)
    return {"image": student_view, "teacher_image": teacher_view}

  def batches(start_step, position=None):
    # both_views() returns exactly {"image", "teacher_image"}: the iterator is the batches (and it
    # reports its position, since unlabeled images may fail to decode).
    return input_pipeline.train_batches(src, global_batch_size=unlabeled_batch,
                                        preprocess_fn=both_views, seed=seed + 1, start_step=start_step,
                                        position=position, index_dir=index_dir)

  return batches


def import_teacher(stage_cfg, config, workdir: str) -> dict:
  """A teacher from an exported (or converted official) checkpoint, re-exported into the workdir."""
  teachers.check_teacher_export(stage_cfg.checkpoint, config.data.num_classes,
                                config.data.get("class_names"), "the labeled data")
  model, variables, metadata = exported_model.load_exported(stage_cfg.checkpoint)
  out = schedule.export_dir(workdir, "teacher")
  exported_model.export_model(out, model, variables,
                              dict(metadata, imported_from=stage_cfg.checkpoint))
  return {"export_dir": out, "imported_from": stage_cfg.checkpoint}


def check_shards(labels_dir: str) -> None:
  """Before a student trains: the manifest and every shard it lists are there (one listing)."""
  manifest_path = os.path.join(labels_dir, pseudo_labels.MANIFEST)
  if not tf.io.gfile.exists(manifest_path):
    raise artifacts.MissingArtifact(manifest_path, "the pseudo-label manifest is missing")
  present = set(tf.io.gfile.listdir(labels_dir))
  for shard in pseudo_labels.read_manifest(labels_dir)["shards"]:
    if shard["file"] not in present:
      raise artifacts.MissingArtifact(os.path.join(labels_dir, shard["file"]),
                                      "this pseudo-label shard is missing")


def damaged_shard(labels_dir: str) -> tuple[str, str] | None:
  """(path, what is wrong) of the first shard that is missing, fails to read or holds fewer
  records than its manifest says; None when all read (the error came from elsewhere)."""
  for shard in pseudo_labels.read_manifest(labels_dir)["shards"]:
    path = os.path.join(labels_dir, shard["file"])
    if not tf.io.gfile.exists(path):
      return path, "this pseudo-label shard is missing"
    try:
      count = int(tf.data.TFRecordDataset([path]).reduce(0, lambda n, _: n + 1))
    except tf.errors.OpError as error:
      return path, f"this pseudo-label shard is damaged ({artifacts.root_cause(error)})"
    if count != shard["count"]:
      return path, (f"this pseudo-label shard holds {count} records, its manifest says "
                    f"{shard['count']} (truncated)")
  return None
