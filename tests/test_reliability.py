"""Reliability: SIGTERM preemption, bitwise-exact resume after SIGKILL, corrupt unlabeled data.

The SIGKILL tests run `nsjax.main` in subprocesses through a tiny wrapper that kills its own
process (SIGKILL: no handler, no cleanup, like a lost VM) at a chosen point of a chosen stage, so
the kill lands exactly where the test says instead of wherever a poll happens to catch it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from nsjax import checkpoint, models, pipeline
from nsjax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs nsjax.main; NSJAX_TEST_KILL="<stage>:<n>" SIGKILLs the process after training step n of that
# stage (once checkpoint <= n is on disk) or after the label stage's n-th shard is recorded.
_WRAPPER = r"""
import os, signal, sys
from absl import app
from nsjax import main
from nsjax.data import pseudo_labels
from nsjax.train import loop

kill = os.environ.get("NSJAX_TEST_KILL")
if kill:
  stage, n = kill.split(":"); n = int(n)
  def die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
  if stage.startswith("label"):
    write_shard = pseudo_labels.HostShardWriter.write_shard
    def write_then_die(self, *args, **kwargs):
      name = write_shard(self, *args, **kwargs)
      if os.path.basename(self.directory) == stage and self.num_shards_done == n:
        die()
      return name
    pseudo_labels.HostShardWriter.write_shard = write_then_die
  else:
    add = loop._Reporter.add
    def add_then_die(self, step, metrics):
      add(self, step, metrics)
      if self.checkpoints.directory.parent.name == stage and step == n:
        self.checkpoints.wait()
        die()
    loop._Reporter.add = add_then_die
app.run(main.main)
"""


def run_main(workdir, kill=None, extra_flags=(), timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
  env.pop("NSJAX_TEST_KILL", None)
  if kill:
    env["NSJAX_TEST_KILL"] = kill
  command = [sys.executable, "-c", _WRAPPER, "--config=" + os.path.join(ROOT, "configs", "smoke.py"),
             "--workdir=" + str(workdir), *extra_flags]
  return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def summary_hashes(workdir):
  with open(os.path.join(workdir, "summary.json")) as f:
    rows = json.load(f)["iterations"]
  return {(r["iteration"], r["role"]): r["params_sha256"] for r in rows}


def completed(workdir):
  path = os.path.join(workdir, "state.json")
  if not os.path.exists(path):
    return set()
  with open(path) as f:
    return set(json.load(f)["completed"])


@pytest.mark.slow
def test_sigkill_in_teacher_labeling_and_student_resumes_bitwise(tmp_path):
  reference = tmp_path / "reference"
  done = run_main(reference)
  assert done.returncode == 0, done.stderr[-3000:]

  killed = tmp_path / "killed"
  # configs/smoke.py: 12 steps per model stage, checkpoints every 6; 512 unlabeled images in
  # shards of 2 x 128.
  for kill, finished_before in (("teacher:9", set()), ("label-1:1", {"teacher"}),
                                ("student-1:9", {"teacher", "label-1"})):
    result = run_main(killed, kill=kill)
    assert result.returncode == -signal.SIGKILL, (kill, result.stderr[-3000:])
    assert completed(killed) == finished_before, kill
  manifest = json.load(open(killed / "label-1" / "manifest-h000.json"))
  assert manifest["complete"] and len(manifest["shards"]) == 2
  assert sorted(os.listdir(killed / "student-1" / "checkpoints")) == ["12", "6"]
  result = run_main(killed)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Restored step 6" in result.stderr  # the student resumed from its checkpoint

  expected = summary_hashes(reference)
  assert len(expected) == 2 and len(set(expected.values())) == 2
  assert summary_hashes(killed) == expected


# --- SIGTERM preemption (in process) ------------------------------------------------------------

class SmallNet(nn.Module):
  """Compiles in seconds; the loop only needs `num_classes`."""
  num_classes: int = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=(2, 2))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Dropout(0.2, deterministic=not train)(jnp.mean(nn.relu(x), axis=(1, 2)))
    return nn.Dense(self.num_classes)(x)


TRAIN = dict(batch_size=8, num_train_steps=10, steps_per_epoch=5, optimizer="adamw",
             base_learning_rate=0.1, warmup_epochs=0.5, log_every_steps=5,
             checkpoint_every_steps=4, export=False)


def tiny_batches(start_step, sigterm_at=None):
  """Update s trains on a batch that depends on s only; SIGTERM arrives while fetching batch
  `sigterm_at`, i.e. during update `sigterm_at - 1` in a real (prefetching) pipeline."""
  step = start_step
  while True:
    rng = np.random.default_rng(step)
    if step == sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    yield {"labeled": {"image": rng.normal(size=(8, 8, 8, 3)).astype(np.float32),
                       "label": rng.integers(0, 4, 8).astype(np.int32)}}
    step += 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  result = loop.train(TRAIN, SmallNet(), tiny_batches, tmp_path_factory.mktemp("uninterrupted"))
  return jax.device_get(result.state.params)


def test_sigterm_checkpoints_the_step_stops_and_resumes_exactly(uninterrupted, tmp_path):
  before = signal.getsignal(signal.SIGTERM)
  with pytest.raises(loop.Preempted) as error:
    loop.train(TRAIN, SmallNet(), lambda s: tiny_batches(s, sigterm_at=6), tmp_path)
  assert error.value.step == 7  # the update in flight (6 -> 7) finished and was saved
  assert str(error.value) == (f"preempted at step 7 (checkpoint {tmp_path / 'checkpoints' / '7'}); "
                              "rerun the same command to resume")
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "7"]
  assert signal.getsignal(signal.SIGTERM) is before  # the handler is only there while training

  resumed = loop.train(TRAIN, SmallNet(), tiny_batches, tmp_path)
  assert resumed.step == 10
  leaves = jax.tree.leaves(jax.device_get(resumed.state.params))
  for got, want in zip(leaves, jax.tree.leaves(uninterrupted), strict=True):
    np.testing.assert_array_equal(got, want)


def test_sigterm_on_a_periodic_checkpoint_step_saves_it_once(tmp_path):
  with pytest.raises(loop.Preempted) as error:
    loop.train(dict(TRAIN, num_train_steps=6), SmallNet(), lambda s: tiny_batches(s, sigterm_at=3),
               tmp_path)
  assert error.value.step == 4
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


def test_a_sigterm_nobody_acts_on_reaches_the_previous_handler():
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    outer = loop.PreemptionWatch().start()
    inner = loop.PreemptionWatch().start()  # nested (pipeline + train): one handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert inner.requested and inner.should_stop(1) and received == []
    inner.stop()
    assert outer.requested  # the outer watch still sees it
    outer.stop()
    assert received == [signal.SIGTERM]  # re-raised once the last watch ends
    assert not loop.PreemptionWatch().requested
  finally:
    signal.signal(signal.SIGTERM, previous)
