"""The run's summary: summary.json, a printed table, and PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from nsjax.files import atomic_write, atomic_write_json

SUMMARY_FILE = "summary.json"


def _pct(x):
  return "-" if x is None else f"{100 * x:.2f}"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """One line per iteration: role, model, params, test top-1 (and corruption mean when present)."""
  header = ["iter", "role", "model", "params", "test top-1 %", "corrupted top-1 %", "params sha256"]
  lines = [[str(r["iteration"]), r["role"], r["model"], f"{r['params']:,}", _pct(r.get("test_top1")),
            _pct(r.get("corruption_top1")), r.get("params_sha256", "")[:12]] for r in rows]
  widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h)
            for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def write_summary(workdir: str, rows: Sequence[dict[str, Any]], wall_seconds: float,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
  summary = {"iterations": list(rows), "wall_seconds": float(wall_seconds), **(extra or {})}
  atomic_write_json(os.path.join(workdir, SUMMARY_FILE), summary)
  return summary


def _save_figure(fig, path: str) -> None:
  def write(tmp):
    with tf.io.gfile.GFile(tmp, "wb") as f:  # a file object, so gs:// works too
      fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
  atomic_write(path, write)


def _pyplot():
  """matplotlib.pyplot on the Agg backend. Imported on first use, not with this module: setting
  the backend is process-wide, and importing nsjax (e.g. in a notebook) must not change it."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_accuracy(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Test top-1 per iteration (students as a line, baseline as a dashed level)."""
  plt = _pyplot()
  chain = [r for r in rows if r["role"] in ("teacher", "student")]
  fig, ax = plt.subplots(figsize=(5.5, 3.6))
  ax.plot([r["iteration"] for r in chain], [100 * r["test_top1"] for r in chain], "o-",
          label="teacher -> noisy students")
  for r in chain:
    ax.annotate(r["model"].replace("efficientnet-", ""), (r["iteration"], 100 * r["test_top1"]),
                textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
  for r in rows:
    if r["role"] == "baseline":
      ax.axhline(100 * r["test_top1"], ls="--", color="gray", label="supervised baseline")
  ax.set_xlabel("iteration")
  ax.set_ylabel("test top-1 (%)")
  ax.set_xticks([r["iteration"] for r in chain])
  ax.legend(loc="lower right", fontsize=8)
  ax.grid(alpha=0.3)
  _save_figure(fig, path)
  plt.close(fig)


def plot_corruptions(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Per-corruption accuracy (mean over severities), one bar group per corruption."""
  plt = _pyplot()
  rows = [r for r in rows if r.get("corruptions")]
  if not rows:
    return
  names = sorted(rows[0]["corruptions"])
  fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.9), 3.6))
  width = 0.8 / len(rows)
  for k, r in enumerate(rows):
    ax.bar(np.arange(len(names)) + k * width, [100 * r["corruptions"][n] for n in names], width,
           label=f"{r['role']} {r['iteration']}")
  ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("top-1 (%), mean over severities")
  ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  _save_figure(fig, path)
  plt.close(fig)


def plot_balance(stats: dict[str, Any], path: str) -> None:
  """Class counts before/after filtering+balancing and the top-1 confidence histogram."""
  plt = _pyplot()
  hist = np.asarray(stats["histogram"])
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
  classes = np.arange(hist.shape[0])
  a.bar(classes - 0.2, hist.sum(1), 0.4, label="predicted (all)")
  a.bar(classes + 0.2, stats["expected_after"], 0.4, label="after filter + balance")
  a.set_xlabel("class")
  a.set_ylabel("images")
  a.legend(fontsize=8)
  b.bar(np.arange(hist.shape[1]) / 100, hist.sum(0), width=0.01, align="edge")
  b.axvline(stats["min_threshold"], color="red", ls="--", label="min threshold")
  b.set_xlabel("teacher top-1 confidence")
  b.set_yscale("log")
  b.legend(fontsize=8)
  _save_figure(fig, path)
  plt.close(fig)
