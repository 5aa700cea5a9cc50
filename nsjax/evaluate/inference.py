"""Inference: a model's eval-mode softmax, as a jitted, sharded predict step."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsjax import parallel
from nsjax.models import inputs as model_inputs


def probabilities(model: nn.Module, variables, images: jax.Array,
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
    probs = probabilities(model, variables, images, normalize_inputs)
    out = {"probs": probs} if full_probs else {}
    if top_k:
      out["top_k_probs"], out["top_k_indices"] = jax.lax.top_k(probs, top_k)
    return out

  # variables_shardings=None: take the variables as they are placed (replicated, FSDP, ...).
  return parallel.jit(predict, in_shardings=(variables_shardings, data), out_shardings=data)
