"""nsjax's steps compile through `parallel.jit`, which asks XLA:CPU for 512-bit vectors on AVX-512."""
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsjax import cpu_features, parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, expected", [
    ("fpu vme avx2 avx512f avx512dq avx512bw", True),
    ("fpu vme avx2 fma", False),
    ("fpu avx512_bf16", False),  # another AVX-512 extension's name is not the foundation
])
def test_avx512_is_read_from_cpuinfo_flags(tmp_path, flags, expected):
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")
  assert parallel.cpu_has_avx512(str(cpuinfo)) is expected


def test_avx512_unknown_without_cpuinfo(tmp_path):
  assert parallel.cpu_has_avx512(str(tmp_path / "missing")) is False


def test_cpu_description_names_the_generation_and_the_extensions(tmp_path):
  """Benchmarks record it: a VM's model name alone ("AMD EPYC") does not tell Zen 3 from Zen 4."""
  cpuinfo = tmp_path / "cpuinfo"
  first = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx fma avx2 sse4_2\n\n")
  second = first.replace("processor\t: 0", "processor\t: 1").replace("avx2", "avx2 avx512f")
  cpuinfo.write_text(first + second)
  assert cpu_features.describe(str(cpuinfo)) == {
      "model": "AMD EPYC", "family_model": "25/1", "vector": ["avx2", "fma"], "matrix": []}
  unknown = cpu_features.describe(str(tmp_path / "missing"))
  assert unknown["family_model"] == "" and unknown["vector"] == [] and unknown["matrix"] == []


MEMORY_SCHEDULER = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def test_wide_vectors_asked_for_only_on_an_avx512_cpu_backend(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(parallel, "cpu_has_avx512", lambda: True)
  on_cpu = jax.default_backend() == "cpu"
  assert parallel.nsjax_compiler_options() == (
      {**MEMORY_SCHEDULER, "xla_cpu_prefer_vector_width": 512} if on_cpu else None)
  monkeypatch.setattr(parallel, "cpu_has_avx512", lambda: False)
  assert parallel.nsjax_compiler_options() == (MEMORY_SCHEDULER if on_cpu else None)


@pytest.mark.parametrize("flag, left", [
    ("--xla_cpu_prefer_vector_width=256", MEMORY_SCHEDULER),
    ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT", {"xla_cpu_prefer_vector_width": 512}),
    ("--xla_cpu_prefer_vector_width=256 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT", None),
])
def test_an_option_in_xla_flags_stands(monkeypatch, flag, left):
  monkeypatch.setattr(parallel, "cpu_has_avx512", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", flag)
  assert parallel.nsjax_compiler_options() == (left if jax.default_backend() == "cpu" else None)


def test_the_memory_optimized_scheduler_computes_the_same_bits():
  """Only the order of the instructions changes: a small conv net's gradients, bit for bit."""
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 4, 8)), jnp.float32)
  images = jnp.asarray(rng.standard_normal((4, 12, 12, 4)), jnp.float32)

  def loss(k, x):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jax.nn.swish(y - y.mean((0, 1, 2))) ** 2)

  grad = jax.grad(loss)
  default = jax.jit(grad).lower(kernel, images).compile()(kernel, images)
  memory = jax.jit(grad).lower(kernel, images).compile(
      compiler_options=MEMORY_SCHEDULER if jax.default_backend() == "cpu" else None)
  np.testing.assert_array_equal(np.asarray(memory(kernel, images)), np.asarray(default))


def test_parallel_jit_compiles_with_the_options(monkeypatch):
  seen = {}
  real_jit = jax.jit

  def recording_jit(fn, **kwargs):
    seen.update(kwargs)
    return real_jit(fn, **kwargs)

  monkeypatch.setattr(parallel, "nsjax_compiler_options", lambda: {"xla_cpu_prefer_vector_width": 512}
                      if jax.default_backend() == "cpu" else None)
  monkeypatch.setattr(jax, "jit", recording_jit)
  double = parallel.jit(lambda x: 2 * x, donate_argnums=())
  assert float(double(jnp.float32(3))) == 6.0
  assert seen["compiler_options"] == parallel.nsjax_compiler_options()
  assert seen["donate_argnums"] == ()
  # Options passed by the caller are added, and win where both name one.
  parallel.jit(lambda x: x, compiler_options={"xla_backend_optimization_level": 0,
                                              "xla_cpu_prefer_vector_width": 128})
  assert seen["compiler_options"] == {"xla_backend_optimization_level": 0,
                                      "xla_cpu_prefer_vector_width": 128}


def test_every_jit_in_the_library_goes_through_parallel_jit():
  offenders = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "nsjax").rglob("*.py"))
               if path.name != "parallel.py"
               for n, line in enumerate(path.read_text().splitlines(), 1) if "jax.jit" in line]
  assert not offenders, f"use nsjax.parallel.jit instead of jax.jit: {offenders}"


def test_test_workers_share_one_session_compilation_cache():
  """Under `pytest -n 2` the controller's conftest picks the cache directory before the workers
  start: a worker that made its own would compile the smoke schedule's programs again."""
  import conftest  # tests/conftest.py, loaded by pytest under this name
  cache = os.environ["NSJAX_COMPILATION_CACHE"]
  assert jax.config.jax_compilation_cache_dir == cache
  assert os.path.isdir(cache)
  if not os.environ.get("PYTEST_XDIST_WORKER"):
    pytest.skip("not a pytest-xdist worker: nothing is shared")
  assert conftest._SESSION_CACHE is None  # inherited, not made (and so not removed) here
