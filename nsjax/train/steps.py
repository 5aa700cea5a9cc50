"""The jitted train step: gradients, optimizer, EMA and the non-finite guard around the objective.

What is minimised, and the batch layout, are nsjax.train.objective's: this step is the same for
any loss. A step whose loss, gradients or new state are not all finite leaves the state exactly
as it was and reports `is_finite = False`, so the loop can stop before anything bad is saved.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nsjax import parallel
from nsjax.models import inputs as model_inputs
from nsjax.train import objective
from nsjax.train import optimizer as opt
from nsjax.train.state import TrainState

# Independent streams derived from the run's seed: parameter init, and per-step noise.
_INIT_STREAM, _NOISE_STREAM = 0, 1


def init_key(seed: int) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)


def dropout_key(seed: int, step: jax.Array) -> jax.Array:
  """The noise of update `step` depends on (seed, step) only, so a resumed run replays exactly."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM), step)


def tree_all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


# ---------------------------------------------------------------------------------------------
# The train step.

def train_step(state: TrainState, batch: dict[str, Any], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: opt.Schedule,
               loss_config: objective.LossConfig, decay_mask: Any, teacher_model: nn.Module | None = None,
               teacher_variables: Any = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One update (pure; see `make_train_step` for the jitted, sharded version)."""
  cfg = loss_config
  teacher = None
  if teacher_model is not None:
    teacher = lambda images: objective.teacher_probs(teacher_model, teacher_variables, images)
  images, targets = objective.inputs_and_targets(batch, cfg, teacher)

  def loss_fn(params):
    logits, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, images,
                                  train=True, rngs={"dropout": dropout_key(cfg.seed, state.step)},
                                  mutable=["batch_stats"])
    loss, parts = objective.loss(logits, targets, opt.l2_penalty(params, decay_mask), cfg)
    return loss, (updates.get("batch_stats", {}), logits, parts)

  (loss, (batch_stats, logits, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  decay = opt.ema_decay(step, cfg.ema_decay)
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
  labels = batch["labeled"]["label"]
  metrics = {
      "loss": loss,
      **parts,
      "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
      "grad_norm": grad_norm,
      "train_accuracy": jnp.mean(jnp.argmax(logits[:labels.shape[0]], -1) == labels),
      "is_finite": is_finite,
  }
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, schedule: opt.Schedule,
                    loss_config: objective.LossConfig, mesh: jax.sharding.Mesh,
                    state_shardings: Any, decay_mask: Any, teacher_model: nn.Module | None = None,
                    teacher_shardings: Any = None) -> Callable[..., Any]:
  """`step(state, batch) -> (state, metrics)`, or `step(state, batch, teacher_variables)` when
  `teacher_model` is given. Jitted with explicit shardings; the state's buffers are donated.
  """
  data = parallel.data_sharding(mesh)
  rep = parallel.replicated(mesh)
  kwargs = dict(model=model, tx=tx, schedule=schedule, loss_config=loss_config,
                decay_mask=decay_mask)
  if teacher_model is None:
    fn = lambda state, batch: train_step(state, batch, **kwargs)
    in_shardings = (state_shardings, data)
  else:
    fn = lambda state, batch, tvars: train_step(state, batch, teacher_model=teacher_model,
                                                teacher_variables=tvars, **kwargs)
    in_shardings = (state_shardings, data, teacher_shardings)  # None: as the arrays are placed
  return parallel.jit(fn, in_shardings=in_shardings, out_shardings=(state_shardings, rep),
                      donate_argnums=(0,))


# ---------------------------------------------------------------------------------------------
# Inference and evaluation.

def _eval_probabilities(model: nn.Module, variables, images: jax.Array,
                        normalize_inputs: bool) -> jax.Array:
  """float32 softmax of the model in eval mode (pixel inputs normalised first if asked)."""
  if normalize_inputs:
    images = model_inputs.normalize(images)
  logits = model.apply(variables, images, train=False)
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def make_predict_step(model: nn.Module, mesh: jax.sharding.Mesh, top_k: int | None = None,
                      variables_shardings: Any = None, full_probs: bool = True,
                      normalize_inputs: bool = False
                      ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """`predict(variables, images) -> {"probs"[, "top_k_probs", "top_k_indices"]}`.

  Eval mode (no dropout, no stochastic depth, BatchNorm moving statistics): pass the EMA
  variables (`state.ema_variables` or an exported model's). Outputs stay sharded like the images.
  `variables_shardings=None` accepts the variables however they are placed (replicated or FSDP).
  `normalize_inputs`: the images are pixels in 0..255 units (`preprocess.eval_view(...,
  normalized=False)`) and the step normalises them (`models.inputs.normalize`) on the device.
  """
  data = parallel.data_sharding(mesh)

  def predict(variables, images):
    probs = _eval_probabilities(model, variables, images, normalize_inputs)
    out = {"probs": probs} if full_probs else {}
    if top_k:
      out["top_k_probs"], out["top_k_indices"] = jax.lax.top_k(probs, top_k)
    return out

  # variables_shardings=None: take the variables as they are placed (replicated, FSDP, ...).
  return parallel.jit(predict, in_shardings=(variables_shardings, data), out_shardings=data)


def pseudo_label_fields(probs: jax.Array, top_k: int = 0) -> dict[str, jax.Array]:
  """A pseudo-label record's fields from float32 probabilities [B, C] (jnp or np arrays).

  {"label": int32 argmax (first on ties), "confidence": float32 top-1 probability, "probs":
  float16 (all classes, or the top-k values, largest first), ["classes": int32 top-k indices,
  lower index first on ties]}. Inside the jitted labeling step the rounding to float16 and the
  top-k run on the device, fused with the softmax, so the host only copies bytes into records.
  """
  probs = jnp.asarray(probs, jnp.float32)
  fields = {"label": jnp.argmax(probs, axis=-1).astype(jnp.int32),
            "confidence": jnp.max(probs, axis=-1)}
  if top_k:
    values, classes = jax.lax.top_k(probs, top_k)
    fields.update(probs=values.astype(jnp.float16), classes=classes.astype(jnp.int32))
  else:
    fields["probs"] = probs.astype(jnp.float16)
  return fields


def make_pseudo_label_step(model: nn.Module, mesh: jax.sharding.Mesh, top_k: int = 0
                           ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """`label_step(variables, pixels) -> pseudo_label_fields(softmax(model(pixels)), top_k)`.

  The teacher in eval mode on pixel-unit eval views (normalised on the device), as the labeling
  stage runs it; outputs stay sharded like the images.
  """
  data = parallel.data_sharding(mesh)

  def label_step(variables, pixels):
    return pseudo_label_fields(_eval_probabilities(model, variables, pixels, True), top_k)

  return parallel.jit(label_step, in_shardings=(None, data), out_shardings=data)


def make_eval_step(model: nn.Module, mesh: jax.sharding.Mesh,
                   variables_shardings: Any = None) -> Callable[[Any, dict], dict[str, jax.Array]]:
  """`eval_step(variables, {"image", "label"[, "mask"]}) -> summed correct counts (replicated)`.

  `mask` (1 = real, 0 = padding) lets the last, padded batch of a dataset count only real
  examples. Top-5 is top-min(5, num_classes). Without `variables_shardings` the jitted step is
  cached per (model, mesh): evaluations that call this once per setting (e.g. 45 corruption
  settings, or several exports of one architecture) compile it once, not once per call.
  """
  if variables_shardings is None:
    return _cached_eval_step(model, mesh)
  return _jit_eval_step(model, mesh, variables_shardings)


@functools.lru_cache(maxsize=16)
def _cached_eval_step(model: nn.Module, mesh: jax.sharding.Mesh) -> Callable:
  return _jit_eval_step(model, mesh, None)


def _jit_eval_step(model: nn.Module, mesh: jax.sharding.Mesh, variables_shardings: Any) -> Callable:
  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
    k = min(5, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    top1 = (top[:, 0] == labels).astype(jnp.float32)
    top5 = jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
    return {"top1_correct": jnp.sum(top1 * mask), "top5_correct": jnp.sum(top5 * mask),
            "count": jnp.sum(mask)}

  return parallel.jit(eval_step,
                      in_shardings=(variables_shardings, parallel.data_sharding(mesh)),
                      out_shardings=parallel.replicated(mesh))


to_global_batch = parallel.to_global_batch  # defined with the other sharding helpers


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[dict[str, Any]],
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Top-1 / top-5 accuracy (fractions) over `batches`, padded examples excluded via `mask`."""
  totals = None
  for batch in batches:
    counts = eval_step(variables, to_global_batch(batch, mesh))
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError("evaluate() got no batches; check the evaluation dataset.")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  if count == 0:
    raise ValueError("Every evaluation example was masked out (mask == 0); nothing to score.")
  return {"top1": float(totals["top1_correct"]) / count,
          "top5": float(totals["top5_correct"]) / count, "num_examples": int(count)}


def make_eval_fn(model: nn.Module, mesh: jax.sharding.Mesh,
                 batches: Callable[[], Iterable[dict[str, Any]]]) -> Callable[[Any], dict]:
  """An `eval_fn(variables) -> {"top1", "top5", "num_examples"}` for `train(eval_fn=...)`.

  `batches` is called anew for each evaluation (a fresh pass over the evaluation set).
  """
  eval_step = make_eval_step(model, mesh)
  return lambda variables: evaluate(eval_step, variables, batches(), mesh)
