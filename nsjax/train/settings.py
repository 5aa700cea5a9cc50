"""A training run's settings: the defaults (nsjax.config_lib), their checks, and what they make.

Hyperparameters (an `ml_collections.ConfigDict`, a plain dict, or keyword overrides of
`default_config()`; unknown keys are an error). Every key, its default and its meaning are listed
in docs/configuration.md (generated from nsjax.config_lib, the one home of defaults).
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import optax

from nsjax import config_lib
from nsjax.train import objective
from nsjax.train import optimizer as opt


def default_config() -> ml_collections.ConfigDict:
  """The official recipe's defaults (see the module docstring for each key); they live in
  nsjax.config_lib, with every other config default, so config validation reads the same keys."""
  return config_lib.train_defaults()


def resolve_config(config: Any = None, **overrides: Any) -> ml_collections.ConfigDict:
  """`default_config()` updated with `config` (dict / ConfigDict) and `overrides`; validated."""
  cfg = default_config()
  given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config or {})
  given.update(overrides)
  unknown = sorted(set(given) - set(cfg))
  if unknown:
    raise ValueError(f"Unknown training config key(s) {unknown}; valid keys: {sorted(cfg)}.")
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
  objective.loss_config(cfg, num_classes=1)  # checks the loss settings
  return cfg


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
