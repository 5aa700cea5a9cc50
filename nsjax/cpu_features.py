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
def _read(cpuinfo_path: str) -> tuple[str, frozenset[str]]:
  """(model name, flags) of the first processor listed; ("", {}) where the file cannot be read."""
  model, flags = "", frozenset()
  try:
    with open(cpuinfo_path) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = frozenset(value.split())
        if model and flags:
          break
  except OSError:
    pass
  return model, flags


def has(flag: str, cpuinfo_path: str = CPUINFO) -> bool:
  """Whether the CPU lists `flag` (a /proc/cpuinfo name such as "avx512f" or "amx_bf16")."""
  return flag in _read(cpuinfo_path)[1]


def describe(cpuinfo_path: str = CPUINFO) -> dict[str, object]:
  """The CPU's model and the vector / matrix extensions nsjax's choices depend on."""
  model, flags = _read(cpuinfo_path)
  return {"model": model or platform.processor() or platform.machine(),
          "vector": [f for f in VECTOR_FLAGS if f in flags],
          "matrix": [f for f in MATRIX_FLAGS if f in flags]}
