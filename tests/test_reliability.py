"""Reliability: SIGTERM preemption, bitwise-exact resume after SIGKILL, corrupt unlabeled data.

The SIGKILL tests run `nsjax.main` in subprocesses through a tiny wrapper that kills its own
process (SIGKILL: no handler, no cleanup, like a lost VM) at a chosen point of a chosen stage, so
the kill lands exactly where the test says instead of wherever a poll happens to catch it.
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
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

from nsjax import (artifacts, config_lib, exported_model, models, parallel, pipeline,
                   workdir_lock)
from nsjax.data import input_pipeline, pseudo_labels
from nsjax.stages import label
from nsjax.stages import train as train_stage
from nsjax.stages.context import Context
from nsjax.train import loop, preemption, reporter
from nsjax.train.run_checkpoints import TrainCheckpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs nsjax.main; NSJAX_TEST_KILL="<stage>:<n>" SIGKILLs the process after training step n of that
# stage (once checkpoint <= n is on disk) or after the label stage's n-th shard is recorded.
_WRAPPER = r"""
import os, signal, sys
from absl import app
from nsjax import main
from nsjax.data import input_pipeline, pseudo_labels
from nsjax.train import reporter

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
    add = reporter.Reporter.add
    def add_then_die(self, step, metrics, num_steps=1):  # dies after the call making step n
      add(self, step, metrics, num_steps)
      if self.checkpoints.directory.parent.name == stage and step - num_steps < n <= step:
        self.checkpoints.wait()
        die()
    reporter.Reporter.add = add_then_die
app.run(main.main)
"""


def load_smoke_config():
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


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
  labels = pseudo_labels.HostShardWriter(str(killed / "label-1"), 0, 10)
  assert labels.complete and labels.num_shards_done == 2
  assert os.listdir(killed / "student-1" / "checkpoints") == ["6"]  # killed at step 9
  result = run_main(killed)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Restored step 6" in result.stderr  # the student resumed from its checkpoint
  assert sorted(os.listdir(killed / "student-1" / "checkpoints")) == ["12", "6"]

  expected = summary_hashes(reference)
  assert len(expected) == 2 and len(set(expected.values())) == 2
  assert summary_hashes(killed) == expected
  # The smoke schedule's cosine decay reaches lr 0 before its last steps, where params stop
  # moving; the BatchNorm statistics keep following the data, so a replay of the wrong batches
  # after the restart shows there.
  for stage in ("teacher", "student-1"):
    ours = exported_model.load_exported(str(killed / stage / "export"))[1]
    theirs = exported_model.load_exported(str(reference / stage / "export"))[1]
    jax.tree.map(np.testing.assert_array_equal, ours, theirs)


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
  with pytest.raises(preemption.Preempted) as error:
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
  with pytest.raises(preemption.Preempted) as error:
    loop.train(dict(TRAIN, num_train_steps=6), SmallNet(), lambda s: tiny_batches(s, sigterm_at=3),
               tmp_path)
  assert error.value.step == 4
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]


def test_a_sigterm_nobody_acts_on_reaches_the_previous_handler():
  received = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    outer = preemption.PreemptionWatch().start()
    inner = preemption.PreemptionWatch().start()  # nested (pipeline + train): one handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert inner.requested and inner.should_stop(1) and received == []
    inner.stop()
    assert outer.requested  # the outer watch still sees it
    outer.stop()
    assert received == [signal.SIGTERM]  # re-raised once the last watch ends
    assert not preemption.PreemptionWatch().requested
  finally:
    signal.signal(signal.SIGTERM, previous)


# --- Corrupt unlabeled data ---------------------------------------------------------------------

BAD_UNLABELED = {3: b"not an image", 10: "truncated png", 17: b"", 25: "9x9"}
NUM_UNLABELED = 40


class NsjaxTestCorruptUnlabeled(tfds.core.GeneratorBasedBuilder):
  """40 MNIST-shaped images in a fixed order; 4 do not decode to a 28x28x1 image."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=10),
            "id": tfds.features.Scalar(dtype=np.int64)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    rng = np.random.default_rng(0)
    for i in range(NUM_UNLABELED):
      png = tf.io.encode_png(rng.integers(0, 255, (28, 28, 1)).astype(np.uint8)).numpy()
      bad = BAD_UNLABELED.get(i)
      if bad == "truncated png":
        png = png[: len(png) // 2]
      elif bad == "9x9":
        png = tf.io.encode_png(np.zeros((9, 9, 1), np.uint8)).numpy()
      elif bad is not None:
        png = bad
      yield i, {"image": png, "label": i % 10, "id": i}


def export_random_teacher(directory):
  model = models.create_model("efficientnet-b0", 10, width=0.1, depth=0.1, small_image=True,
                              resolution=28)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)),
                                         train=False))()
  exported_model.export_model(directory, model, variables)


