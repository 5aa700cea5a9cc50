"""Config validation (nsjax.validate): every check fails with one clear message, before compute."""
from __future__ import annotations

import importlib.util
import logging
import os

import jax
import pytest

from nsjax import exported_model, models, pipeline, schedule, validate
from nsjax.stages import registry
from nsjax.validate import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_config():
  path = os.path.join(ROOT, "configs", "smoke.py")
  spec = importlib.util.spec_from_file_location("smoke_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def export_tiny(directory, num_classes, name="efficientnet-b0"):
  model = models.create_model(name, num_classes, width=0.1, depth=0.1, small_image=True,
                              resolution=28)
  variables = jax.jit(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 28, 28, 3)),
                                         train=False))()
  exported_model.export_model(directory, model, variables)
  return str(directory)


def fails(config, workdir, *fragments):
  with pytest.raises(ConfigError) as error:
    validate.validate_config(config, str(workdir))
  for fragment in fragments:
    assert fragment in str(error.value), (fragment, str(error.value))
  return str(error.value)


def test_the_smoke_config_is_valid(tmp_path):
  validate.validate_config(smoke_config(), str(tmp_path))


def test_unknown_model_lists_the_valid_ones(tmp_path):
  config = smoke_config()
  config.students[0].model = "efficientnet-b99"
  message = fails(config, tmp_path, "students[0].model: unknown model 'efficientnet-b99'")
  assert all(name in message for name in models.MODEL_SPECS)
  assert "efficientnet-l2" in message


def test_teacher_checkpoint_missing(tmp_path):
  config = smoke_config()
  config.teacher.checkpoint = str(tmp_path / "no-such-export")
  fails(config, tmp_path, "teacher.checkpoint", "no-such-export", "holds no exported model",
        "convert_checkpoint")


def test_teacher_checkpoint_with_other_classes(tmp_path):
  config = smoke_config()
  config.teacher.checkpoint = export_tiny(tmp_path / "three-classes", 3)
  fails(config, tmp_path, "predicts 3 classes but config.data.num_classes is 10")


def test_teacher_checkpoint_of_another_architecture_than_teacher_model(tmp_path):
  config = smoke_config()
  config.teacher.checkpoint = export_tiny(tmp_path / "b0", 10)
  config.teacher.model = "efficientnet-b1"
  fails(config, tmp_path, "teacher.model is 'efficientnet-b1'", "holds 'efficientnet-b0'")
  config.teacher.model = "efficientnet-b0"
  validate.validate_config(config, str(tmp_path))  # consistent: imports fine


