"""The Noisy Student schedule end to end (configs/smoke.py), resumption, and stage plumbing."""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from nsjax import exported_model, parallel, pipeline
from nsjax.data import preprocess, pseudo_labels
from nsjax.evaluate import accuracy
from nsjax.stages import context, label
from nsjax.stages import train as train_stage
from nsjax.stages.context import Context
from nsjax.train import compile_ahead, compile_cache, loop, settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("smoke"))
  config = load_config("smoke")
  # Programs jit compiles for the smoke steps during the run (other modules of this worker may
  # have compiled some before: the count is the difference).
  steps = [step_program(config, c, workdir) for c in (config.teacher, config.students[0])]
  evals = [accuracy.make_eval_step(train_stage.build_model(c, config), parallel.make_mesh())
           for c in (config.teacher, config.students[0])]
  before = [program._cache_size() for program in steps + evals]
  state = pipeline.run(config, workdir, compile_ahead=True)  # as the commands run it
  compiles = [p._cache_size() - b for p, b in zip(steps + evals, before)]
  SMOKE_JIT_COMPILES[:], SMOKE_EVAL_COMPILES[:] = compiles[:2], compiles[2:]
  return config, workdir, state


SMOKE_JIT_COMPILES = []
SMOKE_EVAL_COMPILES = []


def step_program(config, stage_cfg, workdir):
  """The jitted k-step program a model stage of `config` trains with (as loop.train reaches it)."""
  labeled = context.source(config.data.labeled, pipeline.prepare_data(config, workdir))
  cfg = train_stage.train_config(stage_cfg, config, context.num_examples(labeled))
  fns = compile_cache.run_functions(
      train_stage.build_model(stage_cfg, config), parallel.make_mesh(),
      settings.step_settings(cfg), (stage_cfg.resolution,) * 2 + (3,), -1)
  return compile_cache.train_step(fns, None, None, cfg.fsdp, cfg.steps_per_call)


def test_the_commands_compile_each_train_step_ahead_and_jit_compiles_none(smoke):
  config, workdir, _ = smoke
  teacher, student = (step_program(config, stage_cfg, workdir)
                      for stage_cfg in (config.teacher, config.students[0]))
  # Here one jitted step serves both (their compiled settings are the same), with two programs:
  # batches with and without pseudo-labeled images.
  assert teacher is student and compile_ahead.started(teacher) >= 2
  assert SMOKE_JIT_COMPILES == [0, 0]  # every call ran an executable compiled ahead


def test_each_model_compiles_one_eval_program(smoke):
  # The final evaluation in training and the eval stage's clean split (pipeline batches) and
  # corrupted sets (numpy batches) share one program: same shapes, and a bool mask in both.
  # (At most one: another module of this worker may have compiled it before the run.)
  assert all(count <= 1 for count in SMOKE_EVAL_COMPILES) and len(SMOKE_EVAL_COMPILES) == 2


@pytest.mark.parametrize("name", ["teacher", "student-1"])
def test_a_stages_batch_spec_is_its_first_batch(smoke, name):
  config, workdir, _ = smoke
  stage = next(s for s in pipeline.schedule(config) if s.name == name)
  stage_cfg = pipeline.stage_config(stage, config)
  ctx = Context(config, workdir, pipeline.prepare_data(config, workdir), parallel.make_mesh(),
                state=None, started=0.0)
  cfg = train_stage.train_config(stage_cfg, config, 100)
  batch = next(iter(train_stage.training_batches(stage, ctx, cfg)[0](0)))
  spec = train_stage.batch_spec(stage, config, cfg)
  as_spec = lambda x: (tuple(x.shape), np.dtype(x.dtype))
  assert jax.tree.map(as_spec, spec) == jax.tree.map(as_spec, batch)
  online = load_config("smoke")
  online.students[0].online_teacher = True  # its batches carry the teacher's view: not known
  assert train_stage.batch_spec(pipeline.Stage("student-1", "student", 1), online, cfg) is None