@pytest.fixture(scope="module")
def corrupt_data_dirs(tmp_path_factory):
  """(data_dir with 4 bad images, data_dir whose record file also lost its tail, records left)."""
  good = str(tmp_path_factory.mktemp("tfds_corrupt"))
  tfds.builder("nsjax_test_corrupt_unlabeled", data_dir=good).download_and_prepare()
  truncated = str(tmp_path_factory.mktemp("tfds_truncated"))
  shutil.copytree(good, truncated, dirs_exist_ok=True)
  files = glob.glob(os.path.join(truncated, "nsjax_test_corrupt_unlabeled", "*", "*.tfrecord*"))
  assert len(files) == 1
  with open(files[0], "r+b") as f:
    f.truncate(os.path.getsize(files[0]) - 500)  # cuts the last record(s) short
  intact = sum(1 for _ in tf.data.TFRecordDataset(files).ignore_errors())
  assert NUM_UNLABELED - 5 <= intact < NUM_UNLABELED
  return good, truncated, intact


def label_corrupt(data_dir, workdir):
  config = load_smoke_config()
  config.data.unlabeled = config_lib.data_source("nsjax_test_corrupt_unlabeled", "train", data_dir)
  config.label.batch_size = 16
  config.label.shard_bytes = 1  # a shard per batch
  config.balance.num_image_per_class = 4
  export_random_teacher(os.path.join(workdir, "teacher", "export"))
  stage = pipeline.Stage("label-1", "label", 1)
  return label.run(stage, Context(config, str(workdir), data_dir, parallel.make_mesh(), None, 0.0))


def test_undecodable_unlabeled_images_are_skipped_and_counted(corrupt_data_dirs, tmp_path):
  good, truncated, intact = corrupt_data_dirs
  result = label_corrupt(good, tmp_path / "bad-images")
  assert result["num_skipped"] == len(BAD_UNLABELED)
  assert result["num_examples"] == NUM_UNLABELED - len(BAD_UNLABELED)
  labels_dir = tmp_path / "bad-images" / "label-1"
  ids = sorted(int(r["id"]) for r in pseudo_labels.read_dataset(str(labels_dir)).as_numpy_iterator())
  assert ids == sorted(set(range(NUM_UNLABELED)) - set(BAD_UNLABELED))
  assert json.load(open(labels_dir / "balance.json"))["num_skipped"] == len(BAD_UNLABELED)
  assert not glob.glob(str(labels_dir / "*.tmp-*"))  # nothing half-written left behind

  result = label_corrupt(truncated, tmp_path / "truncated-file")
  bad_in_intact = sum(1 for i in BAD_UNLABELED if i < intact)
  assert result["num_examples"] == intact - bad_in_intact
  assert result["num_skipped"] == NUM_UNLABELED - intact + bad_in_intact


