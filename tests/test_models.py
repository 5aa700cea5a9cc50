"""EfficientNet family: exact sizes, formulation equivalence, noise only in train mode."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsjax import models
from nsjax.models import layers, specs


def count_params(model, resolution=32):
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"])), abstract


def test_block_counts_and_official_names():
  model = models.create_model("efficientnet-b0", 10)
  _, abstract = count_params(model)
  params = abstract["params"]
  assert set(abstract) == {"params", "batch_stats"}
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  # Parameter counts of all eleven models: tests/test_model_table.py.
  assert len(model.blocks) == 16
  assert set(params["blocks_0"]) == {"depthwise_conv2d", "tpu_batch_normalization", "se",
                                     "conv2d", "tpu_batch_normalization_1"}
  assert set(params["blocks_1"]) == {"conv2d", "tpu_batch_normalization", "depthwise_conv2d",
                                     "tpu_batch_normalization_1", "se", "conv2d_1",
                                     "tpu_batch_normalization_2"}
  # SE is sized from the block's INPUT filters (16 * 0.25 = 4), not the expanded width (96).
  assert params["blocks_1"]["se"]["conv2d"]["kernel"].shape == (1, 1, 96, 4)
  assert params["blocks_1"]["depthwise_conv2d"]["kernel"].shape == (3, 3, 1, 96)
  assert params["head"]["dense"]["kernel"].shape == (1280, 10)


def test_fewer_block_stages_build_the_first_stages_only():
  full = models.create_model("efficientnet-b0", 10)
  two = models.create_model("efficientnet-b0", 10, block_stages=2)
  assert full.block_stages == 7 and len(full.blocks) == 16
  assert two.blocks == full.blocks[:3]  # stage 1 has one block, stage 2 two
  _, abstract = count_params(two)
  assert sorted(k for k in abstract["params"] if k.startswith("blocks_")) == [
      "blocks_0", "blocks_1", "blocks_2"]
  # The head takes whatever the last block gives (24 filters here, 320 for the full network).
  assert abstract["params"]["head"]["conv2d"]["kernel"].shape == (1, 1, 24, 1280)
  # A description written before the field existed rebuilds the published network.
  old = {k: v for k, v in models.describe(full).items() if k != "block_stages"}
  assert models.model_from_config(old) == full
  for bad in (0, 8, 2.5):
    with pytest.raises(ValueError, match=rf"block_stages must be an integer in 1..7 .*got {bad}"):
      models.create_model("efficientnet-b0", 10, block_stages=bad)


def test_round_filters_official_rule():
  assert specs.round_filters(32, 1.0) == 32
  assert specs.round_filters(32, 4.3) == 136
  assert specs.round_filters(1280, 2.0) == 2560
  assert specs.round_filters(16, 0.1) == 8  # never below the divisor
  assert specs.round_repeats(3, 3.1) == 10


def head_input_size(model, size=32):
  """Spatial size of the feature map entering the head (shapes only, nothing computed)."""
  shapes = []

  def record(next_fun, args, kwargs, context):
    if context.module.name == "head" and context.method_name == "__call__":
      shapes.append(args[0].shape)
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, size, size, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.apply(model.init(jax.random.key(0), x), x), x)
  return shapes[-1][1]


def test_small_image_variant_keeps_resolution_longer():
  big = models.create_model("efficientnet-b0", 10)
  small = models.create_model("efficientnet-b0", 10, small_image=True)
  assert [b.stride for b in big.blocks if b.stride == 2] == [2, 2, 2, 2]
  assert sum(b.stride == 2 for b in small.blocks) == 2
  # Stem /2, then four stride-2 stages: 32 -> 1; the small-image variant keeps 32 -> 4.
  assert head_input_size(big) == 1 and head_input_size(small) == 4


def assert_impls_agree(op, x, w, impl):
  """op(x, w, impl) equals op(x, w, "xla"): values, and gradients for both inputs. Returns XLA's."""
  expected = op(x, w, "xla")
  np.testing.assert_allclose(op(x, w, impl), expected, rtol=1e-5, atol=1e-5)
  loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(op(x, w, impl)))
  for a, b in zip(jax.grad(loss(impl), (0, 1))(x, w), jax.grad(loss("xla"), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  return expected


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [7, 8])
def test_shift_depthwise_equals_xla_conv(stride, kernel, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 6))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 1, 6))
  out = assert_impls_agree(lambda x, w, impl: layers.depthwise_conv(x, w, stride, impl), x, w,
                           "shift")
  assert out.shape[1] == -(-size // stride)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's fusion of the shift form")
@pytest.mark.parametrize("stride, size", [(1, 8), (2, 8), (2, 9)])
def test_shift_depthwise_reads_its_activation_once(stride, size):
  """silu -> depthwise compiles to two passes: activation + padding, then the taps. Windows that
  XLA could see as slices of the unpadded input used to pull the raw input and the sigmoid into
  the taps' pass as well (a third pass and two more tensors read)."""
  f = lambda x, k: layers.depthwise_conv(jax.nn.silu(x), k, stride, "shift")
  x, k = jnp.ones((2, size, size, 4)), jnp.ones((3, 3, 1, 4))
  hlo = jax.jit(f).lower(x, k).compile().as_text()
  fusions = [line for line in hlo.splitlines() if " fusion(" in line and "ENTRY" not in line]
  assert len(fusions) == 2, fusions
  taps = next(line for line in fusions if "ROOT" in line)
  assert "%x" not in taps.split("fusion(")[1].split(")")[0], taps  # only the padded activation


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("size", [7, 8])
def test_taps_conv_equals_xla_conv(stride, kernel, size):
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3))
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))
  out = assert_impls_agree(lambda x, w, impl: layers.conv(x, w, stride, impl), x, w, "taps")
  assert out.shape == (2, -(-size // stride), -(-(size + 1) // stride), 5)


def test_conv_impl_auto_picks_taps_only_for_few_channels_on_cpu():
  cpu = jax.default_backend() == "cpu"
  assert layers.resolve_conv_impl("auto", 3) == ("taps" if cpu else "xla")
  assert layers.resolve_conv_impl("auto", layers.TAPS_MAX_INPUT_CHANNELS + 1) == "xla"
  assert layers.resolve_conv_impl("xla", 3) == "xla"
  with pytest.raises(ValueError, match="conv impl must be one of"):
    layers.resolve_conv_impl("im2col", 3)


def test_stem_impls_share_parameters_and_agree():
  """The stem's formulation is not in the checkpoint: variables of one apply to the other."""
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  nets = {impl: models.create_model("efficientnet-b0", 10, width=0.25, depth=0.25,
                                    block_stages=1, stem_impl=impl)  # stem, 1 block, head
          for impl in ("xla", "taps")}
  variables = jax.jit(nets["xla"].init)(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
      jnp.shape, jax.eval_shape(nets["taps"].init, jax.random.key(1), x))
  assert variables["params"]["stem"]["conv2d"]["kernel"].shape == (3, 3, 3, 8)
  np.testing.assert_allclose(jax.jit(nets["taps"].apply)(variables, x),
                             jax.jit(nets["xla"].apply)(variables, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_equals_flax_1x1_conv(use_bias):
  """The dot-based 1x1 conv has nn.Conv's parameters and computes the same values and grads."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, 7))
  dot = layers.PointwiseConv(4, use_bias)
  conv = nn.Conv(4, (1, 1), use_bias=use_bias)
  params = dot.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, conv.init(jax.random.key(1), x))
  if use_bias:
    params = jax.tree.map(lambda p: p + 0.5, params)
  np.testing.assert_allclose(dot.apply(params, x), conv.apply(params, x), rtol=1e-5, atol=1e-5)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  expected = jax.tree.leaves(jax.grad(loss(conv), (0, 1))(params, x))
  for grad in (jax.grad(loss(dot), (0, 1)), jax.jit(jax.grad(loss(dot), (0, 1)))):  # custom VJP
    for a, b in zip(jax.tree.leaves(grad(params, x)), expected):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_same_padding_matches_tf_rule():
  assert layers.same_padding(224, 3, 2) == ((0, 1), 112)
  assert layers.same_padding(224, 5, 2) == ((1, 2), 112)
  assert layers.same_padding(113, 3, 2) == ((1, 1), 57)
  assert layers.same_padding(7, 5, 1) == ((2, 2), 7)


def tiny(**kw):
  # Three block stages (blocks 0-2): every kind of block and noise, at a third of the compile.
  kw = dict(dict(width=0.25, depth=0.25, block_stages=3, dropout_rate=0.5,
                 stochastic_depth_rate=0.5), **kw)
  return models.create_model("efficientnet-b0", 5, **kw)


def test_noise_only_in_train_mode():
  model = tiny()
  x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  evaluate = jax.jit(lambda v, x, key: model.apply(v, x, train=False, rngs={"dropout": key}))
  np.testing.assert_array_equal(evaluate(variables, x, jax.random.key(0)),
                                evaluate(variables, x, jax.random.key(1)))

  def train_fn(m):
    return jax.jit(lambda v, x, seed: m.apply(v, x, train=True, rngs={"dropout": jax.random.key(seed)},
                                              mutable=["batch_stats"])[0])

  train = train_fn(model)
  np.testing.assert_array_equal(train(variables, x, 0), train(variables, x, 0))  # deterministic
  assert not np.allclose(train(variables, x, 0), train(variables, x, 1))  # noise follows the rng
  quiet = train_fn(tiny(dropout_rate=0.0, stochastic_depth_rate=0.0))
  np.testing.assert_array_equal(quiet(variables, x, 0), quiet(variables, x, 1))


def test_drop_rates_follow_linear_schedule():
  model = models.create_model("efficientnet-b0", 10)
  rates = model.block_drop_rates()
  assert len(rates) == 16 and rates[0] == 0.0
  np.testing.assert_allclose(rates, [0.2 * i / 16 for i in range(16)])


def test_drop_connect_is_per_example_and_unbiased():
  x = jnp.ones((20000, 2, 2, 3))
  y = layers.drop_connect(x, 0.25, jax.random.key(0))
  per_example = np.asarray(y[:, 0, 0, 0])
  assert set(np.unique(per_example)) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(np.asarray(y) == per_example[:, None, None, None])  # whole example kept or dropped
  assert abs(per_example.mean() - 1.0) < 0.03
  assert abs((per_example == 0).mean() - 0.25) < 0.02


def test_bfloat16_compute_with_float32_params():
  model = tiny(dtype="bfloat16")
  x = jnp.ones((2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32
  ref = jax.jit(tiny().apply)(variables, x)
  np.testing.assert_allclose(logits, ref, rtol=0.1, atol=0.1)


def test_frozen_blocks_use_running_stats_and_block_gradients():
  model = tiny(frozen_blocks=2)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)

  def loss(params):
    out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                               train=True, rngs={"dropout": jax.random.key(0)},
                               mutable=["batch_stats"])
    return jnp.sum(out ** 2), updates

  grads, updates = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  for frozen in ("stem", "blocks_0", "blocks_1"):
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[frozen]))
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"][frozen],
                 variables["batch_stats"][frozen])
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["blocks_2"]))


def test_bad_names_and_overrides_fail_clearly():
  with pytest.raises(ValueError, match="Unknown model 'efficientnet-b9'.*efficientnet-l2"):
    models.create_model("efficientnet-b9", 10)
  with pytest.raises(ValueError, match="Unknown model override"):
    models.create_model("efficientnet-b0", 10, widht=2.0)
  with pytest.raises(ValueError, match="dtype"):
    models.create_model("efficientnet-b0", 10, dtype="float16")
  # Formulation names are checked when the model is made, not at its first call.
  with pytest.raises(ValueError, match="stem_impl must be one of .*'taps'.*, got 'im2col'"):
    models.create_model("efficientnet-b0", 10, stem_impl="im2col")
  with pytest.raises(ValueError, match="depthwise_impl must be one of .*'shift'.*, got 'grouped'"):
    models.create_model("efficientnet-b0", 10, depthwise_impl="grouped")


def test_config_round_trip():
  model = tiny(resolution=48)
  again = models.model_from_config(models.describe(model))
  assert again == model
  assert model.train_resolution == model.test_resolution == 48
