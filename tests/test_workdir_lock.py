"""One run per workdir (nsjax.workdir_lock): a second run stops at once naming the holder, a lock of
a process that is gone is taken over with a warning, several hosts hold one lock per run."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest
import tensorflow as tf

from nsjax import workdir_lock
from nsjax.workdir_lock import WorkdirBusy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_pid() -> int:
  """The pid of a process that has exited (and been reaped)."""
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def write_record(workdir, **fields):
  record = dict(host=socket.gethostname(), pid=dead_pid(), started="2026-01-01T00:00:00+00:00",
                command="python -m nsjax.main --config=old.py", stage="")
  record.update(fields)
  with open(os.path.join(workdir, workdir_lock.LOCK_FILE), "w") as f:
    json.dump(record, f)
  return record


def test_a_held_workdir_refuses_a_second_holder_and_is_free_afterwards(tmp_path):
  workdir = str(tmp_path)
  with workdir_lock.hold(workdir, "teacher"):
    record = workdir_lock.read_record(workdir)
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    assert record["stage"] == "teacher" and record["started"] and "python" in record["command"]
    with pytest.raises(WorkdirBusy, match=rf"in use by pid {os.getpid()} on host "
                       rf"{socket.gethostname()}, started .*--stage jobs included, go one after "
                       "another"):
      with workdir_lock.hold(workdir):
        pass
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  with workdir_lock.hold(workdir):  # free again
    pass


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(ValueError):
    with workdir_lock.hold(str(tmp_path)):
      raise ValueError("stage failed")
  with workdir_lock.hold(str(tmp_path)):
    pass


def test_a_record_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  old = write_record(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(str(tmp_path)):
      assert workdir_lock.read_record(str(tmp_path))["pid"] == os.getpid()
  assert any("Taking over the lock of a run that is gone" in r.getMessage()
             and f"pid {old['pid']}" in r.getMessage() for r in caplog.records)


def test_a_record_of_a_live_process_on_this_host_blocks_even_without_flock(tmp_path):
  """Where flock is not enforced (some network filesystems), the record's live pid still counts."""
  write_record(str(tmp_path), pid=os.getppid())
  with pytest.raises(WorkdirBusy, match=f"pid {os.getppid()}"):
    with workdir_lock.hold(str(tmp_path)):
      pass


def test_several_hosts_process_0_holds_the_one_lock(tmp_path):
  workdir = str(tmp_path)
  answers = []

  def broadcast(ok):
    answers.append(ok)
    return ok
  with workdir_lock.hold(workdir, process_index=0, process_count=2, broadcast=broadcast):
    assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
    # process 1 writes nothing and proceeds on process 0's word
    with workdir_lock.hold(workdir, process_index=1, process_count=2, broadcast=lambda ok: True):
      assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
  assert answers == [True]
  with pytest.raises(WorkdirBusy, match="Process 0 found the workdir .* in use by another run"):
    with workdir_lock.hold(workdir, process_index=1, process_count=2, broadcast=lambda ok: False):
      pass
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))


def test_object_store_workdirs_are_best_effort_and_say_so(monkeypatch):
  workdir = f"ram://locks-{uuid.uuid4().hex}"
  with workdir_lock.hold(workdir, settle_seconds=0):
    assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
  assert workdir_lock.read_record(workdir) is None  # released
  # A record from another host: its pid cannot be checked, so it counts as a live run.
  workdir_lock.atomic_write_json(workdir_lock.lock_path(workdir),
                                 dict(workdir_lock.holder_record(), pid=77, host="other-host"))
  with pytest.raises(WorkdirBusy, match="pid 77 on host other-host.*If that run is gone .*delete "
                     "that file"):
    with workdir_lock.hold(workdir, settle_seconds=0):
      pass
  tf.io.gfile.remove(workdir_lock.lock_path(workdir))
  # A record of a dead process on this host is taken over.
  workdir_lock.atomic_write_json(workdir_lock.lock_path(workdir),
                                 dict(workdir_lock.holder_record(), pid=dead_pid()))
  with workdir_lock.hold(workdir, settle_seconds=0):
    assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
  # Another run that wrote its record in the same moment wins; this one sees it on reading back.
  real_sleep = time.sleep

  def other_run_writes(seconds):
    workdir_lock.atomic_write_json(workdir_lock.lock_path(workdir),
                                   dict(workdir_lock.holder_record(), pid=12345, host="other"))
    real_sleep(0)
  monkeypatch.setattr(workdir_lock.time, "sleep", other_run_writes)
  with pytest.raises(WorkdirBusy, match="pid 12345 on host other"):
    with workdir_lock.hold(workdir, settle_seconds=0):
      pass


def nsjax_main(workdir, *extra):
  return subprocess.Popen([sys.executable, "-m", "nsjax.main", "--config=configs/smoke.py",
                           f"--workdir={workdir}", *extra], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def test_two_runs_on_one_workdir_the_second_stops_and_a_killed_ones_lock_is_taken_over(tmp_path):
  workdir = str(tmp_path / "work")
  lock = os.path.join(workdir, workdir_lock.LOCK_FILE)
  first = nsjax_main(workdir)
  try:
    deadline = time.time() + 240
    while not os.path.exists(lock) and first.poll() is None and time.time() < deadline:
      time.sleep(0.2)
    assert os.path.exists(lock), first.communicate()[1][-3000:]
    started = time.time()
    second = nsjax_main(workdir)
    _, err = second.communicate(timeout=240)
    assert second.returncode == 2, err[-3000:]
    assert f"Workdir busy: The workdir {workdir} is in use by pid {first.pid}" in err
    assert "--stage jobs included, go one after another" in err and "Traceback" not in err
    assert time.time() - started < 120  # stops at once (the time is the interpreter's start-up)
    assert first.poll() is None, "the first run must be unaffected"
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  assert workdir_lock.read_record(workdir)["pid"] == first.pid  # SIGKILL left the record
  third = nsjax_main(workdir, "--stage=no-such-stage")
  _, err = third.communicate(timeout=240)
  assert "Taking over the lock of a run that is gone" in err and f"pid {first.pid}" in err
  assert third.returncode == 2 and "Unknown stage 'no-such-stage'" in err, err[-3000:]
  assert not os.path.exists(lock)  # released on the way out
