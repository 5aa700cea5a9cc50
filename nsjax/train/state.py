"""The train state and its sharded creation.

The state is built in two moves so a large model never materialises on one device: `jax.eval_shape`
gives the shapes (and, through `nsjax.parallel.tree_shardings`, each leaf's sharding: replicated,
or FSDP over `data`), then one jitted init with those `out_shardings` writes every shard in place.
The same abstract tree, with shardings attached, is the target for restoring a checkpoint.
"""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from nsjax import parallel


@flax.struct.dataclass
class TrainState:
  """Everything a training run updates; all leaves are arrays (checkpointable as one pytree).

  step: updates applied so far (int32). The learning rate, the EMA decay and the dropout key of
    the next update are functions of it.
  params, batch_stats: the live model variables.
  opt_state: the optimizer's slots (for TF1 RMSProp: count, mean square, momentum).
  ema_params, ema_batch_stats: exponential moving averages (evaluation, export, pseudo-labels).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params, "batch_stats": self.batch_stats}

  @property
  def ema_variables(self) -> dict[str, Any]:
    """What evaluation, export and the next teacher use."""
    return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                     image_shape: tuple[int, int, int]) -> TrainState:
  """A fresh state (pure; jit it). EMA copies start equal to the initial variables, as TF's."""
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation,
                         image_shape: tuple[int, int, int]) -> TrainState:
  """ShapeDtypeStructs of the state, without allocating or computing anything."""
  return jax.eval_shape(lambda: init_train_state(model, tx, jax.random.key(0), image_shape))


def state_shardings(mesh: jax.sharding.Mesh, abstract_state: TrainState, fsdp: bool = False) -> Any:
  """Replicated, or (fsdp=True) params, EMA copies and optimizer slots sharded over `data`.

  A slot has its parameter's shape, so `fsdp_spec` (which looks only at the shape) shards it the
  same way, and the elementwise optimizer and EMA updates need no communication.
  """
  return parallel.tree_shardings(mesh, abstract_state, fsdp=fsdp)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """Attach shardings to ShapeDtypeStructs (a restore target for Orbax)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)


def _init_compiler_options() -> dict[str, Any] | None:
  # Init runs once; on CPU, LLVM's full optimisation of the many small RNG kernels costs several
  # times the compile time of the whole init for nothing. Other backends keep their defaults.
  return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def make_init_fn(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                 image_shape: tuple[int, int, int], shardings: Any):
  """`init(key) -> TrainState`, jitted to write each leaf straight into its sharding."""
  return parallel.jit(lambda k: init_train_state(model, tx, k, image_shape),
                      in_shardings=parallel.replicated(mesh), out_shardings=shardings,
                      compiler_options=_init_compiler_options())


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                       key: jax.Array, image_shape: tuple[int, int, int],
                       fsdp: bool = False) -> tuple[TrainState, Any]:
  """(state, shardings): the state initialised directly into its shardings on `mesh`."""
  abstract = abstract_train_state(model, tx, image_shape)
  shardings = state_shardings(mesh, abstract, fsdp)
  return make_init_fn(model, tx, mesh, image_shape, shardings)(key), shardings
