"""Accuracy: the jitted eval step (masked top-1 / top-5 counts) and the passes over a split.

The one top-k count is nsjax.evaluate.metrics.topk_correct; every evaluation (training-time eval,
the eval stage, the corruption suites, the accuracy suites) sums its counts with `evaluate`.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsjax import parallel
from nsjax.data import input_pipeline, views
from nsjax.evaluate import metrics


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
    counts = metrics.topk_correct(logits, batch["label"], (1, 5), batch.get("mask"))
    return {"top1_correct": counts["top1"], "top5_correct": counts["top5"],
            "count": counts["count"],
            "top1_hits": metrics.top1_hits(logits, batch["label"], batch.get("mask"))}

  return parallel.jit(eval_step,
                      in_shardings=(variables_shardings, parallel.data_sharding(mesh)),
                      out_shardings=parallel.replicated(mesh))


def evaluate(eval_step: Callable, variables: Any, batches: Iterable[dict[str, Any]],
             mesh: jax.sharding.Mesh, per_image: bool = False) -> dict[str, Any]:
  """Top-1 / top-5 accuracy (fractions) over `batches`, padded examples excluded via `mask`.

  `per_image` (for eval steps that return "top1_hits"): also "top1_per_image", which of the
  examples, in the order read, the model got right (metrics.pack_hits), so that two models can be
  compared on the same images."""
  totals, hits = None, []
  for batch in batches:
    counts = eval_step(variables, parallel.to_global_batch(batch, mesh))
    if per_image and "top1_hits" in counts:
      hits.append(counts["top1_hits"])  # fetched once at the end: no wait per batch
    counts = {k: v for k, v in counts.items() if k != "top1_hits"}
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError("evaluate() got no batches; check the evaluation dataset.")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  if count == 0:
    raise ValueError("Every evaluation example was masked out (mask == 0); nothing to score.")
  result = {"top1": float(totals["top1_correct"]) / count,
            "top5": float(totals["top5_correct"]) / count, "num_examples": int(count)}
  if hits:
    result["top1_per_image"] = metrics.pack_hits(metrics.real_hits(jax.device_get(hits)))
  return result


def make_eval_fn(model: nn.Module, mesh: jax.sharding.Mesh,
                 batches: Callable[[], Iterable[dict[str, Any]]]) -> Callable[[Any], dict]:
  """An `eval_fn(variables) -> {"top1", "top5", "num_examples"}` for `train(eval_fn=...)`.

  `batches` is called anew for each evaluation (a fresh pass over the evaluation set).
  """
  eval_step = make_eval_step(model, mesh)
  return lambda variables: evaluate(eval_step, variables, batches(), mesh)


def clean_accuracy(model, variables, src: input_pipeline.Source, *, mesh, batch_size: int,
                   small_image: bool | None = None, eval_step=None) -> dict[str, Any]:
  """Top-1 / top-5 over a whole split through the eval view (+ "num_skipped" undecodable images,
  and "top1_per_image": which images, in the split's order, the model got right).

  `small_image` None: the model's own. Pass `eval_step` (`make_eval_step(model, mesh)`) to reuse
  one compilation over many sets."""
  small_image = model.small_image if small_image is None else small_image
  batches = input_pipeline.eval_batches(
      src, global_batch_size=batch_size, mesh=mesh,
      preprocess_fn=views.eval_view_fn(model.test_resolution, small_image, src.image_key))
  result = evaluate(eval_step or make_eval_step(model, mesh), variables, batches, mesh,
                    per_image=True)
  result["num_skipped"] = batches.num_skipped
  return result