def test_a_truncated_record_file_does_not_stall_training_batches(corrupt_data_dirs):
  _, truncated, intact = corrupt_data_dirs
  src = input_pipeline.Source("nsjax_test_corrupt_unlabeled", "train", truncated)
  iterator = input_pipeline.train_batches(src, global_batch_size=8, seed=0, shuffle_block=16)
  ids = {int(i) for _ in range(12) for i in next(iterator)["id"]}  # 96 examples: > 2 epochs
  assert ids == set(range(intact)) - set(BAD_UNLABELED)
  assert iterator.num_skipped >= 2 * (NUM_UNLABELED - len(ids))  # each epoch's losses counted


# --- Command line: one clear line and a documented exit code ------------------------------------

@pytest.mark.parametrize("error, code, line", [
    (preemption.Preempted(7, "checkpoint W/student-1/checkpoints/7"), 75,
     "Stage student-1: preempted at step 7 (checkpoint W/student-1/checkpoints/7); rerun the same "
     "command to resume."),
    (reporter.NonFiniteError("Training step 3 (...) Last good checkpoint: none."), 3,
     "Stage student-1 stopped: Training step 3 (...) Last good checkpoint: none."),
    (artifacts.DamagedArtifact("W/label-1/manifest.json", "not valid JSON"), 2,
     "Damaged or missing artifact: W/label-1/manifest.json: not valid JSON. It was written by "
     "stage label-1: delete W/label-1 and rerun the same command; the stage runs again (with "
     "--stage, run --stage=label-1 first) and reproduces it."),
    (artifacts.disk_full("W/label-1/shard-h000-00001.tfrecord", OSError(28, "No space left")), 74,
     "Disk full: W/label-1/shard-h000-00001.tfrecord: no space left on the device while writing "
     "it (OSError: [Errno 28] No space left). The last complete artifact before it is intact. "
     "Free space (or point --workdir at a larger disk) and rerun the same command: it resumes "
     "from there."),
    (workdir_lock.WorkdirBusy("The workdir W is in use by pid 1 on host h"), 2,
     "Workdir busy: The workdir W is in use by pid 1 on host h"),
])
def test_main_turns_stops_into_one_line_and_an_exit_code(error, code, line, monkeypatch, capsys,
                                                          tmp_path):
  from absl import flags
  from nsjax import main
  def stopped(*args, **kwargs):
    error.stage = "student-1"
    raise error
  monkeypatch.setattr(pipeline, "run", stopped)
  flags.FLAGS(["nsjax", "--config=" + os.path.join(ROOT, "configs", "smoke.py"),
               f"--workdir={tmp_path}"])
  try:
    with pytest.raises(SystemExit) as exit_:
      main.main(["nsjax"])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_.value.code == code
  assert capsys.readouterr().err.strip().splitlines()[-1] == line


# --- Undecodable LABELED images: exact resume ---------------------------------------------------

def corrupt_labeled_config(data_dir):
  """The smoke schedule on the 40-image corrupt dataset (4 bad images) as labeled and test data."""
  config = load_smoke_config()
  config.data.labeled = config_lib.data_source("nsjax_test_corrupt_unlabeled", "train", data_dir)
  config.data.test = config_lib.data_source("nsjax_test_corrupt_unlabeled", "train", data_dir)
  # 40 images are 1.25 steps per epoch: the smoke cosine (over 2.4 epochs) would reach lr 0 at
  # step 3, after which the parameters no longer depend on the data.
  for stage in [config.teacher] + list(config.students):
    stage.train.lr_schedule = "constant"
  return config


class SimulatedCrash(Exception):
  pass


def crash_after_step(monkeypatch, stage, n):
  """Like the SIGKILL wrapper, in process: the run dies right after the call that makes step n
  (checkpoints flushed; a call may make several steps, train.steps_per_call)."""
  add = reporter.Reporter.add

  def add_then_crash(self, step, metrics, num_steps=1):
    add(self, step, metrics, num_steps)
    if self.checkpoints.directory.parent.name == stage and step - num_steps < n <= step:
      self.checkpoints.wait()
      raise SimulatedCrash(f"{stage} step {n}")

  monkeypatch.setattr(reporter.Reporter, "add", add_then_crash)


