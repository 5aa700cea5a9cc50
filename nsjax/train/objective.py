"""The Noisy Student objective: what a step minimises, in one place. A new loss is an edit here.

Batches (global batches; every leaf's leading axis is split over the mesh's `data` axis):

  {"labeled":   {"image": float32 [B, H, W, 3] (normalised), "label": int32 [B]},
   "unlabeled": {"image": float32 [U, H, W, 3], "probs": float [U, C]}            # offline teacher
             or {"image": float32 [U, H, W, 3], "teacher_image": float32 [U, h, w, 3]}}  # online

"unlabeled" is absent for supervised (teacher) training. With an online teacher, `teacher_image`
is the un-augmented view at the teacher's own resolution; the teacher runs in eval mode on its
EMA variables inside the same jitted step and its softmax is the soft target.

The student sees [labeled images; unlabeled images] in ONE forward pass (so BatchNorm statistics
cover both, as officially); its logits are split back at B and the two means kept apart:

  loss = mean_labeled_CE + unlabeled_ratio * mean_unlabeled_CE + weight_decay * sum(w^2) / 2.

Labeled targets get label smoothing; pseudo labels are the teacher's probabilities sharpened with
temperature T (p^(1/T) renormalised), or their argmax with label smoothing ("hard").
Everything here is pure and jit-able; the train step (nsjax.train.steps) only adds gradients, the
optimizer, the EMA and the non-finite guard around `targets` and `loss`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

PSEUDO_LABEL_MODES = ("soft", "hard")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The hyperparameters the train step bakes in (hashable, so compiled steps can be reused).

  No defaults here: they are nsjax.config_lib.train_defaults()'s (`loss_config` builds one from
  resolved settings). `ema_decay` is the step's own, not the loss's; it travels here so that one
  hashable value keys a compiled step. The seed does not: it is an argument of the compiled step,
  so runs that differ only in their seed (a teacher and its baseline, a study's seeds) share one
  compilation."""
  num_classes: int
  label_smoothing: float
  unlabeled_ratio: float
  pseudo_labels: str
  temperature: float
  weight_decay: float
  ema_decay: float

  def __post_init__(self):
    """The one check of these settings: config validation runs it too (settings.resolve_config)."""
    if self.pseudo_labels not in PSEUDO_LABEL_MODES:
      raise ValueError(f"pseudo_labels = {self.pseudo_labels!r}; use 'soft' (the teacher's "
                       "probabilities) or 'hard' (its argmax).")
    if not 0.0 < self.temperature <= 100.0:
      raise ValueError(f"temperature = {self.temperature} is out of range (0, 100]; 1 keeps the "
                       "teacher's probabilities.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"label_smoothing = {self.label_smoothing} is out of range [0, 1); the "
                       "paper uses 0.1.")


def loss_config(cfg, num_classes: int) -> LossConfig:
  """The LossConfig of a resolved training config (nsjax.config_lib.train_defaults' keys)."""
  return LossConfig(num_classes=num_classes, label_smoothing=cfg.label_smoothing,
                    unlabeled_ratio=cfg.unlabeled_ratio, pseudo_labels=cfg.pseudo_labels,
                    temperature=cfg.temperature, weight_decay=cfg.weight_decay,
                    ema_decay=cfg.ema_decay)


# ---------------------------------------------------------------------------------------------
# Targets.

def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
  """TF's label smoothing: one_hot * (1 - s) + s / num_classes."""
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + smoothing / num_classes


def sharpen(probs: jax.Array, temperature: float) -> jax.Array:
  """p^(1/T) renormalised over classes, computed in log space so small T does not underflow."""
  if temperature == 1.0:
    return probs / jnp.sum(probs, axis=-1, keepdims=True)
  logp = jnp.log(jnp.maximum(probs.astype(jnp.float32), jnp.finfo(jnp.float32).tiny))
  return jax.nn.softmax(logp / temperature, axis=-1)


def pseudo_label_targets(probs: jax.Array, mode: str, temperature: float,
                         label_smoothing: float) -> jax.Array:
  """Soft: sharpened teacher probabilities. Hard: argmax, one-hot with label smoothing. (`mode`
  comes from a LossConfig, which checked it.)"""
  if mode == "hard":
    return smooth_labels(jnp.argmax(probs, axis=-1), probs.shape[-1], label_smoothing)
  return sharpen(probs, temperature)


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


def inputs_and_targets(batch: dict[str, Any], cfg: LossConfig,
                       teacher: Callable[[jax.Array], jax.Array] | None = None
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(images of the one forward pass, {"labeled"[, "unlabeled"]: target distributions}).

  The images are the labeled ones followed by the unlabeled ones (see the module docstring)."""
  labeled = batch["labeled"]
  images = labeled["image"]
  targets = {"labeled": smooth_labels(labeled["label"], cfg.num_classes, cfg.label_smoothing)}
  unlabeled = batch.get("unlabeled")
  if unlabeled is not None:
    targets["unlabeled"] = pseudo_label_targets(unlabeled_probs(unlabeled, teacher),
                                                cfg.pseudo_labels, cfg.temperature,
                                                cfg.label_smoothing)
    images = jnp.concatenate([images, unlabeled["image"].astype(images.dtype)], axis=0)
  return images, targets


# ---------------------------------------------------------------------------------------------
# The loss.

def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example CE of float32 logits against a target distribution."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def loss(logits: jax.Array, targets: dict[str, jax.Array], l2: jax.Array,
         cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(scalar loss, its parts) from the student's logits over [labeled; unlabeled] images.

  `l2` is sum(w^2) / 2 over the decayed parameters (nsjax.train.optimizer.l2_penalty)."""
  num_labeled = targets["labeled"].shape[0]
  labeled_loss = jnp.mean(cross_entropy(logits[:num_labeled], targets["labeled"]))
  unlabeled_loss = jnp.zeros([], jnp.float32)
  if "unlabeled" in targets:
    unlabeled_loss = jnp.mean(cross_entropy(logits[num_labeled:], targets["unlabeled"]))
  total = labeled_loss + cfg.unlabeled_ratio * unlabeled_loss + cfg.weight_decay * l2
  return total, {"labeled_loss": labeled_loss, "unlabeled_loss": unlabeled_loss,
                 "weight_decay_loss": cfg.weight_decay * l2}
