"""Multi-host: 2 processes x 2 CPU devices (jax.distributed on 127.0.0.1, gloo collectives) against
1 process x 4 devices, with the same global batches.

Why the two runs can agree: every host reads, by position, its rows of the one stream a single
process reads (nsjax.data.balanced_order), so each of the 4 devices sees
the same examples, augmentations and dropout in both topologies; labeling and evaluation read
contiguous per-host slices and sum counts globally. What stays different is the order of float
sums in the cross-device reductions (XLA's in-process all-reduce vs gloo), so parameters agree to a
tight tolerance rather than bitwise (train losses agree to 6 digits, pseudo labels to 2e-4).

The fast tests simulate hosts inside this process; the end-to-end test runs a shrunk smoke schedule
in three subprocesses at once (2 + 1), a few minutes on a 2-core machine.
"""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from nsjax import parallel
from nsjax.data import input_pipeline as ip
from nsjax.data import mnist5k
from nsjax.evaluate import corruptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  mnist5k.build(path, "labels_10")
  return path


def _batches(data_dir, index, count, start_step=0, n=4, readers=None):
  it = ip.train_batches(ip.Source("mnist5k/labels_10", "train", data_dir), global_batch_size=12,
                        seed=3, start_step=start_step, process_index=index, process_count=count,
                        index_dir=os.path.join(data_dir, "index"))
  batches = [next(it) for _ in range(n)]
  if readers is not None:
    readers.append(it.reader)
  return batches


def test_every_topology_reads_the_same_global_batches(data_dir):
  one = _batches(data_dir, 0, 1)
  for count in (2, 3):
    hosts = [_batches(data_dir, i, count) for i in range(count)]
    for step, batch in enumerate(one):
      for key in ("id", "label", "image"):
        joined = np.concatenate([h[step][key] for h in hosts])
        np.testing.assert_array_equal(joined, batch[key], err_msg=f"{key} step {step} n={count}")
  # Resuming at step 2 on two hosts continues the single-process stream (100 train images,
  # batches of 12: step 8 crosses an epoch boundary).
  resumed = [_batches(data_dir, i, 2, start_step=8, n=1)[0] for i in range(2)]
  later = _batches(data_dir, 0, 1, n=9)[8]
  np.testing.assert_array_equal(np.concatenate([r["id"] for r in resumed]), later["id"])
  np.testing.assert_array_equal(np.concatenate([r["image"] for r in resumed]), later["image"])


def test_hosts_read_disjoint_records_and_their_share_of_the_bytes(data_dir):
  readers = []
  hosts = [_batches(data_dir, i, 2, n=60, readers=readers) for i in range(2)]
  # Within an epoch (100 images, 8 batches of 12) the hosts' records are disjoint.
  ids = [set(np.concatenate([b["id"] for b in h[:8]]).tolist()) for h in hosts]
  assert len(ids[0]) == len(ids[1]) == 48 and not ids[0] & ids[1]
  one = []
  _batches(data_dir, 0, 1, n=60, readers=one)
  # Records only, not the (shared) offset tables: half of the single process's bytes each (60
  # batches, so tf.data's read-ahead of a few chunks is a few percent).
  records = [r.bytes_read - r.table_bytes_read for r in readers + one]
  assert max(records[:2]) <= 0.6 * records[2], records


def test_corruption_examples_and_noise_do_not_depend_on_the_process_count():
  shares = [parallel.local_share(10, i, 3) for i in range(3)]
  assert shares == [(0, 4), (4, 7), (7, 10)]
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 1), dtype=np.uint8)
  whole = corruptions.corrupt_batch(images, "gaussian_noise", 3, seed=5)
  parts = [corruptions.corrupt_batch(images[a:b], "gaussian_noise", 3, seed=5, first_index=a)
           for a, b in shares]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


# ------------------------------------------------------------------------------------------------
# End to end: a shrunk smoke schedule (tests/multihost_config.py) on 2 processes x 2 devices vs
# 1 process x 4 devices, all three processes at once (about 2-3 minutes on 2 cores, nearly all of
# it XLA compilation).

