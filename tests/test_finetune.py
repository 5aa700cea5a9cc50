"""Test-resolution fine-tuning: frozen layers (and their BatchNorm statistics) stay bit-identical,
the rest moves; the learning-rate tail; the pipeline's finetune-i stage and export hand-over."""
import copy

import jax
import numpy as np
import pytest

from nsjax import exported_model, models, parallel, pipeline, schedule
from nsjax.stages import finetune
from nsjax.train import settings
from test_eval_suites import random_variables

# Three block stages: blocks 0-2, enough to freeze two and train one.
TINY = dict(width=0.1, depth=0.1, block_stages=3, small_image=True, resolution=32)


def synthetic_batches(mesh, batch_size=8, resolution=16):
  def batches(start_step):
    rng = np.random.default_rng(start_step)
    while True:
      yield parallel.to_global_batch({"labeled": {
          "image": rng.standard_normal((batch_size, resolution, resolution, 3)).astype(np.float32),
          "label": rng.integers(0, 10, batch_size).astype(np.int32)}}, mesh)
  return batches


def top_level(tree, name):
  return {k: v for k, v in tree.items() if k == name}


def test_frozen_layers_and_their_batchnorm_statistics_stay_bit_identical(tmp_path):
  student = models.create_model("efficientnet-b0", 10, **TINY)
  before = random_variables(student)
  student_dir = str(tmp_path / "student")
  exported_model.export_model(student_dir, student, before, {"step": 40})
  ft = finetune.finetune_config(resolution=16, epochs=1.0, frozen_blocks=2, batch_size=8,
                                lr_mode="constant", learning_rate=0.05,
                                train=dict(log_every_steps=1, checkpoint_every_steps=100))
  mesh = parallel.make_mesh()
  result = finetune.finetune(student_dir, None, str(tmp_path / "ft"), ft, mesh=mesh,
                             num_labeled=24, batches=synthetic_batches(mesh))
  assert result["step"] == 3 and result["learning_rate"] == pytest.approx(0.05)
  model, after, metadata = exported_model.load_exported(result["export_dir"])
  assert model.frozen_blocks == -1 and model.test_resolution == 16
  assert metadata["finetuned_from"] == student_dir and metadata["student_step"] == 40

  frozen = ["stem", "blocks_0", "blocks_1"]
  moving = [f"blocks_{i}" for i in range(2, len(student.blocks))] + ["head"]
  for collection in ("params", "batch_stats"):
    for name in frozen:
      for a, b in zip(jax.tree.leaves(before[collection][name]),
                      jax.tree.leaves(after[collection][name])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for name in moving for a, b in zip(jax.tree.leaves(before[collection][name]),
                                                  jax.tree.leaves(after[collection][name]))]
    assert np.mean(changed) > 0.9, f"only {np.mean(changed):.0%} of the {collection} moved"


def test_learning_rate_tail_of_the_students_schedule():
  student = settings.resolve_config(dict(batch_size=64, num_labeled_examples=640, num_epochs=10,
                                     base_learning_rate=0.016, warmup_epochs=1,
                                     lr_decay_epochs=2.0, lr_decay_factor=0.5))
  last = float(settings.make_schedule(student)(100))  # 10 epochs of 10 steps: 0.004 * 0.5 ** 5
  assert last == pytest.approx(0.004 * 0.5 ** 5)
  final = finetune.learning_rate_settings(finetune.finetune_config(64, lr_mode="final"),
                                          student, 100, batch_size=128)
  assert final["lr_schedule"] == "constant" and final["warmup_epochs"] == 0
  assert final["base_learning_rate"] * 128 / 256 == pytest.approx(last)  # absolute lr kept
  cont = finetune.learning_rate_settings(finetune.finetune_config(64, lr_mode="continue"),
                                         student, 100, batch_size=64)
  lr_fn = settings.make_schedule(settings.resolve_config(dict(
      cont, batch_size=64, num_labeled_examples=640, num_epochs=1.5)))
  assert float(lr_fn(0)) == pytest.approx(last)
  assert float(lr_fn(20)) == pytest.approx(last / 2)  # the decay goes on: 2 epochs later
  with pytest.raises(ValueError, match="lr_mode='constant'"):
    finetune.learning_rate_settings(finetune.finetune_config(64), None, 0, 64)


def test_saved_student_config_round_trips():
  cfg = settings.resolve_config(dict(batch_size=32, num_train_steps=5, steps_per_epoch=2.5))
  saved = {k: ("none" if v is None else v) for k, v in cfg.to_dict().items()}
  ft_cfg = finetune.finetune_train_config(finetune.finetune_config(64, epochs=2.0), {
      "train_config": saved, "step": 5}, num_labeled=80, seed=3)
  assert ft_cfg.batch_size == 32 and settings.num_train_steps(ft_cfg) == 5  # 2 epochs of 2.5 steps
  assert ft_cfg.export is False and ft_cfg.seed == 3


def test_pipeline_schedules_finetune_and_hands_its_export_on(tmp_path):
  from configs import smoke
  config = smoke.get_config()
  config.students = [config.students[0], copy.deepcopy(config.students[0])]
  config.students[0].finetune = finetune.finetune_config(resolution=32, frozen_blocks=1,
                                                         batch_size=32)
  names = [s.name for s in pipeline.schedule(config)]
  assert names.index("finetune-1") == names.index("student-1") + 1
  assert "finetune-2" not in names
  workdir = str(tmp_path)
  assert pipeline.final_export_dir(config, workdir, "student-1") == pipeline.export_dir(
      workdir, "finetune-1")
  assert pipeline.final_export_dir(config, workdir, "student-2") == pipeline.export_dir(
      workdir, "student-2")
  label_2 = next(s for s in pipeline.schedule(config) if s.name == "label-2")
  assert schedule.teacher_export_of(label_2, config, workdir) == pipeline.export_dir(
      workdir, "finetune-1")
  config.students[0].finetune.batch_size = 30
  from nsjax import validate
  with pytest.raises(validate.ConfigError, match="finetune.batch_size = 30"):
    validate.validate_config(config, workdir)
