"""The Noisy Student schedule: teacher -> pseudo labels -> noisy student -> ... -> evaluation.

One ml-collections config describes the whole run (see configs/demo.py for every key):

  iteration 0   "teacher"      train from labels (or import an exported / converted checkpoint)
  iteration i   "label-i"      the teacher of iteration i-1 labels the unlabeled split (skipped for
                               an online teacher), then filtering + balancing are planned
                "student-i"    a noised, equal-or-larger student trains on labeled + pseudo labels
  optional      "finetune-i"   (students[i-1].finetune) test-resolution fine-tuning of student i;
                               its export replaces the student's from then on (nsjax/finetune.py)
  optional      "baseline"     the final student's architecture and noise, labeled data only
                "eval-<name>"  test accuracy (+ the offline corruption suite) of every model
                "summary"      summary.json, a printed table, accuracy and corruption plots

Stages talk only through artifacts in the workdir (exported models, pseudo-label shards, JSON), and
each is recorded in state.json when complete: rerunning the same command skips finished stages and
resumes the interrupted one from its own checkpoints or shards. `run(config, workdir, stage=...)`
runs one stage (for pod users who run each stage as its own job).

Preemption: a SIGTERM stops the run at the next training step (checkpointed), pseudo-label shard, or
stage boundary with `nsjax.train.loop.Preempted` ("preempted at step N ...; rerun the same command
to resume"); `nsjax.main` turns it into exit code 75. A SIGKILL loses at most the work since the
last checkpoint or shard: every artifact is written under a temporary name and renamed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging

from nsjax import (artifacts, checkpoint, finetune, label, models, parallel, report, validate,
                   workdir_lock)
from nsjax.data import (embedded, folder, input_pipeline, preprocess, pseudo_labels,
                        student_input)
from nsjax.data import randaugment as ra
from nsjax.evaluate import stage as eval_stage_lib
from nsjax.files import atomic_write_json
from nsjax.run_state import RunState
from nsjax.train import loop, steps


# ------------------------------------------------------------------------------------------------
# The schedule.

@dataclasses.dataclass(frozen=True)
class Stage:
  name: str           # "teacher", "label-1", "student-1", "baseline", "eval-student-1", "summary"
  kind: str           # teacher | label | student | finetune | baseline | eval | summary
  iteration: int      # 0 for the teacher, i for the i-th student; -1 for the baseline/summary


def model_stage_names(config) -> list[str]:
  names = ["teacher"] + [f"student-{i}" for i in range(1, len(config.students) + 1)]
  return names + (["baseline"] if config.get("baseline") else [])


def schedule(config) -> list[Stage]:
  stages = [Stage("teacher", "teacher", 0)]
  for i, student in enumerate(config.students, start=1):
    if not student.get("online_teacher", False):
      stages.append(Stage(f"label-{i}", "label", i))
    stages.append(Stage(f"student-{i}", "student", i))
    if student.get("finetune"):
      stages.append(Stage(f"finetune-{i}", "finetune", i))
  if config.get("baseline"):
    stages.append(Stage("baseline", "baseline", -1))
  for name in model_stage_names(config):
    stages.append(Stage(f"eval-{name}", "eval", _iteration_of(name)))
  stages.append(Stage("summary", "summary", -1))
  return stages


def _iteration_of(model_stage: str) -> int:
  return 0 if model_stage == "teacher" else (-1 if model_stage == "baseline"
                                             else int(model_stage.split("-")[1]))


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def export_dir(workdir: str, model_stage: str) -> str:
  return os.path.join(stage_dir(workdir, model_stage), "export")


def final_export_dir(config, workdir: str, model_stage: str) -> str:
  """The export that stands for a model stage: a fine-tuned student's replaces its own."""
  if model_stage.startswith("student-"):
    if config.students[_iteration_of(model_stage) - 1].get("finetune"):
      return export_dir(workdir, model_stage.replace("student-", "finetune-"))
  return export_dir(workdir, model_stage)


