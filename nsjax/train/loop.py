"""`train(...)`: one function for teacher, student and fine-tuning runs.

A run is a pure function of (config, model, data as a function of the step, seed): the noise of
update s is drawn from (seed, s), the learning rate and EMA decay are functions of s, and the
state restored from the latest checkpoint is bitwise what was saved. So a run that is stopped and
started again ends with exactly the state of one that never stopped -- provided `train_iter`
replays the same batches from the restored step (pass a callable `start_step -> iterator`).
Where the step alone does not say where the data stands (records that failed to decode were
dropped), the iterator can say it: if it has `input_position()` (JSON-able, this process's
place), every checkpoint saves all processes' positions with the state, and a resume calls
`train_iter(start_step, input_position=<this process's saved position>)`.

Hyperparameters (an `ml_collections.ConfigDict`, a plain dict, or keyword overrides of
`default_config()`; unknown keys are an error):

  seed                    0       init, dropout and stochastic-depth randomness
  batch_size              None    GLOBAL labeled batch size (required; scales the learning rate)
  num_train_steps         None    run length in updates; or
  num_epochs              None    run length in labeled epochs (needs the epoch length below)
  steps_per_epoch         None    updates per pass over the labeled set; or
  num_labeled_examples    None    labeled set size (steps_per_epoch = it / batch_size)
  optimizer               "rmsprop"  TF1 RMSProp (official); "adamw" or "sgd" for small experiments
  base_learning_rate      0.016   per 256 labeled images: peak lr = it * batch_size / 256
  lr_schedule             "exponential"  staircase decay; "constant" or "cosine" also exist
  warmup_epochs           5.0     linear warmup from 0
  lr_decay_epochs         2.4     staircase interval (4.8 for 700-epoch runs)
  lr_decay_factor         0.97
  rmsprop_decay           0.9
  momentum                0.9     RMSProp / SGD momentum
  rmsprop_epsilon         1e-3    inside the square root (TF1)
  adamw_weight_decay      0.0     decoupled decay, only for optimizer="adamw"
  weight_decay            1e-5    L2 in the loss, wd * sum(w^2) / 2, all params but BatchNorm's
  label_smoothing         0.1     on labels and on hard pseudo labels
  unlabeled_ratio         1.0     weight of the unlabeled mean CE in the loss
  pseudo_labels           "soft"  "soft" (teacher probs ^ 1/T) or "hard" (argmax + smoothing)
  temperature             1.0
  ema_decay               0.9999  with num_updates: min(decay, (1 + t) / (10 + t))
  compute_dtype           ""      "bfloat16" trains with bf16 activations; "" keeps the model's
  fsdp                    False   shard params, EMA and optimizer slots over the data axis
  log_every_steps         100     scalars (means over the window) to TensorBoard and the console
  checkpoint_every_steps  1000    periodic Orbax checkpoints under workdir/checkpoints
  keep_checkpoints        3
  eval_every_steps        0       0: evaluate only at the end (needs eval_fn)
  export                  True    export EMA variables + model.json at the end
  export_dir              ""      default workdir/export

Batches: see `nsjax.train.objective` for the dict layout ("labeled", optional "unlabeled").

Preemption: SIGTERM (how Cloud TPU VMs and most schedulers announce preemption) makes `train`
finish the step in flight, save a checkpoint of it, and raise `Preempted`; calling `train` again
with the same arguments resumes there. Hosts of a multi-process run must stop at the SAME step,
so there the decision is jax's preemption sync point (`jax.distributed.initialize()` starts the
preemption service by default; it catches SIGTERM itself and agrees on a step across hosts).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import math
import os
import signal
import threading
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from nsjax import artifacts, checkpoint, config_lib, models, parallel
from nsjax.train import objective
from nsjax.train import optimizer as opt
from nsjax.train import state as state_lib
from nsjax.train import steps
from nsjax.train.checkpointing import DamagedCheckpoint, TrainCheckpoints

log = logging.getLogger(__name__)

# Config keys that change the compiled step (the rest only steer the loop).
_STEP_KEYS = ("seed", "batch_size", "optimizer", "base_learning_rate", "lr_schedule",
              "warmup_epochs", "lr_decay_epochs", "lr_decay_factor", "rmsprop_decay", "momentum",
              "rmsprop_epsilon", "adamw_weight_decay", "weight_decay", "label_smoothing",
              "unlabeled_ratio", "pseudo_labels", "temperature", "ema_decay", "fsdp")


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


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen online teacher: a model (its own size and resolution) and its (EMA) variables."""
  model: nn.Module
  variables: Any

  @classmethod
  def load(cls, directory: str | os.PathLike, **model_overrides: Any) -> Teacher:
    """From an `nsjax.checkpoint.export_model` directory (e.g. the previous stage's export)."""
    model, variables, _ = checkpoint.load_exported(directory, **model_overrides)
    return cls(model, variables)


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
  loss_config: objective.LossConfig


