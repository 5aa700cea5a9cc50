"""XLA's CPU thread count decides how a large reduction is split, hence its rounding: nsjax fixes it
at the machine's cores (NPROC), so pinning a job with taskset changes its speed, not its numbers."""
import os
import shutil
import subprocess
import sys

import pytest

from nsjax import command, cpu_features

PROBE = """
import hashlib, numpy as np, jax, jax.numpy as jnp
x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 1 << 16), np.float32))
print(hashlib.sha256(np.asarray(jax.jit(jnp.sum)(x)).tobytes()).hexdigest())
"""


def _sum_bits(threads, pin=False):
  env = dict(os.environ, NPROC=str(threads), JAX_PLATFORMS="cpu")
  prefix = ["taskset", "-c", "0"] if pin else []
  done = subprocess.run([*prefix, sys.executable, "-c", PROBE], env=env, capture_output=True,
                        text=True, timeout=600, check=True)
  return done.stdout.strip().splitlines()[-1]


def test_the_thread_count_not_the_pinning_decides_the_numbers():
  if shutil.which("taskset") is None:
    pytest.skip("taskset is not installed")
  one, two = _sum_bits(1), _sum_bits(2)
  if one == two:
    pytest.skip("this CPU's XLA does not split this reduction by threads")
  assert _sum_bits(2, pin=True) == two  # two threads on one core: the two-core numbers


def test_fix_threads_takes_the_machines_cores_unless_told(monkeypatch):
  monkeypatch.delenv("NPROC", raising=False)
  assert cpu_features.fix_threads() == os.cpu_count() and os.environ["NPROC"] == str(os.cpu_count())
  monkeypatch.setenv("NPROC", "3")
  assert cpu_features.fix_threads() == 3 and cpu_features.threads() == 3
  assert cpu_features.fix_threads(5) == 5 and os.environ["NPROC"] == "5"
  with pytest.raises(ValueError, match="at least 1"):
    cpu_features.fix_threads(0)


def test_the_commands_fix_the_thread_count_before_jax(monkeypatch):
  monkeypatch.delenv("NPROC", raising=False)
  command.before_jax(0)
  assert os.environ["NPROC"] == str(os.cpu_count())


def test_product_dtype_follows_the_settings_and_the_cpu(monkeypatch):
  monkeypatch.setattr(cpu_features, "has", lambda flag: flag == "amx_bf16")
  assert cpu_features.product_dtype(["float32", "float32"]) == "float32"
  assert cpu_features.product_dtype(["auto"]) == "bfloat16"
  assert cpu_features.product_dtype(["auto"], backend="gpu") == "float32"
  assert cpu_features.product_dtype(["auto", "float32"]) == "mixed"
  monkeypatch.setattr(cpu_features, "has", lambda flag: False)
  assert cpu_features.product_dtype(["auto"]) == "float32"
