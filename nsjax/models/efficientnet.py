"""EfficientNet B0-B7 / L0-L2 as pure-functional Flax linen modules.

Submodules carry the official TF checkpoint names (`stem/conv2d`, `blocks_3/tpu_batch_normalization_1`,
`head/dense`, ...) so that importing an official checkpoint is a renaming of leaves, not of structure
(see nsjax/models/convert.py). Variables: `params` (float32) and `batch_stats`.

Noise lives here and acts only when `train=True`: dropout before the classifier and per-example
stochastic depth whose rate grows linearly with the block index (0 for block 0). Both draw from the
`dropout` rng stream: `model.apply(variables, x, train=True, rngs={"dropout": key},
mutable=["batch_stats"])`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nsjax.models import layers, specs


def _pointwise(features: int, dtype: Any, matmul_operands: str, name: str,
               use_bias=False) -> nn.Module:
  return layers.PointwiseConv(features, use_bias, dtype, matmul_operands, name=name)


class SqueezeExcite(nn.Module):
  """Spatial mean -> 1x1 reduce (to block INPUT filters * ratio) -> swish -> 1x1 expand -> sigmoid."""
  reduced_filters: int
  dtype: Any = jnp.float32
  matmul_operands: str = "auto"

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.swish(_pointwise(self.reduced_filters, self.dtype, self.matmul_operands, "conv2d",
                              use_bias=True)(s))
    s = _pointwise(x.shape[-1], self.dtype, self.matmul_operands, "conv2d_1", use_bias=True)(s)
    return x * nn.sigmoid(s)


class MBConvBlock(nn.Module):
  """Inverted bottleneck with squeeze-excitation; official variable names for e == 1 and e != 1."""
  block: specs.ScaledBlock
  drop_connect_rate: float
  depthwise_impl: str = "auto"
  dtype: Any = jnp.float32
  matmul_operands: str = "auto"

  @nn.compact
  def __call__(self, inputs, train: bool):
    b = self.block
    bn = lambda name: layers.BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)
    bn_names = iter(["tpu_batch_normalization", "tpu_batch_normalization_1",
                     "tpu_batch_normalization_2"])
    conv_names = iter(["conv2d", "conv2d_1"])
    x = inputs
    if b.expand_ratio != 1:
      x = _pointwise(b.input_filters * b.expand_ratio, self.dtype, self.matmul_operands,
                     next(conv_names))(x)
      x = nn.swish(bn(next(bn_names))(x))
    x = layers.DepthwiseConv(b.kernel_size, b.stride, self.depthwise_impl, self.dtype,
                             name="depthwise_conv2d")(x)
    x = nn.swish(bn(next(bn_names))(x))
    if b.se_ratio:
      reduced = max(1, int(b.input_filters * b.se_ratio))
      x = SqueezeExcite(reduced, self.dtype, self.matmul_operands, name="se")(x)
    x = _pointwise(b.output_filters, self.dtype, self.matmul_operands, next(conv_names))(x)
    x = bn(next(bn_names))(x)
    if b.stride == 1 and b.input_filters == b.output_filters:
      if train and self.drop_connect_rate > 0:
        x = layers.drop_connect(x, self.drop_connect_rate, self.make_rng("dropout"))
      x = x + inputs
    return x


class Stem(nn.Module):
  """3x3 stride-2 conv (no bias) -> BN -> swish."""
  filters: int
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    x = layers.Conv(self.filters, 3, 2, self.impl, self.dtype, name="conv2d")(x)
    bn = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                          name="tpu_batch_normalization")
    return nn.swish(bn(x))


class Head(nn.Module):
  """1x1 conv -> BN -> swish -> global average pool -> dropout -> dense (float32 logits)."""
  filters: int
  num_classes: int
  dropout_rate: float
  dtype: Any = jnp.float32
  matmul_operands: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    x = _pointwise(self.filters, self.dtype, self.matmul_operands, "conv2d")(x)
    bn = layers.BatchNorm(use_running_average=not train, dtype=self.dtype,
                          name="tpu_batch_normalization")
    x = jnp.mean(nn.swish(bn(x)), axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, kernel_init=layers.dense_kernel_init, dtype=self.dtype,
                 param_dtype=jnp.float32, name="dense")(x)
    return x.astype(jnp.float32)


class EfficientNet(nn.Module):
  """EfficientNet classifier. All fields are JSON-friendly so an exported model describes itself.

  Attributes:
    num_classes: classifier outputs.
    width, depth: compound-scaling coefficients.
    block_stages: how many of the seven stages of MBConv blocks to build, the first k (7, all of
      them, for every published model). Fewer make a smaller program for tests that check
      plumbing: configs/smoke.py's models have 2 stages and compile in about half the time.
    dropout_rate: dropout before the classifier (train mode only).
    stochastic_depth_rate: the last block's drop rate; block i of N drops with rate * i / N.
    small_image: stages 2 and 3 keep stride 1 (32 px data).
    dtype: compute dtype name ("float32" or "bfloat16"); parameters are always float32.
    depthwise_impl: "auto" (shift on CPU, XLA conv elsewhere), "xla" or "shift".
    stem_impl: the stem's 3x3 convolution: "auto" (taps on CPU, XLA conv elsewhere), "xla" or
      "taps" (see nsjax.models.layers.conv).
    matmul_operands: the 1x1 convolutions' operand dtype, accumulated in float32: "auto"
      (bfloat16 for large products on a CPU with AMX-bf16, else the compute dtype), "float32" or
      "bfloat16" (see nsjax.models.layers.resolve_matmul_operands).
    frozen_blocks: -1 for none; k >= 0 freezes the stem and blocks 0..k-1 (BatchNorm in inference
      mode, no gradient through them), for test-resolution fine-tuning.
    model_name, train_resolution, test_resolution: what the model is (informational: the network
      accepts any image size); they travel with exported checkpoints.
  """
  num_classes: int
  width: float = 1.0
  depth: float = 1.0
  block_stages: int = len(specs.BASE_BLOCKS)
  dropout_rate: float = 0.2
  stochastic_depth_rate: float = 0.2
  small_image: bool = False
  dtype: str = "float32"
  depthwise_impl: str = "auto"
  stem_impl: str = "auto"
  matmul_operands: str = "auto"
  frozen_blocks: int = -1
  model_name: str = "efficientnet-b0"
  train_resolution: int = 224
  test_resolution: int = 224

  @property
  def blocks(self) -> tuple[specs.ScaledBlock, ...]:
    return specs.scaled_blocks(self.width, self.depth, self.small_image,
                               specs.BASE_BLOCKS[:self.block_stages])

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Logits (float32) for NHWC images already normalised with the ImageNet mean and std."""
    dtype = jnp.dtype(self.dtype)
    blocks = self.blocks
    x = Stem(specs.round_filters(specs.STEM_FILTERS, self.width), self.stem_impl, dtype,
             name="stem")(
        jnp.asarray(x, dtype), train and self.frozen_blocks < 0)
    if self.frozen_blocks == 0:
      x = jax.lax.stop_gradient(x)
    for b in blocks:
      rate = self.stochastic_depth_rate * b.index / len(blocks)
      x = MBConvBlock(b, rate, self.depthwise_impl, dtype, self.matmul_operands,
                      name=f"blocks_{b.index}")(
          x, train=train and b.index >= self.frozen_blocks)
      if b.index == self.frozen_blocks - 1:
        x = jax.lax.stop_gradient(x)
    return Head(specs.round_filters(specs.HEAD_FILTERS, self.width), self.num_classes,
                self.dropout_rate, dtype, self.matmul_operands, name="head")(x, train)

  def block_drop_rates(self) -> list[float]:
    """The per-block stochastic-depth rates this model applies in train mode."""
    n = len(self.blocks)
    return [self.stochastic_depth_rate * i / n for i in range(n)]