def _hashable_config(cfg: ml_collections.ConfigDict) -> tuple:
  return tuple((k, cfg[k]) for k in _STEP_KEYS) + (("steps_per_epoch", steps_per_epoch(cfg)),)


# Cached so repeated `train` calls in one process (resume, sweeps, notebooks) reuse compilations.
@functools.lru_cache(maxsize=8)
def _run_functions(model: nn.Module, mesh: jax.sharding.Mesh, hashable_cfg: tuple,
                   image_shape: tuple[int, ...], frozen_blocks: int) -> RunFunctions:
  cfg = ml_collections.ConfigDict(dict(hashable_cfg))
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
                      model=model, mesh=mesh,
                      loss_config=objective.loss_config(cfg, _num_classes(model)))


@functools.lru_cache(maxsize=8)
def _train_step(fns: RunFunctions, teacher_model: nn.Module | None,
                teacher_image_shape: tuple[int, ...] | None, fsdp: bool) -> Callable:
  teacher_shardings = None
  if teacher_model is not None:
    teacher_shardings = _teacher_shardings(teacher_model, fns.mesh, fsdp, teacher_image_shape)
  return steps.make_train_step(fns.model, fns.tx, fns.schedule, fns.loss_config, fns.mesh,
                               fns.shardings, fns.decay_mask, teacher_model, teacher_shardings)


def _teacher_shardings(teacher_model: nn.Module, mesh: jax.sharding.Mesh, fsdp: bool,
                       image_shape: tuple[int, ...]) -> Any:
  abstract = jax.eval_shape(lambda: teacher_model.init(
      jax.random.key(0), np.zeros((1,) + image_shape, np.float32), train=False))
  return parallel.tree_shardings(mesh, abstract, fsdp=fsdp)


def _state_from_variables(fns: RunFunctions, variables: Any) -> state_lib.TrainState:
  """A step-0 state holding `variables` (and their EMA copies), placed in the state's shardings."""
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  expected = {"params": fns.abstract_state.params, "batch_stats": fns.abstract_state.batch_stats}
  if jax.tree.structure(variables) != jax.tree.structure(expected) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(expected))):
    raise ValueError("initial_variables do not match the model's variables (names or shapes); "
                     "start from an export of the same architecture.")

  def build(v):
    return state_lib.TrainState(step=jnp.zeros([], jnp.int32), params=v["params"],
                                batch_stats=v["batch_stats"], opt_state=fns.tx.init(v["params"]),
                                ema_params=v["params"], ema_batch_stats=v["batch_stats"])
  return parallel.jit(build, out_shardings=fns.shardings)(variables)


def _num_classes(model: nn.Module) -> int:
  if not hasattr(model, "num_classes"):
    raise ValueError(f"The model ({type(model).__name__}) needs a `num_classes` attribute.")
  return int(model.num_classes)


class NonFiniteError(FloatingPointError):
  """Training produced NaN/Inf; the offending update was not applied."""


class Preempted(Exception):
  """Stopped early on a preemption notice, after saving everything up to `step` (a training step,
  or a shard / stage count elsewhere: `unit`). `saved` says where, e.g. the checkpoint."""

  def __init__(self, step: int, saved: str, unit: str = "step"):
    super().__init__(f"preempted at {unit} {step} ({saved}); rerun the same command to resume")
    self.step = step
    self.saved = saved
    self.unit = unit


_SIGTERM_RECEIVED = threading.Event()
# Sync-point calls made by this process. jax's service stops every host at the call after the
# fastest host's latest one, comparing the counters the hosts pass, so they must count the same
# calls: training steps, pseudo-label shards and stage starts alike, whichever stage is running
# (a step number would restart at every stage and could never meet a sync point set earlier).
_SYNC_CALLS = itertools.count(1)


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _SIGTERM_RECEIVED.set()  # acted on at the next step (or shard, or stage) boundary
  log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping.")


