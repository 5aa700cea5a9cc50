"""Filtering and class balancing of pseudo labels, as the official offline mode.

1. Per predicted class, a histogram of top-1 confidence in 0.01 bins (summed over shards and hosts).
2. Per class, walk the bins from 1.00 down until the cumulative count reaches `num_image`; that bin's
   lower edge is the class threshold, never below `min_threshold`. Keep images at or above it.
3. Each kept image gets copies c = num_image / kept_count(class), stochastically rounded
   (floor(c) + Bernoulli(frac(c))): full classes are subsampled, rare classes duplicated.
Copies are applied at read time (no physical duplicates), deterministic for a seed and source id.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import tensorflow as tf

NUM_BINS = 100  # 0.01-wide confidence bins


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
  """Bin index of each top-1 probability: [0, 0.01) -> 0, ..., [0.99, 1.0] -> 99."""
  return np.clip(np.floor(np.asarray(confidence, np.float64) * NUM_BINS), 0, NUM_BINS - 1).astype(
      np.int64)


def class_histograms(pred_class: np.ndarray, confidence: np.ndarray, num_classes: int) -> np.ndarray:
  """[num_classes, 100] counts of top-1 confidence per predicted class; add them to merge shards."""
  return bin_histograms(pred_class, confidence_bins(confidence), num_classes)


def bin_histograms(pred_class: np.ndarray, bins: np.ndarray, num_classes: int) -> np.ndarray:
  """`class_histograms` from confidence bins already computed (as pseudo-label sidecars store them)."""
  flat = np.asarray(pred_class, np.int64) * NUM_BINS + np.asarray(bins, np.int64)
  return np.bincount(flat, minlength=num_classes * NUM_BINS).reshape(num_classes, NUM_BINS)


def class_thresholds(hist: np.ndarray, num_image: int, min_threshold: float = 0.3) -> np.ndarray:
  """Per-class confidence threshold keeping about `num_image` images (never below min_threshold)."""
  if num_image < 1:
    raise ValueError(f"num_image (images per class after balancing) must be >= 1, got {num_image}; "
                     f"{KEEP_ALL} keeps every image once, unbalanced.")
  if not 0.0 <= min_threshold < 1.0:
    raise ValueError(f"min_threshold must be in [0, 1), got {min_threshold}.")
  min_bin = int(round(min_threshold * NUM_BINS))
  thresholds = np.full(hist.shape[0], min_threshold, np.float64)
  for c, counts in enumerate(hist):
    cumulative = 0
    for b in range(NUM_BINS - 1, min_bin - 1, -1):
      cumulative += counts[b]
      if cumulative >= num_image:
        thresholds[c] = max(b / NUM_BINS, min_threshold)
        break
  return thresholds


def kept_counts(hist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Images per class at or above that class's threshold (bin-exact, like `keep_mask`)."""
  first_bin = np.round(np.asarray(thresholds) * NUM_BINS).astype(np.int64)
  return np.array([counts[b:].sum() for counts, b in zip(hist, first_bin)], np.int64)


def keep_mask(pred_class: np.ndarray, confidence: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Compares in bin units so that the mask agrees exactly with the histogram counts."""
  first_bin = np.round(np.asarray(thresholds) * NUM_BINS).astype(np.int64)
  return confidence_bins(confidence) >= first_bin[np.asarray(pred_class, np.int64)]


def copy_factors(kept: np.ndarray, num_image: int) -> np.ndarray:
  """num_image / kept per class (0 where nothing was kept)."""
  kept = np.asarray(kept, np.float64)
  return np.where(kept > 0, num_image / np.maximum(kept, 1), 0.0)


_HASH_BUCKETS = 2**53  # exactly representable in float64


def uniform_from_id(seed: int, source_id) -> tf.Tensor:
  """U[0,1) draws that depend only on (seed, source id): stable across shards, hosts and reruns.

  Keyed SipHash of the id (tf.strings.to_hash_bucket_strong), so the same function serves eager
  code and tf.data graphs. `source_id`: a string / bytes or a tensor of them.
  """
  bucket = tf.strings.to_hash_bucket_strong(source_id, _HASH_BUCKETS, key=[int(seed), 0x6e736a6178])
  return tf.cast(bucket, tf.float64) / _HASH_BUCKETS


def stochastic_round(factor: float, u: float) -> int:
  """floor(c) + Bernoulli(frac(c)) with the given uniform draw u."""
  whole = math.floor(factor)
  return int(whole + (1 if u < factor - whole else 0))


@dataclasses.dataclass
class BalancePlan:
  """Everything the student's reader needs to filter and balance, plus statistics for the report."""
  num_image: int
  min_threshold: float
  seed: int
  thresholds: list[float]
  histogram: list[list[int]]
  kept: list[int]
  factors: list[float]
  # Balanced examples per block of `block_size` consecutive pseudo-labeled records (in manifest
  # order: the unlabeled split's order, whichever hosts labeled it), the student's epoch known
  # without reading the records. None until `pseudo_labels.write_read_tables` has run.
  block_counts: list[int] | None = None
  block_size: int = 1024

  def copies(self, pred_class: int, confidence: float, source_id: str | bytes) -> int:
    """How many times this pseudo-labeled image is read per pass (0 = filtered out)."""
    if confidence_bins(np.asarray([confidence]))[0] < round(self.thresholds[pred_class] * NUM_BINS):
      return 0
    u = float(uniform_from_id(self.seed, source_id))
    return stochastic_round(self.factors[pred_class], u)

  def copies_of(self, pred_class: np.ndarray, bins: np.ndarray, source_ids) -> np.ndarray:
    """`copies` of many records at once, from their classes, confidence bins and ids."""
    pred_class = np.asarray(pred_class, np.int64)
    first_bin = np.round(np.asarray(self.thresholds) * NUM_BINS).astype(np.int64)
    keep = np.asarray(bins, np.int64) >= first_bin[pred_class]
    factors = np.asarray(self.factors, np.float64)[pred_class]
    whole = np.floor(factors)
    if len(pred_class) == 0:
      return np.zeros(0, np.int64)
    u = uniform_from_id(self.seed, tf.constant(np.asarray(source_ids, dtype=object))).numpy()
    return np.where(keep, whole.astype(np.int64) + (u < factors - whole), 0).astype(np.int64)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict[str, Any]) -> "BalancePlan":
    return cls(**data)


KEEP_ALL = -1  # num_image: no filtering, no balancing


def plan_balance(hist: np.ndarray, num_image: int, min_threshold: float = 0.3,
                 seed: int = 0) -> BalancePlan:
  """From merged histograms to thresholds, kept counts and copy factors.

  num_image == KEEP_ALL: every pseudo-labeled image once, whatever its class and confidence (a
  student on the teacher's soft labels alone; the official recipe filters and balances).
  """
  if num_image == KEEP_ALL:
    kept = hist.sum(axis=1)
    return BalancePlan(num_image=KEEP_ALL, min_threshold=0.0, seed=int(seed),
                       thresholds=[0.0] * hist.shape[0], histogram=hist.tolist(),
                       kept=[int(k) for k in kept], factors=[1.0] * hist.shape[0])
  thresholds = class_thresholds(hist, num_image, min_threshold)
  kept = kept_counts(hist, thresholds)
  return BalancePlan(num_image=int(num_image), min_threshold=float(min_threshold), seed=int(seed),
                     thresholds=[float(t) for t in thresholds], histogram=hist.tolist(),
                     kept=[int(k) for k in kept],
                     factors=[float(f) for f in copy_factors(kept, num_image)])
