"""Exported models restore with nothing but their directory."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsjax import exported_model, models


def test_export_then_load_gives_same_logits(tmp_path):
  model = models.create_model("efficientnet-b0", 3, width=0.1, depth=0.1, block_stages=2,
                              small_image=True, resolution=16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  export = tmp_path / "teacher"
  exported_model.export_model(export, model, variables, {"class_names": ["a", "b", "c"]})
  assert exported_model.is_exported(export)
  restored_model, restored, metadata = exported_model.load_exported(export)
  assert restored_model == model and metadata == {"class_names": ["a", "b", "c"]}
  np.testing.assert_array_equal(jax.jit(restored_model.apply)(restored, x),
                                jax.jit(model.apply)(variables, x))
  assert exported_model.params_sha256(restored["params"]) == exported_model.params_sha256(variables["params"])
  bumped = jax.tree.map(lambda p: p + 1e-7, variables["params"])
  assert exported_model.params_sha256(bumped) != exported_model.params_sha256(variables["params"])


def test_missing_export_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_checkpoint"):
    exported_model.load_exported(tmp_path / "nothing")


def test_load_places_the_variables_with_the_callers_shardings(tmp_path):
  model = models.create_model("efficientnet-b0", 3, width=0.1, depth=0.1, block_stages=2,
                              small_image=True, resolution=16)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  exported_model.export_model(tmp_path / "m", model, variables)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, variables)
  _, restored, _ = exported_model.load_exported(tmp_path / "m", shardings=shardings)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)  # dicts, not lists
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    assert got.shape == want.shape and got.dtype == want.dtype and got.sharding == replicated


# One value for each override that load_exported trusts not to change any variable's shape.
_SHAPE_PRESERVING = {"dtype": "bfloat16", "dropout_rate": 0.5, "stochastic_depth_rate": 0.0,
                     "frozen_blocks": 2, "train_resolution": 24, "test_resolution": 24}


def _tiny_export(tmp_path):
  model = models.create_model("efficientnet-b0", 3, width=0.1, depth=0.1, block_stages=2,
                              small_image=True, resolution=16)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  exported_model.export_model(tmp_path / "m", model, variables)
  return model, variables, tmp_path / "m"


def _no_tracing(*args, **kwargs):
  raise AssertionError("load_exported traced the model although model.json records the shapes")


def test_load_restores_from_the_recorded_shapes_without_tracing(tmp_path, monkeypatch):
  model, variables, export = _tiny_export(tmp_path)
  description = exported_model.read_description(export)
  assert description["variables"] == exported_model.variables_spec(variables)
  monkeypatch.setattr(models, "abstract_variables", _no_tracing)
  assert set(_SHAPE_PRESERVING) == exported_model.SHAPE_PRESERVING_OVERRIDES
  for loaded_with in ({}, _SHAPE_PRESERVING):
    _, restored, _ = exported_model.load_exported(export, **loaded_with)
    assert jax.tree.structure(restored) == jax.tree.structure(variables)  # dicts, not lists
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(got, want)
      assert got.dtype == want.dtype


def test_shape_preserving_overrides_really_keep_every_shape(tmp_path):
  """The claim that lets load_exported skip tracing: each listed override traces the same tree."""
  model, variables, export = _tiny_export(tmp_path)
  recorded = exported_model.read_description(export)["variables"]
  for key, value in _SHAPE_PRESERVING.items():
    config = dict(models.describe(model), **{key: value})
    traced = models.abstract_variables(models.model_from_config(config))
    assert exported_model.variables_spec(traced) == recorded, key
  wider = models.model_from_config(dict(models.describe(model), width=0.2))
  assert exported_model.variables_spec(models.abstract_variables(wider)) != recorded


def test_abstract_variables_are_the_cpu_formulations_variables():
  # abstract_variables traces XLA's convolutions for speed; the model as built on this CPU
  # (shifted depthwise multiply-adds, the stem's taps) must hold exactly the same variables.
  model = models.create_model("efficientnet-b0", 10, width=0.25, depth=0.25)
  assert model.depthwise_impl == model.stem_impl == "auto"  # "shift" and "taps" on the CPU
  built = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                         jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  abstract = models.abstract_variables(model, resolution=32)
  assert exported_model.variables_spec(abstract) == exported_model.variables_spec(built)
  assert models.count_params(model) == sum(
      int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(built["params"]))


def test_each_model_is_counted_once(monkeypatch):
  traced = []
  original = models.abstract_variables
  monkeypatch.setattr(models, "abstract_variables",
                      lambda m, *a, **k: traced.append(m) or original(m, *a, **k))
  models.count_params.cache_clear()
  model = models.create_model("efficientnet-b0", 10, width=0.1, depth=0.1, block_stages=2)
  first = models.count_params(model)
  assert models.count_params(models.model_from_config(models.describe(model))) == first
  assert len(traced) == 1  # an equal model (the next iteration's teacher) is not traced again
  assert models.count_params(model.clone(width=0.2)) > first and len(traced) == 2


def test_older_exports_and_shape_changing_overrides_trace_the_model(tmp_path, monkeypatch):
  model, variables, export = _tiny_export(tmp_path)
  description = exported_model.read_description(export)
  traced = []
  original = models.abstract_variables
  monkeypatch.setattr(models, "abstract_variables",
                      lambda m, *a, **k: traced.append(m) or original(m, *a, **k))
  del description["variables"]  # as written before the shapes were recorded
  (export / exported_model.MODEL_JSON).write_text(json.dumps(description))
  _, restored, _ = exported_model.load_exported(export)
  assert len(traced) == 1
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(got, want)
  exported_model.export_model(export, model, variables)  # shapes recorded again

  class Traced(Exception):
    pass

  def stop_after_tracing(m, *a, **k):
    traced.append(m)
    raise Traced  # (restoring width 0.2 from a width 0.1 export would fail inside Orbax)
  monkeypatch.setattr(models, "abstract_variables", stop_after_tracing)
  with pytest.raises(Traced):  # width changes the shapes, so the recorded ones cannot serve
    exported_model.load_exported(export, width=0.2)
  assert len(traced) == 2 and traced[1].width == 0.2