class PreemptionWatch:
  """Tells a loop, at each step boundary, whether to checkpoint and stop for a preemption.

  Single process: a SIGTERM handler (main thread only) sets a flag; watches nest (the pipeline
  holds one for the whole run, `train` one per stage) and the outermost `stop` puts the previous
  handler back -- re-raising a SIGTERM that nobody acted on, so it is never swallowed. With
  `jax.distributed` initialised, jax's preemption service owns SIGTERM and
  `reached_preemption_sync_point` turns True on every host at the same step; a Python handler
  would replace the service's, so none is installed then. Without the service a multi-process
  run keeps the default SIGTERM behaviour (the process dies and resumes from the last periodic
  checkpoint), since hosts deciding alone could stop at different steps and hang the save.
  """

  def __init__(self):
    from jax._src import distributed  # the public sync-point API raises without the service
    self.synced = (distributed.global_state.client is not None
                   and distributed.global_state.preemption_sync_manager is not None)
    self._previous = None
    self._installed = False

  def start(self) -> PreemptionWatch:
    if self.synced:
      return self
    if jax.process_count() > 1:
      log.warning("jax's preemption service is off (jax_enable_preemption_service); SIGTERM will "
                  "end this run without a final checkpoint.")
      return self
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _on_sigterm):
      self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
      self._installed = True
    return self

  def stop(self) -> None:
    if not self._installed:
      return
    signal.signal(signal.SIGTERM, self._previous)
    self._installed = False
    if _SIGTERM_RECEIVED.is_set():  # nobody stopped for it: let the previous handler act
      _SIGTERM_RECEIVED.clear()
      signal.raise_signal(signal.SIGTERM)

  @property
  def requested(self) -> bool:
    """A local SIGTERM arrived (single process; always False under the preemption service)."""
    return _SIGTERM_RECEIVED.is_set()

  def should_stop(self, step: int) -> bool:
    """Call at every step (or shard, or stage) boundary, on every host alike: with the service,
    hosts agree by counting these calls (see _SYNC_CALLS); `step` only names the boundary."""
    del step
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_CALLS))
    return _SIGTERM_RECEIVED.is_set()

  @staticmethod
  def acknowledge() -> None:
    """The caller is stopping for the notice (raising `Preempted`): it is handled."""
    _SIGTERM_RECEIVED.clear()


@dataclasses.dataclass
class TrainResult:
  state: state_lib.TrainState
  metrics: dict[str, float]  # the last logged train window and the final evaluation
  step: int
  export_dir: str | None
  # {"process_count", "hosts": [each process's input_position()]} at the end, if the iterator
  # reports positions (e.g. pipeline stages: skipped-record counts per stream).
  input_position: dict[str, Any] | None = None

  def num_skipped(self) -> dict[str, int]:
    """{stream: undecodable records dropped over the whole run, all processes} (from positions)."""
    hosts = (self.input_position or {}).get("hosts", [])
    streams = sorted({name for host in hosts for name in host})
    return {name: sum(host[name]["num_skipped"] for host in hosts) for name in streams}

  def skipped_fields(self) -> dict[str, int]:
    """{"num_skipped_<stream>": n}: how stage results (state.json, summary.json) record them."""
    return {f"num_skipped_{name}": n for name, n in self.num_skipped().items()}


def _gather_positions(batches: Any) -> dict[str, Any] | None:
  """Every process's `batches.input_position()` ({stream: {counter: int}}), on every process.

  A collective: all processes call it at the same steps (they save at the same steps)."""
  get = getattr(batches, "input_position", None)
  if get is None:
    return None
  own = get()
  keys = [(stream, counter) for stream in sorted(own) for counter in sorted(own[stream])]
  values = np.asarray([own[s][c] for s, c in keys], np.int64)
  if jax.process_count() > 1:
    values = np.asarray(multihost_utils.process_allgather(values)).reshape(jax.process_count(), -1)
  else:
    values = values[None]
  hosts = [{} for _ in range(len(values))]
  for host, row in zip(hosts, values):
    for (stream, counter), value in zip(keys, row):
      host.setdefault(stream, {})[counter] = int(value)
  return {"process_count": len(hosts), "hosts": hosts}


def _own_position(saved: dict[str, Any] | None, step: int) -> dict[str, Any] | None:
  """This process's saved position; None when the step alone places the data exactly."""
  if saved is None:
    return None
  if saved["process_count"] == jax.process_count():
    return saved["hosts"][jax.process_index()]
  if any(c.get("num_skipped", 0) for host in saved["hosts"] for c in host.values()):
    raise ValueError(
        f"Checkpoint step {step} was written by {saved['process_count']} processes whose input "
        f"streams had skipped undecodable records; with {jax.process_count()} processes their "
        f"positions cannot be mapped. Resume with {saved['process_count']} processes, or delete "
        "the stage's checkpoints to restart it.")
  return None  # no record was ever dropped: positions follow from the step on any topology


