"""1x1 convolutions take bfloat16 operands (float32 accumulation) where the CPU has AMX-bf16 tiles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nsjax import cpu_features, models
from nsjax.models import layers

HAS_AMX = cpu_features.has("amx_bf16")
ON_CPU = jax.default_backend() == "cpu"


@pytest.fixture
def amx(monkeypatch):
  """Pretend the CPU has (True) or lacks (False) AMX-bf16."""
  def pretend(value: bool):
    monkeypatch.setattr(cpu_features, "has", lambda flag, *a: flag == "amx_bf16" and value)
  return pretend


@pytest.mark.skipif(not ON_CPU, reason="'auto' picks bfloat16 only on a CPU backend")
def test_auto_picks_bfloat16_for_large_products_on_amx(amx):
  amx(True)
  bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
  assert layers.resolve_matmul_operands("auto", jnp.float32, layers.AMX_MIN_CONTRACTION) == bf16
  assert layers.resolve_matmul_operands("auto", jnp.float32, layers.AMX_MIN_CONTRACTION - 1) == f32
  amx(False)
  assert layers.resolve_matmul_operands("auto", jnp.float32, 4096) == f32
  assert layers.resolve_matmul_operands("auto", jnp.bfloat16, 4096) == bf16  # the compute dtype


def test_explicit_settings_win_and_bad_ones_are_named(amx):
  amx(True)
  assert layers.resolve_matmul_operands("float32", jnp.float32, 4096) == jnp.float32
  amx(False)
  assert layers.resolve_matmul_operands("bfloat16", jnp.float32, 1) == jnp.bfloat16
  with pytest.raises(ValueError, match="matmul_operands must be one of .*'bfloat16'.*got 'fp8'"):
    layers.resolve_matmul_operands("fp8", jnp.float32, 64)
  with pytest.raises(ValueError, match="matmul_operands must be one of"):
    models.create_model("efficientnet-b0", 10, matmul_operands="int8")


def _tiny(**overrides):
  # Wide enough that some 1x1 convolutions contract AMX_MIN_CONTRACTION channels or more (stage
  # 3's projection, 120, and the classifier, 640); three block stages keep the compiles short.
  model = models.create_model("efficientnet-b0", 10, width=0.5, depth=0.1, block_stages=3,
                              small_image=True, resolution=16, **overrides)
  images = jnp.asarray(np.random.RandomState(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  return model, variables, images


def _logits(model, variables, images):
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def _train_grads(model, variables, images):
  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, images, train=True,
                            mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)})
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0])
  return jax.jit(jax.grad(loss))(variables["params"])


def test_without_amx_auto_compiles_the_float32_program(amx):
  """No casts are added where bfloat16 would not pay: the program is the one before the setting."""
  amx(False)
  model, variables, images = _tiny()
  step = lambda m: jax.jit(lambda v, x: m.apply(v, x, train=False)).lower(variables, images).as_text()
  auto, f32 = step(model), step(model.clone(matmul_operands="float32"))
  assert auto == f32
  assert "bf16" not in f32


def test_bfloat16_operands_keep_logits_and_gradients_within_bfloat16_tolerance():
  """bfloat16 operands round each input to 8 bits of mantissa; sums stay float32."""
  model, variables, images = _tiny(matmul_operands="float32")
  fast = model.clone(matmul_operands="bfloat16")
  f32, bf16 = (_logits(m, variables, images) for m in (model, fast))
  assert bf16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(f32)))
  assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.03 * scale
  assert float(jnp.max(jnp.abs(bf16 - f32))) > 0  # the bfloat16 path really ran
  # Gradients as one vector: some leaves are exactly zero in float32 (a bias right before a
  # train-mode BatchNorm cancels out) and only rounding noise in bfloat16.
  flat = lambda tree: jnp.concatenate([leaf.ravel() for leaf in jax.tree.leaves(tree)])
  g32 = flat(_train_grads(model, variables, images))
  g16 = flat(_train_grads(fast, variables, images))
  # Train-mode BatchNorm over 4 tiny images amplifies the rounding: ~5% here, so allow 10%.
  assert float(jnp.linalg.norm(g16 - g32)) < 0.1 * float(jnp.linalg.norm(g32))
  cosine = jnp.dot(g16, g32) / (jnp.linalg.norm(g16) * jnp.linalg.norm(g32))
  assert float(cosine) > 0.99


@pytest.mark.skipif(not (HAS_AMX and ON_CPU),
                    reason="this CPU has no AMX-bf16 tiles, so 'auto' keeps float32 operands")
def test_on_this_amx_cpu_auto_uses_bfloat16_operands():
  model, variables, images = _tiny()
  text = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).as_text()
  assert "bf16" in text
  f32 = _logits(model.clone(matmul_operands="float32"), variables, images)
  auto = _logits(model, variables, images)
  assert float(jnp.max(jnp.abs(auto - f32))) < 0.03 * float(jnp.max(jnp.abs(f32)))
