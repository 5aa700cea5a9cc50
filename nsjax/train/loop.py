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

Settings: nsjax.train.settings (defaults in nsjax.config_lib; every key, its default and
meaning in docs/configuration.md). Preemption, the reporter, input positions and the compile cache
have their own modules in nsjax/train/.

Batches: see `nsjax.train.steps` for the dict layout ("labeled", optional "unlabeled").

Preemption: SIGTERM makes `train` finish the step in flight, save a checkpoint of it, and raise
`nsjax.train.preemption.Preempted`; calling `train` again with the same arguments resumes there.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from nsjax import artifacts, exported_model, models, parallel
from nsjax.train import compile_ahead as ahead
from nsjax.train import compile_cache, input_position
from nsjax.train import state as state_lib
from nsjax.train import steps
from nsjax.train.preemption import Preempted, PreemptionWatch
from nsjax.train.reporter import Reporter, hparams
from nsjax.train.run_checkpoints import DamagedCheckpoint, TrainCheckpoints
from nsjax.train.settings import num_train_steps, resolve_config, step_settings


log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen online teacher: a model (its own size and resolution) and its (EMA) variables."""
  model: nn.Module
  variables: Any

  @classmethod
  def load(cls, directory: str | os.PathLike, **model_overrides: Any) -> Teacher:
    """From an `nsjax.exported_model.export_model` directory (e.g. the previous stage's export)."""
    model, variables, _ = exported_model.load_exported(directory, **model_overrides)
    return cls(model, variables)


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


def _state_from_variables(fns: compile_cache.RunFunctions, variables: Any) -> state_lib.TrainState:
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
  # numpy leaves are this process's slice of the global batch (see parallel.to_global_batch).
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
            cfg: ml_collections.ConfigDict, teacher: Teacher | None, model: nn.Module,
            mesh: jax.sharding.Mesh) -> tuple:
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
                              input_position.own(position, step))
      fns = _run_functions(cfg, model, mesh, _image_shape(batch, model))
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


def _save_and_stop(step: int, state: state_lib.TrainState, reporter: Reporter,
                   checkpoints: TrainCheckpoints, batches: Any) -> None:
  reporter.flush_pending()  # a non-finite step is reported, never saved
  checkpoints.wait()
  if checkpoints.latest_step() != step:  # not already saved as a periodic checkpoint
    checkpoints.save(step, state, force=True, input_position=input_position.gather(batches))
    checkpoints.wait()
  reporter.writer.flush()
  PreemptionWatch.acknowledge()
  raise Preempted(step, f"checkpoint {checkpoints.path(step)}")


@dataclasses.dataclass
class _Run:
  """What the step loop works on: the settings, the compiled step, the data and the bookkeeping."""
  cfg: ml_collections.ConfigDict
  total_steps: int
  step_fn: Callable | None
  multi_step_fn: Callable | None  # cfg.steps_per_call updates a call; None when that is 1
  extra_args: tuple
  mesh: jax.sharding.Mesh
  batches: Iterator
  batch: Any
  checkpoints: TrainCheckpoints
  writer: Any
  reporter: Reporter
  progress: Callable[[int], Any]
  preemption: PreemptionWatch
  eval_fn: Callable[[Any], dict[str, float]] | None
  saved_position: dict[str, Any] | None
  # Calls of these many steps have looked for an executable compiled ahead (once each).
  looked_ahead: set[int] = dataclasses.field(default_factory=set)


def _initial_state(fns: compile_cache.RunFunctions, restored: Any, latest: int | None,
                   initial_variables: Any, cfg: ml_collections.ConfigDict, writer: Any,
                   checkpoints: TrainCheckpoints) -> state_lib.TrainState:
  """The restored checkpoint, else the given variables, else a fresh init from the seed."""
  if restored is not None:
    log.info("Restored step %d from %s", latest, checkpoints.path(latest))
    return restored
  writer.write_hparams(hparams(cfg))
  if initial_variables is not None:
    return _state_from_variables(fns, initial_variables)
  return fns.init(steps.init_key(cfg.seed))