def test_smaller_student_only_warns(tmp_path, caplog):
  config = smoke_config()
  config.teacher.model_overrides = dict(width=0.5, depth=0.5)
  with caplog.at_level(logging.WARNING):
    validate.validate_config(config, str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("students[0]" in w and "smaller than its teacher teacher" in w for w in warnings)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    validate.validate_config(smoke_config(), str(tmp_path))  # equal sizes: no warning
  assert not [r for r in caplog.records if "smaller than" in r.getMessage()]


def test_global_batch_not_divisible_by_devices(tmp_path):
  assert jax.device_count() == 4  # tests/conftest.py
  config = smoke_config()
  config.teacher.train.batch_size = 30
  fails(config, tmp_path, "teacher.train.batch_size = 30 is not divisible by the 4 devices",
        "multiple of 4")
  config = smoke_config()
  config.students[0].train.unlabeled_ratio = 1.5  # 48 -> fine; 1.25 -> 40 fine; 1.1 -> 35 not
  validate.validate_config(config, str(tmp_path))
  config.students[0].train.unlabeled_ratio = 1.1
  fails(config, tmp_path, "unlabeled batch (1.1 x 32 = 35) is not divisible by the 4 devices")
  config = smoke_config()
  config.label.batch_size = 6
  fails(config, tmp_path, "label.batch_size = 6 is not divisible by the 4 devices")


@pytest.mark.parametrize("where, key, value, fragment", [
    ("student", "unlabeled_ratio", -1.0, "students[0].train.unlabeled_ratio = -1.0 is out of range"),
    ("student", "unlabeled_ratio", 0.0, "students[0].train.unlabeled_ratio must be > 0"),
    ("student", "temperature", 0.0, "students[0].train: temperature = 0.0 is out of range (0,"),
    ("teacher", "temperature", 1000.0, "teacher.train: temperature = 1000.0 is out of range"),
    ("teacher", "label_smoothing", 1.0, "teacher.train: label_smoothing = 1.0 is out of range"),
    ("student", "pseudo_labels", "medium", "students[0].train: pseudo_labels = 'medium'"),
])
def test_training_values_out_of_range(tmp_path, where, key, value, fragment):
  config = smoke_config()
  stage = config.teacher if where == "teacher" else config.students[0]
  stage.train[key] = value
  fails(config, tmp_path, fragment)


def test_threshold_out_of_range(tmp_path):
  config = smoke_config()
  config.balance.min_threshold = 1.5
  fails(config, tmp_path, "balance.min_threshold = 1.5 is out of range [0.0, 1.0)")


@pytest.mark.parametrize("size", [0, 2**32])
def test_shard_bytes_out_of_range(tmp_path, size):
  config = smoke_config()
  config.label.shard_bytes = size
  fails(config, tmp_path, f"label.shard_bytes = {size}: use 1 .. 2**31 bytes")


def test_images_per_class_below_minus_one_is_refused(tmp_path):
  config = smoke_config()
  config.balance.num_image_per_class = -2
  fails(config, tmp_path, "balance.num_image_per_class = -2: use a count >= 1, 0")


def test_training_settings_of_every_stage_are_checked_up_front(tmp_path):
  config = smoke_config()
  config.students[0].train.learning_rate = 0.1
  fails(config, tmp_path, "Unknown config key students[0].train.learning_rate",
        "did you mean students[0].train.base_learning_rate?")
  config = smoke_config()
  config.students[0].train.num_train_steps = None
  fails(config, tmp_path, "students[0].train: Set config.num_train_steps or config.num_epochs")


def test_workdir_not_writable(tmp_path):
  blocker = tmp_path / "a-file"
  blocker.write_text("not a directory")
  fails(smoke_config(), blocker / "workdir", "is not writable", "choose a --workdir")


def test_no_students(tmp_path):
  config = smoke_config()
  config.students = []
  fails(config, tmp_path, "config.students is empty")


def test_dataset_classes_must_match_the_config(tmp_path):
  config = smoke_config()
  validate.check_datasets(config, str(tmp_path))  # mnist5k has 10 classes; no build needed
  config.data.num_classes = 12
  with pytest.raises(ConfigError, match=r"config.data.labeled \(mnist5k/labels_10\) has 10 classes "
                     r"but config.data.num_classes is 12"):
    validate.check_datasets(config, str(tmp_path))
  config = smoke_config()
  config.data.test.name = "no_such_dataset_xyz"
  with pytest.raises(ConfigError, match="config.data.test.name: unknown TFDS dataset"):
    validate.check_datasets(config, str(tmp_path))


def test_stage_inputs_follow_the_schedule():
  config = smoke_config()
  assert schedule.stage_inputs("label-1", config) == ["teacher"]
  assert schedule.stage_inputs("student-1", config) == ["teacher", "label-1"]
  assert schedule.stage_inputs("eval-student-1", config) == ["student-1"]
  assert schedule.stage_inputs("summary", config) == ["label-1", "eval-teacher", "eval-student-1"]
  config.students[0].online_teacher = True
  assert schedule.stage_inputs("student-1", config) == ["teacher"]


def test_a_stage_run_alone_needs_its_inputs_before_any_compute(tmp_path, monkeypatch):
  def no_compute(*args, **kwargs):
    raise AssertionError("computed before the config was checked")
  for kind in registry.RUNNERS:
    monkeypatch.setitem(registry.RUNNERS, kind, no_compute)
  monkeypatch.setattr(pipeline, "prepare_data", no_compute)
  with pytest.raises(ConfigError, match="Stage student-1 reads the output of teacher, label-1, "
                     "which this workdir has not completed"):
    pipeline.run(smoke_config(), str(tmp_path), stage="student-1")
  bad = smoke_config()
  bad.teacher.model = "resnet-50"
  with pytest.raises(ConfigError, match="teacher.model: unknown model 'resnet-50'"):
    pipeline.run(bad, str(tmp_path))
