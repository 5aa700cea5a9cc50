"""Keep freed host memory for reuse when JAX runs on the CPU (glibc's mallopt).

XLA:CPU allocates each step's buffers with posix_memalign and frees them when the step ends. glibc
serves a large allocation with a fresh mmap and unmaps it on free -- always so for allocations
over 64 MiB made by a thread outside the main malloc arena, which is where XLA's worker threads
allocate. The next step then touches every page of its activations for the first time again: one
page fault per 4 KiB, which for a large step (EfficientNet-B0 at batch 32 and 224 px) costs
more than the arithmetic of its largest outputs.

Three settings keep freed memory in the process: one arena for all threads (M_ARENA_MAX = 1), no
mmap for large blocks (M_MMAP_MAX = 0) and no returning the heap's top to the system
(M_TRIM_THRESHOLD = SIZE_MAX). Large train and inference steps then reuse warm pages
(benchmarks/README.md has the speed-ups).

An explicit `malloc_trim(0)` undoes this: it hands every free page of the arena back to the
system, and the next steps fault them in again. protobuf's Python runtime (upb) calls it once per
10,000 freed message arenas, so hot loops must not build Python protobuf messages: the
pseudo-label writer serialises its records itself (`nsjax.data.example_proto`).

Two costs: the resident memory does not shrink after its peak, and compiling gets slower (one
arena for XLA's compiler threads too), which small runs -- the demo, the tests -- pay without
gaining anything, since their buffers are small. So the settings are applied only
- by `python -m nsjax.main` when a step of the config processes at least LARGE_STEP_PIXELS
  pixels (batch x resolution^2, see `worth_retaining`), and by benchmarks/throughput.py likewise;
- on `import nsjax` when NSJAX_RETAIN_FREED_MEMORY=1 (notebooks, scripts). NSJAX_RETAIN_FREED_MEMORY=0
  turns them off everywhere.
They only reach threads that have not allocated yet, so they must come before JAX's first
computation starts its thread pools. Skipped off glibc Linux, and when JAX is meant for an
accelerator (`JAX_PLATFORMS`, or an accelerator plugin installed: there the host's allocations
are small and one arena could slow many input threads).
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

# Per step, in images x height x width: B0 at batch 32 and 224 px is 1.6M (it gains); the demo's
# 96 x 32 x 32 is 0.1M (it would pay the slower compiles for nothing).
LARGE_STEP_PIXELS = 2 ** 20

_applied = False


def applied() -> bool:
  """Whether this process runs with the settings."""
  return _applied


def worth_retaining(pixels_per_step: int) -> bool:
  """Whether steps this large gain more from reused memory than their compiles lose."""
  return pixels_per_step >= LARGE_STEP_PIXELS


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


# ------------------------------------------------------------------------------------------------
# Transparent huge pages for malloc.
#
# Where the kernel gives transparent huge pages only on request (`madvise`, the common default),
# glibc's malloc asks for them when the process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1
# (glibc 2.35+; older versions ignore the tunable). XLA:CPU's per-step buffers then fault in 2 MiB
# pages instead of 4 KiB ones, up to 512 times fewer faults, which matters on a VM where every
# fault is expensive (benchmarks/README.md). The tunable is read at process start only, so the run
# programs start themselves again with it (`command.start_again_with_huge_pages`, called by their
# entry points only).

HUGE_PAGES_SWITCH = "NSJAX_HUGE_PAGES"
HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> str:
  """The kernel's transparent huge page mode: "always", "madvise", "never", or "" if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  chosen = [word[1:-1] for word in text.split() if word.startswith("[")]
  return chosen[0] if chosen else ""


def huge_pages_environ(environ=os.environ, mode: str | None = None) -> dict[str, str] | None:
  """The environment to start this process again with, so that malloc uses transparent huge
  pages; None where that is not needed (already set, the kernel applies them anyway or never),
  not wanted (NSJAX_HUGE_PAGES=0) or would not help (not glibc Linux, JAX meant for an
  accelerator)."""
  if environ.get(HUGE_PAGES_SWITCH, "1") == "0" or not sys.platform.startswith("linux"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if HUGETLB_TUNABLE in tunables or not jax_expects_cpu(environ):
    return None
  if (thp_mode() if mode is None else mode) != "madvise":
    return None
  try:
    ctypes.CDLL("libc.so.6").gnu_get_libc_version  # glibc, not musl
  except (OSError, AttributeError):
    return None
  setting = f"{HUGETLB_TUNABLE}=1"
  return {**environ, "GLIBC_TUNABLES": f"{tunables}:{setting}" if tunables else setting}
