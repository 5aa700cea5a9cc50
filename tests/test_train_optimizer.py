"""TF1 RMSProp against TensorFlow itself; learning-rate schedule and EMA values."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsjax.train import optimizer as opt

LRS = np.array([0.1, 0.05, 0.2, 0.0, 0.3, 0.01, 0.15, 0.08, 0.25, 0.12], np.float32)


def problem(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(16, 3)).astype(np.float32)
  y = rng.normal(size=(16, 4)).astype(np.float32)
  w = rng.normal(size=(3, 4)).astype(np.float32)
  b = rng.normal(size=(4,)).astype(np.float32)
  return x, y, w, b


def run_tf(x, y, w0, b0):
  import tensorflow as tf
  graph = tf.Graph()
  with graph.as_default():
    w = tf.compat.v1.Variable(w0)
    b = tf.compat.v1.Variable(b0)
    lr = tf.compat.v1.placeholder(tf.float32, [])
    loss = tf.reduce_mean(tf.square(tf.tanh(tf.matmul(x, w) + b) - y))
    optimizer = tf.compat.v1.train.RMSPropOptimizer(lr, decay=0.9, momentum=0.9, epsilon=1e-3)
    train_op = optimizer.minimize(loss, var_list=[w, b])
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      trajectory = []
      for step_lr in LRS:
        sess.run(train_op, {lr: step_lr})
        trajectory.append(sess.run([w, b]))
      slots = sess.run([optimizer.get_slot(w, "rms"), optimizer.get_slot(w, "momentum")])
  return trajectory, slots


def run_jax(x, y, w0, b0):
  tx = opt.tf1_rmsprop(lambda count: jnp.asarray(LRS)[count])
  params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
  loss = lambda p: jnp.mean(jnp.square(jnp.tanh(x @ p["w"] + p["b"]) - y))

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  trajectory = []
  for _ in LRS:
    params, state = step(params, state)
    trajectory.append([np.asarray(params["w"]), np.asarray(params["b"])])
  return trajectory, [np.asarray(state.ms["w"]), np.asarray(state.mom["w"])], state


def test_tf1_rmsprop_matches_tensorflow_step_by_step():
  problem_ = problem()
  tf_traj, tf_slots = run_tf(*problem_)
  jax_traj, jax_slots, state = run_jax(*problem_)
  for i, (ours, theirs) in enumerate(zip(jax_traj, tf_traj)):
    for a, b in zip(ours, theirs):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7, err_msg=f"step {i}")
  for a, b in zip(jax_slots, tf_slots):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-7)
  assert int(state.count) == len(LRS)
  # The parameters moved well beyond the tolerance, so the comparison means something.
  assert np.abs(jax_traj[-1][0] - problem_[2]).max() > 1e-2


def test_tf1_rmsprop_first_step_uses_unit_mean_square():
  tx = opt.tf1_rmsprop(0.5)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  np.testing.assert_array_equal(state.ms["w"], [1.0, 1.0])
  updates, state = tx.update({"w": jnp.array([2.0, -1.0])}, state)
  ms = 1.0 + (np.array([4.0, 1.0]) - 1.0) * 0.1  # 1.3, 1.0
  np.testing.assert_allclose(state.ms["w"], ms, rtol=1e-6)
  np.testing.assert_allclose(updates["w"], -0.5 * np.array([2.0, -1.0]) / np.sqrt(ms + 1e-3),
                             rtol=1e-6)


def test_official_schedule_values():
  # global batch 512 -> peak 0.032; 100 steps/epoch; warmup 500 steps; staircase every 240 steps.
  schedule = opt.learning_rate_schedule(0.016, 512, steps_per_epoch=100, warmup_epochs=5,
                                        decay_epochs=2.4, decay_factor=0.97)
  values = {s: float(schedule(s)) for s in (0, 1, 250, 499, 500, 719, 720, 1000, 24000)}
  expected = {0: 0.0, 1: 0.032 / 500, 250: 0.016, 499: 0.032 * 499 / 500,
              500: 0.032 * 0.97 ** 2,  # counted from step 0: floor(500 / 240) = 2
              719: 0.032 * 0.97 ** 2, 720: 0.032 * 0.97 ** 3, 1000: 0.032 * 0.97 ** 4,
              24000: 0.032 * 0.97 ** 100}
  for s in expected:
    np.testing.assert_allclose(values[s], expected[s], rtol=1e-5, err_msg=f"step {s}")
  no_warmup = opt.learning_rate_schedule(0.016, 256, steps_per_epoch=10, warmup_epochs=0)
  np.testing.assert_allclose(float(no_warmup(0)), 0.016, rtol=1e-6)
  np.testing.assert_allclose(float(no_warmup(24)), 0.016 * 0.97, rtol=1e-6)
  constant = opt.learning_rate_schedule(0.016, 256, 10, warmup_epochs=1, kind="constant")
  np.testing.assert_allclose([float(constant(5)), float(constant(999))], [0.008, 0.016],
                             rtol=1e-6)
  cosine = opt.learning_rate_schedule(0.016, 256, 10, warmup_epochs=0, decay_epochs=10,
                                      kind="cosine")
  np.testing.assert_allclose([float(cosine(50)), float(cosine(100))], [0.008, 0.0], atol=1e-8)
  with pytest.raises(ValueError, match="steps_per_epoch"):
    opt.learning_rate_schedule(0.016, 256, 0)


def test_ema_decay_values_and_update():
  for t, expected in [(0, 1 / 10), (1, 2 / 11), (10, 11 / 20), (1000, 1001 / 1010),
                      (10**6, 0.9999)]:
    np.testing.assert_allclose(float(opt.ema_decay(t, 0.9999)), expected, rtol=1e-6)
  np.testing.assert_allclose(float(opt.ema_decay(100, 0.5)), 0.5)
  ema = opt.ema_update({"a": jnp.array([1.0, 3.0])}, {"a": jnp.array([2.0, 1.0])}, 0.75)
  np.testing.assert_allclose(ema["a"], [1.25, 2.5])


def test_optimizer_names():
  schedule = lambda count: 0.1
  params = {"w": jnp.ones(3)}
  for name in opt.OPTIMIZERS:
    tx = opt.make_optimizer(name, schedule)
    updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    assert float(updates["w"][0]) < 0  # every optimizer descends
  with pytest.raises(ValueError, match="rmsprop"):
    opt.make_optimizer("lamb", schedule)


def test_frozen_parameters_get_no_update():
  params = {"stem": {"w": jnp.ones(2)}, "blocks_0": {"w": jnp.ones(2)},
            "blocks_1": {"w": jnp.ones(2)}, "head": {"w": jnp.ones(2)}}
  tx = opt.freeze(opt.tf1_rmsprop(0.1), params, frozen_blocks=1)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(jnp.abs(updates["stem"]["w"]).sum()) == 0
  assert float(jnp.abs(updates["blocks_0"]["w"]).sum()) == 0
  assert float(updates["blocks_1"]["w"][0]) < 0 and float(updates["head"]["w"][0]) < 0
