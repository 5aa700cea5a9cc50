"""What this host's CPU can do: its model name and the vector and matrix extensions nsjax chooses by.

Read once from Linux's /proc/cpuinfo (elsewhere: nothing is known and every choice falls back to
the portable one). nsjax picks code paths by these features, never by vendor: 512-bit vectors
where AVX-512 exists (`parallel.nsjax_compiler_options`), bfloat16 operands for large matrix
products where AMX-bf16 tiles exist (`models.layers.resolve_matmul_operands`). Benchmarks record
`describe()` with every number, since a result on one CPU family says little about another.
"""
from __future__ import annotations

import functools
import platform

CPUINFO = "/proc/cpuinfo"
# The extensions that change which formulation is fastest, in the order they are reported.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16")
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8")


@functools.lru_cache
def _read(cpuinfo_path: str) -> tuple[str, frozenset[str], str]:
  """(model name, flags, "family/model") of the first processor listed; ("", {}, "") where the
  file cannot be read."""
  fields: dict[str, str] = {}
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        if not line.strip():
          if fields:
            break  # the first processor's block ends at its blank line
          continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  family, number = fields.get("cpu family", ""), fields.get("model", "")
  return (fields.get("model name", ""), frozenset(fields.get("flags", "").split()),
          f"{family}/{number}" if family and number else "")


def has(flag: str, cpuinfo_path: str = CPUINFO) -> bool:
  """Whether the CPU lists `flag` (a /proc/cpuinfo name such as "avx512f" or "amx_bf16")."""
  return flag in _read(cpuinfo_path)[1]


def describe(cpuinfo_path: str = CPUINFO) -> dict[str, object]:
  """The CPU's model, its x86 family/model numbers and the vector / matrix extensions nsjax's
  choices depend on. Cloud VMs often name only the vendor line ("AMD EPYC"); the numbers tell
  its generations apart (family 25, model 1: Zen 3, AVX2 only; family 25, model 17: Zen 4,
  AVX-512)."""
  model, flags, family_model = _read(cpuinfo_path)
  return {"model": model or platform.processor() or platform.machine(),
          "family_model": family_model,
          "vector": [f for f in VECTOR_FLAGS if f in flags],
          "matrix": [f for f in MATRIX_FLAGS if f in flags]}


# XLA's CPU client sizes its intra-op thread pool from NPROC where it is set, else from the cores
# this process may run on. The pool's size decides how reductions and matrix products are split,
# so a run's numbers depend on it: `fix_threads` makes them independent of taskset pinning.
THREADS_VARIABLE = "NPROC"


def fix_threads(threads: int | None = None) -> int:
  """Sets the thread count of XLA's CPU operations before JAX starts its CPU client: `threads`,
  else NPROC where the environment sets it, else every core of the machine (not only the ones a
  `taskset` lets this process use). Returns it."""
  import os
  if threads is None:
    threads = int(os.environ.get(THREADS_VARIABLE) or os.cpu_count() or 1)
  if threads < 1:
    raise ValueError(f"The CPU thread count must be at least 1, got {threads}.")
  os.environ[THREADS_VARIABLE] = str(threads)
  return threads


def threads() -> int:
  """The thread count of XLA's CPU operations in this process: NPROC where set, else the cores
  this process may run on (what the CPU client reads when it starts)."""
  import os
  if os.environ.get(THREADS_VARIABLE):
    return int(os.environ[THREADS_VARIABLE])
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def product_dtype(settings, backend: str = "cpu") -> str:
  """The operand dtype of large matrix products for models whose `matmul_operands` settings are
  `settings` ("auto", "float32", "bfloat16"; see models.layers.resolve_matmul_operands):
  "float32", "bfloat16", or "mixed" when the models differ."""
  amx = backend == "cpu" and has("amx_bf16")
  resolved = {"bfloat16" if s == "bfloat16" or (s == "auto" and amx) else "float32"
              for s in settings}
  return resolved.pop() if len(resolved) == 1 else "mixed" if resolved else "float32"