def fingerprint(config) -> str:
  """Identifies the schedule, so a workdir is never resumed with a different one."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Data.

def source(cfg, data_dir: str | None) -> input_pipeline.Source:
  return input_pipeline.Source(cfg.name, cfg.split, cfg.get("data_dir") or data_dir,
                               cfg.get("image_key", "image"))


def prepare_data(config, workdir: str) -> str | None:
  """Builds the embedded datasets (nsjax.data.embedded) the config names (offline, seconds);
  returns data_dir."""
  data_dir = config.data.get("data_dir") or None
  names = {config.data[k].name for k in ("labeled", "unlabeled", "test")}
  for name in sorted(n for n in names if embedded.is_embedded(n)):
    data_dir = data_dir or os.path.join(workdir, "tensorflow_datasets")
    if jax.process_index() == 0:
      embedded.build(name, data_dir)
    parallel.sync(f"{name}-built")
  return data_dir


def resolve_data(config, workdir: str):
  """(config with image-folder sources converted to TFDS datasets and data.num_classes /
  data.class_names taken from the labeled source, data_dir); see nsjax.data.folder."""
  data_dir = prepare_data(config, workdir)
  return folder.resolve_sources(config, workdir, data_dir), data_dir


def class_metadata(config) -> dict[str, Any]:
  """What exported models record about their classes."""
  names = list(config.data.get("class_names") or [])
  return {"class_names": names} if names else {}


def randaugment_config(noise, small_image: bool, resolution: int) -> ra.RandAugmentConfig | None:
  magnitude = noise.get("randaugment_magnitude")
  if not magnitude or not noise.get("randaugment_layers", 2):
    return None
  layers = int(noise.get("randaugment_layers", 2))
  if small_image:
    return ra.RandAugmentConfig.for_small_images(magnitude, resolution, layers)
  return ra.RandAugmentConfig(num_layers=layers, magnitude=magnitude)


def student_view_fn(stage_cfg, config):
  """(uint8 image, seed) -> the noised, normalised training view of this stage."""
  small, res = config.data.small_image, stage_cfg.resolution
  noise = stage_cfg.noise
  ra_cfg = randaugment_config(noise, small, res)
  cutout = int(noise.get("cutout", 0))
  flip = noise.get("flip", None)
  return lambda image, seed: preprocess.train_view(image, seed, res, randaugment=ra_cfg,
                                                   small_image=small, cutout=cutout, flip=flip)


def record_index_dir(workdir: str) -> str:
  """Where the record offsets of the run's TFDS files are cached (nsjax.data.random_access)."""
  return os.path.join(workdir, "record_index")


def _local(batch_size: int) -> int:
  if batch_size % jax.process_count():
    raise ValueError(f"Batch size {batch_size} is not divisible by {jax.process_count()} processes.")
  return batch_size // jax.process_count()


# ------------------------------------------------------------------------------------------------
# Model stages.

def build_model(stage_cfg, config) -> models.EfficientNet:
  overrides = dict(stage_cfg.get("model_overrides", {}) or {})
  noise = stage_cfg.noise
  for key in ("dropout_rate", "stochastic_depth_rate"):
    if noise.get(key) is not None:
      overrides[key] = noise[key]
  return models.create_model(stage_cfg.model, config.data.num_classes,
                             small_image=config.data.small_image,
                             train_resolution=stage_cfg.resolution,
                             test_resolution=stage_cfg.get("test_resolution") or stage_cfg.resolution,
                             **overrides)


def train_config(stage_cfg, config, num_labeled: int) -> ml_collections.ConfigDict:
  return loop.resolve_config(dict(stage_cfg.train), num_labeled_examples=num_labeled,
                             seed=int(config.seed) * 1000 + int(stage_cfg.get("seed_offset", 0)))


def _num_examples(src: input_pipeline.Source) -> int:
  builder = input_pipeline.load_builder(src.name, src.data_dir)
  return int(builder.info.splits[src.split].num_examples)


def stage_config(stage: Stage, config):
  if stage.kind == "teacher":
    return config.teacher
  if stage.kind == "baseline":
    return config.baseline
  return config.students[stage.iteration - 1]


def teacher_export_of(stage: Stage, config, workdir: str) -> str:
  """Iteration i learns from the (final) export of iteration i-1."""
  previous = "teacher" if stage.iteration == 1 else f"student-{stage.iteration - 1}"
  return final_export_dir(config, workdir, previous)


