"""The jitted train step: gradients, optimizer, EMA and the non-finite guard around the objective.

What is minimised is the objective's (nsjax.objectives, chosen by the config's `objective`): this
step is the same for any of them. It adds the L2 weight decay, weight_decay * sum(w^2) / 2 over
all parameters but BatchNorm's (as officially, whatever the optimizer). A step whose loss,
gradients or new state are not all finite leaves the state exactly as it was and reports
`is_finite = False`, so the loop can stop before anything bad is saved.

Batches (global batches; every leaf's leading axis is split over the mesh's `data` axis):

  {"labeled":   {"image": float32 [B, H, W, 3] (normalised), "label": int32 [B]},
   "unlabeled": {"image": float32 [U, H, W, 3], "probs": float [U, C]}            # offline teacher
             or {"image": float32 [U, H, W, 3], "teacher_image": float32 [U, h, w, 3]}}  # online

"unlabeled" is absent for supervised (teacher) training. With an online teacher, `teacher_image`
is the un-augmented view at the teacher's own resolution; the teacher runs in eval mode on its
EMA variables inside the same jitted step and its softmax is the objective's `teacher_probs`.
The student sees [labeled images; unlabeled images] in ONE forward pass (so BatchNorm statistics
cover both, as officially).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nsjax import parallel
from nsjax.train import optimizer as opt
from nsjax.train.settings import StepSettings
from nsjax.train.state import TrainState

# Independent streams derived from the run's seed: parameter init, and per-step noise.
_INIT_STREAM, _NOISE_STREAM = 0, 1


def init_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)


def dropout_key(seed: int | jax.Array, step: jax.Array) -> jax.Array:
  """The noise of update `step` depends on (seed, step) only, so a resumed run replays exactly.
  `seed` may be traced (the compiled step takes it as an argument): the same key either way."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM), step)


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def teacher_probs(teacher_model, teacher_variables: Any, images: jax.Array) -> jax.Array:
  """The frozen teacher's softmax: eval mode (no noise), no gradient."""
  logits = teacher_model.apply(jax.lax.stop_gradient(teacher_variables), images, train=False)
  return jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))


def unlabeled_probs(unlabeled: dict[str, Any], teacher: Callable[[jax.Array], jax.Array] | None
                    ) -> jax.Array:
  """The teacher's probabilities for the unlabeled half: computed now by the online `teacher`
  (images -> probs) from its own view, or read from the batch (offline pseudo labels)."""
  if teacher is not None:
    if "teacher_image" not in unlabeled:
      raise ValueError("An online teacher needs batch['unlabeled']['teacher_image'] (its own "
                       "un-augmented view); got keys " + str(sorted(unlabeled)) + ".")
    return teacher(unlabeled["teacher_image"])
  if "probs" in unlabeled:
    return unlabeled["probs"]
  raise ValueError("batch['unlabeled'] needs 'probs' (offline pseudo labels) or "
                   f"'teacher_image' together with a teacher; got keys {sorted(unlabeled)}.")


