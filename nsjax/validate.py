"""Config validation before any compute: one clear message per problem, naming the fix.

`check_keys` refuses every key nsjax would not read (the accepted keys are nsjax.config_lib's
defaults, `config_lib.schema()`, and the objectives' own settings), naming its full path and
the nearest accepted key.
Where a part of the config has an owner that checks it, this module asks it: the training
settings (nsjax.train.settings), a fine-tuning (nsjax.stages.finetune), an imported teacher
(nsjax.stages.teachers, whose checks the train stages run again when they read a teacher).
`validate_config` checks a schedule as written: its keys, model names, the imported teacher,
batch sizes against the device count, ranges, each stage's training settings, the workdir.
"Stages chain" means each stage can consume what the previous one produces:
  - an imported teacher (teacher.checkpoint) predicts config.data.num_classes, and teacher.model
    names the checkpoint's architecture (the checkpoint decides it; a different name is a typo);
  - every stage's `train` settings resolve in nsjax.train.settings (known keys, a run length), so a
    typo in the last student fails now, not after hours of teacher training;
  - a student is not smaller than its teacher (a warning: Noisy Student expects equal or larger);
  - the datasets' label features have config.data.num_classes classes (`check_datasets`);
  - a single stage run with --stage finds the stages it consumes complete (`check_stage_inputs`).
"""
from __future__ import annotations

import difflib
import os
import uuid

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from nsjax import config_lib, models, objectives, schedule
from nsjax.data import balance, input_pipeline, pseudo_labels
from nsjax.stages import finetune, teachers
from nsjax.train import settings


# Raised by every check here; defined in config_lib so that the stages' own checks raise it too.
ConfigError = config_lib.ConfigError


def check_keys(config) -> None:
  """Refuses the first key nsjax does not read (a typo would otherwise be silently ignored), with
  its full path and the nearest accepted key; the accepted keys are config_lib's defaults."""
  _check_node(config, config_lib.schema(models.OVERRIDABLE + ("resolution",),
                                        objectives.accepted_keys()), "")


def _check_node(node, schema, path: str) -> None:
  """Walks `node` along `schema` (see config_lib.schema); None in the schema: any value."""
  if isinstance(schema, list):
    for i, item in enumerate(node or []):
      _check_node(item, schema[0], f"{path}[{i}]")
    return
  if schema is None or not hasattr(node, "keys"):
    return
  for key in node.keys():
    where = f"{path}.{key}" if path else key
    if where in config_lib.REMOVED:
      raise ConfigError(f"config.{where} is gone: {config_lib.REMOVED[where]}.")
    if key not in schema:
      raise ConfigError(_unknown_key_message(where, key, path, schema))
    _check_node(node[key], schema[key], where)


def _unknown_key_message(where: str, key: str, path: str, schema) -> str:
  close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
  prefix = f"{path}." if path else ""
  hint = f"; did you mean {prefix}{close[0]}?" if close else "."
  return (f"Unknown config key {where}: nsjax does not read it{hint} The keys "
          f"{path or 'a config'} takes: {', '.join(sorted(schema))} (defaults and meanings in "
          "nsjax/config_lib.py). Rename or remove it.")


def _model_stages(config):
  stages = [("teacher", config.teacher)]
  stages += [(f"students[{i}]", s) for i, s in enumerate(config.students)]
  if config.get("baseline"):
    stages.append(("baseline", config.baseline))
  return stages


def _check_range(where: str, name: str, value, low, high, low_open=False, high_open=False):
  too_low = value <= low if low_open else value < low
  too_high = value >= high if high_open else value > high
  if too_low or too_high:
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    raise ConfigError(f"{where}.{name} = {value} is out of range {lo}{low}, {high}{hi}.")