def training_batches(stage: Stage, config, workdir: str, data_dir: str | None, mesh,
                     cfg: ml_collections.ConfigDict):
  """(`start_step -> iterator of global batches`, online teacher or None) for a model stage.

  Labeled batches hold cfg.batch_size images; a student's unlabeled part holds
  round(unlabeled_ratio * batch_size) pseudo-labeled (or, online, raw unlabeled) images.
  Both halves get the stage's noise.
  """
  stage_cfg = stage_config(stage, config)
  labeled_src = source(config.data.labeled, data_dir)
  view = student_view_fn(stage_cfg, config)

  def labeled_fn(features, seed):
    return {"image": view(features[labeled_src.image_key], seed),
            "label": tf.cast(features["label"], tf.int32)}

  teacher, unlabeled = None, None
  if stage.kind == "student":
    unlabeled_batch = int(round(float(cfg.unlabeled_ratio) * cfg.batch_size))
    if stage_cfg.get("online_teacher", False):
      teacher = loop.Teacher.load(teacher_export_of(stage, config, workdir))
      unlabeled = _online_unlabeled(config, data_dir, stage_cfg, teacher.model, unlabeled_batch,
                                    cfg.seed, record_index_dir(workdir))
    else:
      labels_dir = stage_dir(workdir, f"label-{stage.iteration}")
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
        index_dir=record_index_dir(workdir))
    pseudo = None
    if unlabeled is not None:
      pseudo = unlabeled(start_step, position.get("unlabeled"))
    return student_input.StageBatches(labeled, pseudo, mesh)

  return batches, teacher


def train_model_stage(stage: Stage, config, workdir: str, data_dir: str | None, mesh) -> dict:
  """Teacher, student or baseline training; returns a small result dict for the state file."""
  stage_cfg = stage_config(stage, config)
  if stage.kind == "teacher" and stage_cfg.get("checkpoint"):
    return import_teacher(stage_cfg, config, workdir)
  model = build_model(stage_cfg, config)
  cfg = train_config(stage_cfg, config, _num_examples(source(config.data.labeled, data_dir)))
  if stage.kind == "student":
    check_teacher_compatible(teacher_export_of(stage, config, workdir), model, stage_cfg,
                             config.data.get("class_names"))
  batches, teacher = training_batches(stage, config, workdir, data_dir, mesh, cfg)
  eval_fn = make_eval_fn(model, config, data_dir, mesh)
  result = loop.train(cfg, model, batches, stage_dir(workdir, stage.name), eval_fn=eval_fn,
                      teacher=teacher, mesh=mesh, export_metadata=class_metadata(config))
  return {"step": int(result.step), "export_dir": result.export_dir,
          "final_metrics": {k: float(v) for k, v in result.metrics.items()
                            if np.isscalar(v) or np.ndim(v) == 0},
          **result.skipped_fields()}


def _online_unlabeled(config, data_dir, stage_cfg, teacher_model, unlabeled_batch, seed,
                      index_dir):
  """Raw unlabeled images, each as (teacher view, student view), for the in-step teacher."""
  src = source(config.data.unlabeled, data_dir)
  small = config.data.small_image
  ra_cfg = randaugment_config(stage_cfg.noise, small, stage_cfg.resolution)

  def views(features, example_seed):
    teacher_view, student_view = preprocess.teacher_and_student_views(
        features[src.image_key], example_seed, teacher_model.test_resolution, stage_cfg.resolution,
        randaugment=ra_cfg, small_image=small, cutout=int(stage_cfg.noise.get("cutout", 0)),
        flip=stage_cfg.noise.get("flip", None))
    return {"image": student_view, "teacher_image": teacher_view}

  def batches(start_step, position=None):
    # views() returns exactly {"image", "teacher_image"}: the iterator is the batches (and it
    # reports its position, since unlabeled images may fail to decode).
    return input_pipeline.train_batches(src, global_batch_size=unlabeled_batch,
                                        preprocess_fn=views, seed=seed + 1, start_step=start_step,
                                        position=position, index_dir=index_dir)

  return batches


def make_eval_fn(model, config, data_dir, mesh):
  test_src = source(config.data.test, data_dir)
  batch_size = int(config.eval.batch_size)
  return steps.make_eval_fn(model, mesh, lambda: input_pipeline.eval_batches(
      test_src, global_batch_size=batch_size,
      preprocess_fn=eval_stage_lib.eval_view_fn(model.test_resolution, config.data.small_image,
                                    test_src.image_key)))


