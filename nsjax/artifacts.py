"""Damaged or missing artifacts: one short message naming the path, what is wrong and the fix.

Why a module of its own: exports, checkpoints, pseudo-label shards and manifests are read by many
stages and by the evaluation command line, and a read that fails deep inside Orbax, TensorStore
or tf.data otherwise surfaces as hundreds of lines of tracebacks with the cause buried inside.
The command lines catch `ArtifactError` and print its message alone (exit 2, see nsjax/main.py).

The fix for an artifact a stage wrote is to write it again: delete the stage's folder and rerun
the same command (a completed stage whose folder is gone runs again, see nsjax/pipeline.py). A
rerun reproduces it: every stage is a function of the config and the seed.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from typing import Callable, TypeVar

_T = TypeVar("_T")

# Pipeline stage folders (nsjax.pipeline.stage_dir): what wrote an artifact under them.
_STAGE_DIR = re.compile(r"^(teacher|baseline|(student|label|finetune)-\d+)$")
# Root causes that mean the bytes on disk are bad (not, say, a changed model shape).
_DAMAGE_MARKERS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "corrupt", "Corrupt", "truncated",
                   "Unexpected end", "Expecting value", "Extra data", "Unterminated",
                   "No such file", "not valid", "checksum")


class ArtifactError(RuntimeError):
  """An artifact is damaged or missing; `str()` is the whole message, fix included."""

  def __init__(self, path: str, problem: str, fix: str = ""):
    self.path, self.problem = str(path), problem
    self.fix = fix or fix_for(str(path))
    super().__init__(f"{self.path}: {problem}. {self.fix}")


class DamagedArtifact(ArtifactError, ValueError):
  """The artifact is there but cannot be read."""


class MissingArtifact(ArtifactError, FileNotFoundError):
  """The artifact is not there (FileNotFoundError for callers that catch that)."""


class DiskFull(ArtifactError):
  """No space left while writing an artifact; what was there before is intact."""


def stage_of(path: str) -> tuple[str, str] | None:
  """(workdir, stage name) when `path` lies in a pipeline stage's folder, else None."""
  parts = str(path).rstrip("/").split("/")
  for i in range(len(parts) - 1, 0, -1):
    if _STAGE_DIR.match(parts[i]):
      return "/".join(parts[:i]) or "/", parts[i]
  return None


def fix_for(path: str) -> str:
  """How to write the artifact again: rerun the stage that wrote it, or re-export it."""
  if os.path.basename(path) == "state.json":
    return ("Delete it and rerun the same command: every stage runs again, each resuming from "
            "what its folder holds (finished training stages only re-export).")
  found = stage_of(path)
  if found is None:
    return ("Write it again: rerun the stage or tool that produced it (re-export the model, or "
            "convert the checkpoint again with python -m nsjax.tools.convert_checkpoint).")
  workdir, stage = found
  folder = os.path.join(workdir, stage)
  return (f"It was written by stage {stage}: delete {folder} and rerun the same command; the "
          f"stage runs again (with --stage, run --stage={stage} first) and reproduces it.")


def root_cause(error: BaseException) -> str:
  """The first line of the innermost exception in `error`'s chain: the real cause."""
  for inner in _chain(error):
    error = inner
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:400]


def looks_damaged(error: BaseException) -> bool:
  """Whether a read failed on bad bytes rather than, say, a request that does not fit them."""
  if isinstance(error, (FileNotFoundError, EOFError)):
    return True
  cause = root_cause(error)
  return any(marker in cause for marker in _DAMAGE_MARKERS)


def read_orbax(read: Callable[[], _T], damaged: Callable[[str], ArtifactError]) -> _T:
  """`read()`, an Orbax restore. Bad bytes (errors buried in TensorStore tracebacks) become
  `damaged(root cause)`; other errors (a target that does not fit, say) pass unchanged."""
  quiet_abandoned_reads()
  try:
    return read()
  except Exception as error:  # Orbax wraps TensorStore's errors in bare Exceptions
    if not looks_damaged(error):
      raise
    raise damaged(root_cause(error)) from error


def quiet_abandoned_reads() -> None:
  """Drops the "Event loop is closed" errors of reads a failed Orbax restore left in flight.

  Orbax runs a restore's reads on an event loop of its own and closes that loop as soon as one
  read fails; TensorStore then completes the others on its threads, and each completion's
  `call_soon_threadsafe` on the closed loop becomes an unraisable RuntimeError whose traceback
  lands around our one-line message, before or after it, depending on timing. Called by
  `read_orbax` before each restore (once is enough, later calls do nothing): the loop can close,
  and a completion can arrive, before an `except` after the restore runs. Every other unraisable
  error still reaches the previous hook.
  """
  if getattr(sys.unraisablehook, "_drops_abandoned_reads", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous(unraisable)

  hook._drops_abandoned_reads = True  # pytype: disable=attribute-error
  sys.unraisablehook = hook


def _is_abandoned_read(unraisable) -> bool:
  """A RuntimeError('Event loop is closed') raised inside asyncio's call_soon_threadsafe."""
  if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
    return False
  frame = unraisable.exc_traceback
  while frame is not None:
    if frame.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    frame = frame.tb_next
  return False


def is_disk_full(error: BaseException) -> bool:
  """ENOSPC (or EDQUOT) anywhere in the chain, or TF's wording of it."""
  for inner in _chain(error):
    if isinstance(inner, OSError) and inner.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    if "No space left on device" in str(inner):
      return True
  return False


def _chain(error: BaseException):
  """`error`, then its causes (or contexts), innermost last; each once, even in a cycle."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def disk_full(path: str, error: BaseException) -> DiskFull:
  return DiskFull(path, f"no space left on the device while writing it ({root_cause(error)})",
                  "The last complete artifact before it is intact. Free space (or point --workdir "
                  "at a larger disk) and rerun the same command: it resumes from there.")
