"""Exported models restore with nothing but their directory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsjax import checkpoint, models


def test_export_then_load_gives_same_logits(tmp_path):
  model = models.create_model("efficientnet-b0", 3, width=0.1, depth=0.1, small_image=True,
                              resolution=16)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  export = tmp_path / "teacher"
  checkpoint.export_model(export, model, variables, {"class_names": ["a", "b", "c"]})
  assert checkpoint.is_exported(export)
  restored_model, restored, metadata = checkpoint.load_exported(export)
  assert restored_model == model and metadata == {"class_names": ["a", "b", "c"]}
  np.testing.assert_array_equal(jax.jit(restored_model.apply)(restored, x),
                                jax.jit(model.apply)(variables, x))
  assert checkpoint.params_sha256(restored["params"]) == checkpoint.params_sha256(variables["params"])
  bumped = jax.tree.map(lambda p: p + 1e-7, variables["params"])
  assert checkpoint.params_sha256(bumped) != checkpoint.params_sha256(variables["params"])


def test_missing_export_names_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_checkpoint"):
    checkpoint.load_exported(tmp_path / "nothing")


def test_load_places_the_variables_with_the_callers_shardings(tmp_path):
  model = models.create_model("efficientnet-b0", 3, width=0.1, depth=0.1, small_image=True,
                              resolution=16)
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  checkpoint.export_model(tmp_path / "m", model, variables)
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated, variables)
  _, restored, _ = checkpoint.load_exported(tmp_path / "m", shardings=shardings)
  assert jax.tree.structure(restored) == jax.tree.structure(variables)  # dicts, not lists
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
    assert got.shape == want.shape and got.dtype == want.dtype and got.sharding == replicated
