"""nsjax.host_memory: on the CPU, a step's freed buffers are reused instead of refaulted."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from nsjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose 96 MiB output is freed after every call (the shape of one activation
# buffer of B0's train step); the process reports the minor page faults of each call after warm-up.
_FAULTS_PER_CALL = r"""
import json, resource, sys
import nsjax
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.broadcast_to(x, (6144, 4096)) * 2.0)
x = jnp.ones((4096,), jnp.float32)
for _ in range(10):  # the heap grows to its working size (a few buffers are in flight at once)
  step(x).block_until_ready()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "applied": nsjax.host_memory.applied()}))
"""
_PAGES = 6144 * 4096 * 4 // 4096


def _faults_per_call(switch: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env[host_memory.ENV_SWITCH] = switch
  out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=env, check=True,
                       capture_output=True, text=True).stdout
  report = json.loads(out.strip().splitlines()[-1])
  report["median"] = statistics.median(report["faults"])
  return report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_not_refaulted():
  kept = _faults_per_call("1")
  default = _faults_per_call("0")
  assert kept["applied"] and not default["applied"]
  # glibc's default maps and unmaps the buffer each call: every page of it faults again.
  assert default["median"] > 0.9 * _PAGES, default
  # Kept: the typical call reuses freed pages. The heap can still grow by a buffer now and then
  # (fragmentation, or a free that lags behind the next call on a loaded machine), so the test
  # asks about the median call, not the mean.
  assert kept["median"] < 0.25 * _PAGES, kept


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "CPU"}, True),
    ({"JAX_PLATFORMS": "tpu"}, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False),
])
def test_jax_platforms_decides_whether_jax_runs_on_cpu(environ, expected):
  assert host_memory.jax_expects_cpu(environ) is expected


def test_only_large_steps_are_worth_it():
  assert host_memory.worth_retaining(32 * 224 * 224)  # B0's benchmark step
  assert not host_memory.worth_retaining(96 * 32 * 32)  # the demo's student step


def test_switch_off_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", False)
  assert host_memory.retain_freed_memory({host_memory.ENV_SWITCH: "0",
                                          "JAX_PLATFORMS": "cpu"}) is False
  assert host_memory.retain_freed_memory({"JAX_PLATFORMS": "tpu"}) is False