CONFIG = os.path.join(ROOT, "tests", "multihost_config.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, devices, log, extra=(), umask=0o022):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
             TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [sys.executable, "-m", "nsjax.main", f"--config={CONFIG}", f"--workdir={workdir}", *extra]
  # The umask tells the writers apart: a file process 1 creates is mode 0600, process 0's 0644.
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                          preexec_fn=lambda: os.umask(umask))


def _wait(procs, logs, timeout=900, expect=0):
  try:
    for p, log in zip(procs, logs):
      rc = p.wait(timeout=timeout)
      assert rc == expect, f"{log} (exit {rc}):\n" + open(log).read()[-4000:]
  finally:
    for q in procs:
      if q.poll() is None:
        q.kill()


def _multi(workdir, logs, port, extra=()):
  return [_launch(workdir, 2, logs[i], [f"--coordinator_address=127.0.0.1:{port}",
                                        "--num_processes=2", f"--process_id={i}", *extra],
                  umask=0o022 if i == 0 else 0o077)
          for i in range(2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multihost")
  multi, single = str(base / "2x2"), str(base / "1x4")
  logs = [str(base / f"p{i}.log") for i in range(2)] + [str(base / "single.log")]
  procs = _multi(multi, logs, _free_port()) + [_launch(single, 4, logs[2])]
  _wait(procs, logs)
  return multi, single, logs


def _params(workdir, stage):
  from nsjax import exported_model
  _, variables, _ = exported_model.load_exported(os.path.join(workdir, stage, "export"))
  return variables


def _flat(tree):
  import jax
  return np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])


def _labels(workdir):
  from nsjax.data import pseudo_labels
  records = pseudo_labels.read_dataset(os.path.join(workdir, "label-1")).as_numpy_iterator()
  return {r["id"]: (r["probs"], r["image"]) for r in records}


def _mode(path):
  return os.stat(path).st_mode & 0o777