def _step_functions(fns: compile_cache.RunFunctions, batch: Any, teacher: Teacher | None,
                    cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                    ) -> tuple[Callable | None, Callable | None, tuple]:
  """(the train step, the step of cfg.steps_per_call updates or None when that is 1, the
  arguments after (state, batch): the seed, then the placed teacher variables with an online
  teacher); (None, None, ()) when nothing is left to train. Each compiles at its first call, so
  a run whose calls all make several steps never compiles the single one."""
  if batch is None:
    return None, None, ()
  teacher_shape = tuple(batch["unlabeled"]["teacher_image"].shape[1:]) if teacher else None
  teacher_model = teacher.model if teacher else None
  step_fn = _step_program(fns, teacher_model, teacher_shape, cfg, 1)
  multi_step_fn = (_step_program(fns, teacher_model, teacher_shape, cfg, cfg.steps_per_call)
                   if cfg.steps_per_call > 1 else None)
  seed = steps.seed_argument(cfg.seed, mesh)
  if teacher is None:
    return step_fn, multi_step_fn, (seed,)
  return step_fn, multi_step_fn, (seed, jax.device_put(
      teacher.variables, compile_cache.teacher_shardings(teacher.model, mesh, cfg.fsdp,
                                                         teacher_shape)))


def _step_program(fns: compile_cache.RunFunctions, teacher_model: nn.Module | None,
                  teacher_shape: tuple[int, ...] | None, cfg: ml_collections.ConfigDict,
                  num_steps: int) -> Callable:
  """The jitted step of `num_steps` updates a call (one cached object per program: `train` and
  `compile_ahead` must reach the same one)."""
  return compile_cache.train_step(fns, teacher_model, teacher_shape, cfg.fsdp, num_steps)


def _run_functions(cfg: ml_collections.ConfigDict, model: nn.Module, mesh: jax.sharding.Mesh,
                   image_shape: tuple[int, ...]) -> compile_cache.RunFunctions:
  """The run's cached functions, for `model` in cfg.compute_dtype (`train` and `compile_ahead`
  must reach the same ones)."""
  train_model = model.clone(dtype=cfg.compute_dtype) if cfg.compute_dtype else model
  return compile_cache.run_functions(train_model, mesh, step_settings(cfg),
                                     image_shape, int(getattr(model, "frozen_blocks", -1)))


def compile_ahead(config: Any, model: nn.Module, batch_spec: Any,
                  mesh: jax.sharding.Mesh | None = None, evaluates: bool = True) -> None:
  """Starts compiling the program of the first call of `train(config, model, ...)` from step 0,
  in the background (nsjax.train.compile_ahead), for batches like `batch_spec`: one global batch
  {"labeled": {"image", "label"}[, "unlabeled": {"image", "probs"}]} of jax.ShapeDtypeStructs.
  `evaluates`: whether `train` will get an eval_fn (its cadence shapes the calls). The call then
  uses it if its arguments match (else it compiles as usual). Not for an online teacher, whose
  variables are the step's argument too."""
  cfg = resolve_config(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  fns = _run_functions(cfg, model, mesh, tuple(batch_spec["labeled"]["image"].shape[1:]))
  num_steps = steps_in_call(0, num_train_steps(cfg), cfg.steps_per_call,
                            tuple(_cadences(cfg, evaluates).values()))
  if num_steps == 1:
    sharding, leading = parallel.data_sharding(mesh), ()
  else:
    sharding, leading = parallel.stacked_data_sharding(mesh), (num_steps,)
  batches = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype, sharding=sharding),
      batch_spec)
  state = state_lib.with_shardings(fns.abstract_state, fns.shardings)
  seed = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh))
  ahead.start(_step_program(fns, None, None, cfg, num_steps), state, batches, seed)


