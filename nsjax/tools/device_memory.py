"""Per-device memory of a schedule's models, before anything runs or allocates.

  python -m nsjax.tools.device_memory --config=configs/imagenet_b7_l2.py [--num_devices=256]

Whether a model's training state fits next to its activations decides `train.fsdp`: replicated,
every device holds all params, both EMA copies and every optimizer slot (TF1 RMSProp keeps two per
parameter, so ~4x the params); FSDP divides the large arrays by the device count. This prints, for
each model of the schedule, those bytes per device both ways. Everything comes from shapes
(`jax.eval_shape`) and the shardings `nsjax.parallel.tree_shardings` gives them on a 1-D `data` mesh
of N devices -- an `AbstractMesh`, so N need not exist here and even EfficientNet-L2 costs seconds.
Activations are not counted (they depend on batch size, resolution and XLA's rematerialisation):
leave room for them. FSDP vs replicated training agreeing numerically is tested in
tests/test_train_steps.py.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any

import jax
import numpy as np
from absl import app, flags
from jax.sharding import AbstractMesh

from nsjax import command, config_flag, config_lib, parallel, schedule, validate
from nsjax.stages import train as train_stage
from nsjax.train import optimizer as opt
from nsjax.train import settings
from nsjax.train import state as state_lib

PARTS = ("params", "batch_stats", "ema", "opt_slots")
_CONFIG = _NUM_DEVICES = None  # flag holders, set by define_flags()


@dataclasses.dataclass
class ModelMemory:
  stage: str            # teacher, student-1, ..., baseline
  model: str            # e.g. efficientnet-l2
  resolution: int
  optimizer: str        # "" for an imported teacher (no training state)
  fsdp_configured: bool  # what the config's train.fsdp says
  num_params: int
  replicated: dict[str, int]  # bytes per device for each of PARTS, and "total"
  fsdp: dict[str, int]


def abstract_mesh(num_devices: int) -> AbstractMesh:
  """A 1-D `data` mesh of `num_devices` devices that need not exist (shapes only)."""
  return AbstractMesh((int(num_devices),), (parallel.DATA_AXIS,))


def bytes_per_device(abstract_tree: Any, shardings: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs placed with `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _parts(abstract_state: Any, mesh: AbstractMesh, fsdp: bool) -> dict[str, int]:
  trees = {"params": abstract_state["params"], "batch_stats": abstract_state["batch_stats"],
           "ema": abstract_state["ema"], "opt_slots": abstract_state["opt_slots"]}
  out = {k: bytes_per_device(t, parallel.tree_shardings(mesh, t, fsdp=fsdp))
         for k, t in trees.items()}
  out["total"] = sum(out.values())
  return out


_CACHE: dict[str, tuple[Any, Any, str]] = {}  # tracing L2 takes a while; shapes never change


def abstract_training_state(stage_cfg, config) -> tuple[Any, Any, str]:
  key = stage_cfg.to_json(sort_keys=True) + config.data.to_json(sort_keys=True)
  if key not in _CACHE:
    _CACHE[key] = _abstract_training_state(stage_cfg, config)
  return _CACHE[key]


def _abstract_training_state(stage_cfg, config) -> tuple[Any, Any, str]:
  """({params, batch_stats, ema, opt_slots} as ShapeDtypeStructs, model, optimizer name).

  An imported teacher (stage_cfg.checkpoint) only runs inference: no EMA, no optimizer slots.
  """
  model = train_stage.build_model(stage_cfg, config)
  res = int(stage_cfg.resolution)
  if stage_cfg.get("checkpoint"):
    abstract = jax.eval_shape(lambda: model.init(
        jax.random.key(0), np.zeros((1, res, res, 3), np.float32), train=False))
    return ({"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {}),
             "ema": {}, "opt_slots": {}}, model, "")
  # Only shapes matter here, so the epoch length is a placeholder.
  cfg = train_stage.train_config(stage_cfg, config, int(stage_cfg.train.batch_size))
  base_tx = settings.make_tx(cfg, settings.make_schedule(cfg))
  abstract_vars = jax.eval_shape(lambda: model.init(
      jax.random.key(0), np.zeros((1, res, res, 3), np.float32), train=False))
  tx = opt.freeze(base_tx, abstract_vars["params"], int(getattr(model, "frozen_blocks", -1)))
  state = state_lib.abstract_train_state(model, tx, (res, res, 3))
  return ({"params": state.params, "batch_stats": state.batch_stats,
           "ema": {"params": state.ema_params, "batch_stats": state.ema_batch_stats},
           "opt_slots": state.opt_state}, model, cfg.optimizer)


def schedule_memory(config, num_devices: int | None = None) -> list[ModelMemory]:
  """One `ModelMemory` per model of the schedule (teacher, students, baseline)."""
  num_devices = int(num_devices or jax.device_count())
  if num_devices < 1:
    raise ValueError(f"num_devices must be >= 1, got {num_devices}.")
  config = config_lib.with_defaults(config)
  mesh = abstract_mesh(num_devices)
  rows = []
  for name in schedule.model_stage_names(config):
    stage_cfg = schedule.stage_config(schedule.model_stage(name), config)
    abstract, model, optimizer = abstract_training_state(stage_cfg, config)
    num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract["params"])))
    rows.append(ModelMemory(
        stage=name, model=model.model_name, resolution=int(stage_cfg.resolution),
        optimizer=optimizer, fsdp_configured=bool(stage_cfg.train.fsdp),
        num_params=num_params, replicated=_parts(abstract, mesh, fsdp=False),
        fsdp=_parts(abstract, mesh, fsdp=True)))
  return rows


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def format_report(rows: list[ModelMemory], num_devices: int) -> str:
  """A table in MiB per device: params, BN statistics, EMA, optimizer slots and total, both ways."""
  header = ["stage", "model", "params", "optimizer", "fsdp cfg", "sharding"] + list(PARTS) + ["total"]
  lines = []
  for r in rows:
    for label, parts in (("replicated", r.replicated), ("fsdp", r.fsdp)):
      lines.append([r.stage, r.model, f"{r.num_params:,}", r.optimizer or "(imported)",
                    "yes" if r.fsdp_configured else "no", label]
                   + [_mib(parts[p]) for p in PARTS] + [_mib(parts["total"])])
  widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.rjust(w) if i >= 6 else c.ljust(w)
                                for i, (c, w) in enumerate(zip(cells, widths)))
  title = (f"Training state per device, MiB, on {num_devices} device(s) (activations not "
           "included; leave room for them):")
  return "\n".join([title, fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def define_flags() -> None:
  """--config and --num_devices, defined on first use rather than at import: absl flags are
  process-global, and nsjax.main (imported beside this module in tests) defines --config too."""
  global _CONFIG, _NUM_DEVICES
  if "num_devices" in flags.FLAGS:
    return
  _CONFIG = config_flag.define_config_flag(
      "Experiment config (configs/*.py or a bundled config's name with `nsjax memory`); "
      "--config.a.b=value overrides any key.")
  _NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices on the data axis (default: "
                                      "this machine's); they need not exist here.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # A mistyped --config.* override included: exit 2 with the nearest key, as the run command.
  command.run_with_exit_codes(lambda: validate.check_keys(_CONFIG.value))
  num_devices = _NUM_DEVICES.value or jax.device_count()
  rows = schedule_memory(_CONFIG.value, num_devices)
  print(format_report(rows, num_devices), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main, argv=config_flag.resolve_config_flags_or_exit(sys.argv))