def test_two_hosts_match_one_host(runs):
  from nsjax.data import input_pipeline
  multi, single, logs = runs
  state = [json.load(open(os.path.join(w, "state.json"))) for w in (multi, single)]
  assert sorted(state[0]["completed"]) == sorted(state[1]["completed"]) == [
      "eval-student-1", "eval-teacher", "label-1", "student-1", "summary", "teacher"]
  # Parameters: same batches, different float summation order in the all-reduces (XLA's in-process
  # all-reduce over 4 devices vs two local ones plus gloo across processes), so not bitwise; Adam
  # divides tiny gradients by their own scale, so a few near-zero entries move by up to ~lr per
  # step. Observed: relative L2 difference ~2.5e-4, <1% of entries differ by more than 1e-4.
  for stage in ("teacher", "student-1"):
    x, y = _flat(_params(multi, stage)), _flat(_params(single, stage))
    assert np.linalg.norm(x - y) / np.linalg.norm(y) < 2e-3, stage
    assert np.mean(np.abs(x - y) > 1e-4) < 0.05, stage
  # Labeling: each host wrote its own shards and manifest, process 0 merged them; together they
  # hold the same 256 ids, images and (float16) teacher probabilities as the single process's.
  merged = json.load(open(os.path.join(multi, "label-1", "manifest.json")))
  files = [s["file"] for s in merged["shards"]]
  assert {f[:10] for f in files} == {"shard-h000", "shard-h001"}
  for f in files:  # written by the host its name says (see the umasks in _launch)
    assert _mode(os.path.join(multi, "label-1", f)) == (0o644 if f.startswith("shard-h000") else 0o600)
  one = json.load(open(os.path.join(single, "label-1", "manifest.json")))
  assert merged["num_examples"] == one["num_examples"] == 256
  assert np.sum(merged["histogram"]) == np.sum(one["histogram"]) == 256
  la, lb = _labels(multi), _labels(single)
  assert len(la) == 256 and sorted(la) == sorted(lb)
  assert all(la[i][1] == lb[i][1] for i in la)
  np.testing.assert_allclose(np.stack([la[i][0] for i in sorted(la)]),
                             np.stack([lb[i][0] for i in sorted(lb)]), atol=2e-3)
  # Evaluation over the same examples. These 8-step models' logits are ~1e-2 with the 5th and 6th
  # largest ~1e-3 apart, so the parameter differences above can flip an example's top-k membership:
  # top-1 and corruption top-1 may differ by two examples, top-5 by more. The eval code path itself
  # is checked exactly below.
  for model in ("teacher", "student-1"):
    ea, eb = [json.load(open(os.path.join(w, "eval", f"{model}.json"))) for w in (multi, single)]
    assert ea["num_examples"] == eb["num_examples"] == 128
    for key, slack in (("top1", 2 / 128), ("top5", 12 / 128), ("corruption_top1", 2 / 64)):
      assert abs(ea[key] - eb[key]) <= slack + 1e-9, (model, key, ea[key], eb[key])
  # The multi-host evaluation of an export equals this (4-device, one-process) evaluation of it.
  from nsjax.evaluate import corruption_suite as eval_lib
  from nsjax import parallel
  for model in ("teacher", "student-1"):
    again = eval_lib.evaluate_export(
        os.path.join(multi, model, "export"),
        input_pipeline.Source("mnist5k/labels_10", "test[:128]",
                              os.path.join(multi, "tensorflow_datasets")),
        mesh=parallel.make_mesh(), batch_size=64, small_image=True, corruptions=["contrast"],
        severities=[3], max_corruption_examples=64, seed=0)
    stored = json.load(open(os.path.join(multi, "eval", f"{model}.json")))
    for key in ("top1", "top5", "corruption_top1", "num_examples"):
      assert stored[key] == again[key], (model, key, stored[key], again[key])
  # Summary and state: written by process 0 only (mode 0644; process 1 would leave 0600 files).
  summary = [json.load(open(os.path.join(w, "summary.json"))) for w in (multi, single)]
  assert [r["role"] for r in summary[0]["iterations"]] == ["teacher", "student"]
  for ra, rb in zip(summary[0]["iterations"], summary[1]["iterations"]):
    assert abs(ra["test_top1"] - rb["test_top1"]) <= 2 / 128 + 1e-9
  for name in ("state.json", "summary.json", os.path.join("eval", "teacher.json"),
               os.path.join("teacher", "export", "model.json")):
    assert _mode(os.path.join(multi, name)) == 0o644, name
  # Only process 0 writes TensorBoard events, and only it prints the summary table.
  for stage in ("teacher", "student-1"):
    events = [f for f in os.listdir(os.path.join(multi, stage)) if "tfevents" in f]
    assert len(events) == 1, events
  assert "test top-1" in open(logs[0]).read() and "test top-1" not in open(logs[1]).read()


# ------------------------------------------------------------------------------------------------
# Preemption on several hosts: jax.distributed starts jax's preemption service, which catches
# SIGTERM on whichever process gets it and makes `reached_preemption_sync_point` true on every
# process at the same step (nsjax.train.preemption.PreemptionWatch); both save that step and exit 75.

def _wait_for(path, text, procs, timeout=600):
  import time
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and text in open(path).read():
      return
    assert all(p.poll() is None for p in procs), open(path).read()[-4000:]
    time.sleep(0.2)
  raise TimeoutError(f"{text!r} never appeared in {path}")


