"""Preemption: a SIGTERM stops training, labeling or the schedule at the next boundary, saved.

SIGTERM is how Cloud TPU VMs and most schedulers announce preemption. `PreemptionWatch` tells a
loop, at each step (or shard, or stage) boundary, whether to save and stop; the loop then raises
`Preempted`, and rerunning the same command resumes there. Hosts of a multi-process run must stop
at the SAME boundary, so there the decision is jax's preemption sync point
(`jax.distributed.initialize()` starts the preemption service by default; it catches SIGTERM
itself and agrees on a step across hosts).
"""
from __future__ import annotations

import itertools
import logging
import signal
import threading

import jax
# Private, on purpose: the public sync-point API raises when the service is off, and the watch
# must ask whether it is on.
from jax._src import distributed
from jax.experimental import multihost_utils


log = logging.getLogger(__name__)


class Preempted(Exception):
  """Stopped early on a preemption notice, after saving everything up to `step` (a training step,
  or a shard / stage count elsewhere: `unit`). `saved` says where, e.g. the checkpoint."""

  def __init__(self, step: int, saved: str, unit: str = "step"):
    super().__init__(f"preempted at {unit} {step} ({saved}); rerun the same command to resume")
    self.step = step
    self.saved = saved
    self.unit = unit


_SIGTERM_RECEIVED = threading.Event()


# Sync-point calls made by this process. jax's service stops every host at the call after the
# fastest host's latest one, comparing the counters the hosts pass, so they must count the same
# calls: training steps, pseudo-label shards and stage starts alike, whichever stage is running
# (a step number would restart at every stage and could never meet a sync point set earlier).
_SYNC_CALLS = itertools.count(1)


def _on_sigterm(signum, frame) -> None:
  del signum, frame
  _SIGTERM_RECEIVED.set()  # acted on at the next step (or shard, or stage) boundary
  log.warning("SIGTERM received: saving a checkpoint at the next step boundary, then stopping.")


class PreemptionWatch:
  """Tells a loop, at each step boundary, whether to checkpoint and stop for a preemption.

  Single process: a SIGTERM handler (main thread only) sets a flag; watches nest (the pipeline
  holds one for the whole run, `train` one per stage) and the outermost `stop` puts the previous
  handler back -- re-raising a SIGTERM that nobody acted on, so it is never swallowed. With
  `jax.distributed` initialised, jax's preemption service owns SIGTERM and
  `reached_preemption_sync_point` turns True on every host at the same step; a Python handler
  would replace the service's, so none is installed then. Without the service a multi-process
  run keeps the default SIGTERM behaviour (the process dies and resumes from the last periodic
  checkpoint), since hosts deciding alone could stop at different steps and hang the save.
  """

  def __init__(self):
    self.synced = (distributed.global_state.client is not None
                   and distributed.global_state.preemption_sync_manager is not None)
    self._previous = None
    self._installed = False

  def start(self) -> PreemptionWatch:
    if self.synced:
      return self
    if jax.process_count() > 1:
      log.warning("jax's preemption service is off (jax_enable_preemption_service); SIGTERM will "
                  "end this run without a final checkpoint.")
      return self
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _on_sigterm):
      self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
      self._installed = True
    return self

  def stop(self) -> None:
    if not self._installed:
      return
    signal.signal(signal.SIGTERM, self._previous)
    self._installed = False
    if _SIGTERM_RECEIVED.is_set():  # nobody stopped for it: let the previous handler act
      _SIGTERM_RECEIVED.clear()
      signal.raise_signal(signal.SIGTERM)

  @property
  def requested(self) -> bool:
    """A local SIGTERM arrived (single process; always False under the preemption service)."""
    return _SIGTERM_RECEIVED.is_set()

  def should_stop(self, step: int) -> bool:
    """Call at every step (or shard, or stage) boundary, on every host alike: with the service,
    hosts agree by counting these calls (see _SYNC_CALLS); `step` only names the boundary."""
    del step
    if self.synced:
      return multihost_utils.reached_preemption_sync_point(next(_SYNC_CALLS))
    return _SIGTERM_RECEIVED.is_set()

  @staticmethod
  def acknowledge() -> None:
    """The caller is stopping for the notice (raising `Preempted`): it is handled."""
    _SIGTERM_RECEIVED.clear()
