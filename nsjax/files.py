"""Atomic file writes (local or gs:// through tf.io.gfile): readers see the old file or the new one."""
from __future__ import annotations

import json
import os
from typing import Any, Callable

import tensorflow as tf

from nsjax import artifacts


def atomic_write(path: str, write_fn: Callable[[str], None]) -> None:
  """`write_fn(tmp_path)` writes the content; then the temporary file is renamed over `path`.

  A failed write leaves `path` as it was and removes the temporary file; a full disk raises
  artifacts.DiskFull naming `path` (the caller's last complete artifact is intact)."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    write_fn(tmp)
    tf.io.gfile.rename(tmp, path, overwrite=True)
  except Exception as error:
    _remove_quietly(tmp)
    if artifacts.is_disk_full(error):
      raise artifacts.disk_full(path, error) from error
    raise


def _remove_quietly(path: str) -> None:
  try:
    tf.io.gfile.remove(path)
  except (tf.errors.OpError, OSError):
    pass


def atomic_write_text(path: str, text: str) -> None:
  def write(tmp):
    with tf.io.gfile.GFile(tmp, "w") as f:
      f.write(text)
  atomic_write(path, write)


def atomic_write_json(path: str, data: Any, indent: int | None = 1) -> None:
  """indent=None writes one line, with json's C encoder: ~10x faster for large files."""
  atomic_write_text(path, json.dumps(data, indent=indent, sort_keys=True, default=float))


def read_json(path: str) -> Any:
  """The file's JSON; artifacts.DamagedArtifact (naming the path and the fix) when it is not."""
  with tf.io.gfile.GFile(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as error:
    raise artifacts.DamagedArtifact(path, f"not valid JSON ({artifacts.root_cause(error)})") \
        from error
