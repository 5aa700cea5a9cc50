"""Official TF checkpoint import: names, EMA preference, scopes, one error for all problems, CLI."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from nsjax import exported_model, models
from nsjax.models import convert
from nsjax.tools import convert_checkpoint

TINY = dict(width=0.25, depth=0.25, small_image=True, test_resolution=32)
TINY_FLAGS = ["--width=0.25", "--depth=0.25", "--small_image", "--test_resolution=32"]
SCOPE = "efficientnet-b0"
TEACHER = "teacher_model/efficientnet-b0"


def tiny_model(**overrides):
  return models.create_model("efficientnet-b0", 10, **dict(TINY, **overrides))


def random_variables(model, seed):
  """Random values for every variable (BN statistics included, fan-in scaled kernels), so that a
  wrongly mapped or skipped tensor changes the logits. numpy only: no init to compile."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in traverse_util.flatten_dict(models.abstract_variables(model)).items():
    shape = leaf.shape
    if path[-1] == "var":
      value = rng.uniform(0.5, 2.0, shape)
    elif path[-1] == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 1:  # biases, BN betas and means
      value = rng.normal(0, 0.2, shape)
    else:
      value = rng.normal(0, 1, shape) / np.sqrt(np.prod(shape[:-1]))
    out[path] = value.astype(np.float32)
  return traverse_util.unflatten_dict(out)


_apply = jax.jit(lambda model, variables, x: model.apply(variables, x, train=False),
                 static_argnums=0)


def logits(model, variables, seed=0):
  x = jax.random.normal(jax.random.key(seed), (2, 32, 32, 3))
  return np.asarray(_apply(model, variables, x))


def assert_trees_equal(a, b):
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert set(fa) == set(fb)
  for key in fa:
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=str(key))


def test_official_names_and_shapes_follow_reference():
  shapes = convert.official_shapes(models.create_model("efficientnet-b0", 1000))
  # stem 5 + block 0 (e == 1) 14 + 15 expanded blocks x 19 + head 7.
  assert len(shapes) == 5 + 14 + 15 * 19 + 7
  assert shapes["stem/conv2d/kernel"] == (3, 3, 3, 32)
  assert shapes["stem/tpu_batch_normalization/moving_variance"] == (32,)
  assert shapes["blocks_0/depthwise_conv2d/depthwise_kernel"] == (3, 3, 32, 1)
  assert shapes["blocks_0/tpu_batch_normalization/gamma"] == (32,)
  assert shapes["blocks_0/conv2d/kernel"] == (1, 1, 32, 16)  # project conv when e == 1
  assert shapes["blocks_0/tpu_batch_normalization_1/beta"] == (16,)
  assert shapes["blocks_1/conv2d/kernel"] == (1, 1, 16, 96)  # expand conv
  assert shapes["blocks_1/depthwise_conv2d/depthwise_kernel"] == (3, 3, 96, 1)
  assert shapes["blocks_1/se/conv2d/kernel"] == (1, 1, 96, 4)
  assert shapes["blocks_1/se/conv2d_1/bias"] == (96,)
  assert shapes["blocks_1/conv2d_1/kernel"] == (1, 1, 96, 24)
  assert shapes["blocks_1/tpu_batch_normalization_2/moving_mean"] == (24,)
  assert shapes["blocks_15/conv2d_1/kernel"] == (1, 1, 1152, 320)
  assert shapes["head/conv2d/kernel"] == (1, 1, 320, 1280)
  assert shapes["head/dense/kernel"] == (1280, 1000)
  assert shapes["head/dense/bias"] == (1000,)


