"""The EfficientNet family: base block table, compound scaling, and per-model specs.

Numbers from ../shared/REFERENCE.md section 1 (the TF EfficientNet code and the Noisy Student paper).
L0/L1 resolutions are unverified there; they are defaults, overridable in configs.
"""
from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of MBConv blocks before scaling."""
  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float = 0.25


BASE_BLOCKS: tuple[BlockArgs, ...] = (
    BlockArgs(1, 3, 1, 1, 32, 16),
    BlockArgs(2, 3, 2, 6, 16, 24),
    BlockArgs(2, 5, 2, 6, 24, 40),
    BlockArgs(3, 3, 2, 6, 40, 80),
    BlockArgs(3, 5, 1, 6, 80, 112),
    BlockArgs(4, 5, 2, 6, 112, 192),
    BlockArgs(1, 3, 1, 6, 192, 320),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
# Small-image variant (32 px data such as SVHN/CIFAR): stages 2 and 3 (1-based) keep stride 1.
SMALL_IMAGE_STRIDE1_STAGES = (1, 2)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  name: str
  width: float
  depth: float
  train_resolution: int
  test_resolution: int
  dropout_rate: float
  # Trainable parameters at 1000 classes, as published (checked by the tests against the code).
  reference_params: int
  # RandAugment magnitude of the official ImageNet scripts (0 = none).
  randaugment_magnitude: int


MODEL_SPECS: dict[str, ModelSpec] = {
    s.name: s for s in (
        ModelSpec("efficientnet-b0", 1.0, 1.0, 224, 224, 0.2, 5_288_548, 0),
        ModelSpec("efficientnet-b1", 1.0, 1.1, 240, 240, 0.2, 7_794_184, 0),
        ModelSpec("efficientnet-b2", 1.1, 1.2, 260, 260, 0.3, 9_109_994, 6),
        ModelSpec("efficientnet-b3", 1.2, 1.4, 300, 300, 0.3, 12_233_232, 12),
        ModelSpec("efficientnet-b4", 1.4, 1.8, 380, 380, 0.4, 19_341_616, 15),
        ModelSpec("efficientnet-b5", 1.6, 2.2, 456, 456, 0.4, 30_389_784, 18),
        ModelSpec("efficientnet-b6", 1.8, 2.6, 528, 528, 0.5, 43_040_704, 24),
        ModelSpec("efficientnet-b7", 2.0, 3.1, 600, 600, 0.5, 66_347_960, 27),
        ModelSpec("efficientnet-l0", 2.8, 3.7, 380, 500, 0.5, 140_764_664, 27),
        ModelSpec("efficientnet-l1", 3.9, 3.7, 380, 500, 0.5, 272_630_564, 27),
        ModelSpec("efficientnet-l2", 4.3, 5.3, 475, 800, 0.5, 480_309_308, 27),
    )
}


def get_spec(name: str) -> ModelSpec:
  if name not in MODEL_SPECS:
    raise ValueError(f"Unknown model {name!r}. Valid models: {', '.join(MODEL_SPECS)}.")
  return MODEL_SPECS[name]


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
  """Channel count after width scaling, rounded to a multiple of `divisor` (official rule)."""
  scaled = filters * width
  new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if new < 0.9 * scaled:
    new += divisor
  return int(new)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class ScaledBlock:
  """One MBConv block after scaling, in global order."""
  index: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int
  se_ratio: float


def scaled_blocks(width: float, depth: float, small_image: bool = False,
                  base: tuple[BlockArgs, ...] = BASE_BLOCKS) -> tuple[ScaledBlock, ...]:
  """Expands the stage table into the list of blocks; only a stage's first block strides."""
  blocks = []
  for stage, args in enumerate(base):
    in_f = round_filters(args.input_filters, width)
    out_f = round_filters(args.output_filters, width)
    stride = 1 if (small_image and stage in SMALL_IMAGE_STRIDE1_STAGES) else args.stride
    for r in range(round_repeats(args.repeats, depth)):
      blocks.append(ScaledBlock(
          index=len(blocks), kernel_size=args.kernel_size, stride=stride if r == 0 else 1,
          expand_ratio=args.expand_ratio, input_filters=in_f if r == 0 else out_f,
          output_filters=out_f, se_ratio=args.se_ratio))
  return tuple(blocks)
