"""A training run's settings: the defaults (nsjax.config_lib), their checks, and what they make.

Hyperparameters (an `ml_collections.ConfigDict`, a plain dict, or keyword overrides of
`default_config()`; unknown keys are an error). The general keys have their defaults in
nsjax.config_lib; `objective` names the objective (nsjax.objectives), whose own keys have their
defaults in its class. Every key, its default and its meaning are listed in docs/configuration.md.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import ml_collections
import optax

from nsjax import config_lib, objectives
from nsjax.train import optimizer as opt


def default_config() -> ml_collections.ConfigDict:
  """The official recipe's defaults (see the module docstring for each key); they live in
  nsjax.config_lib, with every other config default, so config validation reads the same keys."""
  return config_lib.train_defaults()


def resolve_config(config: Any = None, **overrides: Any) -> ml_collections.ConfigDict:
  """`default_config()` and the chosen objective's defaults, updated with `config` (dict /
  ConfigDict) and `overrides`; validated."""
  cfg = default_config()
  given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config or {})
  given.update(overrides)
  objective = given.get("objective", cfg.objective)
  for key, value in objectives.defaults(objective).items():
    setattr(cfg, key, value)
  _check_known_keys(given, cfg, objective)
  for key, value in given.items():
    setattr(cfg, key, value)
  if not cfg.batch_size or cfg.batch_size < 1:
    raise ValueError("config.batch_size (the GLOBAL labeled batch size) must be set; it scales "
                     "the learning rate (0.016 * batch_size / 256) and defines the epoch length.")
  if cfg.optimizer not in opt.OPTIMIZERS:
    raise ValueError(f"config.optimizer must be one of {opt.OPTIMIZERS}, got {cfg.optimizer!r}.")
  if cfg.compute_dtype not in ("", "float32", "bfloat16"):
    raise ValueError(f"config.compute_dtype must be '', 'float32' or 'bfloat16', "
                     f"got {cfg.compute_dtype!r}.")
  if isinstance(cfg.steps_per_call, bool) or cfg.steps_per_call < 1:
    raise ValueError(f"config.steps_per_call must be an integer >= 1 (updates per compiled "
                     f"call), got {cfg.steps_per_call!r}.")
  steps_per_epoch(cfg)
  num_train_steps(cfg)
  objectives.from_settings(cfg)  # the objective's own checks of its settings
  return cfg


def _check_known_keys(given: dict[str, Any], cfg: ml_collections.ConfigDict,
                      objective: str) -> None:
  """Refuses keys neither general nor the chosen objective's, naming the objectives they belong
  to (a setting of another objective is not silently ignored)."""
  unknown = sorted(set(given) - set(cfg))
  for key in unknown:
    owners = objectives.owners(key)
    if owners:
      raise ValueError(f"{key} is a setting of the objective {' or '.join(map(repr, owners))}, "
                       f"but objective = {objective!r}; set objective = {owners[0]!r} or "
                       f"remove {key}.")
  if unknown:
    raise ValueError(f"Unknown training config key(s) {unknown}; valid keys: {sorted(cfg)}.")


def steps_per_epoch(cfg: ml_collections.ConfigDict) -> float:
  """Updates per pass over the LABELED set (may be fractional, as in the official code)."""
  if cfg.steps_per_epoch:
    return float(cfg.steps_per_epoch)
  if cfg.num_labeled_examples:
    return cfg.num_labeled_examples / cfg.batch_size
  raise ValueError("Set config.steps_per_epoch or config.num_labeled_examples: the learning-rate "
                   "warmup and decay are measured in labeled epochs.")


def num_train_steps(cfg: ml_collections.ConfigDict) -> int:
  if cfg.num_train_steps:
    return int(cfg.num_train_steps)
  if cfg.num_epochs:
    return int(math.ceil(cfg.num_epochs * steps_per_epoch(cfg)))
  raise ValueError("Set config.num_train_steps or config.num_epochs (the run length).")


def make_schedule(cfg: ml_collections.ConfigDict) -> opt.Schedule:
  return opt.learning_rate_schedule(cfg.base_learning_rate, cfg.batch_size, steps_per_epoch(cfg),
                                    cfg.warmup_epochs, cfg.lr_decay_epochs, cfg.lr_decay_factor,
                                    cfg.lr_schedule)


def make_tx(cfg: ml_collections.ConfigDict, schedule: opt.Schedule) -> optax.GradientTransformation:
  return opt.make_optimizer(cfg.optimizer, schedule, rmsprop_decay=cfg.rmsprop_decay,
                            momentum=cfg.momentum, rmsprop_epsilon=cfg.rmsprop_epsilon,
                            adamw_weight_decay=cfg.adamw_weight_decay)


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """What a compiled train step depends on, and so the key of its compilation cache
  (nsjax.train.compile_cache): each field but the last two is the resolved training setting of
  its name; `objective` is the objective's own settings object (nsjax.objectives), so a setting
  an objective adds keys the cache with no edit here. The seed is not a field: it is an argument
  of the compiled step, so runs that differ only in their seed share one compilation."""
  batch_size: int
  optimizer: str
  base_learning_rate: float
  lr_schedule: str
  warmup_epochs: float
  lr_decay_epochs: float
  lr_decay_factor: float
  rmsprop_decay: float
  momentum: float
  rmsprop_epsilon: float
  adamw_weight_decay: float
  weight_decay: float
  ema_decay: float
  fsdp: bool
  steps_per_epoch: float
  objective: Any


def step_settings(cfg: ml_collections.ConfigDict) -> StepSettings:
  """The StepSettings of a resolved training config."""
  derived = {"steps_per_epoch": steps_per_epoch(cfg), "objective": objectives.from_settings(cfg)}
  return StepSettings(**{f.name: derived[f.name] if f.name in derived else cfg[f.name]
                         for f in dataclasses.fields(StepSettings)})
