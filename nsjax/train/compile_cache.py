"""What a (model, settings, mesh, input shape) combination compiles, built once per process.

Cached so repeated `train` calls in one process (resume, sweeps, notebooks, benchmarks) reuse
their compilations; only the settings that change the compiled step key the cache
(nsjax.train.settings.StepSettings, the objective's own settings object among them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
import optax

from nsjax import parallel
from nsjax.train import optimizer as opt
from nsjax.train import state as state_lib
from nsjax.train import steps
from nsjax.train.settings import StepSettings, make_tx


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (it is itself cached)
class RunFunctions:
  """What a (model, hyperparameters, mesh, input shape) combination compiles, built once."""
  schedule: opt.Schedule
  tx: optax.GradientTransformation
  abstract_state: state_lib.TrainState
  shardings: Any
  init: Callable[[jax.Array], state_lib.TrainState]
  decay_mask: Any
  model: nn.Module
  mesh: jax.sharding.Mesh
  settings: StepSettings


@functools.lru_cache(maxsize=8)
def run_functions(model: nn.Module, mesh: jax.sharding.Mesh, cfg: StepSettings,
                  image_shape: tuple[int, ...], frozen_blocks: int) -> RunFunctions:
  """`cfg`: nsjax.train.settings.step_settings of the run's resolved config."""
  schedule = opt.learning_rate_schedule(cfg.base_learning_rate, cfg.batch_size,
                                        cfg.steps_per_epoch, cfg.warmup_epochs,
                                        cfg.lr_decay_epochs, cfg.lr_decay_factor, cfg.lr_schedule)
  base_tx = make_tx(cfg, schedule)
  abstract_vars = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1,) + image_shape, np.float32), train=False))
  params = abstract_vars["params"]
  batch_stats = abstract_vars.get("batch_stats", {})
  tx = opt.freeze(base_tx, params, frozen_blocks)
  abstract = state_lib.abstract_train_state(model, tx, image_shape)
  shardings = state_lib.state_shardings(mesh, abstract, cfg.fsdp)
  init = state_lib.make_init_fn(model, tx, mesh, image_shape, shardings)
  return RunFunctions(schedule=schedule, tx=tx, abstract_state=abstract, shardings=shardings,
                      init=init, decay_mask=opt.weight_decay_mask(params, batch_stats,
                                                                  frozen_blocks),
                      model=model, mesh=mesh, settings=cfg)


def train_step(fns: RunFunctions, teacher_model: nn.Module | None,
               teacher_image_shape: tuple[int, ...] | None, fsdp: bool,
               steps_per_call: int = 1) -> Callable:
  """The jitted step of `steps_per_call` updates a call: one object per program however it is
  asked for (the cache keys on all five arguments, so `steps_per_call` left to its default and
  given as 1 reach the same one: `train` and `loop.compile_ahead` must)."""
  return _train_step(fns, teacher_model, teacher_image_shape, fsdp, steps_per_call)


@functools.lru_cache(maxsize=8)
def _train_step(fns: RunFunctions, teacher_model: nn.Module | None,
                teacher_image_shape: tuple[int, ...] | None, fsdp: bool,
                steps_per_call: int) -> Callable:
  placed_teacher = None  # the teacher variables' shardings, with an online teacher
  if teacher_model is not None:
    placed_teacher = teacher_shardings(teacher_model, fns.mesh, fsdp, teacher_image_shape)
  return steps.make_train_step(fns.model, fns.tx, fns.schedule, fns.settings, fns.mesh,
                               fns.shardings, fns.decay_mask, teacher_model, placed_teacher,
                               steps_per_call)


def teacher_shardings(teacher_model: nn.Module, mesh: jax.sharding.Mesh, fsdp: bool,
                       image_shape: tuple[int, ...]) -> Any:
  abstract = jax.eval_shape(lambda: teacher_model.init(
      jax.random.key(0), np.zeros((1,) + image_shape, np.float32), train=False))
  return parallel.tree_shardings(mesh, abstract, fsdp=fsdp)

