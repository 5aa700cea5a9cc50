"""The pipeline's state file: which stages of a schedule have finished, written atomically.

`<workdir>/state.json` = {"config_fingerprint": ..., "completed": {"teacher-0": {...}, ...}}.
A stage is recorded only after its artifacts are complete, so a rerun of the same command skips
finished stages and resumes the interrupted one (which resumes from its own checkpoints/shards).
"""
from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from nsjax.files import atomic_write_json, read_json

STATE_FILE = "state.json"


class RunState:
  """Completed stages of one workdir. Only process 0 writes."""

  def __init__(self, workdir: str, fingerprint: str, writer: bool = True):
    self.path = os.path.join(workdir, STATE_FILE)
    self.writer = writer
    if tf.io.gfile.exists(self.path):
      self.data = read_json(self.path)
      if self.data.get("config_fingerprint") != fingerprint:
        raise ValueError(
            f"{self.path} belongs to a run with a different schedule (config fingerprint "
            f"{self.data.get('config_fingerprint')} != {fingerprint}). Use a new --workdir, or "
            "delete the state file to start over in this one.")
    else:
      self.data = {"config_fingerprint": fingerprint, "completed": {}}

  def done(self, stage: str) -> bool:
    return stage in self.data["completed"]

  def result(self, stage: str) -> dict[str, Any]:
    return self.data["completed"][stage]

  def mark_done(self, stage: str, result: dict[str, Any] | None = None) -> None:
    self.data["completed"][stage] = result or {}
    if self.writer:
      tf.io.gfile.makedirs(os.path.dirname(self.path))
      atomic_write_json(self.path, self.data)