def check_teacher_compatible(teacher_dir: str, student: models.EfficientNet, stage_cfg,
                             class_names=None) -> None:
  """The teacher must predict the student's classes; a smaller student only gets a warning."""
  description = checkpoint.read_description(teacher_dir)
  folder.check_class_names(description["metadata"].get("class_names"), class_names,
                           f"the teacher at {teacher_dir}", "the student's labeled data",
                           "Use a teacher trained on these classes (or a new workdir).")
  teacher = description["model"]
  validate.check_teacher_classes(f"The teacher at {teacher_dir}", teacher["num_classes"],
                                 student.num_classes, "the dataset's class count")
  validate.warn_if_smaller((f"the teacher at {teacher_dir}", models.model_from_config(teacher)),
                           (f"the student ({stage_cfg.model})", student))


count_params = validate.count_params  # summary rows count each model's parameters


def import_teacher(stage_cfg, config, workdir: str) -> dict:
  """A teacher from an exported (or converted official) checkpoint, re-exported into the workdir."""
  model, variables, metadata = checkpoint.load_exported(stage_cfg.checkpoint)
  validate.check_teacher_classes(f"The teacher checkpoint {stage_cfg.checkpoint}",
                                 model.num_classes, config.data.num_classes,
                                 "config.data.num_classes")
  folder.check_class_names(metadata.get("class_names"), config.data.get("class_names"),
                           f"the teacher checkpoint {stage_cfg.checkpoint}", "the labeled data",
                           "Import a teacher trained on these classes.")
  out = export_dir(workdir, "teacher")
  checkpoint.export_model(out, model, variables, dict(metadata, imported_from=stage_cfg.checkpoint))
  return {"export_dir": out, "imported_from": stage_cfg.checkpoint}


def finetune_stage(stage: Stage, config, workdir: str, data_dir, mesh) -> dict:
  """Test-resolution fine-tuning of student i on the labeled data (see nsjax/finetune.py)."""
  labeled = source(config.data.labeled, data_dir)
  return finetune.finetune(
      export_dir(workdir, f"student-{stage.iteration}"), labeled, stage_dir(workdir, stage.name),
      config.students[stage.iteration - 1].finetune, mesh=mesh,
      num_labeled=_num_examples(labeled), seed=int(config.seed) * 1000 + 500 + stage.iteration,
      eval_fn=lambda model: make_eval_fn(model, config, data_dir, mesh),
      index_dir=record_index_dir(workdir))


# ------------------------------------------------------------------------------------------------
# Labeling, evaluation, summary.

