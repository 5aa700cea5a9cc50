"""Compiling a train step ahead, in the background (nsjax.train.compile_ahead): the call gets that
executable when its arguments match exactly, else compiles as usual; a run trained with it ends
bitwise where one without it does."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nsjax import parallel
from nsjax.train import compile_ahead, compile_cache, loop, settings
from test_train_loop import BATCH, MODEL, NUM_CLASSES, SIZE, batches

# Its own learning rate: this module's step functions (and their compile counts) are its own.
CONFIG = dict(batch_size=BATCH, steps_per_epoch=4, base_learning_rate=0.3, warmup_epochs=1,
              unlabeled_ratio=1.0, log_every_steps=4, checkpoint_every_steps=8,
              keep_checkpoints=2, num_train_steps=8, steps_per_call=4, export=False)
SPEC = {"labeled": {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), np.float32),
                    "label": jax.ShapeDtypeStruct((BATCH,), np.int32)},
        "unlabeled": {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), np.float32),
                      "probs": jax.ShapeDtypeStruct((BATCH, NUM_CLASSES), np.float32)}}


def test_a_matching_call_gets_the_program_compiled_ahead_and_jit_compiles_nothing():
  fn = jax.jit(lambda x, y: jnp.tanh(x @ y))
  x = jnp.ones((8, 8)) * 0.1
  abstract = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=x.sharding)
  compile_ahead.start(fn, abstract, abstract)
  compile_ahead.start(fn, abstract, abstract)  # once per program
  assert compile_ahead.started(fn) == 1
  program = compile_ahead.ready(fn, x, x)
  assert isinstance(program, jax.stages.Compiled)
  np.testing.assert_array_equal(program(x, x), jnp.tanh(x @ x))
  assert fn._cache_size() == 0  # jit itself never compiled
  # Other arguments (a shape, a dtype) get the jitted function, which compiles at the call.
  assert compile_ahead.ready(fn, jnp.ones((4, 8)), jnp.ones((8, 8))) is fn
  assert compile_ahead.ready(fn, x.astype(jnp.bfloat16), x) is fn


def test_a_program_that_fails_to_compile_ahead_falls_back_to_the_call(monkeypatch):
  fn = jax.jit(lambda x: x + 1)
  abstract = jax.ShapeDtypeStruct((3,), jnp.float32, sharding=jnp.zeros(3).sharding)

  class Broken:
    def compile(self):
      raise RuntimeError("out of memory")

  monkeypatch.setattr(fn, "lower", lambda *args: Broken(), raising=False)
  compile_ahead.start(fn, abstract)
  assert compile_ahead.ready(fn, jnp.zeros(3)) is fn


def test_train_uses_the_step_compiled_ahead_and_ends_where_it_would_have(tmp_path):
  mesh = parallel.make_mesh()
  cfg = settings.resolve_config(CONFIG)
  fns = compile_cache.run_functions(MODEL, mesh, settings.step_settings(cfg),
                                    (SIZE, SIZE, 3), -1)
  four_steps = compile_cache.train_step(fns, None, None, False, 4)
  # One object per program however it is asked for (the single step by default or as 1).
  assert (compile_cache.train_step(fns, None, None, False)
          is compile_cache.train_step(fns, None, None, False, 1) is not four_steps)
  plain = loop.train(CONFIG, MODEL, batches, tmp_path / "plain", mesh=mesh)
  assert four_steps._cache_size() == 1  # compiled at its first call
  jax.clear_caches()
  loop.compile_ahead(CONFIG, MODEL, SPEC, mesh=mesh, evaluates=False)
  assert compile_ahead.started(four_steps) == 1
  ahead = loop.train(CONFIG, MODEL, batches, tmp_path / "ahead", mesh=mesh)
  assert four_steps._cache_size() == 0  # every call ran the program compiled ahead
  for a, b in zip(jax.tree.leaves(plain.state), jax.tree.leaves(ahead.state)):
    np.testing.assert_array_equal(a, b)


def test_a_run_whose_batches_are_not_the_spec_compiles_at_its_call_and_looks_once(
    tmp_path, monkeypatch):
  mesh = parallel.make_mesh()
  config = dict(CONFIG, base_learning_rate=0.25)  # a step function of this test's own
  fns = compile_cache.run_functions(MODEL, mesh, settings.step_settings(
      settings.resolve_config(config)), (SIZE, SIZE, 3), -1)
  four_steps = compile_cache.train_step(fns, None, None, False, 4)
  other = jax.tree.map(lambda x: jax.ShapeDtypeStruct((2 * x.shape[0],) + x.shape[1:], x.dtype),
                       SPEC)  # twice the batch the run will have
  loop.compile_ahead(config, MODEL, other, mesh=mesh, evaluates=False)
  looks = []
  real_ready = compile_ahead.ready
  monkeypatch.setattr(compile_ahead, "ready", lambda fn, *a: looks.append(fn) or real_ready(fn, *a))
  loop.train(config, MODEL, batches, tmp_path, mesh=mesh)
  assert looks == [four_steps]  # once for the run's two calls
  assert four_steps._cache_size() == 1  # compiled at the call, as without compile_ahead


def test_a_stage_that_cannot_compile_ahead_is_left_to_its_first_step(monkeypatch, caplog):
  from nsjax import pipeline
  from nsjax.stages import train as train_stage

  def broken(stage, ctx):
    raise KeyError("resolution")

  monkeypatch.setattr(train_stage, "compile_ahead", broken)
  monkeypatch.setattr(pipeline, "_done", lambda state, workdir, name: name == "teacher")
  stages = [pipeline.Stage("teacher", "teacher", 0), pipeline.Stage("label-1", "label", 1),
            pipeline.Stage("student-1", "student", 1)]
  with caplog.at_level("WARNING"):
    ctx = types.SimpleNamespace(config=ml_collections.ConfigDict({"students": [{}]}),
                                state=None, workdir="unused")
    pipeline._compile_ahead(stages, ctx=ctx)
  warnings = [r.getMessage() for r in caplog.records]
  assert warnings == ["Stage student-1: its train step is not compiled ahead (KeyError: "
                      "'resolution'); it compiles at its first step."]
