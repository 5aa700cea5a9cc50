"""Several updates per compiled call (`train.steps_per_call`): the calls it makes, and runs with it
end to end on the tiny EfficientNet of test_train_loop over a 4-device mesh."""
import jax
import numpy as np
import pytest

from nsjax import exported_model, parallel
from nsjax.evaluate import accuracy
from nsjax.train import compile_cache, loop, reporter, settings
from test_train_loop import MODEL, NUM_STEPS, SIZE, batches, eval_batches, read_scalars

# Another learning rate than test_train_loop's runs, so this module's step functions are its own
# (their compile counts below are this module's) whichever worker runs it.
CONFIG = dict(batch_size=8, steps_per_epoch=4, base_learning_rate=0.4, warmup_epochs=1,
              unlabeled_ratio=2.0, log_every_steps=4, checkpoint_every_steps=8,
              keep_checkpoints=2, eval_every_steps=8)


def calls(total, k, cadences, start=0):
  """The (first step, number of steps) of each call from `start` to `total`."""
  out, step = [], start
  while step < total:
    n = loop.steps_in_call(step, total, k, cadences)
    out.append((step, n))
    step += n
  return out


def test_calls_end_at_every_log_checkpoint_and_evaluation():
  assert calls(16, 4, (4, 8, 8)) == [(0, 4), (4, 4), (8, 4), (12, 4)]
  assert calls(16, 1, (4, 8, 8)) == [(s, 1) for s in range(16)]
  # A log every 6 steps cuts the call over steps 5-8 short, and the last 2 steps are too few.
  assert calls(14, 4, (6, 0)) == [(0, 4), (4, 1), (5, 1), (6, 1), (7, 1), (8, 4), (12, 1),
                                  (13, 1)]
  # A call may end on an event (the log at step 8), never pass one.
  assert loop.steps_in_call(4, 100, 4, (8,)) == 4
  assert loop.steps_in_call(4, 100, 4, (7,)) == 1
  # A run resumed at any step makes the calls of the run that never stopped, from there.
  whole = calls(50, 4, (6, 10))
  for start, _ in whole:
    assert calls(50, 4, (6, 10), start) == [c for c in whole if c[0] >= start]


