"""Training-run checkpoints: Orbax `CheckpointManager` over the whole `TrainState`.

These are for resuming a run (optimizer slots, live and EMA variables, step); the hand-off to the
next stage is `nsjax.exported_model.export_model` (EMA variables + model.json). Restores always go
through a target built from the abstract state and its shardings, so every leaf comes back as a
`jax.Array` in the right place and the right tree (Orbax without a target returns lists and
host arrays). Saves are asynchronous: the arrays are copied off the devices before `save`
returns, so the next (donating) step may run while files are written.

Each checkpoint may carry a second item, `input_position` (JSON, written by process 0): every
host's place in its input streams after that step (see `BatchIterator.position`), saved in the
same atomic Orbax commit as the state, so a restored step never meets a stale or missing position.
The state stays the `default` item, so checkpoints from before positions existed still restore.

Replica-parallel writing (each replica of a replicated array writes a slice) pays off when several
hosts share the work, but its first save compiles a slicing kernel per array shape (seconds on
CPU); it is on only for multi-process runs.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nsjax import artifacts
from nsjax.train.state import TrainState, with_shardings

STATE = "default"  # the name a single-item manager used, so older checkpoints restore
INPUT_POSITION = "input_position"


class DamagedCheckpoint(artifacts.DamagedArtifact):
  """A run checkpoint whose files cannot be read."""

  def __init__(self, step: int, path: str, cause: str):
    self.step, self.cause = step, cause
    super().__init__(path, f"training checkpoint {step} cannot be read ({cause})")


class TrainCheckpoints:
  """Periodic, keep-N checkpoints of a `TrainState` under `directory/<step>`."""

  def __init__(self, directory: str | os.PathLike, every_steps: int = 1000, keep: int = 3):
    if every_steps < 1 or keep < 1:
      raise ValueError(f"checkpoint_every_steps ({every_steps}) and keep_checkpoints ({keep}) "
                       "must both be >= 1.")
    self.directory = epath.Path(directory)
    self.every_steps = every_steps
    # A save cut short (SIGKILL, lost VM) leaves only a temporary directory, which Orbax never
    # reports as a step; it is removed on the next start so the step can be saved again.
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                           create=True, cleanup_tmp_directories=True)
    handler = ocp.PyTreeCheckpointHandler(
        type_handler_registry=_type_handlers(replica_parallel=jax.process_count() > 1))
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: handler, INPUT_POSITION: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, force: bool = False,
           input_position: Any = None) -> bool:
    """Starts an async save (the caller checks finiteness first: see `train`). `input_position`
    (JSON-able, the same on every process) is committed together with the state."""
    items = {STATE: ocp.args.PyTreeSave(state)}
    if input_position is not None:
      items[INPUT_POSITION] = ocp.args.JsonSave(input_position)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def input_position(self, step: int) -> Any:
    """The input position saved with checkpoint `step`, or None (saved without one)."""
    if not (self.directory / str(step) / INPUT_POSITION).exists():
      return None
    restored = self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**{INPUT_POSITION: ocp.args.JsonRestore()})))
    return restored[INPUT_POSITION]

  def restore(self, abstract_state: TrainState, shardings: Any,
              step: int | None = None) -> TrainState:
    """The state saved at `step` (default the latest); DamagedCheckpoint when its bytes are bad."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No training checkpoint under {self.directory}.")
    target = with_shardings(abstract_state, shardings)
    args = ocp.args.PyTreeRestore(item=target,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    return self._read(step, lambda: self.manager.restore(
        step, args=ocp.args.Composite(**{STATE: args}))[STATE])

  def _read(self, step: int, read: Any) -> Any:
    """Orbax's errors on bad bytes (buried in TensorStore tracebacks) as one DamagedCheckpoint;
    other errors (a target that does not fit, say) pass unchanged."""
    return artifacts.read_orbax(read, lambda cause: DamagedCheckpoint(step, self.path(step), cause))

  def previous_step(self, step: int) -> int | None:
    """The newest kept checkpoint before `step`, or None."""
    older = [s for s in self.manager.all_steps() if s < step]
    return max(older) if older else None

  def discard(self, step: int) -> None:
    """Deletes checkpoint `step` (a damaged one: the run saves that step again later)."""
    self.manager.delete(step)

  def path(self, step: int | None) -> str:
    return "none" if step is None else str(self.directory / str(step))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> TrainCheckpoints:
    return self

  def __exit__(self, *exc) -> None:
    self.close()



def _type_handlers(replica_parallel: bool) -> ocp.type_handlers.TypeHandlerRegistry:
  scalar = ocp.type_handlers.ScalarHandler()
  return ocp.type_handlers.create_type_handler_registry(
      (int, scalar), (float, scalar), (np.number, scalar),
      (np.ndarray, ocp.type_handlers.NumpyHandler()),
      (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=replica_parallel)))
