"""The official optimizer, learning-rate schedule, EMA and weight decay, as small pure functions.

Noisy Student inherits the TF EfficientNet recipe, whose numbers only transfer if the update rule
is TF1's, not optax's `rmsprop`: TF1 keeps epsilon INSIDE the square root, starts the mean-square
slot at ONE (so early steps are small, not huge) and multiplies the learning rate into the momentum
accumulator (so a changing learning rate does not rescale past momentum). `tf1_rmsprop` follows
TF's kernel (`ApplyRMSProp` in training_ops.cc) operation by operation.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("rmsprop", "adamw", "sgd")
Schedule = Callable[[jax.Array], jax.Array]


class TF1RMSPropState(NamedTuple):
  count: jax.Array  # updates applied so far; the schedule is evaluated at this value
  ms: Any  # mean-square slot ("RMSProp" in TF checkpoints), starts at ones
  mom: Any  # momentum slot ("RMSProp_1"), starts at zeros


def tf1_rmsprop(learning_rate: float | Schedule, decay: float = 0.9, momentum: float = 0.9,
                epsilon: float = 1e-3) -> optax.GradientTransformation:
  """`tf.compat.v1.train.RMSPropOptimizer(lr, decay, momentum, epsilon)` as an optax transformation.

  Per step (TF's own operation order, so results agree to float rounding):
    ms  <- ms + (g^2 - ms) * (1 - decay)            # == decay * ms + (1 - decay) * g^2
    mom <- momentum * mom + lr(count) * g / sqrt(ms + epsilon)
    update = -mom                                    # w <- w - mom
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    return TF1RMSPropState(count=jnp.zeros([], jnp.int32),
                           ms=jax.tree.map(jnp.ones_like, params),
                           mom=jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    del params
    lr = jnp.asarray(schedule(state.count), jnp.float32)
    ms = jax.tree.map(lambda s, g: s + (jnp.square(g) - s) * (1.0 - decay), state.ms, grads)
    mom = jax.tree.map(lambda m, s, g: momentum * m + lr * g / jnp.sqrt(s + epsilon),
                       state.mom, ms, grads)
    updates = jax.tree.map(jnp.negative, mom)
    return updates, TF1RMSPropState(count=state.count + 1, ms=ms, mom=mom)

  return optax.GradientTransformation(init, update)


def learning_rate_schedule(base_learning_rate: float, batch_size: int, steps_per_epoch: float,
                           warmup_epochs: float = 5.0, decay_epochs: float = 2.4,
                           decay_factor: float = 0.97, kind: str = "exponential") -> Schedule:
  """The official schedule: peak = base * batch / 256, linear warmup, staircase exponential decay.

  As TF's `build_learning_rate`: the decayed value is `peak * factor ** floor(step / (decay_epochs
  * steps_per_epoch))` counted from step 0 (not from the end of warmup); during the first
  `int(warmup_epochs * steps_per_epoch)` steps it is replaced by `peak * step / warmup_steps`
  (so step 0 has learning rate 0). `kind="constant"` keeps the peak after warmup (for small
  experiments); "cosine" decays to 0 over `decay_epochs`.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}.")
  peak = base_learning_rate * batch_size / 256.0
  warmup_steps = int(warmup_epochs * steps_per_epoch)
  decay_steps = decay_epochs * steps_per_epoch
  if kind not in ("exponential", "constant", "cosine"):
    raise ValueError(f"Unknown lr schedule {kind!r}; use 'exponential', 'constant' or 'cosine'.")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if kind == "exponential":
      lr = peak * jnp.power(decay_factor, jnp.floor(step / decay_steps))
    elif kind == "cosine":
      lr = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * jnp.minimum(step / decay_steps, 1.0)))
    else:
      lr = jnp.full_like(step, peak)
    if warmup_steps > 0:
      lr = jnp.where(step < warmup_steps, peak * step / warmup_steps, lr)
    return lr

  return schedule


def make_optimizer(name: str, schedule: Schedule, *, rmsprop_decay: float = 0.9,
                   momentum: float = 0.9, rmsprop_epsilon: float = 1e-3,
                   adamw_weight_decay: float = 0.0) -> optax.GradientTransformation:
  """"rmsprop" (TF1, the official choice), "adamw" or "sgd" (with momentum) for small experiments.

  L2 weight decay is part of the loss for every optimizer (as officially); `adamw_weight_decay`
  adds AdamW's decoupled decay on top and defaults to none.
  """
  if name == "rmsprop":
    return tf1_rmsprop(schedule, rmsprop_decay, momentum, rmsprop_epsilon)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=adamw_weight_decay)
  if name == "sgd":
    return optax.sgd(schedule, momentum=momentum or None)
  raise ValueError(f"Unknown optimizer {name!r}; choose one of {OPTIMIZERS}.")


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """TF `ExponentialMovingAverage(decay, num_updates=step)`: min(decay, (1 + t) / (10 + t))."""
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema: Any, value: Any, decay: jax.Array) -> Any:
  """shadow <- shadow - (1 - decay) * (shadow - value), TF's formulation."""
  return jax.tree.map(lambda e, v: e - (1.0 - decay) * (e - v), ema, value)


def batchnorm_mask(params: Any, batch_stats: Any) -> Any:
  """True for BatchNorm scale/bias: params whose module also owns entries in `batch_stats`.

  Deciding by structure (not by a name pattern) keeps the rule right for any model with BN.
  """
  bn_modules = {path[:-1] for path, _ in _flatten_keys(batch_stats)}
  return jax.tree_util.tree_map_with_path(lambda path, _: _keys(path)[:-1] in bn_modules, params)


def frozen_mask(params: Any, frozen_blocks: int) -> Any:
  """True for parameters of the stem and blocks 0..frozen_blocks-1 (test-resolution fine-tuning)."""
  def frozen(path, _):
    top = _keys(path)[0]
    if frozen_blocks < 0:
      return False
    if top == "stem":
      return True
    return top.startswith("blocks_") and int(top.split("_")[1]) < frozen_blocks
  return jax.tree_util.tree_map_with_path(frozen, params)


def weight_decay_mask(params: Any, batch_stats: Any, frozen_blocks: int = -1) -> Any:
  """True for the variables that get L2 decay: every trainable parameter except BatchNorm's."""
  return jax.tree.map(lambda bn, fr: not (bn or fr), batchnorm_mask(params, batch_stats),
                      frozen_mask(params, frozen_blocks))


def l2_penalty(params: Any, mask: Any) -> jax.Array:
  """sum(w^2) / 2 over the masked leaves (multiply by the weight-decay coefficient)."""
  leaves = [jnp.sum(jnp.square(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
            if m]
  return 0.5 * sum(leaves) if leaves else jnp.zeros([], jnp.float32)


def freeze(tx: optax.GradientTransformation, params: Any,
           frozen_blocks: int) -> optax.GradientTransformation:
  """Zero updates for frozen parameters (momentum would otherwise keep moving them)."""
  if frozen_blocks < 0:
    return tx
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable",
                        frozen_mask(params, frozen_blocks))
  return optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()}, labels)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _flatten_keys(tree: Any) -> list[tuple[tuple[str, ...], Any]]:
  return [(_keys(p), v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]]
