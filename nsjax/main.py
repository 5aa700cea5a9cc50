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

import sys

from absl import app, flags

from nsjax import command, config_flag

_CONFIG = config_flag.define_config_flag(
    "Experiment config: a file (configs/*.py) or a bundled config's name (smoke, demo, ...); "
    "--config.a.b=value overrides any key.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, labels and results go.")
_STAGE = flags.DEFINE_string("stage", None, "Run only this stage, e.g. teacher, label-1, student-1, "
                             "baseline, eval-student-2, summary (default: the whole schedule).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host "
                                   "outside Cloud TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with "
                                 "automatic settings (Cloud TPU pods).")

EXIT_PREEMPTED = command.EXIT_PREEMPTED
EXIT_BAD_CONFIG = command.EXIT_BAD_CONFIG
EXIT_NON_FINITE = command.EXIT_NON_FINITE
EXIT_DISK_FULL = command.EXIT_DISK_FULL


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checked here rather than with mark_flags_as_required, which would bind every program that
  # imports this module (absl flags are process-global) to --config and --workdir.
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "python -m nsjax.main --config=configs/demo.py --workdir=/tmp/nsjax-demo")
  command.before_jax(pixels_per_step(_CONFIG.value))
  import jax
  if _COORDINATOR.value or _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  command.after_jax()
  from nsjax import pipeline
  command.freeze_startup_objects()
  command.run_with_exit_codes(
      lambda: pipeline.run(_CONFIG.value, _WORKDIR.value, stage=_STAGE.value,
                           compile_ahead=True))


pixels_per_step = command.pixels_per_step


if __name__ == "__main__":
  command.start_again_with_huge_pages()
  app.run(main, argv=config_flag.resolve_config_flags_or_exit(sys.argv))
