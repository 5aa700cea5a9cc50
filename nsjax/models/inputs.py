"""What the models take as input: pixels normalised with the ImageNet mean and standard deviation.

The input pipeline usually normalises on the host (`nsjax.data.preprocess.normalize`, in tf.data);
`normalize` here does the same on the device, inside a jitted step, where XLA fuses it into the
stem convolution. The pseudo-labeling stage uses it: there the host's CPU is the scarce resource on
a CPU machine, and the official EfficientNet code normalises inside the model function as well.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Per RGB channel, in pixel units (0..255).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def normalize(pixels: jax.Array) -> jax.Array:
  """[..., 3] pixels in 0..255 units -> float32 (pixels - mean) / std, as the models expect."""
  pixels = jnp.asarray(pixels, jnp.float32)
  return (pixels - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STDDEV_RGB, jnp.float32)