def train_teacher(config, workdir):
  stage = pipeline.Stage("teacher", "teacher", 0)
  return train_stage.run(stage, Context(config, str(workdir), None, parallel.make_mesh(), None,
                                        0.0))


def export_sha256(workdir, stage="teacher"):
  """Of the exported params AND batch-norm statistics (both depend on every batch)."""
  _, variables, _ = exported_model.load_exported(os.path.join(workdir, stage, "export"))
  return exported_model.params_sha256(variables)


def test_resume_with_undecodable_labeled_images_is_bitwise_exact(corrupt_data_dirs, tmp_path,
                                                                  monkeypatch):
  good, _, _ = corrupt_data_dirs
  config = corrupt_labeled_config(good)
  train_teacher(config, tmp_path / "straight")
  # Step 9 of 12, checkpoints every 6: the rerun restores step 6, after 192 good images; bad
  # images came before that point in the stream, so the stream must resume past them.
  with monkeypatch.context() as m:
    crash_after_step(m, "teacher", 9)
    with pytest.raises(SimulatedCrash):
      train_teacher(config, tmp_path / "crashed")
  assert os.listdir(tmp_path / "crashed" / "teacher" / "checkpoints") == ["6"]
  # The checkpoint carries where the labeled stream stood: past 6 x 32 good images and the bad
  # ones among them.
  with TrainCheckpoints(tmp_path / "crashed" / "teacher" / "checkpoints") as saved:
    labeled = saved.input_position(6)["hosts"][0]["labeled"]
  assert labeled["num_skipped"] > 0 and labeled["next_record"] == 6 * 32 + labeled["num_skipped"]
  result = train_teacher(config, tmp_path / "crashed")
  assert export_sha256(tmp_path / "crashed") == export_sha256(tmp_path / "straight")
  # 12 x 32 = 384 good images = 10 epochs of 36 and 24 more: 40 bad ones, and up to 4 more.
  assert 40 <= result["num_skipped_labeled"] <= 44


# --- End to end: summary.json counts every skipped image ----------------------------------------

def good_examples_stream_skips(data_dir, seed, steps=12, batch=32):
  """Undecodable records a fresh labeled stream drops while yielding `steps` batches."""
  src = input_pipeline.Source("nsjax_test_corrupt_unlabeled", "train", data_dir)
  iterator = input_pipeline.train_batches(src, global_batch_size=batch, seed=seed)
  for _ in range(steps):
    next(iterator)
  return iterator.num_skipped


def test_smoke_schedule_on_corrupt_data_reports_exact_skipped_counts(corrupt_data_dirs, tmp_path):
  good, truncated, intact = corrupt_data_dirs
  config = corrupt_labeled_config(good)  # labeled and test data: 40 images, 4 undecodable
  # Unlabeled: the copy whose record file lost its tail, so read errors count too.
  config.data.unlabeled = config_lib.data_source("nsjax_test_corrupt_unlabeled", "train", truncated)
  config.label.batch_size = 16
  config.label.shard_bytes = 1  # a shard per batch
  config.balance.num_image_per_class = 4
  config.eval.max_corruption_examples = 16
  state = pipeline.run(config, str(tmp_path))
  assert "summary" in state["completed"]
  summary = json.load(open(tmp_path / "summary.json"))
  bad_in_intact = sum(1 for i in BAD_UNLABELED if i < intact)
  assert summary["skipped_unlabeled_images"] == {
      "label-1": NUM_UNLABELED - intact + bad_in_intact}
  # Labeled: 12 steps x 32 good images = 10 epochs of 36 (40 bad) and 24 images of an 11th.
  expected = {"teacher": good_examples_stream_skips(good, seed=0),
              "student-1": good_examples_stream_skips(good, seed=1)}  # seeds: seed * 1000 + offset
  assert all(40 <= n <= 44 for n in expected.values())
  assert summary["skipped_labeled_images"] == expected
  assert summary["skipped_files"] == {}
