"""What the models take as input: pixels normalised with the ImageNet mean and standard deviation.

The input pipeline usually normalises on the host (`nsjax.data.preprocess.normalize`, in tf.data);
`normalize` here does the same on the device, inside a jitted step, where XLA fuses it into the
stem convolution. The pseudo-labeling stage uses it: there the host's CPU is the scarce resource on
a CPU machine, and the official EfficientNet code normalises inside the model function as well.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# ImageNet statistics per RGB channel, for pixels in [0, 1] and in pixel units (0..255).
MEAN = (0.485, 0.456, 0.406)
STDDEV = (0.229, 0.224, 0.225)
MEAN_RGB = tuple(m * 255 for m in MEAN)
STDDEV_RGB = tuple(s * 255 for s in STDDEV)


def normalize(pixels: jax.Array) -> jax.Array:
  """[..., 3] pixels in 0..255 units -> float32 (pixels - mean) / std, as the models expect."""
  pixels = jnp.asarray(pixels, jnp.float32)
  return (pixels - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STDDEV_RGB, jnp.float32)