def _check_first_batch(batch: Any, cfg: ml_collections.ConfigDict, teacher: Teacher | None) -> None:
  if not isinstance(batch, dict) or "labeled" not in batch:
    keys = list(batch) if isinstance(batch, dict) else "-"
    raise ValueError("Each batch must be a dict {'labeled': {'image', 'label'}, optional "
                     "'unlabeled': {'image', 'probs' | 'teacher_image'}}; got "
                     f"{type(batch).__name__} with keys {keys}.")
  labeled = batch["labeled"]
  missing = {"image", "label"} - set(labeled)
  if missing:
    raise ValueError(f"batch['labeled'] lacks {sorted(missing)}.")
  image = labeled["image"]
  # numpy leaves are this process's slice of the global batch (see steps.to_global_batch).
  expected = cfg.batch_size if isinstance(image, jax.Array) else (
      cfg.batch_size // jax.process_count())
  if image.shape[0] != expected:
    raise ValueError(f"The labeled batch holds {image.shape[0]} images but config.batch_size "
                     f"is {cfg.batch_size} ({expected} per process); batches must be GLOBAL "
                     "batches.")
  unlabeled = batch.get("unlabeled")
  if teacher is not None and (unlabeled is None or "teacher_image" not in unlabeled):
    raise ValueError("An online teacher was given, so batch['unlabeled'] needs 'image' and "
                     "'teacher_image' (the teacher's un-augmented view).")
  if teacher is None and unlabeled is not None and "probs" not in unlabeled:
    raise ValueError("batch['unlabeled'] has no 'probs': pass teacher=Teacher(...) for online "
                     "pseudo labels, or add the offline teacher's probabilities.")


def _hparams(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: ("none" if v is None else v) for k, v in cfg.to_dict().items()}


class _Reporter:
  """Collects per-step metrics (one step late), stops on non-finite steps, writes windows."""

  def __init__(self, writer: Any, checkpoints: TrainCheckpoints, last_good: int | None):
    self.writer = writer
    self.checkpoints = checkpoints
    self.last_good = last_good
    self.window: list[dict[str, Any]] = []
    self.pending: tuple[int, Any] | None = None
    self.latest: dict[str, float] = {}

  def add(self, step: int, step_metrics: Any) -> None:
    """Checks the PREVIOUS step while this one runs: a host sync per step, one step late."""
    self.flush_pending()
    self.pending = (step, step_metrics)

  def flush_pending(self) -> None:
    if self.pending is None:
      return
    done_step, step_metrics = self.pending
    self.pending = None
    values = jax.device_get(step_metrics)
    if not bool(values["is_finite"]):
      self.checkpoints.wait()
      self.writer.flush()
      raise NonFiniteError(
          f"Training step {done_step} (state.step {done_step - 1} -> {done_step}) produced a "
          "non-finite loss, gradient or state; that update was skipped and training stopped. "
          f"Last good checkpoint: {self.checkpoints.path(self.last_good)}. Check the inputs for "
          "NaN/Inf, lower the learning rate, or train in float32.")
    self.window.append(values)

  def write_window(self, step: int) -> None:
    if not self.window:
      return
    keys = [k for k in self.window[0] if k != "is_finite"]
    self.latest = {k: float(np.mean([w[k] for w in self.window])) for k in keys}
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in self.latest.items()})
    self.window = []


def _start(train_iter: Any, start_step: int, total_steps: int, cfg: ml_collections.ConfigDict,
           teacher: Teacher | None, position: dict[str, Any] | None = None
           ) -> tuple[Iterator, Any]:
  """(batch iterator positioned after the first batch, first batch or None when done)."""
  if start_step >= total_steps:
    return iter(()), None
  if callable(train_iter) and not hasattr(train_iter, "__next__"):
    # Only iterators that report positions get one back (the saved one came from them).
    batches = iter(train_iter(start_step) if position is None
                   else train_iter(start_step, input_position=position))
  else:
    batches = iter(train_iter)
  first = next(batches, None)
  if first is None:
    raise ValueError("train_iter yielded no batches.")
  _check_first_batch(first, cfg, teacher)
  return batches, first


