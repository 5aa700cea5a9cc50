"""Every experiment config in configs/ loads, validates on 4 (fake) devices, and its models, shapes
and schedule hang together -- without allocating a single weight (jax.eval_shape only)."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from nsjax import pipeline, validate
from nsjax.stages import train as train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def load_config(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}",
                                                os.path.join(ROOT, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config()


def model_stages(config):
  stages = [("teacher", config.teacher)]
  stages += [(f"student-{i}", s) for i, s in enumerate(config.students, start=1)]
  return stages + ([("baseline", config.baseline)] if config.get("baseline") else [])


def abstract_init_and_forward(model, train_resolution, test_resolution):
  """Shapes of an init at the training resolution and of a forward pass at the test one, traced
  once (nothing is computed): (variables, logits)."""
  def init_and_forward(x_train, x_test):
    variables = model.init(jax.random.key(0), x_train, train=False)
    return variables, model.apply(variables, x_test, train=False)
  return jax.eval_shape(init_and_forward, *(
      jax.ShapeDtypeStruct((2, r, r, 3), np.float32) for r in (train_resolution, test_resolution)))


def num_params(variables):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables["params"])))


def test_the_expected_configs_exist():
  assert {"smoke", "svhn_b0", "cifar10_4000", "imagenet_10pct", "imagenet_b7_l2"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_consistent(name, tmp_path):
  module, config = load_config(name)
  assert "python -m nsjax.main --config=configs/" + name + ".py" in " ".join(
      module.__doc__.split()), "the docstring must hold the exact command"
  if not config.data.num_classes:
    # Folder sources take the class count from the data at run time (pipeline.resolve_data);
    # without a folder here, check the schedule's shapes with a stand-in count.
    config.data.num_classes = 5
  validate.validate_config(config, str(tmp_path))  # 4 fake devices: batch divisibility included
  devices = jax.device_count()

  previous_params = None
  for stage_name, stage in model_stages(config):
    # XLA's convolutions trace in fewer ops than the CPU formulations (B7 -> L2's four networks:
    # 23 -> 14 s); parameters and outputs have the same shapes whichever runs (test_models).
    model = train_stage.build_model(stage, config).clone(depthwise_impl="xla", stem_impl="xla")
    finetune = stage.get("finetune")
    test_resolution = finetune.resolution if finetune else stage.test_resolution
    variables, logits = abstract_init_and_forward(model, stage.resolution, test_resolution)
    assert logits.shape == (2, config.data.num_classes), stage_name
    params = num_params(variables)
    if finetune:
      assert (finetune.batch_size or stage.train.batch_size) % devices == 0
      assert finetune.frozen_blocks < len(model.blocks), "frozen_blocks beyond the model's blocks"
    if stage_name.startswith("student"):
      unlabeled_batch = round(stage.train.unlabeled_ratio * stage.train.batch_size)
      assert unlabeled_batch % devices == 0, stage_name
      assert params >= previous_params, f"{stage_name} is smaller than its teacher"
    if stage_name != "baseline":
      previous_params = params

  names = [s.name for s in pipeline.schedule(config)]
  assert names[0] == "teacher" and names[-1] == "summary"
  for i, student in enumerate(config.students, start=1):
    assert names.index(f"student-{i}") > names.index("teacher")
    if not student.get("online_teacher"):
      assert names.index(f"label-{i}") == names.index(f"student-{i}") - 1
    if student.get("finetune"):
      assert names.index(f"finetune-{i}") == names.index(f"student-{i}") + 1
    assert f"eval-student-{i}" in names
  assert len(names) == len(set(names))


def test_svhn_learning_rate_reaches_the_published_final_value():
  from nsjax.train import settings
  module, config = load_config("svhn_b0")
  cfg = train_stage.train_config(config.teacher, config, module.NUM_LABELED)
  schedule = settings.make_schedule(cfg)
  assert settings.num_train_steps(cfg) == 109_474
  assert float(schedule(10_000)) == pytest.approx(0.008 * 0.97 ** 11, rel=1e-5)
  assert float(schedule(109_473)) == pytest.approx(2e-4, rel=0.03)  # one staircase step


def test_cli_keeps_freed_memory_for_large_steps_only():
  """`python -m nsjax.main` applies nsjax.host_memory by the config's largest step."""
  from nsjax import host_memory, main
  pixels = {name: main.pixels_per_step(load_config(name)[1]) for name in CONFIGS}
  worth = {name: host_memory.worth_retaining(p) for name, p in pixels.items()}
  assert not worth["demo"] and not worth["smoke"]  # compile-bound: small buffers
  assert worth["imagenet_10pct"] and worth["imagenet_b7_l2"]
  assert pixels["imagenet_10pct"] >= 2048 * 224 * 224
  assert main.pixels_per_step(object()) == 0  # malformed: validation reports it later