def forward_inputs(batch: dict[str, Any], teacher: Callable[[jax.Array], jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array | None]:
  """(images of the one forward pass: the labeled ones, then the unlabeled ones; the teacher's
  probabilities for the unlabeled ones, or None without them)."""
  images = batch["labeled"]["image"]
  unlabeled = batch.get("unlabeled")
  if unlabeled is None:
    return images, None
  probs = unlabeled_probs(unlabeled, teacher)
  return jnp.concatenate([images, unlabeled["image"].astype(images.dtype)], axis=0), probs


def train_step(state: TrainState, batch: dict[str, Any], seed: int | jax.Array, *,
               model: nn.Module,
               tx: optax.GradientTransformation, schedule: opt.Schedule,
               settings: StepSettings, decay_mask: Any,
               teacher_model: nn.Module | None = None,
               teacher_variables: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update (pure; see `make_train_step` for the jitted, sharded version)."""
  teacher = None
  if teacher_model is not None:
    teacher = lambda images: teacher_probs(teacher_model, teacher_variables, images)
  images, probs = forward_inputs(batch, teacher)
  labels = batch["labeled"]["label"]

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, rngs={"dropout": dropout_key(seed, state.step)},
                                  mutable=["batch_stats"])
    l2 = opt.l2_penalty(params, decay_mask)
    loss, parts = settings.objective.loss(logits, labels, probs)
    decay_loss = settings.weight_decay * l2
    parts = {**parts, "weight_decay_loss": decay_loss}
    return loss + decay_loss, (updates.get("batch_stats", {}), logits, parts)

  (loss, (batch_stats, logits, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  decay = opt.ema_decay(step, settings.ema_decay)
  candidate = TrainState(step=step, params=params, batch_stats=batch_stats, opt_state=opt_state,
                         ema_params=opt.ema_update(state.ema_params, params, decay),
                         ema_batch_stats=opt.ema_update(state.ema_batch_stats, batch_stats, decay))
  # A NaN/Inf anywhere in the gradients makes their global norm non-finite, and with finite
  # gradients and learning rate the optimizer and EMA updates stay finite; BatchNorm statistics
  # are checked on their own. (A few scalars, instead of one reduction per leaf of the state.)
  grad_norm = optax.global_norm(grads)
  is_finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
               & tree_all_finite(batch_stats))
  # lax.cond, not a per-leaf jnp.where: XLA fuses each `where` with the update that feeds it and
  # the CPU compile time triples; a conditional just picks one of two finished trees.
  new_state = jax.lax.cond(is_finite, lambda: candidate, lambda: state)
  metrics = {
      "loss": loss,
      **parts,
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
      "grad_norm": grad_norm,
      "train_accuracy": jnp.mean(jnp.argmax(logits[:labels.shape[0]], -1) == labels),
      "is_finite": is_finite,
  }
  return new_state, metrics


def seed_argument(seed: int, mesh: jax.sharding.Mesh) -> jax.Array:
  """The step's `seed` argument: an int32 scalar placed once, replicated over `mesh`."""
  return jax.device_put(np.int32(seed), parallel.replicated(mesh))


def scanned(step_fn: Callable[..., tuple[TrainState, Any]]) -> Callable[..., Any]:
  """`step_fn(state, batch, *args)` -> `fn(state, batches, *args)`: one update per batch of
  `batches` (each leaf stacked on a new leading axis), in order; metrics stacked the same way.

  Why: a step of a small model on a CPU is mostly fixed cost -- the call, and XLA:CPU allocating
  (and the kernel zeroing) the step's buffers afresh -- which one call of several steps pays once
  (docs/models.md, "Several steps per call"). Same updates, but XLA fuses the loop body
  differently, so the floats round differently from one call per step.
  """
  def fn(state, batches, *args):
    return jax.lax.scan(lambda carry, batch: step_fn(carry, batch, *args), state, batches)
  return fn


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: opt.Schedule,
                    settings: StepSettings, mesh: jax.sharding.Mesh,
                    state_shardings: Any, decay_mask: Any, teacher_model: nn.Module | None = None,
                    teacher_shardings: Any = None, steps_per_call: int = 1) -> Callable[..., Any]:
  """`step(state, batch, seed) -> (state, metrics)`, or `step(state, batch, seed,
  teacher_variables)` when `teacher_model` is given. Jitted with explicit shardings; the state's
  buffers are donated. The seed (an int32 scalar, see `seed_argument`) is an argument, not a
  constant: runs that differ only in their seed share one compilation.

  With `steps_per_call` k > 1 it makes k updates a call (`scanned`): `batch` holds k batches
  stacked on a leading axis (`parallel.to_global_batches`), and each metric k values.
  """
  data = (parallel.data_sharding(mesh) if steps_per_call == 1
          else parallel.stacked_data_sharding(mesh))
  rep = parallel.replicated(mesh)
  kwargs = dict(model=model, tx=tx, schedule=schedule, settings=settings,
                decay_mask=decay_mask)
  if teacher_model is None:
    fn = lambda state, batch, seed: train_step(state, batch, seed, **kwargs)
    in_shardings = (state_shardings, data, rep)
  else:
    fn = lambda state, batch, seed, tvars: train_step(state, batch, seed,
                                                      teacher_model=teacher_model,
                                                      teacher_variables=tvars, **kwargs)
    in_shardings = (state_shardings, data, rep, teacher_shardings)  # None: as placed
  if steps_per_call > 1:
    fn = scanned(fn)
  return parallel.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, rep),
                      donate_argnums=(0,))
