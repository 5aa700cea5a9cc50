"""nsjax EfficientNet-B0..B7 equal `keras.applications.EfficientNetB0..B7` in eval mode.

The Keras weights (weights=None, then BatchNorm gammas, betas and biases randomised and moving
statistics calibrated on a random batch, so that every mapped tensor matters) are copied with
`convert.keras_to_flax`, which goes through the official TF names and layouts: this also checks
the layouts the official-checkpoint importer relies on.
Keras's input preprocessing (Rescaling + Normalization) is bypassed with a sub-model that starts
at the stem's ZeroPadding layer; nsjax models take already normalised images.

Tolerance: every logit within rtol=1e-4, plus atol = 1e-4 * max|logit| (i.e. agreement to 1e-4 of
the logit scale). The atol is tied to the scale because the two frameworks sum in different orders
(oneDNN vs XLA): float32 rounding leaves an absolute error that grows with depth and resolution
(measured max|diff| / max|logit|: 6e-6..9e-6 for B0-B3, ~2e-5 for B6/B7 at 528/600 px), which would
be a large *relative* error on logits that happen to lie near zero. A real mapping error is far
above this: shifting the stem BN means by 0.01 moves the B0 logits by ~0.2 of their scale.
"""
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nsjax import models  # noqa: E402
from nsjax.models import convert  # noqa: E402

RTOL = 1e-4
ATOL_FRACTION_OF_SCALE = 1e-4


def randomised_keras_model(variant: str, resolution: int, seed: int = 0):
  """keras EfficientNetB<variant>, logits output, with random BN gammas/betas and conv/dense biases,
  and BN moving statistics set from a random calibration batch (see `calibrate_batchnorm`)."""
  constructor = getattr(keras.applications, f"EfficientNet{variant.upper()}")
  keras_model = constructor(weights=None, classifier_activation=None,
                            input_shape=(resolution, resolution, 3))
  rng = np.random.default_rng(seed)
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      n = layer.gamma.shape[0]
      layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
      layer.beta.assign(rng.normal(0, 0.2, n).astype(np.float32))
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
      layer.bias.assign(rng.normal(0, 0.2, layer.bias.shape).astype(np.float32))
  calibration = rng.normal(size=(1, resolution, resolution, 3)).astype(np.float32)
  calibrate_batchnorm(without_preprocessing(keras_model), calibration)
  return keras_model


def calibrate_batchnorm(keras_model, images):
  """Sets every BN's moving statistics to its input's statistics on `images` (momentum 0, no
  dropout).

  Random moving statistics would be meaningful too, but they do not match the activations, which
  then grow layer after layer (|logits| ~ 3e4 for B7) until float32 rounding differences between
  the frameworks are amplified beyond any tolerance. Calibrated statistics are still per-channel,
  data-dependent values (not the 0/1 defaults) and keep every model's logits O(1).
  """
  saved = {}
  for layer in keras_model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      saved[layer.name] = ("momentum", layer.momentum)
      layer.momentum = 0.0
    elif isinstance(layer, keras.layers.Dropout):
      saved[layer.name] = ("rate", layer.rate)
      layer.rate = 0.0
  keras_model(images, training=True)
  for layer in keras_model.layers:
    if layer.name in saved:
      setattr(layer, *saved[layer.name])


def without_preprocessing(keras_model):
  """The network from the stem's padding on: takes images already normalised, like nsjax."""
  return keras.Model(keras_model.get_layer("stem_conv_pad").input, keras_model.output)


def assert_logits_close(ours, theirs):
  np.testing.assert_allclose(ours, theirs, rtol=RTOL,
                             atol=ATOL_FRACTION_OF_SCALE * np.abs(theirs).max())


@pytest.mark.parametrize("variant,batch", [
    ("b0", 2), ("b1", 1), ("b2", 1),
    pytest.param("b3", 1, marks=pytest.mark.slow), pytest.param("b4", 1, marks=pytest.mark.slow),
    pytest.param("b5", 1, marks=pytest.mark.slow), pytest.param("b6", 1, marks=pytest.mark.slow),
    pytest.param("b7", 1, marks=pytest.mark.slow),
])
def test_logits_match_keras(variant, batch):
  name = f"efficientnet-{variant}"
  resolution = models.get_spec(name).test_resolution
  keras.backend.clear_session()
  keras_model = randomised_keras_model(variant, resolution)
  # Same architecture: Keras's trainable parameter count is the published one.
  trainable = sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)
  assert trainable == models.get_spec(name).reference_params

  x = np.random.default_rng(1).normal(size=(batch, resolution, resolution, 3)).astype(np.float32)
  theirs = np.asarray(without_preprocessing(keras_model)(x, training=False))
  # float32 products: the equivalence is to 1e-4, tighter than the bfloat16 operands an AMX CPU
  # would otherwise give the large 1x1 convolutions (tests/test_matmul_operands.py).
  model = models.create_model(name, 1000, matmul_operands="float32")
  variables = convert.keras_to_flax(keras_model, model)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False))
  ours = np.asarray(forward(variables, x))

  assert ours.shape == (batch, 1000)
  assert np.std(theirs) > 0.05  # not a degenerate (constant) output
  assert_logits_close(ours, theirs)

  if variant == "b0":
    # The tolerance is tight enough to notice one slightly wrong BN statistic in the stem.
    stem_bn = variables["batch_stats"]["stem"]["tpu_batch_normalization"]
    stem_bn["mean"] = stem_bn["mean"] + 0.01
    with pytest.raises(AssertionError):
      assert_logits_close(np.asarray(forward(variables, x)), theirs)


def test_keras_depthwise_and_block_mapping():
  """Keras `block2a_*` is official `blocks_1` (expanded); depthwise kernels keep TF's [k,k,C,1]."""
  keras.backend.clear_session()
  keras_model = keras.applications.EfficientNetB0(weights=None, classifier_activation=None,
                                                  input_shape=(32, 32, 3))
  official = convert.keras_to_official(keras_model, scope="efficientnet-b0")
  kernel = keras_model.get_layer("block2a_dwconv").weights[0].numpy()
  np.testing.assert_array_equal(
      official["efficientnet-b0/blocks_1/depthwise_conv2d/depthwise_kernel"], kernel)
  assert kernel.shape == (3, 3, 96, 1)
  np.testing.assert_array_equal(official["efficientnet-b0/blocks_0/conv2d/kernel"],
                                keras_model.get_layer("block1a_project_conv").weights[0].numpy())
  np.testing.assert_array_equal(official["efficientnet-b0/blocks_15/conv2d_1/kernel"],
                                keras_model.get_layer("block7a_project_conv").weights[0].numpy())
  assert set(official) == {f"efficientnet-b0/{n}" for n in
                           convert.official_shapes(models.create_model("efficientnet-b0", 1000))}