def check_workdir(workdir: str) -> None:
  try:
    tf.io.gfile.makedirs(workdir)
    probe = os.path.join(workdir, f".write-test-{uuid.uuid4().hex}")
    with tf.io.gfile.GFile(probe, "w") as f:
      f.write("ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as error:
    raise ConfigError(f"The workdir {workdir} is not writable ({error}); choose a --workdir you "
                      "can write to.") from error


def validate_config(config, workdir: str) -> None:
  """Raises ConfigError for the first problem found; warns for a student smaller than its teacher."""
  check_keys(config)
  config = config_lib.with_defaults(config)
  if not config.students:
    raise ConfigError("config.students is empty: a Noisy Student schedule needs at least one "
                      "student.")
  previous = None  # (where, model) of the latest teacher or student
  for where, stage in _model_stages(config):
    if where == "teacher" and stage.checkpoint:
      previous = (where, teachers.check_imported_teacher(stage, config.data.num_classes))
      continue
    model = _check_trained_stage(where, stage, config.data.num_classes)
    if where.startswith("students") and previous is not None:
      warn_if_smaller(previous, (where, model))  # the one place this warning is given
    if not where == "baseline":
      previous = (where, model)
  _check_sections(config)
  check_workdir(workdir)


def check_divisible(where: str, value: int, what: str = "") -> None:
  """The one check that a global batch splits evenly over this run's devices."""
  num_devices = jax.device_count()
  if int(value) % num_devices:
    raise ConfigError(f"{where}{what or f' = {value}'} is not divisible by the {num_devices} "
                      f"devices; use a multiple of {num_devices}.")


def _check_trained_stage(where: str, stage, num_classes: int) -> models.EfficientNet:
  """A stage that trains: its model, batch sizes, training and fine-tuning settings."""
  if stage.model not in models.MODEL_SPECS:
    raise ConfigError(f"{where}.model: unknown model {stage.model!r}. Valid models: "
                      f"{', '.join(models.MODEL_SPECS)}.")
  train = stage.train
  batch = int(train.batch_size)
  check_divisible(f"{where}.train.batch_size", batch)
  ratio = float(train.unlabeled_ratio)
  _check_range(where, "train.unlabeled_ratio", ratio, 0.0, 1000.0)
  if where.startswith("students"):
    if ratio <= 0:
      raise ConfigError(f"{where}.train.unlabeled_ratio must be > 0 for a student.")
    check_divisible(where, round(ratio * batch),
                    f": the unlabeled batch ({ratio} x {batch} = {round(ratio * batch)})")
  _check_train_settings(where, train)  # temperature, label smoothing, soft/hard included
  try:
    model = models.create_model(stage.model, num_classes, **dict(stage.model_overrides or {}))
  except ValueError as error:
    raise ConfigError(f"{where}: {error}") from error
  if stage.get("finetune"):
    _check_finetune(f"{where}.finetune", stage.finetune)
  return model


def _check_finetune(where: str, ft) -> None:
  try:
    finetune.check_config(ft, where)
  except ValueError as error:
    raise ConfigError(str(error)) from error
  check_divisible(f"{where}.batch_size", int(ft.batch_size))


def _check_sections(config) -> None:
  """The label, balance and eval sections."""
  _check_range("balance", "min_threshold", float(config.balance.min_threshold), 0.0, 1.0,
               high_open=True)
  if int(config.balance.num_image_per_class) < balance.KEEP_ALL:
    raise ConfigError(f"balance.num_image_per_class = {config.balance.num_image_per_class}: use a "
                      "count >= 1, 0 (unlabeled images / classes) or -1 (every image once, "
                      "unbalanced).")
  check_divisible("label.batch_size", config.label.batch_size)
  if not 1 <= int(config.label.shard_bytes) <= pseudo_labels.MAX_SHARD_BYTES:
    raise ConfigError(f"label.shard_bytes = {config.label.shard_bytes}: use 1 .. 2**31 bytes "
                      "(record offsets are stored as 32-bit numbers; 256 MiB is the default).")
  check_divisible("eval.batch_size", config.eval.batch_size)


def _check_train_settings(where: str, train) -> None:
  try:  # the labeled set size is only known once the data is there; any size checks the rest
    settings.resolve_config(dict(train), num_labeled_examples=int(train.batch_size))
  except ValueError as error:
    raise ConfigError(f"{where}.train: {error}") from error


def check_datasets(config, data_dir: str | None) -> None:
  """The labeled and test sets must have config.data.num_classes classes (before training)."""
  num_classes = config.data.num_classes
  for key in ("labeled", "test"):
    src = config.data[key]
    try:
      builder = input_pipeline.load_builder(src.name, src.get("data_dir") or data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
      raise ConfigError(f"config.data.{key}.name: unknown TFDS dataset {src.name!r} ({error}).") \
          from error
    label = builder.info.features["label"] if "label" in builder.info.features else None
    found = getattr(label, "num_classes", None)
    if found is not None and found != num_classes:
      raise ConfigError(f"config.data.{key} ({src.name}) has {found} classes but "
                        f"config.data.num_classes is {num_classes}; make them agree.")


def check_stage_inputs(stage_name: str, config, completed) -> None:
  """A stage run alone (--stage) needs the stages it reads to be complete in this workdir."""
  missing = [n for n in schedule.stage_inputs(stage_name, config) if n not in completed]
  if missing:
    raise ConfigError(f"Stage {stage_name} reads the output of {', '.join(missing)}, which "
                      "this workdir has not completed; run those stages first (or run the whole "
                      "schedule without --stage).")


def warn_if_smaller(teacher, student) -> None:
  """(where, model) pairs: a student smaller than its teacher only gets a warning, since the
  method allows it but the paper's gains come from equal or larger students."""
  (t_where, t_model), (s_where, s_model) = teacher, student
  t, s = models.count_params(t_model), models.count_params(s_model)
  if s < t:
    logging.warning("%s (%s, %d params) is smaller than its teacher %s (%s, %d params); Noisy "
                    "Student expects an equal or larger student.", s_where, s_model.model_name, s,
                    t_where, t_model.model_name, t)