@pytest.mark.slow  # ~3 min on 2 cores (two 2-process runs, then a resume beside a reference)
def test_sigterm_to_one_host_stops_both_at_the_same_step_and_resumes(tmp_path):
  import re
  steps_flag = ["--config.teacher.train.num_train_steps=48", "--stage=teacher"]
  stopped, straight = str(tmp_path / "stopped"), str(tmp_path / "straight")
  logs = [str(tmp_path / f"stopped{i}.log") for i in range(2)]
  ref_logs = [str(tmp_path / f"straight{i}.log") for i in range(2)]
  procs = _multi(stopped, logs, _free_port(), steps_flag)
  try:
    _wait_for(logs[1], "[4] steps_per_sec", procs)  # training, past the first checkpoint
  except BaseException:
    for q in procs:
      q.kill()
    raise
  procs[1].terminate()  # SIGTERM to process 1 only
  _wait(procs, logs, expect=75)
  said = [re.findall(r"preempted at step (\d+) \(checkpoint ([^)]*)\)", open(f).read())
          for f in logs]
  assert said[0] and said[0] == said[1], said  # the same step and checkpoint on both hosts
  step, path = int(said[0][0][0]), said[0][0][1]
  assert 4 <= step < 48 and os.path.isdir(path) and path.endswith(f"/{step}")
  assert not os.path.exists(os.path.join(stopped, "teacher", "export"))
  # Rerunning the same command resumes there and ends where an uninterrupted run ends (both start
  # now, after the first run filled the compilation cache).
  procs = (_multi(stopped, logs, _free_port(), steps_flag)
           + _multi(straight, ref_logs, _free_port(), steps_flag))
  _wait(procs, logs + ref_logs)
  assert f"Restored step {step}" in open(logs[0]).read()
  x, y = _flat(_params(stopped, "teacher")), _flat(_params(straight, "teacher"))
  # Same topology, batches and step: observed bitwise equal; allow the all-reduce tolerance above.
  assert np.linalg.norm(x - y) / np.linalg.norm(y) < 2e-3
  assert np.mean(np.abs(x - y) > 1e-4) < 0.05
  print("bitwise" if np.array_equal(x, y) else f"max diff {np.abs(x - y).max()}")


# ------------------------------------------------------------------------------------------------
# Labeling on several hosts: each host writes its own shards, but every host must run every
# batch's inference step. A SIGTERM stops both hosts after the same batch (here a shard); hosts stopped at
# different shards (SIGKILL, a lost VM) resume from the least advanced one. Both reruns must end
# with identical shards (every feature's bytes) to an uninterrupted run.

# nsjax.main; NSJAX_TEST_SIGTERM="<process>" SIGTERMs that process right after it writes its first
# pseudo-label shard. Every process then pauses after each shard (NSJAX_TEST_PAUSE seconds), so
# the preemption service settles its sync point before anyone reaches the next shard boundary.
_LABEL_WRAPPER = r"""
import os, signal, time
from absl import app
from nsjax import main
from nsjax.data import pseudo_labels
if os.environ.get("NSJAX_TEST_SIGTERM"):
  write_shard = pseudo_labels.HostShardWriter.write_shard
  def write_then_signal(self, *args, **kwargs):
    name = write_shard(self, *args, **kwargs)
    if self.num_shards_done == 1 and self.host == int(os.environ["NSJAX_TEST_SIGTERM"]):
      os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(float(os.environ["NSJAX_TEST_PAUSE"]))
    return name
  pseudo_labels.HostShardWriter.write_shard = write_then_signal
app.run(main.main)
"""


def _multi_label(workdir, logs, sigterm=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=ROOT, NSJAX_TEST_PAUSE="6")
  env.pop("NSJAX_TEST_SIGTERM", None)
  if sigterm is not None:
    env["NSJAX_TEST_SIGTERM"] = str(sigterm)
  port = _free_port()
  return [subprocess.Popen(
      [sys.executable, "-c", _LABEL_WRAPPER, f"--config={CONFIG}", f"--workdir={workdir}",
       "--stage=label-1", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
       f"--process_id={i}"], cwd=ROOT, env=env, stdout=open(logs[i], "w"),
      stderr=subprocess.STDOUT) for i in range(2)]


def _workdir_with_teacher(workdir):
  """A workdir whose teacher stage is complete (a random tiny teacher: labeling only needs one)."""
  import importlib.util
  import jax
  import jax.numpy as jnp
  from nsjax import exported_model, models, pipeline
  spec = importlib.util.spec_from_file_location("nsjax_multihost_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  model = models.create_model("efficientnet-b0", 10, width=0.1, depth=0.1, small_image=True,
                              resolution=28)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3))))()
  exported_model.export_model(os.path.join(workdir, "teacher", "export"), model, variables)
  state = {"config_fingerprint": pipeline.fingerprint(module.get_config()),
           "completed": {"teacher": {}}}
  json.dump(state, open(os.path.join(workdir, "state.json"), "w"))


