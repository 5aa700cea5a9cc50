"""Model registry: `create_model(name, num_classes, **overrides)`, the spec table, and the shapes
of a model's variables (`abstract_variables`, `count_params`) without allocating them."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nsjax.models import layers, specs
from nsjax.models.efficientnet import EfficientNet
from nsjax.models.specs import MODEL_SPECS, ModelSpec, get_spec

OVERRIDABLE = ("width", "depth", "block_stages", "dropout_rate", "stochastic_depth_rate",
               "small_image", "dtype", "depthwise_impl", "stem_impl", "matmul_operands",
               "frozen_blocks", "train_resolution", "test_resolution")
DTYPES = ("float32", "bfloat16")


def model_config(name: str, num_classes: int, **overrides: Any) -> dict[str, Any]:
  """The JSON-serialisable description of a model: spec defaults with `overrides` applied.

  `resolution` is a shorthand that sets both train and test resolution.
  """
  spec = get_spec(name)
  if "resolution" in overrides:
    res = overrides.pop("resolution")
    overrides.setdefault("train_resolution", res)
    overrides.setdefault("test_resolution", res)
  unknown = sorted(set(overrides) - set(OVERRIDABLE))
  if unknown:
    raise ValueError(f"Unknown model override(s) {unknown}; valid: {', '.join(OVERRIDABLE)}, "
                     "resolution.")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
  config = dict(model_name=name, num_classes=num_classes, width=spec.width, depth=spec.depth,
                block_stages=len(specs.BASE_BLOCKS),
                dropout_rate=spec.dropout_rate, stochastic_depth_rate=0.2, small_image=False,
                dtype="float32", depthwise_impl="auto", stem_impl="auto", matmul_operands="auto",
                frozen_blocks=-1, train_resolution=spec.train_resolution,
                test_resolution=spec.test_resolution)
  config.update(overrides)
  if config["dtype"] not in DTYPES:
    raise ValueError(f"dtype must be one of {DTYPES}, got {config['dtype']!r}.")
  for key, valid in (("depthwise_impl", layers.DEPTHWISE_IMPLS), ("stem_impl", layers.CONV_IMPLS),
                     ("matmul_operands", layers.MATMUL_OPERANDS)):
    if config[key] not in valid:
      raise ValueError(f"{key} must be one of {valid}, got {config[key]!r}.")
  stages = config["block_stages"]
  if not isinstance(stages, int) or not 1 <= stages <= len(specs.BASE_BLOCKS):
    raise ValueError(f"block_stages must be an integer in 1..{len(specs.BASE_BLOCKS)} (the first k "
                     f"stages of MBConv blocks), got {stages!r}.")
  for key in ("dropout_rate", "stochastic_depth_rate"):
    if not 0.0 <= config[key] < 1.0:
      raise ValueError(f"{key} must be in [0, 1), got {config[key]}.")
  return config


def create_model(name: str, num_classes: int, **overrides: Any) -> EfficientNet:
  """An EfficientNet (`efficientnet-b0` ... `-b7`, `-l0`, `-l1`, `-l2`) with optional overrides.

  Overrides: width, depth, block_stages, dropout_rate, stochastic_depth_rate, small_image, dtype ("float32" or
  "bfloat16"), depthwise_impl, stem_impl, matmul_operands, frozen_blocks, train_resolution,
  test_resolution, resolution.
  """
  return EfficientNet(**model_config(name, num_classes, **overrides))


def model_from_config(config: dict[str, Any]) -> EfficientNet:
  """Rebuilds a model from `model_config(...)` output (e.g. read back from an exported teacher)."""
  config = dict(config)
  return create_model(config.pop("model_name"), config.pop("num_classes"), **config)


def describe(model: EfficientNet) -> dict[str, Any]:
  """The model's fields as a JSON-ready dict (inverse of `model_from_config`)."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.name in ("model_name", "num_classes") + OVERRIDABLE}


def abstract_variables(model: EfficientNet, resolution: int | None = None) -> Any:
  """ShapeDtypeStructs of {"params", "batch_stats"} without allocating them.

  Traced with XLA's convolutions: the CPU formulations hold the same variables (tested) in many
  more traced ops (each depthwise layer's taps, custom gradients), and each trace is paid at a
  run's start (validation, teacher loading), where the fewer ops trace faster."""
  res = resolution or model.test_resolution
  model = model.clone(depthwise_impl="xla", stem_impl="xla")
  x = jax.ShapeDtypeStruct((1, res, res, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@functools.lru_cache(maxsize=64)
def count_params(model: EfficientNet) -> int:
  """Trainable parameters (BatchNorm moving statistics excluded), without allocating any. The
  shapes do not depend on the image size: traced at a small one. Cached: a schedule's checks ask
  for each middle student twice (as a student, then as the next one's teacher), and a trace of
  an L2 takes seconds."""
  abstract = abstract_variables(model, resolution=32)
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract["params"]))


__all__ = ["EfficientNet", "MODEL_SPECS", "ModelSpec", "abstract_variables", "count_params",
           "create_model", "describe", "get_spec", "model_config", "model_from_config"]
