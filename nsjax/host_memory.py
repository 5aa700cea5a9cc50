"""Keep freed host memory for reuse when JAX runs on the CPU (glibc's mallopt).

XLA:CPU allocates each step's buffers with posix_memalign and frees them when the step ends. glibc
serves a large allocation with a fresh mmap and unmaps it on free -- always so for allocations
over 64 MiB made by a thread outside the main malloc arena, which is where XLA's worker threads
allocate. The next step then touches every page of its activations for the first time again: one
page fault per 4 KiB. EfficientNet-B0's train step at batch 32 took about a million faults
(4 GB) per step, and a [401408, 96] matmul output spent two thirds of its time in them.

Three settings keep freed memory in the process: one arena for all threads (M_ARENA_MAX = 1), no
mmap for large blocks (M_MMAP_MAX = 0) and no returning the heap's top to the system
(M_TRIM_THRESHOLD = SIZE_MAX). The cost: the resident memory does not shrink after its peak.

They only take effect for threads that have not allocated yet, so `nsjax/__init__.py` applies them
on import, before JAX starts its thread pools: import nsjax before running any JAX computation.
Skipped off glibc Linux, when JAX is meant for an accelerator (`JAX_PLATFORMS`, or an accelerator
plugin installed: there the host's allocations are small and one arena could slow many input
threads), and when NSJAX_RETAIN_FREED_MEMORY=0.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

ENV_SWITCH = "NSJAX_RETAIN_FREED_MEMORY"

# glibc <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SIZE_MAX = -1  # mallopt takes an int; glibc stores the trim threshold as size_t: -1 is SIZE_MAX

_ACCELERATOR_MODULES = ("libtpu", "jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin")

_applied = False


def jax_expects_cpu(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator plugin exists."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_MODULES)


def retain_freed_memory(environ=os.environ) -> bool:
  """Applies the three mallopt settings where they help; True when they are in effect."""
  global _applied
  if _applied:
    return True
  if environ.get(ENV_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
    return False
  if not jax_expects_cpu(environ):
    return False
  try:
    mallopt = ctypes.CDLL("libc.so.6").mallopt
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  _applied = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _SIZE_MAX)))
  return _applied
