"""One run per workdir: a run holds `<workdir>/nsjax.lock` while it works there.

Why: two runs in one workdir (a scheduler that restarts a job while the old one still lives, two
`--stage` jobs started together) train the same stages into the same folders and overwrite each
other's state file; nothing in the artifacts would show it afterwards.

The lock file is a JSON record of the holder (host, pid, start time, command, stage), written
atomically (temporary file + rename) and removed when the run ends, however it ends short of
SIGKILL. Whether the workdir is free is decided differently by where it lives:

- Local or mounted filesystems: an exclusive `flock` on the workdir directory, which the kernel
  drops when the holding process dies, so a run that was SIGKILLed or lost its VM never blocks the
  next one. A record left behind by such a run is taken over with a warning naming it. A record
  whose process is alive on this host blocks even where flock is not enforced.
- Object stores (gs://, through tf.io.gfile): no atomic create-if-absent is available through
  plain file APIs (GCS offers one only as a generation precondition, which tf.io.gfile does not
  expose), so the check is best effort: a record present means busy (a record of a dead process on
  this host is taken over); otherwise this run writes its record and reads it back after a moment.
  Two runs started within that moment can both proceed; a run whose host died leaves a record only
  deleting it clears (the message says so).

Several hosts: process 0 takes the lock and tells the others at the run's start barrier; they
stop with the same exit code when it could not.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from typing import Any, Callable, Iterator

import numpy as np
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils

from nsjax.files import atomic_write_json

LOCK_FILE = "nsjax.lock"
_REMOTE_SETTLE_SECONDS = 2.0  # object stores: how long a record must survive before it counts


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir."""


def lock_path(workdir: str) -> str:
  """Where the holder record lives (the file a user sees and, if need be, deletes)."""
  return os.path.join(workdir, LOCK_FILE)


def is_local(workdir: str) -> bool:
  """Local paths get flock; URLs (gs://, ...) only the best-effort record."""
  return "://" not in workdir


def holder_record(stage: str | None = None) -> dict[str, Any]:
  """Who holds the lock: what the message of a second run names."""
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now,
          "started": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
          "stage": stage or "", "token": uuid.uuid4().hex}


def read_record(workdir: str) -> dict[str, Any] | None:
  """The holder record, or None when there is none (or it cannot be parsed)."""
  try:
    with tf.io.gfile.GFile(lock_path(workdir)) as f:
      return json.loads(f.read())
  except (tf.errors.NotFoundError, FileNotFoundError):
    return None
  except (ValueError, tf.errors.OpError, OSError):
    return {"host": "?", "pid": -1, "started": "?", "command": "(unreadable lock record)"}


def describe(record: dict[str, Any] | None) -> str:
  """The holder as a message names it (None: the holder has not written its record yet)."""
  if not record:
    return "another run (its record is not written yet)"
  return (f"pid {record.get('pid')} on host {record.get('host')}, started "
          f"{record.get('started')}, command: {record.get('command')}")


def pid_alive(pid: int) -> bool:
  """Signal 0 checks existence without touching the process."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # someone else's live process
  return True


def alive_here(record: dict[str, Any]) -> bool:
  """Whether the record's process runs on this host (pids of other hosts cannot be checked)."""
  return record.get("host") == socket.gethostname() and int(record.get("pid", -1)) > 0 and \
      int(record["pid"]) != os.getpid() and pid_alive(int(record["pid"]))


def busy_message(workdir: str, record: dict[str, Any] | None, remote: bool = False) -> str:
  """Names the holder, the rule (one run per workdir, --stage jobs too) and what to do."""
  fix = ("If that run is gone (its host died), delete that file and rerun."
         if remote else "If that process is gone, rerun: its lock is taken over (if the record "
         "is wrong, e.g. its pid now belongs to another program, delete the lock file).")
  return (f"The workdir {workdir} is in use by {describe(record)} (lock file "
          f"{lock_path(workdir)}). One run per workdir: runs on one workdir, --stage jobs "
          "included, go one after another. Wait for that run to end, stop it, or use another "
          f"--workdir. {fix}")


