"""Where each position of the balanced pseudo-label stream comes from, computed, never scanned.

The balance plan says how many times each pseudo-labeled record is read per epoch (its copies,
stored per shard by `pseudo_labels.write_read_tables`) and how many balanced examples each shard
holds. From that alone, position p of epoch e maps to one record:
  1. the shards are put in a random order (a permutation seeded by (seed, e));
  2. consecutive shards of that order form windows of about `window` balanced examples (a shard
     belongs to the window in which its first example falls);
  3. within a window, the balanced examples -- each record repeated by its copies -- are permuted
     (seeded by (seed, e, window)).
So the stream is a deterministic function of (seed, position), the same for any number of hosts:
a host asks only for the positions of its rows of each global batch and reads only those records,
and a resume computes its window directly instead of reading through the epoch. Memory holds the
shards' counts (one integer per shard) and the tables of one or two windows, never per-record
state of the whole set. Mixing is that of a shuffle buffer of `window` examples over shards in
random order, like tf.data's file shuffle + shuffle buffer, but exact and seekable.
"""
from __future__ import annotations

import collections
import threading
from typing import Callable

import numpy as np

_SHARD_ORDER, _WINDOW_ORDER = 21, 22


def _rng(*key: int) -> np.random.Generator:
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class BalancedOrder:
  """Maps stream positions to (shard, record) pairs; thread-safe, caches a few windows.

  `counts[k]`: balanced examples of shard k. `table(k) -> copies [n_k]`: how many times each of
  shard k's records is read per epoch (sum = counts[k]).
  """

  def __init__(self, counts, table: Callable[[int], np.ndarray], seed: int, window: int,
               cache_windows: int = 2):
    self.counts = np.asarray(counts, np.int64)
    if self.counts.sum() <= 0:
      raise ValueError("The balance plan keeps no pseudo-labeled images; lower "
                       "balance.min_threshold or check the teacher.")
    self.epoch_size = int(self.counts.sum())
    self._table, self._seed, self._window = table, int(seed), max(1, int(window))
    self._lock = threading.Lock()
    self._layouts: collections.OrderedDict = collections.OrderedDict()
    self._windows: collections.OrderedDict = collections.OrderedDict()
    self._cache_windows = cache_windows

  def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard order, window start positions, window -> first index into the order) of an epoch."""
    if epoch not in self._layouts:
      order = _rng(self._seed, _SHARD_ORDER, epoch).permutation(len(self.counts))
      starts = np.concatenate([[0], np.cumsum(self.counts[order])[:-1]])
      window_of = starts // self._window
      first = np.flatnonzero(np.diff(window_of, prepend=-1))  # first shard of each window
      self._layouts[epoch] = (order, starts[first], first)
      while len(self._layouts) > 2:
        self._layouts.popitem(last=False)
    return self._layouts[epoch]

  def _window_records(self, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(shard, record) of each position of a window, in stream order."""
    key = (epoch, window)
    if key not in self._windows:
      order, _, first = self._layout(epoch)
      end = first[window + 1] if window + 1 < len(first) else len(order)
      shards, records = [], []
      for shard in order[first[window]:end]:
        copies = self._table(int(shard))
        index = np.repeat(np.arange(len(copies)), copies)
        shards.append(np.full(len(index), shard, np.int64))
        records.append(index)
      shards, records = np.concatenate(shards), np.concatenate(records)
      perm = _rng(self._seed, _WINDOW_ORDER, epoch, window).permutation(len(shards))
      self._windows[key] = (shards[perm], records[perm])
      while len(self._windows) > self._cache_windows:
        self._windows.popitem(last=False)
    return self._windows[key]

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(shard, record) arrays for global stream positions (any int64, epochs wrap)."""
    positions = np.asarray(positions, np.int64)
    epochs, within = np.divmod(positions, self.epoch_size)
    shards = np.empty_like(positions)
    records = np.empty_like(positions)
    with self._lock:
      for epoch in np.unique(epochs):
        in_epoch = epochs == epoch
        _, window_starts, _ = self._layout(int(epoch))
        windows = np.searchsorted(window_starts, within[in_epoch], side="right") - 1
        for window in np.unique(windows):
          rows = np.flatnonzero(in_epoch)[windows == window]
          w_shards, w_records = self._window_records(int(epoch), int(window))
          offset = within[rows] - window_starts[window]
          shards[rows], records[rows] = w_shards[offset], w_records[offset]
    return shards, records
