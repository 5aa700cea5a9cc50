"""Command line: `python -m nsjax.main --config=configs/demo.py --workdir=DIR [--stage=NAME]`
(the same as `nsjax run ...`; `--config` also takes a bundled config's name, e.g. `--config=smoke`).

Multi-host: on Cloud TPU, `jax.distributed.initialize()` needs no arguments; elsewhere pass
--coordinator_address, --num_processes and --process_id (every process runs the same command).

Exit codes: 0 done; 75 preempted (SIGTERM: the step in flight was checkpointed; rerun the same
command to resume -- EX_TEMPFAIL, so schedulers that restart failed jobs do so); 2 the config cannot
run, or another run holds the workdir (nothing was computed; one run per workdir, see
nsjax/workdir_lock.py), or an artifact a stage needs is damaged or missing (the message names the
path and the fix: which stage folder to delete before rerunning; nsjax/artifacts.py); 3 training
produced NaN/Inf (the message names the step and the last good checkpoint); 74 the disk filled
while writing an artifact (EX_IOERR; the message names the path; the last complete artifact is
intact, so a rerun after freeing space resumes); 1 anything else (with a traceback).
"""
from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from nsjax import artifacts, cli, host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: a file (configs/*.py) "
                                          "or a bundled config's name (smoke, demo, ...).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, labels and results go.")
_STAGE = flags.DEFINE_string("stage", None, "Run only this stage, e.g. teacher, label-1, student-1, "
                             "baseline, eval-student-2, summary (default: the whole schedule).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host "
                                   "outside Cloud TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "automatic settings (Cloud TPU pods).")

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again later
EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR


class _QuietLibraries:
  """Drops INFO lines from Orbax and TFDS internals; our own progress lines stay."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checked here rather than with mark_flags_as_required, which would bind every program that
  # imports this module (absl flags are process-global) to --config and --workdir.
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "python -m nsjax.main --config=configs/demo.py --workdir=/tmp/nsjax-demo")
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  # Before JAX's first computation starts its thread pools (see nsjax.host_memory).
  if host_memory.worth_retaining(pixels_per_step(_CONFIG.value)) and \
      host_memory.retain_freed_memory():
    logging.info("Large steps on the CPU: freed host memory is kept for reuse (nsjax.host_memory).")
  # JAX, TensorFlow and everything that imports them come only now, in this order: host memory
  # settings must precede JAX's thread pools, and jax.distributed must start before any computation
  # (module-level imports would run before both, and make `--help` slow).
  import jax
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")  # TF only feeds the host
  tfds.disable_progress_bar()
  from nsjax import parallel, pipeline, validate, workdir_lock
  from nsjax.train import preemption, reporter
  parallel.enable_compilation_cache()
  logging.info("JAX process %d/%d, %d devices.", jax.process_index(), jax.process_count(),
               jax.device_count())
  try:
    pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value)
  except preemption.Preempted as error:
    _exit(EXIT_PREEMPTED, f"Stage {getattr(error, 'stage', '?')}: {error}.")
  except validate.ConfigError as error:
    _exit(EXIT_BAD_CONFIG, f"Config error: {error}")
  except workdir_lock.WorkdirBusy as error:
    _exit(EXIT_BAD_CONFIG, f"Workdir busy: {error}")
  except artifacts.DiskFull as error:
    _exit(EXIT_DISK_FULL, f"Disk full: {error}")
  except artifacts.ArtifactError as error:
    _exit(EXIT_BAD_CONFIG, f"Damaged or missing artifact: {error}")
  except reporter.NonFiniteError as error:
    _exit(EXIT_NON_FINITE, f"Stage {getattr(error, 'stage', '?')} stopped: {error}")


def pixels_per_step(config) -> int:
  """The most images x height x width one train or labeling step of `config` processes; 0 for a
  config too malformed to tell (validation reports it later)."""
  try:
    stages = [(s, False) for s in (config.teacher, config.baseline) if s]
    stages += [(s, True) for s in config.students]
    most = 0
    for stage, is_student in stages:
      train = stage.get("train", {})
      images = train.get("batch_size", 0)
      if is_student:  # labeled and pseudo-labeled images in one step
        images *= 1 + float(train.get("unlabeled_ratio", 1.0))
      most = max(most, images * stage.resolution ** 2,
                 config.label.batch_size * stage.get("test_resolution", stage.resolution) ** 2)
    return int(most)
  except (AttributeError, KeyError, TypeError, ValueError):
    return 0


def _exit(code: int, message: str) -> None:
  """One clear line (no traceback) on stderr and in the log, then the documented exit code."""
  logging.error(message)
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)


if __name__ == "__main__":
  try:
    resolved_argv = cli.resolve_config_flags(sys.argv)
  except cli.ConfigNotFound as config_error:
    _exit(EXIT_BAD_CONFIG, f"Config error: {config_error}")
  app.run(main, argv=resolved_argv)
