"""The one parallel code path: `jax.jit` over a 1-D `data` mesh with `NamedSharding`.

Batches are sharded along their leading axis over `data`. Parameters are replicated by default;
`fsdp_sharding` shards each large array's biggest divisible axis over `data` instead (for L1/L2).
"""
from __future__ import annotations

import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import distributed  # the coordination client; no public API for its barrier
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nsjax import cpu_features

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over all (or the first `num_devices`) global devices, with Auto axis types.

  Auto (not Explicit) axis types keep sharding a property of the arrays and of jit's in/out
  shardings, as in pjit; jax>=0.7 defaults `make_mesh` to Explicit.
  """
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"Asked for a mesh of {num_devices} devices but only {len(devices)} exist.")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def stacked_data_sharding(mesh: Mesh) -> NamedSharding:
  """Several batches stacked on a new leading axis (steps of one call): their batch axis, the
  second, split over the data axis."""
  return NamedSharding(mesh, P(None, DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int = 2**14) -> P:
  """Shard the largest axis divisible by `num_shards`; small or indivisible arrays stay replicated."""
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def tree_shardings(mesh: Mesh, abstract_tree: Any, fsdp: bool = False) -> Any:
  """Shardings for a pytree of arrays / ShapeDtypeStructs: replicated, or FSDP over `data`."""
  n = mesh.shape[DATA_AXIS]

  def one(x):
    if not fsdp or not hasattr(x, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(tuple(x.shape), n))

  return jax.tree.map(one, abstract_tree)


def global_batch_from_local(local_batch: Any, mesh: Mesh) -> Any:
  """Per-process numpy batch (leading axis = local batch) -> global `jax.Array`s sharded over data."""
  sharding = data_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def local_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """The slice of a global batch that this process feeds; checks divisibility up front."""
  num_devices = mesh.size if mesh is not None else jax.device_count()
  if global_batch_size % num_devices:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the number of "
                     f"devices ({num_devices}); choose a multiple of {num_devices}.")
  return global_batch_size // jax.process_count()


def local_share(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of this process's contiguous share of `num_examples` rows (larger shares first)."""
  base, extra = divmod(num_examples, process_count)
  start = process_index * base + min(process_index, extra)
  return start, start + base + int(process_index < extra)


def process_local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in local-batch order (inverse of
  `global_batch_from_local`)."""
  if jax.process_count() == 1:
    return np.asarray(x)
  seen, parts = set(), []
  for shard in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = shard.index[0].start or 0
    if start not in seen:  # replicas of the same rows on several local devices
      seen.add(start)
      parts.append(np.asarray(shard.data))
  return np.concatenate(parts)


def to_global_batch(batch: Any, mesh: Mesh) -> Any:
  """numpy leaves: this process's slice -> global arrays; jax.Arrays: (re)placed on `data`."""
  sharding = data_sharding(mesh)

  def one(x):
    if isinstance(x, jax.Array):
      return x if x.sharding.is_equivalent_to(sharding, x.ndim) else jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(one, batch)


def to_global_batches(batches: list[Any], mesh: Mesh) -> Any:
  """Batches for one call of several steps (each as `to_global_batch` takes it) -> one tree of
  global arrays, stacked on a new leading axis, batch axis sharded over `data`."""
  sharding = stacked_data_sharding(mesh)

  def one(*xs):
    if all(isinstance(x, jax.Array) for x in xs):
      return jax.device_put(jnp.stack(xs), sharding)
    return jax.make_array_from_process_local_data(sharding, np.stack([np.asarray(x) for x in xs]))

  return jax.tree.map(one, *batches)


def sync(name: str) -> None:
  """A barrier across hosts (no-op on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_HOST_BARRIERS = itertools.count()


def host_barrier(name: str, timeout_s: int = 3600) -> None:
  """A barrier through jax.distributed's coordination service, not a device computation: safe to
  call while a stage's computations are in flight (a device barrier there can interleave with
  them differently on each host, and gloo's collectives then wait for each other forever). Every
  process must call it the same number of times in the same order (ids are numbered)."""
  client = distributed.global_state.client
  if jax.process_count() == 1 or client is None:
    return
  client.wait_at_barrier(f"nsjax-{name}-{next(_HOST_BARRIERS)}", timeout_s * 1000)


CPU_VECTOR_WIDTH_OPTION = "xla_cpu_prefer_vector_width"


def cpu_has_avx512(cpuinfo_path: str = cpu_features.CPUINFO) -> bool:
  """Whether this host's CPU has AVX-512 (Linux /proc/cpuinfo; False where it cannot tell)."""
  return cpu_features.has("avx512f", cpuinfo_path)


CPU_SCHEDULER_OPTION = "xla_cpu_scheduler_type"
CPU_MEMORY_OPTIMIZED_SCHEDULER = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def nsjax_compiler_options() -> dict[str, Any] | None:
  """XLA options for nsjax's jitted steps on a CPU backend (accelerators: None).

  - The memory-optimized instruction scheduler, on every CPU: XLA:CPU's default order keeps more
    buffers alive at once, and a step that touches less memory runs faster; the programs compute
    the same values bit for bit, and compile sooner (benchmarks/README.md).
  - 512-bit vectors where the CPU has AVX-512. XLA:CPU generates its loops (elementwise passes,
    the depthwise and stem taps) for 256-bit vectors by default, a guard against the clock
    throttling of early AVX-512 Intel parts; twice the width speeds up those loops (inference
    more than the train step, which is mostly matrix products).
  An option set in XLA_FLAGS stands: then nsjax does not add its own.
  """
  if jax.default_backend() != "cpu":
    return None
  xla_flags = os.environ.get("XLA_FLAGS", "")
  options: dict[str, Any] = {}
  if CPU_SCHEDULER_OPTION not in xla_flags:
    options[CPU_SCHEDULER_OPTION] = CPU_MEMORY_OPTIMIZED_SCHEDULER
  if CPU_VECTOR_WIDTH_OPTION not in xla_flags and cpu_has_avx512():
    options[CPU_VECTOR_WIDTH_OPTION] = 512
  return options or None


def jit(fn, compiler_options: dict[str, Any] | None = None, **kwargs):
  """`jax.jit` plus `nsjax_compiler_options()` (options passed here win); every nsjax step."""
  options = {**(nsjax_compiler_options() or {}), **(compiler_options or {})}
  return jax.jit(fn, compiler_options=options or None, **kwargs)


def enable_compilation_cache(directory: str | None = None) -> str | None:
  """Persists XLA compilations across processes (reruns, stages run as jobs, test sessions).

  Directory: the argument, else $NSJAX_COMPILATION_CACHE, else ~/.cache/nsjax/jax_cache; the env
  var set to "" disables it. On a small CPU, loading a program from the cache takes a fraction
  of compiling it.
  """
  if directory is None:
    directory = os.environ.get("NSJAX_COMPILATION_CACHE",
                               os.path.join(os.path.expanduser("~"), ".cache", "nsjax", "jax_cache"))
  if not directory:
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory
