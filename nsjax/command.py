"""What nsjax's run commands (`nsjax.main`, `nsjax.study`) share: the process set-up around JAX's
start, and one clear line plus a documented exit code for each known way a run stops (the codes
are listed in nsjax/main.py's docstring).

This module defines no flags (absl flags are process-global), so both commands can import it.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Any, Callable

from absl import logging

from nsjax import cpu_features, host_memory

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: try again later
EXIT_BAD_CONFIG = 2
EXIT_NON_FINITE = 3
EXIT_DISK_FULL = 74  # sysexits.h EX_IOERR


class QuietLibraries:
  """Drops INFO lines from Orbax and TFDS internals; our own progress lines stay."""

  def filter(self, record):
    noisy = ("/orbax/", "/tensorflow_datasets/", "/etils/")
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def before_jax(pixels: int) -> None:
  """Quiet logs; XLA's CPU thread count fixed (cpu_features.fix_threads); for steps of `pixels`
  (images x height x width) large enough, keep freed host memory. Call before JAX's first
  computation starts its thread pools. (Huge pages are the
  programs' own first step, start_again_with_huge_pages: a library call must never restart the
  process that called it, e.g. pytest.)"""
  import logging as py_logging
  py_logging.getLogger("absl").addFilter(QuietLibraries())
  threads = cpu_features.fix_threads()
  logging.info("XLA's CPU operations use %d threads (%s; a run's numbers depend on it, not on "
               "taskset pinning).", threads, cpu_features.THREADS_VARIABLE)
  if host_memory.HUGETLB_TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
    logging.info("malloc asks for transparent huge pages (GLIBC_TUNABLES=%s; NSJAX_HUGE_PAGES=0 "
                 "turns this off).", os.environ["GLIBC_TUNABLES"])
  if host_memory.worth_retaining(pixels) and host_memory.retain_freed_memory():
    logging.info("Large steps on the CPU: freed host memory is kept for reuse (nsjax.host_memory).")


def start_again_with_huge_pages() -> None:
  """Replaces this process by the same command with malloc's transparent huge pages, where they
  are wanted and not yet on (nsjax.host_memory.huge_pages_environ); otherwise returns.

  Only a program's entry point calls this (`python -m nsjax.main`, `python -m nsjax.study`,
  `nsjax run`), never a main() that tests or notebooks call in process: it re-executes
  sys.orig_argv, which there is pytest's or the kernel's command line."""
  environ = host_memory.huge_pages_environ()
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


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


def after_jax() -> None:
  """TensorFlow only feeds the host; no progress bars; the persistent XLA compilation cache."""
  import jax
  import tensorflow as tf
  import tensorflow_datasets as tfds
  tf.config.set_visible_devices([], "GPU")
  tfds.disable_progress_bar()
  from nsjax import parallel
  parallel.enable_compilation_cache()
  logging.info("JAX process %d/%d, %d devices.", jax.process_index(), jax.process_count(),
               jax.device_count())


def freeze_startup_objects() -> None:
  """Takes what the imports made (JAX, TensorFlow, TFDS, flax, Orbax: ~540k objects, all living
  as long as the process) out of the garbage collector's view. Every full collection walked them
  again, ~0.3 s each with the GIL held; the demo ran 16, ~5 s. Objects made later are collected
  as usual. Commands call it once their modules are imported, before the first stage."""
  gc.collect()
  gc.freeze()


def _known_stops() -> tuple:
  """(exception type, exit code, message) for each documented way a run stops, most specific
  first (DiskFull is an ArtifactError)."""
  from nsjax import artifacts, validate, workdir_lock
  from nsjax.train import preemption, reporter
  stage = lambda error: getattr(error, "stage", "?")
  return (
      (preemption.Preempted, EXIT_PREEMPTED, lambda e: f"Stage {stage(e)}: {e}."),
      (validate.ConfigError, EXIT_BAD_CONFIG, lambda e: f"Config error: {e}"),
      (workdir_lock.WorkdirBusy, EXIT_BAD_CONFIG, lambda e: f"Workdir busy: {e}"),
      (artifacts.DiskFull, EXIT_DISK_FULL, lambda e: f"Disk full: {e}"),
      (artifacts.ArtifactError, EXIT_BAD_CONFIG, lambda e: f"Damaged or missing artifact: {e}"),
      (reporter.NonFiniteError, EXIT_NON_FINITE, lambda e: f"Stage {stage(e)} stopped: {e}"),
  )


def run_with_exit_codes(fn: Callable[[], Any]) -> Any:
  """`fn()`, with each known stop turned into one line on stderr and its exit code."""
  stops = _known_stops()
  try:
    return fn()
  except tuple(kind for kind, _, _ in stops) as error:
    code, message = next((code, message(error)) for kind, code, message in stops
                         if isinstance(error, kind))
    exit_with(code, message)


def exit_with(code: int, message: str) -> None:
  """One clear line (no traceback) on stderr and in the log, then the documented exit code."""
  logging.error(message)
  print(message, file=sys.stderr, flush=True)
  sys.exit(code)
