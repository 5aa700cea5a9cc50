"""The reporter: per-step metrics checked for NaN/Inf one step late, written in windows."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from nsjax.train.run_checkpoints import TrainCheckpoints


class NonFiniteError(FloatingPointError):
  """Training produced NaN/Inf; the offending update was not applied."""


def hparams(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: ("none" if v is None else v) for k, v in cfg.to_dict().items()}


class Reporter:
  """Collects per-step metrics (one step late), stops on non-finite steps, writes windows."""

  def __init__(self, writer: Any, checkpoints: TrainCheckpoints, last_good: int | None):
    self.writer = writer
    self.checkpoints = checkpoints
    self.last_good = last_good
    self.window: list[dict[str, Any]] = []
    self.pending: tuple[int, Any, int] | None = None
    self.latest: dict[str, float] = {}

  def add(self, step: int, step_metrics: Any, num_steps: int = 1) -> None:
    """Checks the PREVIOUS call while this one runs: a host sync per call, one call late.
    `step` is the call's last step; with num_steps > 1 each metric holds one value a step."""
    self.flush_pending()
    self.pending = (step, step_metrics, num_steps)

  def flush_pending(self) -> None:
    if self.pending is None:
      return
    last_step, step_metrics, num_steps = self.pending
    self.pending = None
    values = jax.device_get(step_metrics)
    per_step = ([values] if num_steps == 1 else
                [{k: v[i] for k, v in values.items()} for i in range(num_steps)])
    for done_step, step_values in enumerate(per_step, start=last_step - num_steps + 1):
      if not bool(step_values["is_finite"]):
        self.checkpoints.wait()
        self.writer.flush()
        raise NonFiniteError(
            f"Training step {done_step} (state.step {done_step - 1} -> {done_step}) produced a "
            "non-finite loss, gradient or state; that update was skipped and training stopped. "
            f"Last good checkpoint: {self.checkpoints.path(self.last_good)}. Check the inputs "
            "for NaN/Inf, lower the learning rate, or train in float32.")
      self.window.append(step_values)

  def write_window(self, step: int) -> None:
    if not self.window:
      return
    keys = [k for k in self.window[0] if k != "is_finite"]
    self.latest = {k: float(np.mean([w[k] for w in self.window])) for k in keys}
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in self.latest.items()})
    self.window = []
