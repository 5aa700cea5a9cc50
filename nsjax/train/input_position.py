"""Input positions: where each process's data streams stand, saved with every checkpoint.

Where the step alone does not say where the data stands (records that failed to decode were
dropped), the batch iterator can say it: if it has `input_position()` (JSON-able, this process's
place), every checkpoint saves all processes' positions with the state, and a resume hands each
process its own saved position back.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather(batches: Any) -> dict[str, Any] | None:
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


def own(saved: dict[str, Any] | None, step: int) -> dict[str, Any] | None:
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
