"""Train/inference steps: loss algebra, sharding equivalence, NaN guard, online teacher.

A two-layer CNN (conv + BatchNorm + dropout + dense) stands in for EfficientNet here: the step
does not care which model it runs, and this one compiles in a second instead of twenty. The
dense kernel (2048 x 10) is big enough for FSDP to shard it. EfficientNet itself goes through
the step in tests/test_train_loop.py.
"""
import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nsjax import models, parallel
from nsjax.models import inputs as model_inputs
from nsjax.evaluate import accuracy, inference
from nsjax.stages import label
from nsjax.objectives import noisy_student
from nsjax.train import optimizer as opt
from nsjax.train import settings
from nsjax.train import state as state_lib
from nsjax.train import steps

NUM_CLASSES = 10


class TinyNet(nn.Module):
  num_classes: int = NUM_CLASSES
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(32, (3, 3), dtype=self.dtype, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype, name="bn")(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="dense")(x).astype(jnp.float32)


IMAGE_SHAPE = (8, 8, 3)
# The step reads the objective, the weight decay and the EMA decay (its optimizer is built below).
LOSS = settings.step_settings(settings.resolve_config(dict(
    batch_size=8, steps_per_epoch=2, num_train_steps=3, unlabeled_ratio=3.0, temperature=0.5,
    weight_decay=1e-3, ema_decay=0.9999)))
SEED = 7


def make_batch(seed=0, labeled=8, unlabeled=8, teacher_image=False, image_shape=IMAGE_SHAPE):
  rng = np.random.default_rng(seed)
  batch = {"labeled": {"image": rng.normal(size=(labeled,) + image_shape).astype(np.float32),
                       "label": rng.integers(0, NUM_CLASSES, labeled).astype(np.int32)}}
  if unlabeled:
    u = {"image": rng.normal(size=(unlabeled,) + image_shape).astype(np.float32)}
    if teacher_image:
      u["teacher_image"] = rng.normal(size=(unlabeled,) + image_shape).astype(np.float32)
    else:
      u["probs"] = rng.dirichlet(np.ones(NUM_CLASSES), unlabeled).astype(np.float32)
    batch["unlabeled"] = u
  return batch


def build(mesh, fsdp=False, model=TinyNet(), loss=LOSS, teacher_model=None,
          image_shape=IMAGE_SHAPE):
  schedule = opt.learning_rate_schedule(0.5, 256, steps_per_epoch=2, warmup_epochs=1)
  tx = opt.tf1_rmsprop(schedule)
  abstract = state_lib.abstract_train_state(model, tx, image_shape)
  shardings = state_lib.state_shardings(mesh, abstract, fsdp)
  mask = opt.weight_decay_mask(abstract.params, abstract.batch_stats)
  teacher_shardings = None
  if teacher_model is not None:
    teacher_shardings = parallel.tree_shardings(mesh, {"params": abstract.params,
                                                       "batch_stats": abstract.batch_stats})
  step = steps.make_train_step(model, tx, schedule, loss, mesh, shardings, mask, teacher_model,
                               teacher_shardings)
  init = state_lib.make_init_fn(model, tx, mesh, image_shape, shardings)
  return init, step, shardings


def run(mesh, fsdp=False, num_steps=3, model=TinyNet(), image_shape=IMAGE_SHAPE):
  init, step, shardings = build(mesh, fsdp, model=model, image_shape=image_shape)
  state = init(steps.init_key(0))
  history = []
  for i in range(num_steps):
    batch = make_batch(i, image_shape=image_shape)
    state, metrics = step(state, parallel.to_global_batch(batch, mesh), SEED)
    history.append(jax.device_get(metrics))
  return state, history, shardings


@pytest.fixture(scope="module")
def mesh4():
  return parallel.make_mesh(4)


@pytest.fixture(scope="module")
def replicated_run(mesh4):
  return run(mesh4)