def _shard_bytes(workdir):
  """{shard file: its records, each feature's bytes} (an Example's serialised feature order
  varies between processes, so the files themselves are compared through their content)."""
  import tensorflow as tf
  directory = os.path.join(workdir, "label-1")
  content = {}
  for f in sorted(os.listdir(directory)):
    if f.startswith("shard-") and f.endswith(".tfrecord"):
      examples = [tf.train.Example.FromString(r) for r in
                  tf.data.TFRecordDataset(os.path.join(directory, f)).as_numpy_iterator()]
      content[f] = [{k: v.SerializeToString() for k, v in sorted(e.features.feature.items())}
                    for e in examples]
  return content


def _host_writer(workdir, host):
  from nsjax.data import pseudo_labels
  return pseudo_labels.HostShardWriter(os.path.join(workdir, "label-1"), host, 10)


def _roll_back(workdir, host, keep):
  """The on-disk state of `host` killed right after writing its shard number `keep`."""
  from nsjax.data import pseudo_labels
  directory = os.path.join(workdir, "label-1")
  for shard in _host_writer(workdir, host).shards[keep:]:
    os.remove(os.path.join(directory, shard["file"]))
    os.remove(pseudo_labels.meta_path(directory, shard["file"]))
  os.remove(pseudo_labels.done_path(directory, host))


@pytest.mark.slow  # ~3 min on 2 cores (four 2-process label-stage runs, two at a time)
def test_labeling_stops_both_hosts_at_one_shard_and_resumes_identically(tmp_path):
  import shutil
  stopped, straight, uneven = (str(tmp_path / n) for n in ("stopped", "straight", "uneven"))
  for workdir in (stopped, straight):
    os.makedirs(workdir)
    _workdir_with_teacher(workdir)
  logs = [str(tmp_path / f"{n}{i}.log") for n in ("stopped", "straight") for i in range(2)]
  procs = _multi_label(stopped, logs[:2], sigterm=1) + _multi_label(straight, logs[2:])
  _wait(procs[2:], logs[2:])
  _wait(procs[:2], logs[:2], expect=75)
  # Multihost labeling: 4 batches of 32 per host, one shard each (tests/multihost_config.py).
  reference = _shard_bytes(straight)
  assert len(reference) == 8
  # Both hosts stopped after the same shard, the first one, with nothing half-written.
  assert [_host_writer(stopped, h).num_batches_done for h in range(2)] == [1, 1]
  assert sorted(_shard_bytes(stopped)) == ["shard-h000-00000.tfrecord", "shard-h001-00000.tfrecord"]
  assert not [f for f in os.listdir(os.path.join(stopped, "label-1")) if ".tmp-" in f]
  for log in logs[:2]:
    assert "Stage label-1: preempted at pseudo-label shard 1" in open(log).read()
  # Hosts that stopped at different shards: host 0 after 3, host 1 after 1.
  shutil.copytree(straight, uneven)
  for host, keep in ((0, 3), (1, 1)):
    _roll_back(uneven, host, keep)
  os.remove(os.path.join(uneven, "label-1", "manifest.json"))
  state = json.load(open(os.path.join(uneven, "state.json")))
  del state["completed"]["label-1"]
  json.dump(state, open(os.path.join(uneven, "state.json"), "w"))
  logs = [str(tmp_path / f"{n}{i}.log") for n in ("resumed", "uneven") for i in range(2)]
  procs = _multi_label(stopped, logs[:2]) + _multi_label(uneven, logs[2:])
  _wait(procs, logs)
  assert _shard_bytes(stopped) == reference
  assert _shard_bytes(uneven) == reference
  for workdir in (stopped, uneven):
    merged = json.load(open(os.path.join(workdir, "label-1", "manifest.json")))
    assert merged["num_examples"] == 256 and merged["num_skipped"] == 0
