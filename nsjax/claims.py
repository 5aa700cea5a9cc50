"""Claims a study tests, and whether each holds in the study's numbers.

A claim says one row of a study should beat another: a variant, or the reference's "teacher" or
"baseline". It holds when the per-seed differences (the two rows of one seed share that seed's
teacher and data, so they are compared pairwise) have a mean above zero by more than a one-sided
95% Student-t bound: mean > t(0.95, n - 1) * sd / sqrt(n). Below minus that bound the claim is
reversed; between, the seeds cannot tell it from noise. One seed is never judged.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from scipy import stats

CONFIDENCE = 0.95
REFERENCE_ROWS = ("teacher", "baseline")


@dataclasses.dataclass(frozen=True)
class Claim:
  """`better` should reach a higher test top-1 than `worse` (variant names, or "teacher" /
  "baseline": the reference variant's); `paper` is what the paper reports for it."""
  text: str
  paper: str
  better: str
  worse: str


def _row(results: dict[str, Any], name: str) -> dict[str, Any]:
  return results[name] if name in REFERENCE_ROWS else results["variants"][name]


def check(results: dict[str, Any], claim: Claim) -> dict[str, Any]:
  """{claim fields, seeds, diff_mean, diff_sd, bound, verdict}: `diff` = better - worse, in
  points of top-1, per seed; verdict "yes", "no: reversed", "no: within noise", "one seed" or
  "not run yet"."""
  better, worse = _row(results, claim.better)["top1"], _row(results, claim.worse)["top1"]
  seeds = sorted(set(better) & set(worse), key=int)
  diffs = [better[s] - worse[s] for s in seeds]
  out = {**dataclasses.asdict(claim), "seeds": [int(s) for s in seeds], "diff_mean": None,
         "diff_sd": None, "bound": None}
  if not diffs:
    return {**out, "verdict": "not run yet"}
  mean = sum(diffs) / len(diffs)
  out["diff_mean"] = mean
  if len(diffs) == 1:
    return {**out, "verdict": "one seed"}
  sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
  bound = float(stats.t.ppf(CONFIDENCE, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
  verdict = "yes" if mean > bound else "no: reversed" if mean < -bound else "no: within noise"
  return {**out, "diff_sd": sd, "bound": bound, "verdict": verdict}


def _mean_sd(row: dict[str, Any]) -> str:
  if row["mean"] is None:
    return "-"
  return f"{row['mean']:.1f} +- {row['std']:.1f}"


def format_table(results: dict[str, Any], checked: list[dict[str, Any]]) -> str:
  """Markdown: claim | paper | nsjax (mean +- std of both rows, the paired difference) | holds?"""
  lines = ["| claim | paper | nsjax miniature (mean +- std over seeds) | holds here? |",
           "|---|---|---|---|"]
  for c in checked:
    ours = (f"{c['better']} {_mean_sd(_row(results, c['better']))} vs {c['worse']} "
            f"{_mean_sd(_row(results, c['worse']))}")
    if c["diff_mean"] is not None:
      ours += f"; difference {c['diff_mean']:+.1f}"
      if c["bound"] is not None:
        ours += f" (noise bound {c['bound']:.1f})"
    lines.append(f"| {c['text']} | {c['paper']} | {ours} | {c['verdict']} |")
  return "\n".join(lines) + "\n"