@pytest.fixture(scope="module")
def compiled(mesh4):
  return build(mesh4)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_four_device_mesh_equals_one_device(replicated_run):
  state4, hist4, _ = replicated_run
  state1, hist1, _ = run(parallel.make_mesh(1))
  assert int(state4.step) == 3 and all(h["is_finite"] for h in hist4)
  assert hist4[-1]["learning_rate"] > 0  # warmup passed step 0, the params really moved
  assert_trees_close(state4.params, state1.params)
  assert_trees_close(state4.ema_batch_stats, state1.ema_batch_stats)
  for h4, h1 in zip(hist4, hist1):
    np.testing.assert_allclose(h4["loss"], h1["loss"], rtol=1e-5)
  init = jax.device_get(build(parallel.make_mesh(1))[0](steps.init_key(0)).params)
  assert not np.allclose(init["dense"]["kernel"], np.asarray(state4.params["dense"]["kernel"]))


def test_fsdp_shards_params_slots_and_ema_and_matches_replicated(replicated_run, mesh4):
  state_rep, hist_rep, _ = replicated_run
  state_fsdp, hist_fsdp, shardings = run(mesh4, fsdp=True)
  sharded = P("data", None)
  assert shardings.params["dense"]["kernel"].spec == sharded
  assert shardings.ema_params["dense"]["kernel"].spec == sharded
  assert shardings.opt_state.ms["dense"]["kernel"].spec == sharded
  assert shardings.opt_state.mom["dense"]["kernel"].spec == sharded
  assert state_fsdp.params["dense"]["kernel"].sharding.spec == sharded
  assert shardings.params["bn"]["scale"].spec == P()  # small arrays stay replicated
  assert_trees_close(state_fsdp.params, state_rep.params)
  assert_trees_close(state_fsdp.opt_state, state_rep.opt_state)
  assert_trees_close(state_fsdp.ema_params, state_rep.ema_params)
  np.testing.assert_allclose(hist_fsdp[-1]["loss"], hist_rep[-1]["loss"], rtol=1e-5)
  # Evaluation takes the FSDP-sharded EMA variables as they are.
  eval_step = accuracy.make_eval_step(TinyNet(), mesh4)
  batch = parallel.to_global_batch(make_batch(60, unlabeled=0)["labeled"], mesh4)
  counts = [jax.device_get(eval_step(s.ema_variables, batch)) for s in (state_fsdp, state_rep)]
  hits = [c.pop("top1_hits") for c in counts]  # which images each got right: the same ones
  assert counts[0] == counts[1] and counts[0]["count"] == 8
  np.testing.assert_array_equal(hits[0], hits[1])


def test_eval_step_is_compiled_once_per_model_and_mesh(mesh4):
  """Corruption suites call make_eval_step once per setting; each call used to recompile."""
  eval_step = accuracy.make_eval_step(TinyNet(), mesh4)
  assert accuracy.make_eval_step(TinyNet(), mesh4) is eval_step  # equal modules share it
  variables = jax.jit(lambda: TinyNet().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)),
                                             train=False))()
  sizes = []
  for seed in (1, 2):  # other tests may have compiled other shapes already: count the growth
    batch = parallel.to_global_batch(make_batch(seed, unlabeled=0)["labeled"], mesh4)
    accuracy.make_eval_step(TinyNet(), mesh4)(variables, batch)
    sizes.append(eval_step._cache_size())
  assert sizes[1] == sizes[0] >= 1  # the second call (a new make_eval_step) compiled nothing