class _LocalLock:
  """flock on the workdir directory + the holder record (see the module docstring)."""

  def __init__(self, workdir: str, stage: str | None):
    self.workdir, self.stage, self.fd = workdir, stage, None

  def acquire(self) -> None:
    """flock first (the kernel's answer), then the record (what a second run reads)."""
    fd = os.open(self.workdir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(fd)
      if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
        raise WorkdirBusy(busy_message(self.workdir, read_record(self.workdir))) from None
      raise
    self.fd = fd
    try:
      _take_over_if_stale(self.workdir, read_record(self.workdir))
      atomic_write_json(lock_path(self.workdir), holder_record(self.stage))
    except BaseException:
      self._unlock()
      raise

  def release(self) -> None:
    """Record first, then the flock: the next holder never sees our record as a stale one."""
    try:
      _remove_record(self.workdir)
    finally:
      self._unlock()

  def _unlock(self) -> None:
    if self.fd is not None:
      os.close(self.fd)  # drops the flock
      self.fd = None


class _RemoteLock:
  """Best effort on object stores (see the module docstring)."""

  def __init__(self, workdir: str, stage: str | None, settle_seconds: float):
    self.workdir, self.stage, self.settle = workdir, stage, settle_seconds
    self.token = None

  def acquire(self) -> None:
    """Refuse on a record; else write ours and read it back after `settle` seconds."""
    record = read_record(self.workdir)
    if record is not None:
      if record.get("host") != socket.gethostname() or alive_here(record):
        raise WorkdirBusy(busy_message(self.workdir, record, remote=True))
      _take_over_if_stale(self.workdir, record)
    mine = holder_record(self.stage)
    atomic_write_json(lock_path(self.workdir), mine)
    time.sleep(self.settle)
    now = read_record(self.workdir)
    if not now or now.get("token") != mine["token"]:
      raise WorkdirBusy(busy_message(self.workdir, now, remote=True))
    self.token = mine["token"]

  def release(self) -> None:
    """Removes the record only if it is still ours."""
    record = read_record(self.workdir)
    if record and record.get("token") == self.token:
      _remove_record(self.workdir)


def _take_over_if_stale(workdir: str, record: dict[str, Any] | None) -> None:
  """A record whose process is gone: warn, naming it, and carry on (it is overwritten)."""
  if record is None:
    return
  if alive_here(record):  # flock not enforced here, but the process lives: do not take over
    raise WorkdirBusy(busy_message(workdir, record))
  logging.warning("Taking over the lock of a run that is gone: %s (lock file %s). Its stages "
                  "resume from their checkpoints and shards.", describe(record),
                  lock_path(workdir))


def _remove_record(workdir: str) -> None:
  try:
    tf.io.gfile.remove(lock_path(workdir))
  except (tf.errors.NotFoundError, FileNotFoundError):
    pass


def _broadcast_from_process_0(ok: bool) -> bool:
  """Process 0's answer, at a barrier every process reaches (the run's start barrier)."""
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


@contextlib.contextmanager
def hold(workdir: str, stage: str | None = None, *, process_index: int = 0,
         process_count: int = 1,
         broadcast: Callable[[bool], bool] | None = None,
         settle_seconds: float = _REMOTE_SETTLE_SECONDS) -> Iterator[None]:
  """Holds the workdir for the block's duration; raises WorkdirBusy when another run has it."""
  lock = (_LocalLock(workdir, stage) if is_local(workdir)
          else _RemoteLock(workdir, stage, settle_seconds))
  failure = None
  if process_index == 0:
    try:
      lock.acquire()
    except Exception as error:  # any failure: the other processes must not wait for process 0
      failure = error
  if process_count > 1:
    ok = (broadcast or _broadcast_from_process_0)(failure is None)
  else:
    ok = failure is None
  if failure is not None:
    raise failure
  if not ok:
    raise WorkdirBusy(f"Process 0 found the workdir {workdir} in use by another run (its log names "
                      "the holder); one run per workdir. Wait for that run to end or use another "
                      "--workdir.")
  try:
    yield
  finally:
    if process_index == 0:
      lock.release()