def test_cli_converts_teacher_scope_preferring_ema_and_skipping_slots(tmp_path):
  model = tiny_model()
  ema_values, raw_values = random_variables(model, 1), random_variables(model, 2)
  tensors = {}
  for name, value in convert.flax_to_official(raw_values, TEACHER).items():
    tensors[name] = value
    tensors[name + "/RMSProp"] = np.ones_like(value)
    tensors[name + "/RMSProp_1"] = np.zeros_like(value)
  for name, value in convert.flax_to_official(ema_values, TEACHER).items():
    tensors[name + convert.EMA_SUFFIX] = value
  tensors["global_step"] = np.array(1234, np.int64)
  convert.write_tf_checkpoint(tmp_path / "run" / "model.ckpt-1234", tensors)

  export_dir = tmp_path / "export"
  rc = convert_checkpoint.main(["--tf_checkpoint", str(tmp_path / "run"), "--model",
                                "efficientnet-b0", "--output", str(export_dir)] + TINY_FLAGS)
  assert rc == 0
  loaded_model, loaded, metadata = exported_model.load_exported(export_dir)

  assert loaded_model.num_classes == 10  # read from head/dense
  assert loaded_model.small_image and loaded_model.test_resolution == 32
  assert (loaded_model.width, loaded_model.depth) == (0.25, 0.25)
  expected = logits(model, ema_values)
  np.testing.assert_allclose(logits(loaded_model, loaded), expected, rtol=1e-6, atol=1e-6)
  assert np.abs(logits(model, raw_values) - expected).max() > 1e-2  # EMA really differs
  source = metadata["source"]
  assert source["scope"] == TEACHER
  assert source["values"] == "ExponentialMovingAverage"
  n_variables = len(convert.official_shapes(model))
  assert source["ignored_variables"] == 2 * n_variables + 1  # two slots per variable, global_step
  assert source["path"] == str(tmp_path / "run")
  assert metadata["params_sha256"] == exported_model.params_sha256(loaded["params"])
  assert n_variables == len(jax.tree.leaves(loaded))


def test_student_scope_is_default_and_teacher_selectable():
  model = tiny_model()
  student, teacher = random_variables(model, 3), random_variables(model, 4)
  tensors = {**convert.flax_to_official(student, SCOPE),
             **convert.flax_to_official(teacher, TEACHER)}
  imported = convert.import_official(tensors, model)
  assert imported.scope == SCOPE and imported.values == "raw"
  assert imported.num_ignored == len(convert.official_shapes(model))  # the teacher's variables
  assert_trees_equal(imported.variables, student)
  assert_trees_equal(convert.official_to_flax(tensors, model, scope=TEACHER), teacher)


def test_use_ema_false_takes_raw_values():
  model = tiny_model()
  raw, ema = random_variables(model, 5), random_variables(model, 6)
  tensors = convert.flax_to_official(raw, SCOPE)
  for name, value in convert.flax_to_official(ema, SCOPE).items():
    tensors[name + convert.EMA_SUFFIX] = value
  assert_trees_equal(convert.official_to_flax(tensors, model), ema)
  assert_trees_equal(convert.official_to_flax(tensors, model, use_ema=False), raw)


def test_one_error_lists_missing_unexpected_and_misshaped():
  model = tiny_model()
  tensors = convert.flax_to_official(random_variables(model, 7), SCOPE)
  del tensors[f"{SCOPE}/blocks_2/se/conv2d_1/bias"]
  tensors[f"{SCOPE}/blocks_0/extra/kernel"] = np.zeros((3,), np.float32)
  tensors["stray/variable"] = np.zeros((3,), np.float32)
  tensors[f"{SCOPE}/head/dense/kernel"] = np.zeros((7, 10), np.float32)
  with pytest.raises(ValueError) as info:
    convert.official_to_flax(tensors, model)
  message = str(info.value)
  assert "1 missing" in message and f"{SCOPE}/blocks_2/se/conv2d_1/bias" in message
  assert "2 unexpected" in message and f"{SCOPE}/blocks_0/extra/kernel" in message
  assert "stray/variable" in message
  assert "1 mis-shaped" in message and f"{SCOPE}/head/dense/kernel: (7, 10)" in message


def test_wrong_model_or_path_is_a_clear_error(tmp_path, capsys):
  model = tiny_model()
  tensors = convert.flax_to_official(random_variables(model, 8), SCOPE)
  b1 = models.create_model("efficientnet-b1", 10, **TINY)
  with pytest.raises(ValueError, match=r"model scopes found: \['efficientnet-b0'\]"):
    convert.official_to_flax(tensors, b1)
  rc = convert_checkpoint.main(["--tf_checkpoint", str(tmp_path / "missing"), "--model",
                                "efficientnet-b0"])
  assert rc == 1
  assert "Cannot read a TF checkpoint" in capsys.readouterr().err