@pytest.mark.slow
def test_efficientnet_sharded_and_fsdp_match_single_device():
  """The same equivalences on the tiny EfficientNet (three ~20 s compiles, hence slow)."""
  model = models.create_model("efficientnet-b0", NUM_CLASSES, width=0.25, depth=0.25,
                              small_image=True, resolution=16, depthwise_impl="xla")
  shape = (16, 16, 3)
  one, _, _ = run(parallel.make_mesh(1), model=model, image_shape=shape)
  four, _, _ = run(parallel.make_mesh(4), model=model, image_shape=shape)
  fsdp, _, shardings = run(parallel.make_mesh(4), fsdp=True, model=model, image_shape=shape)
  assert any(s.spec != P() for s in jax.tree.leaves(shardings.params))
  # Stacked BatchNorms and RMSProp's 1/sqrt(ms) amplify reduction-order rounding a little.
  assert_trees_close(four.params, one.params, rtol=1e-3, atol=1e-4)
  assert_trees_close(fsdp.params, four.params, rtol=1e-3, atol=1e-4)
  assert_trees_close(fsdp.ema_batch_stats, four.ema_batch_stats, rtol=1e-3, atol=1e-4)
  moved = np.abs(np.asarray(four.params["head"]["dense"]["kernel"]) -
                 np.asarray(build(parallel.make_mesh(1), model=model, image_shape=shape)[0](
                     steps.init_key(0)).params["head"]["dense"]["kernel"])).max()
  assert moved > 1e-2  # the tolerance is far below how far training moved the weights


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32_loss(compiled, mesh4):
  init16, step16, _ = build(mesh4, model=TinyNet(dtype=jnp.bfloat16))
  state16, metrics16 = step16(init16(steps.init_key(0)),
                              parallel.to_global_batch(make_batch(50), mesh4), SEED)
  init32, step32, _ = compiled
  _, metrics32 = step32(init32(steps.init_key(0)), parallel.to_global_batch(make_batch(50), mesh4),
                        SEED)
  assert bool(metrics16["is_finite"])
  assert state16.params["conv"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(metrics16["loss"], metrics32["loss"], rtol=3e-2)


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_traced_seed_draws_the_keys_a_constant_seed_drew():
  """The step takes its seed as an argument; runs keep the noise they had with a constant."""
  for seed in (0, 7, 2**31 - 1):
    constant = jax.random.key_data(steps.dropout_key(seed, jnp.int32(5)))
    traced = jax.jit(steps.dropout_key)(np.int32(seed), jnp.int32(5))
    np.testing.assert_array_equal(constant, jax.random.key_data(traced))


def test_loss_decomposition_and_joint_batchnorm_match_manual(compiled, mesh4):
  init, step, _ = compiled
  state = init(steps.init_key(0))
  # Move off the initial state so the checked step is a generic one (step 1, nonzero lr).
  state, _ = step(state, parallel.to_global_batch(make_batch(10), mesh4), SEED)
  before = jax.device_get(state)
  batch = make_batch(11)
  new_state, metrics = step(state, parallel.to_global_batch(batch, mesh4), SEED)
  metrics = jax.device_get(metrics)

  images = np.concatenate([batch["labeled"]["image"], batch["unlabeled"]["image"]])
  logits, updates = TinyNet().apply(
      {"params": before.params, "batch_stats": before.batch_stats}, images, train=True,
      rngs={"dropout": steps.dropout_key(SEED, 1)}, mutable=["batch_stats"])
  logits = np.asarray(logits, np.float64)
  onehot = np.eye(NUM_CLASSES)[batch["labeled"]["label"]]
  labeled_targets = onehot * 0.9 + 0.1 / NUM_CLASSES
  sharp = batch["unlabeled"]["probs"].astype(np.float64) ** (1 / LOSS.objective.temperature)
  sharp /= sharp.sum(-1, keepdims=True)
  labeled = -(labeled_targets * np_log_softmax(logits[:8])).sum(-1).mean()
  unlabeled = -(sharp * np_log_softmax(logits[8:])).sum(-1).mean()
  p = before.params
  l2 = sum(float((np.asarray(w, np.float64) ** 2).sum()) for w in
           [p["conv"]["kernel"], p["conv"]["bias"], p["dense"]["kernel"], p["dense"]["bias"]]) / 2
  expected = labeled + 3.0 * unlabeled + 1e-3 * l2
  np.testing.assert_allclose(metrics["labeled_loss"], labeled, rtol=1e-5)
  np.testing.assert_allclose(metrics["unlabeled_loss"], unlabeled, rtol=1e-5)
  np.testing.assert_allclose(metrics["weight_decay_loss"], 1e-3 * l2, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
  expected_accuracy = (logits[:8].argmax(-1) == batch["labeled"]["label"]).mean()
  np.testing.assert_allclose(metrics["train_accuracy"], expected_accuracy)
  # BatchNorm statistics come from the 16 images of the joint forward pass.
  assert_trees_close(new_state.batch_stats, updates["batch_stats"])
  # EMA with num_updates = 2 (the new step): decay min(0.9999, 3 / 12) = 0.25.
  ema = lambda old, new: np.asarray(old) * 0.25 + np.asarray(new) * 0.75
  after = jax.device_get(new_state)
  assert_trees_close(after.ema_params, jax.tree.map(ema, before.ema_params, after.params))
  assert_trees_close(after.ema_batch_stats,
                     jax.tree.map(ema, before.ema_batch_stats, after.batch_stats))
  # LR of this update: warmup over 2 steps -> step 1 uses half of 0.5 * 256 / 256.
  np.testing.assert_allclose(metrics["learning_rate"], 0.25)
  assert int(new_state.step) == 2


def test_non_finite_input_leaves_state_unchanged(compiled, mesh4):
  init, step, _ = compiled
  state = init(steps.init_key(0))
  state, _ = step(state, parallel.to_global_batch(make_batch(20), mesh4), SEED)
  before = jax.device_get(state)
  batch = make_batch(21)
  batch["unlabeled"]["image"][3, 0, 0, 0] = np.nan
  after, metrics = step(state, parallel.to_global_batch(batch, mesh4), SEED)
  assert not bool(metrics["is_finite"])
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(after))):
    np.testing.assert_array_equal(x, y)
  assert int(after.step) == 1


