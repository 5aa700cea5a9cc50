"""Synthetic pseudo-label sets of any size, written by the real writer (tests, benchmarks/scale.py).

Records are small grayscale PNGs (a few dozen distinct images, reused) with random teacher
probabilities, so a set of a million records is written in about a minute on one core.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from nsjax.data import balance, pseudo_labels


def png_images(count: int, size: int = 28, seed: int = 0) -> list[bytes]:
  rng = np.random.default_rng(seed)
  return [tf.io.encode_png(rng.integers(0, 256, (size, size, 1), np.uint8)).numpy()
          for _ in range(count)]


def label_fields(probs: np.ndarray) -> dict[str, np.ndarray]:
  """What `nsjax.stages.label.pseudo_label_fields` returns for all-class storage, in numpy."""
  probs = np.asarray(probs, np.float32)
  return {"label": probs.argmax(-1).astype(np.int32), "confidence": probs.max(-1),
          "probs": probs.astype(np.float16)}


def write_label_set(directory: str, num_records: int, num_classes: int = 10, *,
                    num_hosts: int = 1, shard_bytes: int = 2**20, batch: int = 256,
                    seed: int = 0, num_image: int = balance.KEEP_ALL, block_size: int = 1024
                    ) -> tuple[balance.BalancePlan, int]:
  """Writes `num_records` pseudo-labeled records as `num_hosts` labeling hosts would (each its
  contiguous slice, shards cut at `shard_bytes`), merges them and makes the balance plan with its
  read tables. Returns (plan, metadata bytes written: sidecars, summaries, manifest, tables)."""
  images = png_images(64, seed=seed)
  # Each record's probabilities depend on its index only, not on which host wrote it.
  logits = np.random.default_rng(seed).normal(size=(num_records, num_classes)).astype(np.float32) * 3
  per_host = -(-num_records // num_hosts)
  written = 0
  for host in range(num_hosts):
    writer = pseudo_labels.HostShardWriter(directory, host, num_classes)
    begin, end = host * per_host, min((host + 1) * per_host, num_records)
    pending = []
    for first in range(begin, end, batch):
      pending.append(range(first, min(first + batch, end)))
      if sum(len(r) for r in pending) * 900 >= shard_bytes or first + batch >= end:
        ids = [i for r in pending for i in r]
        probs = np.exp(logits[ids]) / np.exp(logits[ids]).sum(-1, keepdims=True)
        writer.write_shard([images[i % len(images)] for i in ids], label_fields(probs),
                           [b"r%d" % i for i in ids])
        pending = []
    writer.finish()
    written += writer.bytes_written
  manifest = pseudo_labels.merge_manifests(directory, num_hosts)
  plan = balance.plan_balance(np.asarray(manifest["histogram"]), num_image, 0.0, seed)
  plan.block_size = block_size
  plan.block_counts = pseudo_labels.write_read_tables(directory, plan,
                                                      manifest["shards"]).tolist()
  written += tf.io.gfile.stat(f"{directory}/{pseudo_labels.MANIFEST}").length
  written += sum(tf.io.gfile.stat(pseudo_labels.table_path(directory, s["file"])).length
                 for s in manifest["shards"])
  return plan, written