def _resume(checkpoints: TrainCheckpoints, train_iter: Any, total_steps: int,
            cfg: ml_collections.ConfigDict, teacher: Teacher | None, train_model: nn.Module,
            model: nn.Module, mesh: jax.sharding.Mesh) -> tuple:
  """(latest readable checkpoint step or None, its input position, batches from there, the first
  batch, the run functions, the restored state or None).

  A checkpoint that cannot be read (a disk error, a copy cut short) is deleted for the previous
  kept one, with a warning naming both: a run loses the steps in between instead of stopping.
  """
  while True:
    latest = checkpoints.latest_step()
    step = latest or 0
    try:
      position = checkpoints.input_position(latest) if latest is not None else None
      batches, batch = _start(train_iter, step, total_steps, cfg, teacher,
                              _own_position(position, step))
      fns = _run_functions(train_model, mesh, _hashable_config(cfg), _image_shape(batch, model),
                           int(getattr(model, "frozen_blocks", -1)))
      state = (checkpoints.restore(fns.abstract_state, fns.shardings, latest)
               if latest is not None else None)
      return latest, position, batches, batch, fns, state
    except DamagedCheckpoint as damaged:
      _fall_back(checkpoints, damaged)


def _fall_back(checkpoints: TrainCheckpoints, damaged: DamagedCheckpoint) -> None:
  """Deletes the damaged checkpoint, naming it and the one the run resumes from instead."""
  previous = checkpoints.previous_step(damaged.step)
  if previous is None:
    raise artifacts.DamagedArtifact(
        str(checkpoints.directory), f"training checkpoint {damaged.step} cannot be read "
        f"({damaged.cause}) and no older one is kept",
        f"Delete {checkpoints.directory} to train this stage again from step 0 (or put back a "
        "copy of it).") from damaged
  log.warning("Training checkpoint %s cannot be read (%s); resuming from the previous kept one, "
              "%s, instead (the damaged one is deleted).", checkpoints.path(damaged.step),
              damaged.cause, checkpoints.path(previous))
  checkpoints.discard(damaged.step)


def _image_shape(first: Any, model: nn.Module) -> tuple[int, ...]:
  if first is not None:
    return tuple(first["labeled"]["image"].shape[1:])
  res = getattr(model, "train_resolution", 32)  # nothing left to train: only the shapes matter
  return (res, res, 3)


def _save_and_stop(step: int, state: state_lib.TrainState, reporter: _Reporter,
                   checkpoints: TrainCheckpoints, batches: Any) -> None:
  reporter.flush_pending()  # a non-finite step is reported, never saved
  checkpoints.wait()
  if checkpoints.latest_step() != step:  # not already saved as a periodic checkpoint
    checkpoints.save(step, state, force=True, input_position=_gather_positions(batches))
    checkpoints.wait()
  reporter.writer.flush()
  PreemptionWatch.acknowledge()
  raise Preempted(step, f"checkpoint {checkpoints.path(step)}")