def label_stage(stage: Stage, config, workdir: str, data_dir, mesh) -> dict:
  teacher_dir = teacher_export_of(stage, config, workdir)
  out = stage_dir(workdir, stage.name)
  lcfg = config.label
  manifest = label.label_unlabeled(
      teacher_dir, source(config.data.unlabeled, data_dir), out,
      global_batch_size=int(lcfg.batch_size), mesh=mesh, small_image=config.data.small_image,
      shard_bytes=int(lcfg.shard_bytes), top_k=int(lcfg.top_k))
  bcfg = config.balance
  num_image = int(bcfg.num_image_per_class) or max(
      1, manifest["num_examples"] // config.data.num_classes)
  plan = label.plan_and_report(out, num_image, float(bcfg.min_threshold), int(config.seed))
  return {"num_examples": manifest["num_examples"], "num_skipped": manifest["num_skipped"],
          "kept": int(sum(plan.kept)), "num_image_per_class": num_image}


def eval_stage(stage: Stage, config, workdir: str, data_dir, mesh) -> dict:
  """Test top-1/top-5 of an exported model, plus the offline corruption suite if configured."""
  from nsjax.evaluate import stage as eval_lib
  model_stage = stage.name[len("eval-"):]
  test_src = source(config.data.test, data_dir)
  folder.check_class_names(
      checkpoint.read_description(final_export_dir(config, workdir, model_stage))["metadata"].get(
          "class_names"),
      folder.source_class_names(test_src), f"the {model_stage} model", "the test data",
      "Evaluate on data with the classes the model was trained on.")
  results = eval_lib.evaluate_export(
      final_export_dir(config, workdir, model_stage), test_src, mesh=mesh,
      batch_size=int(config.eval.batch_size), small_image=config.data.small_image,
      corruptions=list(config.eval.get("corruptions", [])),
      severities=list(config.eval.get("severities", [1, 2, 3, 4, 5])),
      max_corruption_examples=int(config.eval.get("max_corruption_examples", 0)),
      seed=int(config.seed))
  if jax.process_index() == 0:
    os.makedirs(stage_dir(workdir, "eval"), exist_ok=True)
    atomic_write_json(os.path.join(stage_dir(workdir, "eval"), f"{model_stage}.json"), results)
  return results


def summary_rows(config, workdir: str, state: RunState) -> list[dict]:
  rows = []
  for name in model_stage_names(config):
    model, variables, _ = checkpoint.load_exported(final_export_dir(config, workdir, name))
    results = state.result(f"eval-{name}")
    role = "teacher" if name == "teacher" else ("baseline" if name == "baseline" else "student")
    row = {"iteration": _iteration_of(name) if role != "baseline" else len(config.students),
           "role": role, "model": model.model_name, "params": count_params(model),
           "test_top1": results["top1"], "test_top5": results["top5"],
           "params_sha256": checkpoint.params_sha256(variables["params"])}
    if "corruption_top1" in results:
      row["corruption_top1"] = results["corruption_top1"]
      row["corruptions"] = results["corruptions"]
    rows.append(row)
  return rows


def skipped_images(state: RunState) -> dict[str, dict[str, int]]:
  """Undecodable images dropped per stage: unlabeled ones once each by the label stages (or, per
  epoch read, by online-teacher students), labeled ones once per epoch read by training stages."""
  unlabeled, labeled = {}, {}
  for name, result in state.data["completed"].items():
    if name.startswith("label-"):
      unlabeled[name] = result.get("num_skipped", 0)
    if "num_skipped_unlabeled" in result:
      unlabeled[name] = result["num_skipped_unlabeled"]
    if "num_skipped_labeled" in result:
      labeled[name] = result["num_skipped_labeled"]
  return {"skipped_unlabeled_images": unlabeled, "skipped_labeled_images": labeled}


def summary_stage(config, workdir: str, state: RunState, started: float) -> dict:
  rows = summary_rows(config, workdir, state)
  wall = time.time() - state.data.get("started_at", started)
  if jax.process_index() == 0:
    extra = {**skipped_images(state), "skipped_files": folder.skipped_files(workdir)}
    report.write_summary(workdir, rows, wall, extra)
    report.plot_accuracy(rows, os.path.join(workdir, "summary.png"))
    report.plot_corruptions(rows, os.path.join(workdir, "corruptions.png"))
    print(report.format_table(rows), flush=True)
    print(f"wall time {wall:.0f} s; summary.json, summary.png in {workdir}", flush=True)
  return {"wall_seconds": wall, "rows": len(rows)}


# ------------------------------------------------------------------------------------------------
# Driver.

def run(config: ml_collections.ConfigDict, workdir: str, stage: str | None = None,
        mesh=None) -> dict[str, Any]:
  """Runs the schedule (or one stage of it) in `workdir`; returns the state file's content.

  The run holds the workdir (nsjax.workdir_lock) from before it reads the state file until it
  returns: a second run, a --stage job too, stops with WorkdirBusy instead of working beside it."""
  validate.check_keys(config)  # before anything, folder conversions included
  validate.check_workdir(workdir)
  with workdir_lock.hold(workdir, stage, process_index=jax.process_index(),
                         process_count=jax.process_count()):
    return _run_held(config, workdir, stage, mesh)


def _run_held(config: ml_collections.ConfigDict, workdir: str, stage: str | None,
              mesh) -> dict[str, Any]:
  """`run` once the workdir is held."""
  # The state file keys on the config as written; image folders have their own fingerprints.
  config_fingerprint = fingerprint(config)
  state = RunState(workdir, config_fingerprint, writer=jax.process_index() == 0)
  stages = schedule(config)
  if stage is not None:
    known = [s.name for s in stages]
    if stage not in known:
      raise validate.ConfigError(f"Unknown stage {stage!r}; this schedule has: {', '.join(known)}.")
    stages = [s for s in stages if s.name == stage]
    if not _done(state, workdir, stage):
      validate.check_stage_inputs(stage, config, _completed(state, workdir))
  # Check before building any data, unless the class count itself comes from the labeled data.
  classes_known = bool(config.data.num_classes)
  if classes_known:
    validate.validate_config(config, workdir)
  config, data_dir = resolve_data(config, workdir)  # builds mnist5k / image folders (cached)
  if not classes_known:
    validate.validate_config(config, workdir)
  validate.check_datasets(config, data_dir)
  mesh = parallel.make_mesh() if mesh is None else mesh
  started = time.time()
  state.data.setdefault("started_at", started)
  preemption = loop.PreemptionWatch().start()  # SIGTERM: stop at the next step/shard/stage end
  try:
    for s in stages:
      if _done(state, workdir, s.name):
        logging.info("Stage %s already complete; skipping.", s.name)
        continue
      _stop_if_preempted(preemption, s.name)
      _run_stage(s, config, workdir, data_dir, mesh, state, started)
    preemption.acknowledge()  # a notice during the last stage: nothing is left to resume
    return state.data
  finally:
    preemption.stop()


def _done(state: RunState, workdir: str, name: str) -> bool:
  """Recorded as complete, and its folder is still there: deleting a stage's folder (the fix for
  a damaged artifact, see nsjax/artifacts.py) makes the stage run again."""
  if not state.done(name):
    return False
  if name.startswith(("eval-", "summary")):
    return True
  return tf.io.gfile.isdir(stage_dir(workdir, name))


def _completed(state: RunState, workdir: str) -> list[str]:
  return [name for name in state.data["completed"] if _done(state, workdir, name)]


def _raise_as_artifact_error(s: Stage, workdir: str, error: Exception) -> None:
  """A full disk, or a pseudo-label shard that fails to read, as one ArtifactError naming the
  path and the fix; any other error returns (the caller re-raises it unchanged)."""
  if artifacts.is_disk_full(error):
    raise artifacts.disk_full(stage_dir(workdir, s.name), error) from error
  if s.kind == "student" and isinstance(error, tf.errors.OpError):
    labels_dir = stage_dir(workdir, f"label-{s.iteration}")
    damaged = _damaged_shard(labels_dir) if tf.io.gfile.isdir(labels_dir) else None
    if damaged:
      raise artifacts.DamagedArtifact(damaged[0], damaged[1]) from error


def _damaged_shard(labels_dir: str) -> tuple[str, str] | None:
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


def _stop_if_preempted(preemption: loop.PreemptionWatch, next_stage: str) -> None:
  """Between stages every finished one is recorded, so stopping here loses nothing (every host
  reaches this boundary, so it is also a sync point of jax's preemption service)."""
  if not preemption.should_stop(0):
    return
  preemption.acknowledge()
  error = loop.Preempted(next_stage, "every earlier stage is complete", unit="the start of stage")
  error.stage = next_stage
  raise error


def _run_stage(s: Stage, config, workdir: str, data_dir, mesh, state: RunState,
               started: float) -> None:
  logging.info("Stage %s starting.", s.name)
  t0 = time.time()
  try:
    if s.kind in ("teacher", "student", "baseline"):
      result = train_model_stage(s, config, workdir, data_dir, mesh)
    elif s.kind == "finetune":
      result = finetune_stage(s, config, workdir, data_dir, mesh)
    elif s.kind == "label":
      result = label_stage(s, config, workdir, data_dir, mesh)
    elif s.kind == "eval":
      result = eval_stage(s, config, workdir, data_dir, mesh)
    else:
      result = summary_stage(config, workdir, state, started)
  except (loop.Preempted, loop.NonFiniteError) as error:
    error.stage = s.name  # for the command line's one-line message
    raise
  except artifacts.ArtifactError:
    raise
  except Exception as error:
    _raise_as_artifact_error(s, workdir, error)
    raise
  result["seconds"] = time.time() - t0
  state.mark_done(s.name, result)
  parallel.sync(f"stage-{s.name}-done")
  logging.info("Stage %s done in %.1f s.", s.name, result["seconds"])