def test_steps_per_call_must_be_a_positive_integer():
  base = dict(CONFIG, num_train_steps=4)
  for bad in (0, -2):
    with pytest.raises(ValueError, match="steps_per_call must be an integer >= 1"):
      settings.resolve_config(dict(base, steps_per_call=bad))
  with pytest.raises(TypeError, match="steps_per_call"):  # ConfigDict keeps the default's type
    settings.resolve_config(dict(base, steps_per_call=1.5))
  assert settings.resolve_config(base).steps_per_call == 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  eval_fn = accuracy.make_eval_fn(MODEL, mesh, eval_batches)
  root = tmp_path_factory.mktemp("steps_per_call")
  config = dict(CONFIG, steps_per_call=4)
  single = loop.train(dict(CONFIG, num_train_steps=NUM_STEPS), MODEL, batches, root / "single",
                      eval_fn=eval_fn, mesh=mesh)
  fns = compile_cache.run_functions(MODEL, mesh, settings.step_settings(
      settings.resolve_config(dict(config, num_train_steps=NUM_STEPS))), (SIZE, SIZE, 3), -1)
  one_step = compile_cache.train_step(fns, None, None, False)
  compiled_single = one_step._cache_size()
  full = loop.train(dict(config, num_train_steps=NUM_STEPS), MODEL, batches, root / "full",
                    eval_fn=eval_fn, mesh=mesh)
  compiled_after = one_step._cache_size()
  loop.train(dict(config, num_train_steps=NUM_STEPS // 2), MODEL, batches, root / "resumed",
             eval_fn=eval_fn, mesh=mesh)
  resumed = loop.train(dict(config, num_train_steps=NUM_STEPS), MODEL, batches,
                       root / "resumed", eval_fn=eval_fn, mesh=mesh)
  return dict(root=root, mesh=mesh, single=single, full=full, resumed=resumed,
              compiled=(compiled_single, compiled_after))


def test_no_warning_when_every_cadence_is_a_multiple(runs, tmp_path, caplog):
  with caplog.at_level("WARNING", logger="nsjax.train.loop"):
    loop.train(dict(CONFIG, num_train_steps=8, steps_per_call=4, export=False,
                    eval_every_steps=0), MODEL, batches, tmp_path, mesh=runs["mesh"])
  assert not [r for r in caplog.records if "steps_per_call" in r.getMessage()]


def test_every_call_makes_four_steps_and_the_single_step_never_compiles(runs):
  compiled_single, compiled_after = runs["compiled"]
  assert compiled_single >= 1  # the run with steps_per_call = 1 compiled it ...
  assert compiled_after == compiled_single  # ... and the run of 4-step calls used no new one
  multi = compile_cache.train_step(
      compile_cache.run_functions(MODEL, runs["mesh"], settings.step_settings(
          settings.resolve_config(dict(CONFIG, num_train_steps=NUM_STEPS))), (SIZE, SIZE, 3), -1),
      None, None, False, 4)
  assert multi._cache_size() == 1


def test_a_resumed_run_of_several_steps_per_call_is_bitwise_identical(runs):
  full, resumed = runs["full"], runs["resumed"]
  assert (full.step, resumed.step) == (NUM_STEPS, NUM_STEPS)
  a = jax.tree_util.tree_flatten_with_path(jax.device_get(full.state))[0]
  b = jax.tree.leaves(jax.device_get(resumed.state))
  for (path, x), y in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert exported_model.params_sha256(full.state.ema_params) == exported_model.params_sha256(
      resumed.state.ema_params)


def test_several_steps_per_call_make_the_same_updates_and_logs(runs):
  """The same updates as one call per step, up to float rounding; every step is logged, each
  window's mean over its own 4 steps, and evaluation and checkpoints keep their steps."""
  single = read_scalars(runs["root"] / "single")
  multi = read_scalars(runs["root"] / "full")
  for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "eval/top1"):
    assert sorted(multi[tag]) == sorted(single[tag]), tag
  # The learning rate is a function of the step alone: exact windows prove each step's value
  # was logged once, in order.
  for s in single["train/learning_rate"]:
    np.testing.assert_allclose(multi["train/learning_rate"][s], single["train/learning_rate"][s],
                               rtol=1e-6)
  np.testing.assert_allclose(multi["train/loss"][4], single["train/loss"][4], rtol=1e-4)
  np.testing.assert_allclose(multi["train/loss"][16], single["train/loss"][16], rtol=0.05)
  kept = sorted(int(p.name) for p in (runs["root"] / "full" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert kept == [8, 16]
  a = jax.device_get(runs["single"].state.params)["head"]["dense"]["kernel"]
  b = jax.device_get(runs["full"].state.params)["head"]["dense"]["kernel"]
  np.testing.assert_allclose(a, b, atol=0.05)


def test_a_non_finite_step_inside_a_call_is_named_and_nothing_is_saved(runs, tmp_path):
  config = dict(CONFIG, num_train_steps=NUM_STEPS, eval_every_steps=0, export=False,
                steps_per_call=4)
  with pytest.raises(reporter.NonFiniteError) as err:
    loop.train(config, MODEL, lambda s: batches(s, nan_at=9), tmp_path, mesh=runs["mesh"])
  message = str(err.value)
  assert "Training step 10 (state.step 9 -> 10)" in message  # the call's second step
  kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == ["8"]


def test_calls_cut_short_by_a_log_resume_exactly(runs, tmp_path, caplog):
  """Logs every 6 steps and checkpoints every 5 with 4-step calls: single steps fill the gaps
  (the run says why), and a run stopped at step 10 resumes to the same state as one that never
  stopped."""
  config = dict(CONFIG, log_every_steps=6, checkpoint_every_steps=5, eval_every_steps=0,
                export=False, steps_per_call=4)
  with caplog.at_level("WARNING", logger="nsjax.train.loop"):
    full = loop.train(dict(config, num_train_steps=14), MODEL, batches, tmp_path / "full",
                      mesh=runs["mesh"])
  warned = [r.getMessage() for r in caplog.records if "steps_per_call=4" in r.getMessage()]
  assert warned and all(f"{key}=" in warned[0] for key in ("log_every_steps",
                                                           "checkpoint_every_steps",
                                                           "num_train_steps"))
  assert "eval_every_steps" not in warned[0]
  loop.train(dict(config, num_train_steps=10), MODEL, batches, tmp_path / "resumed",
             mesh=runs["mesh"])
  resumed = loop.train(dict(config, num_train_steps=14), MODEL, batches, tmp_path / "resumed",
                       mesh=runs["mesh"])
  for x, y in zip(jax.tree.leaves(jax.device_get(full.state)),
                  jax.tree.leaves(jax.device_get(resumed.state))):
    np.testing.assert_array_equal(x, y)
  assert sorted(read_scalars(tmp_path / "full")["train/loss"]) == [6, 12, 14]


def test_an_online_teacher_in_calls_of_two_steps(runs, tmp_path):
  """The teacher's variables pass through every step of a call: 2-step calls give the 1-step
  calls' losses, up to rounding."""
  from test_train_loop import SmallNet
  import jax.numpy as jnp
  teacher_model = SmallNet()
  teacher = loop.Teacher(teacher_model,
                         teacher_model.init(jax.random.key(42), jnp.zeros((1, 8, 8, 3))))

  def online_batches(start):
    for b in batches(start):
      yield {"labeled": b["labeled"],
             "unlabeled": {"image": b["unlabeled"]["image"],
                           "teacher_image": b["unlabeled"]["image"][:, ::2, ::2]}}

  config = dict(CONFIG, num_train_steps=4, eval_every_steps=0, export=False, log_every_steps=2,
                checkpoint_every_steps=4)
  losses = {}
  for k in (1, 2):
    result = loop.train(dict(config, steps_per_call=k), SmallNet(), online_batches,
                        tmp_path / str(k), mesh=runs["mesh"], teacher=teacher)
    assert result.step == 4 and result.metrics["unlabeled_loss"] > 0
    losses[k] = read_scalars(tmp_path / str(k))["train/unlabeled_loss"]
  assert sorted(losses[2]) == [2, 4]
  for s in (2, 4):
    np.testing.assert_allclose(losses[2][s], losses[1][s], rtol=1e-3)
