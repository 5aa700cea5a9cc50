"""Layers shared by the EfficientNet family: convolutions and stochastic depth.

Depthwise convolution has two numerically equal formulations, picked by backend:
- "xla": `lax.conv_general_dilated` with `feature_group_count` -- what TPUs and GPUs run best;
- "shift": a sum of k*k shifted, strided slices times per-channel weights. XLA's CPU backend
  compiles grouped convolutions to much slower code than oneDNN's; elementwise multiply-adds it
  vectorises well. Its gradients are written by hand (`custom_vjp`): autodiff of the k*k strided
  slices is many times slower than the forward pass.
1x1 convolutions are dots (`PointwiseConv`) so that their CPU gradients are dots too, with a
`custom_vjp` that keeps XLA:CPU from fusing BatchNorm's backward pass into a transpose.
Dense k x k convolutions over few channels (the stem's RGB input) likewise have two formulations
(`conv`): "xla", or "taps" -- a sum of k*k*C_in strided windows times kernel rows, which XLA:CPU
runs as one vectorised loop, faster than its convolution for 3 input channels.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from nsjax import cpu_features

DEPTHWISE_IMPLS = ("auto", "xla", "shift")
CONV_IMPLS = ("auto", "xla", "taps")
# "auto" picks "taps" on CPU up to this many input channels: its work grows with k*k*C_in terms per
# output value, a convolution library's does not.
TAPS_MAX_INPUT_CHANNELS = 4
MATMUL_OPERANDS = ("auto", "float32", "bfloat16")
# AMX multiplies tiles of 16 rows by 32 bfloat16 pairs. Products that contract fewer values (B0's
# first expansion contracts 16 channels) are bound by writing their float32 output, and casting
# their operands costs more than the tiles save.
AMX_MIN_CONTRACTION = 64


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
    return _xla_conv(x, kernel, stride, groups=x.shape[-1])
  return _depthwise_conv_shift(x, kernel, stride)


def _strided_window(padded: jax.Array, i: int, j: int, out_h: int, out_w: int,
                    stride: int) -> jax.Array:
  """The input pixels that kernel tap (i, j) meets, one per output pixel."""
  batch, _, _, channels = padded.shape
  return lax.slice(
      padded, (0, i, j, 0),
      (batch, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
      (1, stride, stride, 1))


def _shifted_multiply_add(padded: jax.Array, kernel: jax.Array, out_h: int, out_w: int,
                          stride: int) -> jax.Array:
  """sum over taps (i, j) of window(i, j) * kernel[i, j]: a 'VALID' depthwise correlation.

  Each window is cut from the image flattened over (H, W): tap (i, j) is the contiguous run from
  i * W + j, reshaped to rows of W, then strided. The values are those of 4-D slices, but XLA
  cannot rewrite a window as a slice of the unpadded input, as it did the centre tap's: that gave
  the activation feeding the padding a second consumer, so XLA:CPU computed its sigmoid in a pass
  of its own and the depthwise pass re-read three tensors instead of one.
  """
  batch, height, width, channels = padded.shape
  kh, kw = kernel.shape[:2]
  rows, cols = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  # The last tap's run ends kw - 1 values past its last row (values no window reads): callers pad
  # `_spare_rows` more rows at the bottom, in the same pad (a second one would copy the image).
  if (kh - 1 + rows) * width + kw - 1 > height * width:
    raise ValueError(f"padded height {height} lacks the spare row(s) for a {kh}x{kw} kernel")
  flat = padded.reshape(batch, height * width, channels)
  out = None
  for i in range(kh):
    for j in range(kw):
      start = i * width + j
      run = lax.slice(flat, (0, start, 0), (batch, start + rows * width, channels))
      window = lax.slice(run.reshape(batch, rows, width, channels), (0, 0, 0, 0),
                         (batch, rows, cols, channels), (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def _spare_rows(kernel_shape) -> int:
  """Zero rows below the padding that `_shifted_multiply_add`'s flat windows run into."""
  return 1 if kernel_shape[1] > 1 else 0


