"""The driver: runs a Noisy Student schedule (nsjax.schedule) stage by stage in a workdir.

Data flows config -> schedule -> stage -> artifact: `run` validates the config (nsjax.validate),
prepares the data, then hands each stage of `schedule(config)` to its runner
(nsjax.stages.registry).
Stages talk only through artifacts in the workdir (exported models, pseudo-label shards, JSON), and
each is recorded in state.json when complete: rerunning the same command skips finished stages and
resumes the interrupted one from its own checkpoints or shards. `run(config, workdir, stage=...)`
runs one stage (for pod users who run each stage as its own job).

Preemption: a SIGTERM stops the run at the next training step (checkpointed), pseudo-label shard, or
stage boundary with `nsjax.train.preemption.Preempted` ("preempted at step N ...; rerun the same
command to resume"); `nsjax.main` turns it into exit code 75. A SIGKILL loses at most the work since
the last checkpoint or shard: every artifact is written under a temporary name and renamed.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import tensorflow as tf
from absl import logging

from nsjax import artifacts, config_lib, parallel, validate, workdir_lock
from nsjax.data import embedded, folder
from nsjax.run_state import RunState
from nsjax.schedule import (Stage, export_dir, final_export_dir, fingerprint, model_stage_names,
                            schedule, stage_config, stage_dir)
from nsjax.stages import registry
from nsjax.stages import train as train_stage
from nsjax.stages.context import Context
from nsjax.train.preemption import Preempted, PreemptionWatch
from nsjax.train.reporter import NonFiniteError

# The schedule's names are re-exported: callers (the CLI, notebooks, studies) reach them here.
__all__ = ["run", "prepare_data", "resolve_data", "Stage", "schedule", "stage_config", "stage_dir",
           "export_dir", "final_export_dir", "model_stage_names", "fingerprint"]


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


def run(config: ml_collections.ConfigDict, workdir: str, stage: str | None = None,
        mesh=None, compile_ahead: bool = False) -> dict[str, Any]:
  """Runs the schedule (or one stage of it) in `workdir`; returns the state file's content.

  The run holds the workdir (nsjax.workdir_lock) from before it reads the state file until it
  returns: a second run, a --stage job too, stops with WorkdirBusy instead of working beside it.
  `compile_ahead`: before the first stage, start compiling every model stage's train step in the
  background, in schedule order (`nsjax.train.compile_ahead`): each compiles while the stages
  before it run and its own stage sets up, instead of at its first step (the commands do; a
  library call that stops early, e.g. in a test, would compile for nothing)."""
  validate.check_keys(config)  # before anything, folder conversions included
  validate.check_workdir(workdir)
  with workdir_lock.hold(workdir, stage, process_index=jax.process_index(),
                         process_count=jax.process_count()):
    return _run_held(config, workdir, stage, mesh, compile_ahead)


def _compile_ahead(stages: list[Stage], ctx: Context) -> None:
  """Starts the train step of every model stage still to run, in schedule order. Only time
  depends on it: a stage whose program could not be started compiles it at its first call (and
  meets any error there, in its own context)."""
  trained = set(model_stage_names(ctx.config))
  for s in stages:
    if s.name in trained and not _done(ctx.state, ctx.workdir, s.name):
      try:
        train_stage.compile_ahead(s, ctx)
      except Exception as error:  # noqa: BLE001 -- see the docstring
        logging.warning("Stage %s: its train step is not compiled ahead (%s: %s); it compiles "
                        "at its first step.", s.name, type(error).__name__, error)


def _run_held(config: ml_collections.ConfigDict, workdir: str, stage: str | None,
              mesh, compile_ahead: bool = False) -> dict[str, Any]:
  """`run` once the workdir is held."""
  # The state file keys on the config as written; image folders have their own fingerprints.
  config_fingerprint = fingerprint(config)
  config = config_lib.with_defaults(config)  # from here on, every key is there to read
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
  preemption = PreemptionWatch().start()  # SIGTERM: stop at the next step/shard/stage end
  try:
    if compile_ahead:
      _compile_ahead(stages, Context(config, workdir, data_dir, mesh, state, started))
    for s in stages:
      if _done(state, workdir, s.name):
        logging.info("Stage %s already complete; skipping.", s.name)
        continue
      _stop_if_preempted(preemption, s.name)
      _run_stage(s, Context(config, workdir, data_dir, mesh, state, started))
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
    damaged = train_stage.damaged_shard(labels_dir) if tf.io.gfile.isdir(labels_dir) else None
    if damaged:
      raise artifacts.DamagedArtifact(damaged[0], damaged[1]) from error


def _stop_if_preempted(preemption: PreemptionWatch, next_stage: str) -> None:
  """Between stages every finished one is recorded, so stopping here loses nothing (every host
  reaches this boundary, so it is also a sync point of jax's preemption service)."""
  if not preemption.should_stop(0):
    return
  preemption.acknowledge()
  error = Preempted(next_stage, "every earlier stage is complete", unit="the start of stage")
  error.stage = next_stage
  raise error


def _run_stage(s: Stage, ctx: Context) -> None:
  logging.info("Stage %s starting.", s.name)
  t0 = time.time()
  try:
    result = registry.RUNNERS[s.kind](s, ctx)
  except (Preempted, NonFiniteError) as error:
    error.stage = s.name  # for the command line's one-line message
    raise
  except artifacts.ArtifactError:
    raise
  except Exception as error:
    _raise_as_artifact_error(s, ctx.workdir, error)
    raise
  result["seconds"] = time.time() - t0
  ctx.state.mark_done(s.name, result)
  parallel.sync(f"stage-{s.name}-done")
  logging.info("Stage %s done in %.1f s.", s.name, result["seconds"])