def test_supervised_step_without_unlabeled_batch(compiled, mesh4):
  init, step, _ = compiled
  state = init(steps.init_key(0))
  batch = make_batch(30, unlabeled=0)
  _, metrics = step(state, parallel.to_global_batch(batch, mesh4), SEED)
  metrics = jax.device_get(metrics)
  assert metrics["unlabeled_loss"] == 0.0
  np.testing.assert_allclose(metrics["loss"], metrics["labeled_loss"] +
                             metrics["weight_decay_loss"], rtol=1e-6)
  assert metrics["labeled_loss"] > 1.0  # ~log(10) for an untrained net


def test_online_teacher_equal_to_initial_student_gives_expected_loss(mesh4):
  model = TinyNet()
  init, step, _ = build(mesh4, teacher_model=model)
  state = init(steps.init_key(0))
  initial = jax.device_get(state)
  teacher_vars = {"params": initial.ema_params, "batch_stats": initial.ema_batch_stats}
  batch = make_batch(40, teacher_image=True)
  _, metrics = step(state, parallel.to_global_batch(batch, mesh4), SEED, teacher_vars)
  metrics = jax.device_get(metrics)

  teacher_logits = np.asarray(model.apply(teacher_vars, batch["unlabeled"]["teacher_image"]),
                              np.float64)
  teacher_probs = np.exp(np_log_softmax(teacher_logits))
  targets = teacher_probs ** (1 / LOSS.objective.temperature)
  targets /= targets.sum(-1, keepdims=True)
  images = np.concatenate([batch["labeled"]["image"], batch["unlabeled"]["image"]])
  student_logits, _ = model.apply(initial.variables, images, train=True,
                                  rngs={"dropout": steps.dropout_key(SEED, 0)},
                                  mutable=["batch_stats"])
  student = np_log_softmax(np.asarray(student_logits, np.float64))
  expected_unlabeled = -(targets * student[8:]).sum(-1).mean()
  np.testing.assert_allclose(metrics["unlabeled_loss"], expected_unlabeled, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["loss"], metrics["labeled_loss"] + 3.0 * expected_unlabeled +
      metrics["weight_decay_loss"], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Pure target/loss math.

def test_label_smoothing_values():
  out = np.asarray(noisy_student.smooth_labels(jnp.array([2, 0]), 4, 0.1))
  np.testing.assert_allclose(out[0], [0.025, 0.025, 0.925, 0.025])
  np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)