def _pad_same(x: jax.Array, kernel_shape, stride: int, spare_rows: int = 0):
  """x with TF 'SAME' padding for a [kh, kw, ...] kernel (and `spare_rows` more at the bottom),
  the padding, and the output size."""
  pad_h, out_h = same_padding(x.shape[1], kernel_shape[0], stride)
  pad_w, out_w = same_padding(x.shape[2], kernel_shape[1], stride)
  padding = ((0, 0), (pad_h[0], pad_h[1] + spare_rows), pad_w, (0, 0))
  return jnp.pad(x, padding), (pad_h, pad_w), (out_h, out_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_conv_shift(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  padded, _, (out_h, out_w) = _pad_same(x, kernel.shape, stride, _spare_rows(kernel.shape))
  return _shifted_multiply_add(padded, kernel, out_h, out_w, stride)


def _depthwise_conv_shift_fwd(x, kernel, stride):
  return _depthwise_conv_shift(x, kernel, stride), (x, kernel)


def _depthwise_conv_shift_bwd(stride, residuals, cotangent):
  """Hand-written gradients: autodiff of the slices is many times slower than the forward pass.

  Input gradient: the cotangent, dilated by the stride and padded, correlated with the flipped
  kernel -- the same shifted multiply-adds as the forward pass. Kernel gradient: k*k products
  of a window with the cotangent, summed by ONE variadic reduction over the image rows (one
  pass over memory instead of k*k), then over the batch and columns. The first sum keeps the
  batch axis, and so the reduction, local to each device when the batch is sharded. Summing
  rows first, not whole images, keeps each partial sum a contiguous [W, C] row that XLA:CPU
  vectorises.
  """
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  _, height, width, _ = x.shape
  padded, (pad_h, pad_w), (out_h, out_w) = _pad_same(x, kernel.shape, stride)
  dilated_h, dilated_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  lo_h, lo_w = kh - 1 - pad_h[0], kw - 1 - pad_w[0]
  spread = lax.pad(cotangent, jnp.zeros((), cotangent.dtype),
                   ((0, 0, 0), (lo_h, height + kh - 1 - lo_h - dilated_h + _spare_rows(kernel.shape),
                                stride - 1),
                    (lo_w, width + kw - 1 - lo_w - dilated_w, stride - 1), (0, 0, 0)))
  x_grad = _shifted_multiply_add(spread, kernel[::-1, ::-1], height, width, 1)

  # Accumulate in float32 even for bfloat16 activations: each sum runs over a whole image.
  products = tuple((_strided_window(padded, i, j, out_h, out_w, stride) * cotangent)
                   .astype(jnp.float32) for i in range(kh) for j in range(kw))
  zeros = tuple(jnp.zeros((), p.dtype) for p in products)
  per_row = lax.reduce(products, zeros, lambda a, b: tuple(u + v for u, v in zip(a, b)), (1,))
  kernel_grad = jnp.stack([jnp.sum(p, axis=(0, 1)) for p in per_row]).reshape(kernel.shape)
  return x_grad, kernel_grad.astype(kernel.dtype)


_depthwise_conv_shift.defvjp(_depthwise_conv_shift_fwd, _depthwise_conv_shift_bwd)


def resolve_conv_impl(impl: str, input_channels: int) -> str:
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv impl must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    small = input_channels <= TAPS_MAX_INPUT_CHANNELS
    return "taps" if jax.default_backend() == "cpu" and small else "xla"
  return impl


def conv(x: jax.Array, kernel: jax.Array, stride: int, impl: str = "auto") -> jax.Array:
  """Dense 'SAME' convolution of NHWC `x` with a [k, k, C_in, C_out] kernel (no bias)."""
  if resolve_conv_impl(impl, x.shape[-1]) == "xla":
    return _xla_conv(x, kernel, stride)
  return _conv_taps(x, kernel, stride)


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int, groups: int = 1) -> jax.Array:
  """XLA's 'SAME' convolution, NHWC x HWIO (groups = channels: depthwise)."""
  return lax.conv_general_dilated(x, kernel, (stride, stride), "SAME",
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  feature_group_count=groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_taps(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """sum over taps (i, j) and input channels c of window(i, j)[..., c] times kernel[i, j, c].

  XLA:CPU lowers a convolution with 3 input channels to a matrix product with a 27-long
  contraction, which its matmul library runs far from the memory floor; these multiply-adds are
  one loop over the output, vectorised along C_out. Accumulates in float32. The gradients are
  the XLA convolution's: autodiff of this form gives one reduction per kernel row, each re-reading
  the cotangent (k * k * C_in passes over it).
  """
  padded, _, (out_h, out_w) = _pad_same(x, kernel.shape, stride)
  out = None
  for i in range(kernel.shape[0]):
    for j in range(kernel.shape[1]):
      window = _strided_window(padded, i, j, out_h, out_w, stride).astype(jnp.float32)
      for c in range(kernel.shape[2]):
        term = window[..., c:c + 1] * kernel[i, j, c].astype(jnp.float32)
        out = term if out is None else out + term
  return out.astype(jnp.result_type(x, kernel))


def _conv_taps_fwd(x, kernel, stride):
  return _conv_taps(x, kernel, stride), (x, kernel)


def _conv_taps_bwd(stride, residuals, cotangent):
  x, kernel = residuals
  _, vjp = jax.vjp(lambda x, kernel: _xla_conv(x, kernel, stride), x, kernel)
  return vjp(cotangent)


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


class Conv(nn.Module):
  """k x k 'SAME' convolution, no bias; parameters laid out as nn.Conv's ("kernel" [k, k, C_in,
  C_out], float32), so checkpoints do not depend on the formulation."""
  features: int
  kernel_size: int
  stride: int = 1
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_kernel_init,
                        (self.kernel_size, self.kernel_size, x.shape[-1], self.features),
                        jnp.float32)
    return conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.impl)


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


def resolve_matmul_operands(setting: str, compute_dtype: Any, contraction: int) -> Any:
  """The dtype a matrix product's operands are cast to; it accumulates in float32 either way.

  "auto": bfloat16 on a CPU backend whose CPU has AMX-bf16 tiles, for products that contract at
  least `AMX_MIN_CONTRACTION` values, else the compute dtype. "float32" / "bfloat16": always that.
  """
  if setting not in MATMUL_OPERANDS:
    raise ValueError(f"matmul_operands must be one of {MATMUL_OPERANDS}, got {setting!r}.")
  if setting != "auto":
    return jnp.dtype(setting)
  amx = jax.default_backend() == "cpu" and cpu_features.has("amx_bf16")
  return jnp.dtype(jnp.bfloat16) if amx and contraction >= AMX_MIN_CONTRACTION else jnp.dtype(compute_dtype)


def _dot(a: jax.Array, b: jax.Array, dims, setting: str, out_dtype: Any) -> jax.Array:
  """`lax.dot_general` with operands in the dtype `setting` resolves to, the result in `out_dtype`.

  When the operands already have that dtype nothing is cast: a float32 model's program holds no
  conversions for this setting.
  """
  contraction = math.prod(a.shape[d] for d in dims[0][0])
  operands = resolve_matmul_operands(setting, a.dtype, contraction)
  if operands == a.dtype == b.dtype:
    return lax.dot_general(a, b, dims).astype(out_dtype)
  return lax.dot_general(a.astype(operands), b.astype(operands), dims,
                         preferred_element_type=jnp.float32).astype(out_dtype)


def _channel_dot(x: jax.Array, kernel: jax.Array, setting: str = "auto") -> jax.Array:
  """x [..., C_in] times kernel [C_in, C_out]."""
  return _dot(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), setting, x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise_conv(x: jax.Array, kernel: jax.Array, operands: str = "auto") -> jax.Array:
  """1x1 convolution of [..., C_in] by [C_in, C_out] as one dot; its gradients are two more dots.

  `operands` ("auto", "float32", "bfloat16") sets each dot's operand dtype; see
  `resolve_matmul_operands`."""
  return _channel_dot(x, kernel, operands)


def _pointwise_conv_fwd(x, kernel, operands):
  return _channel_dot(x, kernel, operands), (x, kernel)


def _pointwise_conv_bwd(operands, residuals, cotangent):
  """On CPU the two operands of the kernel gradient are first written out in their own layout.

  The kernel gradient contracts the pixel axis, which is major in both operands, so XLA:CPU
  transposes one of them. Left alone it fuses the cotangent's producer (BatchNorm's backward
  pass) into that transpose, which then evaluates it in transposed, cache-hostile order, many
  times slower than writing it out and transposing the copy.
  """
  x, kernel = residuals
  if jax.default_backend() == "cpu":
    x, cotangent = lax.optimization_barrier((x, cotangent))
  x_grad = _dot(cotangent, kernel, (((cotangent.ndim - 1,), (1,)), ((), ())), operands, x.dtype)
  pixel_axes = tuple(range(x.ndim - 1))
  kernel_grad = _dot(x, cotangent, ((pixel_axes, pixel_axes), ((), ())), operands, kernel.dtype)
  return x_grad, kernel_grad


pointwise_conv.defvjp(_pointwise_conv_fwd, _pointwise_conv_bwd)


class PointwiseConv(nn.Module):
  """1x1 convolution as one matrix product over all pixels; parameters laid out as nn.Conv's.

  Written as a dot, not a convolution, because on CPU XLA lowers the gradients of a 1x1
  convolution to convolutions over transposed copies of the activations (two extra passes
  over memory and a slow kernel); a dot's gradients are two more dots that the matmul library
  runs directly. TPUs and GPUs compile both forms to the same thing.
  """
  features: int
  use_bias: bool = False
  dtype: Any = jnp.float32
  matmul_operands: str = "auto"

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_kernel_init, (1, 1, x.shape[-1], self.features),
                        jnp.float32)
    y = pointwise_conv(x.astype(self.dtype), kernel[0, 0].astype(self.dtype), self.matmul_operands)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,),
                         jnp.float32).astype(self.dtype)
    return y


def drop_connect(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
  """Per-example stochastic depth: mask = floor(keep + U[0,1)) of shape [B,1,1,1]; x / keep * mask."""
  keep = 1.0 - rate
  mask = jnp.floor(keep + jax.random.uniform(rng, (x.shape[0],) + (1,) * (x.ndim - 1), jnp.float32))
  return x / jnp.asarray(keep, x.dtype) * mask.astype(x.dtype)


# Official initialisers: conv kernels N(0, sqrt(2 / fan_out)) (untruncated), dense U(+-1/sqrt(out)).
conv_kernel_init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_kernel_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")

BatchNorm = functools.partial(nn.BatchNorm, momentum=0.99, epsilon=1e-3)