def train(config: Any, model: nn.Module, train_iter: Iterable | Callable[[int], Iterable],
          workdir: str | os.PathLike, eval_fn: Callable[[Any], dict[str, float]] | None = None,
          teacher: Teacher | str | os.PathLike | None = None,
          mesh: jax.sharding.Mesh | None = None,
          initial_variables: Any = None,
          export_metadata: dict[str, Any] | None = None) -> TrainResult:
  """Trains `model`, resuming from the latest checkpoint in `workdir/checkpoints` if any.

  Args:
    config: hyperparameters (see module docstring); dict or ConfigDict.
    model: e.g. `nsjax.models.create_model(...)`. Exported at the end with its EMA variables.
    train_iter: an iterator of global batches (see `nsjax.train.steps`), or a callable
      `start_step -> iterable` so a resumed run continues the data where it stopped.
    workdir: checkpoints/, TensorBoard events and (by default) export/ go here.
    eval_fn: `eval_fn(ema_variables) -> {"top1": ..., "top5": ...}` (see
      `steps.make_eval_fn`), called every `eval_every_steps` and at the end.
    teacher: an online teacher (`Teacher` or an export directory); without one, unlabeled
      batches must carry the offline teacher's `probs`.
    mesh: defaults to all devices on one `data` axis.
    initial_variables: {"params", "batch_stats"} to start from instead of a random init (e.g. an
      exported model, for fine-tuning); the EMA starts there too, the optimizer slots fresh.
      Ignored when resuming from a checkpoint.
    export_metadata: extra entries for the export's metadata (e.g. "class_names").
  Returns:
    TrainResult(state, metrics, step, export_dir).
  Raises:
    NonFiniteError when an update yields NaN/Inf (naming the step and the last good checkpoint).
    Preempted after a SIGTERM, once the step it arrived in is checkpointed (see module docstring).
  """
  from clu import metric_writers, parameter_overview, periodic_actions  # imports TensorFlow

  cfg = resolve_config(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  if isinstance(teacher, (str, os.PathLike)):
    teacher = Teacher.load(teacher)
  if cfg.export and not isinstance(model, models.EfficientNet):
    raise ValueError("config.export needs an nsjax EfficientNet (it writes model.json); set "
                     "export=False for other modules.")
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  total_steps = num_train_steps(cfg)
  train_model = model.clone(dtype=cfg.compute_dtype) if cfg.compute_dtype else model

  checkpoints = TrainCheckpoints(workdir / "checkpoints", cfg.checkpoint_every_steps,
                                 cfg.keep_checkpoints)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  preemption = PreemptionWatch().start()
  try:
    latest, saved_position, batches, batch, fns, restored = _resume(
        checkpoints, train_iter, total_steps, cfg, teacher, train_model, model, mesh)
    step = latest or 0
    if restored is not None:
      state = restored
      log.info("Restored step %d from %s", latest, checkpoints.path(latest))
    elif initial_variables is not None:
      state = _state_from_variables(fns, initial_variables)
      writer.write_hparams(_hparams(cfg))
    else:
      state = fns.init(steps.init_key(cfg.seed))
      writer.write_hparams(_hparams(cfg))
    if jax.process_index() == 0:
      stats = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
      parameter_overview.log_parameter_overview(state.params, include_stats=stats)
    progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                               every_steps=cfg.log_every_steps)
    reporter = _Reporter(writer, checkpoints, latest)

    extra_args = ()
    if batch is not None:
      teacher_shape = (tuple(batch["unlabeled"]["teacher_image"].shape[1:]) if teacher else None)
      step_fn = _train_step(fns, teacher.model if teacher else None, teacher_shape, cfg.fsdp)
      if teacher is not None:
        extra_args = (jax.device_put(teacher.variables, _teacher_shardings(
            teacher.model, mesh, cfg.fsdp, teacher_shape)),)

    while step < total_steps:
      state, step_metrics = step_fn(state, steps.to_global_batch(batch, mesh), *extra_args)
      step += 1
      reporter.add(step, step_metrics)
      progress(step)
      log_now = step % cfg.log_every_steps == 0 or step == total_steps
      save_now = step % cfg.checkpoint_every_steps == 0 or step == total_steps
      eval_now = bool(eval_fn and cfg.eval_every_steps and step % cfg.eval_every_steps == 0
                      and step != total_steps)  # the final evaluation comes after the loop
      if log_now or save_now or eval_now:
        reporter.flush_pending()  # nothing is saved or reported before its step is known finite
      if log_now:
        reporter.write_window(step)
      if save_now:
        position = _gather_positions(batches)
        checkpoints.save(step, state, force=step == total_steps, input_position=position)
        saved_position = position
        reporter.last_good = step
      if eval_now:
        writer.write_scalars(step, {f"eval/{k}": v
                                    for k, v in eval_fn(state.ema_variables).items()})
      if step < total_steps and preemption.should_stop(step):
        _save_and_stop(step, state, reporter, checkpoints, batches)
      if step < total_steps:
        batch = next(batches, None)
        if batch is None:
          raise ValueError(f"train_iter ran out after step {step} of {total_steps}; make it "
                           "repeat (or lower num_train_steps).")
    checkpoints.wait()

    metrics = dict(reporter.latest)
    if eval_fn is not None:
      final_eval = eval_fn(state.ema_variables)
      writer.write_scalars(step, {f"eval/{k}": v for k, v in final_eval.items()})
      metrics.update({f"eval_{k}": v for k, v in final_eval.items()})
    export_dir = None
    if cfg.export:
      export_dir = str(epath.Path(cfg.export_dir) if cfg.export_dir else workdir / "export")
      checkpoint.export_model(export_dir, model, state.ema_variables, metadata={
          **(export_metadata or {}), "step": int(step), "train_config": _hparams(cfg),
          "metrics": {k: float(v) for k, v in metrics.items()}})
    writer.flush()
  finally:
    preemption.stop()
    writer.close()
    checkpoints.close()
  return TrainResult(state=state, metrics=metrics, step=step, export_dir=export_dir,
                     input_position=saved_position)