def steps_in_call(step: int, total_steps: int, steps_per_call: int,
                  cadences: Iterable[int]) -> int:
  """How many updates the call after `step` makes: `steps_per_call` when the call starts at a
  multiple of it and no log, checkpoint or evaluation (`cadences`, in steps) nor the last step
  falls inside it -- they may fall on its last step -- otherwise 1.

  A function of the step alone, so a resumed run makes the same calls as one that never stopped,
  and ends bitwise the same."""
  k = steps_per_call
  if k <= 1 or step % k or step + k > total_steps:
    return 1
  if any((step // every + 1) * every < step + k for every in cadences if every > 0):
    return 1
  return k


def _cadences(cfg: ml_collections.ConfigDict, evaluates: bool) -> dict[str, int]:
  """{setting: its interval in steps} of the events no call may pass (0 = none)."""
  return {"log_every_steps": cfg.log_every_steps,
          "checkpoint_every_steps": cfg.checkpoint_every_steps,
          "eval_every_steps": cfg.eval_every_steps if evaluates else 0}


def _warn_if_calls_are_cut(cfg: ml_collections.ConfigDict, total_steps: int,
                           evaluates: bool) -> None:
  """Says which cadences make single steps (and compile the one-step program as well)."""
  k = cfg.steps_per_call
  if k <= 1:
    return
  named = {**_cadences(cfg, evaluates), "num_train_steps": total_steps}
  uneven = [f"{name}={every}" for name, every in named.items() if every > 0 and every % k]
  if uneven:
    log.warning("steps_per_call=%d does not divide %s: the steps up to those run one per call, "
                "and the one-step program compiles too. Choose multiples of %d to avoid it.",
                k, ", ".join(uneven), k)


def _next_batch(run: _Run, step: int) -> Any:
  batch = next(run.batches, None)
  if batch is None:
    raise ValueError(f"train_iter ran out after step {step} of {run.total_steps}; make it "
                     "repeat (or lower num_train_steps).")
  return batch


def _call(run: _Run, state: state_lib.TrainState, step: int, num_steps: int
          ) -> tuple[state_lib.TrainState, Any]:
  """Updates `num_steps` times from `step`, starting with `run.batch` (the later batches are
  read here). Returns the state and the metrics (leaves stacked when num_steps > 1)."""
  if num_steps == 1:
    args = (state, parallel.to_global_batch(run.batch, run.mesh), *run.extra_args)
  else:
    batches = [run.batch] + [_next_batch(run, step + i) for i in range(1, num_steps)]
    args = (state, parallel.to_global_batches(batches, run.mesh), *run.extra_args)
  return _program(run, num_steps, args)(*args)


def _program(run: _Run, num_steps: int, args: tuple) -> Callable:
  """The step of `num_steps` updates a call; at its first call, the executable compiled ahead for
  exactly these arguments, where there is one (nsjax.train.compile_ahead)."""
  if num_steps not in run.looked_ahead:
    run.looked_ahead.add(num_steps)
    if num_steps == 1:
      run.step_fn = ahead.ready(run.step_fn, *args)
    else:
      run.multi_step_fn = ahead.ready(run.multi_step_fn, *args)
  return run.step_fn if num_steps == 1 else run.multi_step_fn


def _train_steps(run: _Run, state: state_lib.TrainState, step: int
                 ) -> tuple[state_lib.TrainState, int]:
  """Runs steps `step` .. total_steps: logs, checkpoints, evaluates and stops for preemption.
  Returns the final state and step."""
  cfg, total_steps = run.cfg, run.total_steps
  cadences = tuple(_cadences(cfg, run.eval_fn is not None).values())
  while step < total_steps:
    num_steps = steps_in_call(step, total_steps, cfg.steps_per_call, cadences)
    state, step_metrics = _call(run, state, step, num_steps)
    for done in range(step + 1, step + num_steps + 1):
      run.progress(done)  # clu's progress wants every step
    step += num_steps
    run.reporter.add(step, step_metrics, num_steps)
    log_now = step % cfg.log_every_steps == 0 or step == total_steps
    save_now = step % cfg.checkpoint_every_steps == 0 or step == total_steps
    eval_now = bool(run.eval_fn and cfg.eval_every_steps and step % cfg.eval_every_steps == 0
                    and step != total_steps)  # the final evaluation comes after the loop
    if log_now or save_now or eval_now:
      run.reporter.flush_pending()  # nothing is saved or reported before its step is known finite
    if log_now:
      run.reporter.write_window(step)
    if save_now:
      position = input_position.gather(run.batches)
      run.checkpoints.save(step, state, force=step == total_steps, input_position=position)
      run.saved_position = position
      run.reporter.last_good = step
    if eval_now:
      run.writer.write_scalars(step, {f"eval/{k}": v
                                      for k, v in run.eval_fn(state.ema_variables).items()})
    if step < total_steps and run.preemption.should_stop(step):
      _save_and_stop(step, state, run.reporter, run.checkpoints, run.batches)
    if step < total_steps:
      run.batch = _next_batch(run, step)
  run.checkpoints.wait()
  return state, step


def _finish(run: _Run, state: state_lib.TrainState, step: int, model: nn.Module,
            workdir: epath.Path, export_metadata: dict[str, Any] | None
            ) -> tuple[dict[str, float], str | None]:
  """(final metrics: the last train window and the final evaluation, the export folder)."""
  metrics = dict(run.reporter.latest)
  if run.eval_fn is not None:
    final_eval = run.eval_fn(state.ema_variables)
    run.writer.write_scalars(step, {f"eval/{k}": v for k, v in final_eval.items()})
    metrics.update({f"eval_{k}": v for k, v in final_eval.items()})
  export_dir = None
  if run.cfg.export:
    export_dir = str(epath.Path(run.cfg.export_dir) if run.cfg.export_dir else workdir / "export")
    exported_model.export_model(export_dir, model, state.ema_variables, metadata={
        **(export_metadata or {}), "step": int(step), "train_config": hparams(run.cfg),
        "metrics": {k: float(v) for k, v in metrics.items()}})
  run.writer.flush()
  return metrics, export_dir


def _check_model(cfg: ml_collections.ConfigDict, model: nn.Module) -> None:
  if cfg.export and not isinstance(model, models.EfficientNet):
    raise ValueError("config.export needs an nsjax EfficientNet (it writes model.json); set "
                     "export=False for other modules.")


def train(config: Any, model: nn.Module, train_iter: Iterable | Callable[[int], Iterable],
          workdir: str | os.PathLike, eval_fn: Callable[[Any], dict[str, float]] | None = None,
          teacher: Teacher | str | os.PathLike | None = None,
          mesh: jax.sharding.Mesh | None = None,
          initial_variables: Any = None,
          export_metadata: dict[str, Any] | None = None) -> TrainResult:
  """Trains `model`, resuming from the latest checkpoint in `workdir/checkpoints` if any.

  Args:
    config: hyperparameters (nsjax.train.settings); dict or ConfigDict.
    model: e.g. `nsjax.models.create_model(...)`. Exported at the end with its EMA variables.
    train_iter: an iterator of global batches (see `nsjax.train.steps`), or a callable
      `start_step -> iterable` so a resumed run continues the data where it stopped.
    workdir: checkpoints/, TensorBoard events and (by default) export/ go here.
    eval_fn: `eval_fn(ema_variables) -> {"top1": ..., "top5": ...}` (see
      `nsjax.evaluate.accuracy.make_eval_fn`), called every `eval_every_steps` and at the end.
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
  # clu imports TensorFlow; deferred so that importing nsjax.train (models, steps) stays TF-free.
  from clu import metric_writers, parameter_overview, periodic_actions

  cfg = resolve_config(config)
  mesh = parallel.make_mesh() if mesh is None else mesh
  teacher = Teacher.load(teacher) if isinstance(teacher, (str, os.PathLike)) else teacher
  _check_model(cfg, model)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  total_steps = num_train_steps(cfg)
  _warn_if_calls_are_cut(cfg, total_steps, eval_fn is not None)
  checkpoints = TrainCheckpoints(workdir / "checkpoints", cfg.checkpoint_every_steps,
                                 cfg.keep_checkpoints)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  preemption = PreemptionWatch().start()
  try:
    latest, saved_position, batches, batch, fns, restored = _resume(
        checkpoints, train_iter, total_steps, cfg, teacher, model, mesh)
    state = _initial_state(fns, restored, latest, initial_variables, cfg, writer, checkpoints)
    if jax.process_index() == 0:
      stats = all(x.is_fully_addressable for x in jax.tree.leaves(state.params))
      parameter_overview.log_parameter_overview(state.params, include_stats=stats)
    step_fn, multi_step_fn, extra_args = _step_functions(fns, batch, teacher, cfg, mesh)
    run = _Run(cfg=cfg, total_steps=total_steps, step_fn=step_fn, multi_step_fn=multi_step_fn,
               extra_args=extra_args,
               mesh=mesh, batches=batches, batch=batch, checkpoints=checkpoints, writer=writer,
               reporter=Reporter(writer, checkpoints, latest), preemption=preemption,
               progress=periodic_actions.ReportProgress(num_train_steps=total_steps,
                                                        writer=writer,
                                                        every_steps=cfg.log_every_steps),
               eval_fn=eval_fn, saved_position=saved_position)
    state, step = _train_steps(run, state, latest or 0)
    metrics, export_dir = _finish(run, state, step, model, workdir, export_metadata)
  finally:
    preemption.stop()
    writer.close()
    checkpoints.close()
  return TrainResult(state=state, metrics=metrics, step=step, export_dir=export_dir,
                     input_position=run.saved_position)