def test_temperature_sharpening_and_hard_labels():
  p = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], np.float32)
  for t in (1.0, 0.5, 2.0):
    expected = p.astype(np.float64) ** (1 / t)
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(noisy_student.sharpen(jnp.asarray(p), t), expected, rtol=1e-5)
  sharp = np.asarray(noisy_student.sharpen(jnp.asarray(p), 0.5))
  assert sharp[0, 0] > 0.5 and sharp[1, 2] > 0.8  # lower T sharpens
  hard = np.asarray(noisy_student.pseudo_label_targets(jnp.asarray(p), "hard", 0.5, 0.1))
  np.testing.assert_allclose(hard, [[0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3],
                                    [0.1 / 3, 0.1 / 3, 0.1 / 3 + 0.9]], rtol=1e-6)
  with pytest.raises(ValueError, match="pseudo_labels"):
    dataclasses.replace(LOSS.objective, pseudo_labels="argmax")


def test_weight_decay_mask_excludes_batchnorm_only():
  tiny = state_lib.abstract_train_state(TinyNet(), opt.tf1_rmsprop(0.1), IMAGE_SHAPE)
  mask = opt.weight_decay_mask(tiny.params, tiny.batch_stats)
  assert mask == {"conv": {"kernel": True, "bias": True}, "dense": {"kernel": True, "bias": True},
                  "bn": {"scale": False, "bias": False}}
  model = models.create_model("efficientnet-b0", 10, width=0.25, depth=0.25, small_image=True)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  flat = jax.tree_util.tree_flatten_with_path(
      opt.weight_decay_mask(variables["params"], variables["batch_stats"]))[0]
  for path, decayed in flat:
    name = jax.tree_util.keystr(path)
    assert decayed == ("tpu_batch_normalization" not in name), name
  # Each BatchNorm has scale + bias in params and mean + var in batch_stats.
  assert sum(not d for _, d in flat) == len(jax.tree.leaves(variables["batch_stats"]))
  frozen = opt.weight_decay_mask(variables["params"], variables["batch_stats"], frozen_blocks=1)
  assert not frozen["stem"]["conv2d"]["kernel"] and not frozen["blocks_0"]["conv2d"]["kernel"]
  assert frozen["blocks_1"]["conv2d"]["kernel"] and frozen["head"]["dense"]["bias"]


def test_l2_penalty_value():
  params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
  np.testing.assert_allclose(opt.l2_penalty(params, {"a": True, "b": False}), 2.5)
  np.testing.assert_allclose(opt.l2_penalty(params, {"a": True, "b": True}), 7.0)


# ------------------------------------------------------------------------------------------------
# Inference and evaluation.

