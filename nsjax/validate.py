"""Config validation before any compute: one clear message per problem, naming the fix."""
from __future__ import annotations

import os
import uuid

import jax
import tensorflow as tf
from absl import logging

from nsjax import checkpoint, models


class ConfigError(ValueError):
  """The config cannot run as written."""


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
  if not config.students:
    raise ConfigError("config.students is empty: a Noisy Student schedule needs at least one "
                      "student.")
  host_input = config.data.get("host_input", "global")
  if host_input not in ("global", "split"):
    raise ConfigError(f"config.data.host_input = {host_input!r}; use 'global' (the same batches on "
                      "any number of hosts) or 'split' (each host reads only its slice).")
  num_devices = jax.device_count()
  num_classes = config.data.num_classes
  previous = None
  for where, stage in _model_stages(config):
    if where == "teacher" and stage.get("checkpoint"):
      path = stage.checkpoint
      if not checkpoint.is_exported(path):
        raise ConfigError(f"teacher.checkpoint {path} holds no exported model (model.json + "
                          "variables/). Convert an official checkpoint with `python -m "
                          "nsjax.tools.convert_checkpoint`, or point to a stage's export/ folder.")
      teacher = checkpoint.read_description(path)["model"]
      if teacher["num_classes"] != num_classes:
        raise ConfigError(f"teacher.checkpoint {path} predicts {teacher['num_classes']} classes but "
                          f"config.data.num_classes is {num_classes}.")
      previous = (where, models.model_from_config(teacher))
      continue
    if stage.model not in models.MODEL_SPECS:
      raise ConfigError(f"{where}.model: unknown model {stage.model!r}. Valid models: "
                        f"{', '.join(models.MODEL_SPECS)}.")
    train = stage.train
    batch = int(train.batch_size)
    if batch % num_devices:
      raise ConfigError(f"{where}.train.batch_size = {batch} is not divisible by the {num_devices} "
                        f"devices; use a multiple of {num_devices}.")
    ratio = float(train.get("unlabeled_ratio", 1.0))
    _check_range(where, "train.unlabeled_ratio", ratio, 0.0, 1000.0)
    if where.startswith("students"):
      if ratio <= 0:
        raise ConfigError(f"{where}.train.unlabeled_ratio must be > 0 for a student.")
      unlabeled_batch = round(ratio * batch)
      if unlabeled_batch % num_devices:
        raise ConfigError(f"{where}: the unlabeled batch ({ratio} x {batch} = {unlabeled_batch}) "
                          f"is not divisible by the {num_devices} devices.")
    _check_range(where, "train.temperature", float(train.get("temperature", 1.0)), 0.0, 100.0,
                 low_open=True)
    _check_range(where, "train.label_smoothing", float(train.get("label_smoothing", 0.1)), 0.0,
                 1.0, high_open=True)
    try:
      model = models.create_model(stage.model, num_classes,
                                  **dict(stage.get("model_overrides", {}) or {}))
    except ValueError as error:
      raise ConfigError(f"{where}: {error}") from error
    if stage.get("finetune"):
      from nsjax import finetune
      try:
        finetune.check_config(stage.finetune, num_devices, f"{where}.finetune")
      except ValueError as error:
        raise ConfigError(str(error)) from error
    if where.startswith("students") and previous is not None:
      _warn_if_smaller(previous, (where, model))
    if not where == "baseline":
      previous = (where, model)
  _check_range("balance", "min_threshold", float(config.balance.min_threshold), 0.0, 1.0,
               high_open=True)
  if config.label.batch_size % num_devices:
    raise ConfigError(f"label.batch_size = {config.label.batch_size} is not divisible by the "
                      f"{num_devices} devices.")
  if config.eval.batch_size % num_devices:
    raise ConfigError(f"eval.batch_size = {config.eval.batch_size} is not divisible by the "
                      f"{num_devices} devices.")
  check_workdir(workdir)


def _warn_if_smaller(teacher, student) -> None:
  from nsjax.pipeline import count_params
  (t_where, t_model), (s_where, s_model) = teacher, student
  t, s = count_params(t_model), count_params(s_model)
  if s < t:
    logging.warning("%s (%s, %d params) is smaller than its teacher %s (%s, %d params); Noisy "
                    "Student expects an equal or larger student.", s_where, s_model.model_name, s,
                    t_where, t_model.model_name, t)