def test_smoke_schedule_runs_every_stage(smoke):
  config, workdir, state = smoke
  expected = ["teacher", "label-1", "student-1", "eval-teacher", "eval-student-1", "summary"]
  assert [s.name for s in pipeline.schedule(config)] == expected
  assert sorted(state["completed"]) == sorted(expected)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  rows = summary["iterations"]
  assert [(r["iteration"], r["role"]) for r in rows] == [(0, "teacher"), (1, "student")]
  for r in rows:
    assert 0.0 <= r["test_top1"] <= r["test_top5"] <= 1.0
    assert len(r["params_sha256"]) == 64 and r["params"] > 1000
    assert set(r["corruptions"]) == {"gaussian_noise", "contrast"}
  assert rows[0]["params_sha256"] != rows[1]["params_sha256"]
  assert summary["wall_seconds"] > 0
  for artifact in ("summary.png", "corruptions.png", "label-1/balance.json", "label-1/balance.png",
                   "eval/teacher.json", "teacher/export/model.json"):
    assert os.path.getsize(os.path.join(workdir, artifact)) > 0, artifact


def test_pseudo_labels_cover_the_unlabeled_split(smoke):
  _, workdir, _ = smoke
  manifest = pseudo_labels.read_manifest(os.path.join(workdir, "label-1"))
  assert manifest["num_examples"] == 512  # configs/smoke.py labels unlabeled[:512]
  records = list(pseudo_labels.read_dataset(os.path.join(workdir, "label-1")).as_numpy_iterator())
  assert len({r["id"] for r in records}) == 512
  probs = np.stack([r["probs"] for r in records])
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  balance_stats = json.load(open(os.path.join(workdir, "label-1", "balance.json")))
  assert np.sum(balance_stats["histogram"]) == 512


def test_pseudo_labels_are_the_teachers_softmax_on_the_normalised_eval_view(smoke):
  """The stage ships pixels and normalises on the device; the labels must be what the exported
  teacher gives on the host-normalised eval view (the input every other stage feeds it)."""
  _, workdir, _ = smoke
  model, variables, _ = exported_model.load_exported(os.path.join(workdir, "teacher", "export"))
  records = list(pseudo_labels.read_dataset(os.path.join(workdir, "label-1")).take(64)
                 .as_numpy_iterator())
  views = np.stack([
      preprocess.eval_view(preprocess.decode(r["image"])[0], model.test_resolution,
                           small_image=True).numpy() for r in records])
  expected = np.asarray(jax.nn.softmax(model.apply(variables, views, train=False), axis=-1))
  stored = np.stack([r["probs"] for r in records])
  np.testing.assert_allclose(stored, expected, atol=2e-3)  # stored as float16
  unnormalised = np.asarray(jax.nn.softmax(
      model.apply(variables, preprocess.denormalize(views).numpy(), train=False), axis=-1))
  assert np.abs(stored - unnormalised).max() > 0.05  # the check can tell the two inputs apart


def test_rerun_skips_finished_stages(smoke, monkeypatch):
  config, workdir, state = smoke
  def must_not_train(*args, **kwargs):
    raise AssertionError("a finished stage ran again")
  monkeypatch.setattr(loop, "train", must_not_train)
  monkeypatch.setattr(label, "label_unlabeled", must_not_train)
  again = pipeline.run(config, workdir)
  assert again["completed"] == state["completed"]


def test_one_stage_at_a_time(smoke, tmp_path):
  config, workdir, _ = smoke
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  state = json.load(open(os.path.join(copy, "state.json")))
  del state["completed"]["eval-student-1"]
  json.dump(state, open(os.path.join(copy, "state.json"), "w"))
  os.remove(os.path.join(copy, "eval", "student-1.json"))
  pipeline.run(config, copy, stage="eval-student-1")
  redone = json.load(open(os.path.join(copy, "eval", "student-1.json")))
  original = json.load(open(os.path.join(workdir, "eval", "student-1.json")))
  assert redone["top1"] == original["top1"]
  with pytest.raises(ValueError, match="Unknown stage 'student-7'.*teacher, label-1"):
    pipeline.run(config, copy, stage="student-7")


def test_changed_schedule_refuses_the_workdir(smoke):
  config, workdir, _ = smoke
  changed = load_config("smoke")
  changed.students[0].train.num_train_steps = 13
  with pytest.raises(ValueError, match="different schedule"):
    pipeline.run(changed, workdir)


