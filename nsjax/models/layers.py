"""Layers shared by the EfficientNet family: depthwise convolution and stochastic depth.

Depthwise convolution has two numerically equal formulations, picked by backend:
- "xla": `lax.conv_general_dilated` with `feature_group_count` -- what TPUs and GPUs run best;
- "shift": a sum of k*k shifted, strided slices times per-channel weights. XLA's CPU backend
  compiles grouped convolutions ~20x slower than oneDNN (REFERENCE.md section 5); elementwise
  multiply-adds it vectorises well, forward and backward.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("auto", "xla", "shift")


def same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
  """TF 'SAME' padding (extra pixel at the bottom/right) and the output size."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2), out


def resolve_depthwise_impl(impl: str) -> str:
  if impl not in DEPTHWISE_IMPLS:
    raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "shift" if jax.default_backend() == "cpu" else "xla"
  return impl


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
  """Depthwise 'SAME' convolution of NHWC `x` with a [k, k, 1, C] kernel."""
  impl = resolve_depthwise_impl(impl)
  if impl == "xla":
    return lax.conv_general_dilated(
        x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])
  return _depthwise_conv_shift(x, kernel, stride)


def _depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  kh, kw = kernel.shape[:2]
  batch, height, width, channels = x.shape
  pad_h, out_h = same_padding(height, kh, stride)
  pad_w, out_w = same_padding(width, kw, stride)
  padded = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      window = lax.slice(
          padded, (0, i, j, 0),
          (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
          (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_kernel_init(key, shape, dtype=jnp.float32):
  """N(0, sqrt(2 / (k*k))): the official fan-out init with out_channels = 1 for depthwise."""
  kh, kw = shape[:2]
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / (kh * kw)).astype(dtype)


class DepthwiseConv(nn.Module):
  """Depthwise conv, no bias; kernel stored as [k, k, 1, C] (flax grouped-conv layout)."""
  kernel_size: int
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    kernel = self.param("kernel", depthwise_kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    return depthwise_conv(x, kernel, self.stride, self.impl)


def drop_connect(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Per-example stochastic depth: mask = floor(keep + U[0,1)) of shape [B,1,1,1]; x / keep * mask."""
  keep = 1.0 - rate
  mask = jnp.floor(keep + jax.random.uniform(rng, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32))
  return x / jnp.asarray(keep, x.dtype) * mask.astype(x.dtype)


# Official initialisers: conv kernels N(0, sqrt(2 / fan_out)) (untruncated), dense U(+-1/sqrt(out)).
conv_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.99, epsilon=1e-3)