def test_predict_top_k_and_masked_eval(mesh4):
  model = TinyNet()
  variables = model.init(jax.random.key(3), jnp.zeros((1,) + IMAGE_SHAPE))
  rng = np.random.default_rng(5)
  images = rng.normal(size=(8,) + IMAGE_SHAPE).astype(np.float32)
  predict = inference.make_predict_step(model, mesh4, top_k=3)
  out = jax.device_get(predict(variables, parallel.to_global_batch(images, mesh4)))
  logits = np.asarray(model.apply(variables, images), np.float64)
  probs = np.exp(np_log_softmax(logits))
  np.testing.assert_allclose(out["probs"], probs, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(out["top_k_indices"], np.argsort(-probs, -1)[:, :3])
  np.testing.assert_allclose(out["top_k_probs"], np.sort(probs, -1)[:, ::-1][:, :3], rtol=1e-5)

  # Pixel inputs normalised inside the step give the model's output on the normalised images.
  pixels = np.asarray(images * model_inputs.STDDEV_RGB + model_inputs.MEAN_RGB, np.float32)
  on_device = inference.make_predict_step(model, mesh4, normalize_inputs=True)
  from_pixels = jax.device_get(on_device(variables, parallel.to_global_batch(pixels, mesh4)))
  np.testing.assert_allclose(from_pixels["probs"], probs, rtol=1e-4, atol=1e-6)

  # Labels: first 3 examples right at top-1; the next 3 right only within top-5; last 2 padded
  # and deliberately "right", so counting them would change both numbers.
  order = np.argsort(-logits, -1)
  labels = np.concatenate([order[:3, 0], order[3:6, 3], order[6:, 0]]).astype(np.int32)
  mask = np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  eval_step = accuracy.make_eval_step(model, mesh4)
  batches = lambda: [{"image": images, "label": labels, "mask": mask}]
  result = accuracy.evaluate(eval_step, variables, batches(), mesh4)
  assert result == {"top1": 0.5, "top5": 1.0, "num_examples": 6}
  assert accuracy.make_eval_fn(model, mesh4, batches)(variables)["top1"] == 0.5


@pytest.mark.parametrize("top_k", [0, 3])
def test_pseudo_label_fields_on_the_mesh_match_numpy(mesh4, top_k):
  rng = np.random.default_rng(7)
  probs = rng.dirichlet(np.full(6, 0.3), 8).astype(np.float32)
  probs[0] = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]   # ties: the lower class wins, as numpy's argmax
  probs[1, :] = [1e-7, 3e-8, 2e-8, 0.5, 0.25, 0.25]  # float16 subnormals and underflow to 0
  fields_fn = jax.jit(functools.partial(label.pseudo_label_fields, top_k=top_k),
                      out_shardings=parallel.data_sharding(mesh4))
  got = jax.device_get(fields_fn(parallel.to_global_batch(probs, mesh4)))
  np.testing.assert_array_equal(got["label"], probs.argmax(-1))
  assert got["label"].dtype == np.int32
  np.testing.assert_array_equal(got["confidence"], probs.max(-1))  # exact: the float32 maximum
  if top_k:
    order = np.argsort(-probs, -1, kind="stable")[:, :top_k]
    np.testing.assert_array_equal(got["classes"], order)
    expected = np.take_along_axis(probs, order, -1).astype(np.float16)
  else:
    assert "classes" not in got
    expected = probs.astype(np.float16)
  assert got["probs"].dtype == np.float16
  np.testing.assert_array_equal(got["probs"].view(np.uint16), expected.view(np.uint16))


def test_pseudo_label_step_is_the_predict_step_then_its_fields(mesh4):
  model = TinyNet()
  variables = model.init(jax.random.key(3), jnp.zeros((1,) + IMAGE_SHAPE))
  pixels = np.random.default_rng(1).uniform(0, 255, (8,) + IMAGE_SHAPE).astype(np.float32)
  batch = parallel.to_global_batch(pixels, mesh4)
  probs = inference.make_predict_step(model, mesh4, normalize_inputs=True)(variables, batch)["probs"]
  expected = jax.device_get(label.pseudo_label_fields(probs, 2))
  got = label.make_pseudo_label_step(model, mesh4, top_k=2)(variables, batch)
  assert all(v.sharding.is_equivalent_to(parallel.data_sharding(mesh4), v.ndim)
             for v in got.values())
  got = jax.device_get(got)
  assert set(got) == set(expected)
  for key in expected:
    np.testing.assert_allclose(got[key], expected[key], rtol=1e-6, err_msg=key)