def test_student_batches_hold_the_configured_ratio(smoke):
  config, workdir, _ = smoke
  config = load_config("smoke")
  config.students[0].train.unlabeled_ratio = 3.0
  stage = pipeline.Stage("student-1", "student", 1)
  data_dir = pipeline.prepare_data(config, workdir)
  cfg = train_stage.train_config(config.students[0], config, 100)
  ctx = Context(config, workdir, data_dir, parallel.make_mesh(), state=None, started=0.0)
  batches, teacher = train_stage.training_batches(stage, ctx, cfg)
  assert teacher is None
  batch = next(iter(batches(0)))
  assert batch["labeled"]["image"].shape == (32, 28, 28, 3)
  assert batch["unlabeled"]["image"].shape == (96, 28, 28, 3)
  assert batch["unlabeled"]["probs"].shape == (96, 10)
  resumed = next(iter(batches(5)))
  later = batches(0)
  for _ in range(5):
    next(later)
  np.testing.assert_array_equal(np.asarray(next(later)["unlabeled"]["image"]),
                                np.asarray(resumed["unlabeled"]["image"]))


def test_an_online_teacher_feeds_raw_unlabeled_images_in_both_views(smoke):
  """students[0].online_teacher: no label stage; the previous model's export predicts in the step,
  so unlabeled batches carry its un-noised view next to the student's noised one."""
  config, workdir, _ = smoke
  config = load_config("smoke")
  config.students[0].online_teacher = True
  assert "label-1" not in [s.name for s in pipeline.schedule(config)]
  ctx = Context(config, workdir, pipeline.prepare_data(config, workdir), parallel.make_mesh(),
                state=None, started=0.0)
  cfg = train_stage.train_config(config.students[0], config, 100)
  batches, teacher = train_stage.training_batches(pipeline.Stage("student-1", "student", 1), ctx,
                                                  cfg)
  assert teacher is not None and teacher.model.num_classes == 10
  batch = next(iter(batches(0)))
  assert batch["unlabeled"]["image"].shape == (32, 28, 28, 3)
  assert batch["unlabeled"]["teacher_image"].shape == (32, 28, 28, 3)
  assert "probs" not in batch["unlabeled"]


def test_labeling_resumes_after_a_crash_with_the_same_result(smoke, tmp_path, monkeypatch):
  config, workdir, _ = smoke
  teacher = os.path.join(workdir, "teacher", "export")
  src = context.source(config.data.unlabeled, pipeline.prepare_data(config, workdir))
  mesh = parallel.make_mesh()
  kwargs = dict(global_batch_size=64, mesh=mesh, small_image=True, shard_bytes=1)
  crashed = str(tmp_path / "crashed")
  original_write = pseudo_labels.HostShardWriter.write_shard
  calls = []

  def write_then_crash(self, *args, **kw):
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated crash")
    calls.append(1)
    return original_write(self, *args, **kw)

  monkeypatch.setattr(pseudo_labels.HostShardWriter, "write_shard", write_then_crash)
  with pytest.raises(KeyboardInterrupt):
    label.label_unlabeled(teacher, src, crashed, **kwargs)
  monkeypatch.setattr(pseudo_labels.HostShardWriter, "write_shard", original_write)
  partial = pseudo_labels.HostShardWriter(crashed, 0, config.data.num_classes)
  assert partial.num_shards_done == 2 and not partial.complete
  resumed = label.label_unlabeled(teacher, src, crashed, **kwargs)
  fresh = label.label_unlabeled(teacher, src, str(tmp_path / "fresh"), **kwargs)
  assert resumed["num_examples"] == fresh["num_examples"] == 512
  assert resumed["histogram"] == fresh["histogram"]
  a = list(pseudo_labels.read_dataset(crashed).as_numpy_iterator())
  b = list(pseudo_labels.read_dataset(str(tmp_path / "fresh")).as_numpy_iterator())
  assert [r["id"] for r in a] == [r["id"] for r in b]
  np.testing.assert_array_equal(np.stack([r["probs"] for r in a]), np.stack([r["probs"] for r in b]))
