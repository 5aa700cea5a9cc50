"""Noisy Student's objective (the default): cross-entropy on labels and on pseudo labels.

  loss = mean_labeled_CE + unlabeled_ratio * mean_unlabeled_CE

Labeled targets get label smoothing; pseudo labels are the teacher's probabilities sharpened with
temperature T (p^(1/T) renormalised), or their argmax with label smoothing ("hard"). The step adds
weight_decay * sum(w^2) / 2 (nsjax.train.steps).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from nsjax.objectives.registry import register, setting

PSEUDO_LABEL_MODES = ("soft", "hard")


@register("noisy_student")
@dataclasses.dataclass(frozen=True)
class NoisyStudent:
  """Cross-entropy on smoothed labels plus unlabeled_ratio x cross-entropy on the teacher's soft
  (sharpened) or hard pseudo labels, as the paper."""
  unlabeled_ratio: float  # the general setting: unlabeled images per labeled one, their weight
  label_smoothing: float = setting(0.1, "on labels and on hard pseudo labels")
  pseudo_labels: str = setting("soft", "'soft' (teacher probabilities ^ 1/T) or 'hard' (argmax, "
                               "smoothed)")
  temperature: float = setting(1.0, "T of the soft pseudo labels")

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

  def loss(self, logits: jax.Array, labels: jax.Array, teacher_probs: jax.Array | None
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar loss, its parts) from the student's logits over [labeled; unlabeled] images."""
    num_labeled = labels.shape[0]
    labeled_targets = smooth_labels(labels, logits.shape[-1], self.label_smoothing)
    labeled_loss = jnp.mean(cross_entropy(logits[:num_labeled], labeled_targets))
    unlabeled_loss = jnp.zeros([], jnp.float32)
    if teacher_probs is not None:
      targets = pseudo_label_targets(teacher_probs, self.pseudo_labels, self.temperature,
                                     self.label_smoothing)
      unlabeled_loss = jnp.mean(cross_entropy(logits[num_labeled:], targets))
    total = labeled_loss + self.unlabeled_ratio * unlabeled_loss
    return total, {"labeled_loss": labeled_loss, "unlabeled_loss": unlabeled_loss}


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
  comes from a NoisyStudent, which checked it.)"""
  if mode == "hard":
    return smooth_labels(jnp.argmax(probs, axis=-1), probs.shape[-1], label_smoothing)
  return sharpen(probs, temperature)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example CE of float32 logits against a target distribution."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1)
