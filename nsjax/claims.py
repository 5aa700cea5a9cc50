"""Claims a study tests, and what its seeds say about each.

A claim compares two rows of a study (variants, or the reference's "teacher" / "baseline"). The two
rows of one seed share that seed's teacher and data, so a claim is judged on the paired per-seed
differences d_s = better_s - worse_s (points of test top-1). Two kinds:

- superiority, "better > worse": the boundary is 0;
- non-inferiority, "better >= worse - margin" (the paper's ">=" statements, which a superiority test
  can never confirm): the boundary is -margin, the margin stated in the study before it runs.

The mean difference gets a two-sided 95% Student-t interval (n - 1 degrees of freedom) whose
standard error adds two parts in quadrature: the seeds' spread, sd(d) / sqrt(n), and the test set's
own sampling error, which no number of seeds removes (every seed is scored on the same images).
With per-image records that error is the paired one, from a seeds x images decomposition of the
differences (`image_error`: the images' share of the grand mean's variance, less what the seeds'
spread already holds); without them, the unpaired binomial error of the two accuracies (larger,
so conservative). A zero spread over seeds therefore never gives a verdict on its own.

Verdicts: "holds" (the interval lies above the boundary), "reversed" (below it), "no effect larger
than E points" (a superiority claim whose interval lies inside +-E, E the study's smallest effect
of interest), "worse, but not shown to be more than m points worse" (a non-inferiority claim whose
interval straddles -m below 0), or "undecided" with the number of seeds that would decide it at 80%
power. The
interval's p-value (two-sided, against the boundary) is corrected for the number of claims by
Holm's step-down method; `verdict_corrected` is the verdict that survives it. Per-image records
add a paired bootstrap interval over the test images and per-seed McNemar tests beside.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

from nsjax.evaluate import metrics

CONFIDENCE = 0.95
POWER = 0.80
SMALLEST_EFFECT = 1.0  # points of top-1: the default E of "no effect larger than E points"
REFERENCE_ROWS = ("teacher", "baseline")
TESTS = ("superiority", "non_inferiority")
BOOTSTRAP_SAMPLES = 2000
MAX_SEEDS = 1000  # "undecided" names at most this many seeds; beyond, the test set is too small


@dataclasses.dataclass(frozen=True)
class Claim:
  """`better` should reach a higher test top-1 than `worse` (superiority), or one at most `margin`
  points lower (non_inferiority); `paper` is what the paper reports for it."""
  text: str
  paper: str
  better: str
  worse: str
  test: str = "superiority"
  margin: float = 0.0

  def __post_init__(self):
    if self.test not in TESTS:
      raise ValueError(f"Claim {self.text!r}: test must be one of {TESTS}, got {self.test!r}.")
    if self.test == "non_inferiority" and not self.margin > 0:
      raise ValueError(f"Claim {self.text!r}: a non-inferiority claim needs a margin > 0 points, "
                       "stated before the study runs.")

  @property
  def boundary(self) -> float:
    return -self.margin if self.test == "non_inferiority" else 0.0


def row(results: dict[str, Any], name: str) -> dict[str, Any]:
  return results[name] if name in REFERENCE_ROWS else results["variants"][name]


def paired_seeds(results: dict[str, Any], claim: Claim,
                 excluded: Sequence[str] = ()) -> list[str]:
  """The seeds both rows have, less `excluded` (seeds whose rows came from different machines)."""
  better, worse = row(results, claim.better)["top1"], row(results, claim.worse)["top1"]
  return sorted((set(better) & set(worse)) - set(excluded), key=int)


def _hits(entry: dict[str, Any], seed: str) -> np.ndarray | None:
  packed = entry.get("top1_per_image", {}).get(seed)
  count = entry.get("num_examples", {}).get(seed)
  return None if packed is None or count is None else metrics.unpack_hits(packed, int(count))


def test_set_error(results: dict[str, Any], claim: Claim, seeds: Sequence[str]) -> dict[str, Any]:
  """The test set's sampling error of the seed-mean difference (points): paired from per-image
  records where both rows have them for every seed (with a bootstrap interval over images and
  per-seed McNemar p-values), else the unpaired binomial error; "se": None if neither is known."""
  better, worse = row(results, claim.better), row(results, claim.worse)
  hits = [(_hits(better, s), _hits(worse, s)) for s in seeds]
  if seeds and all(b is not None and w is not None and b.size == w.size == hits[0][0].size
                   for b, w in hits):
    per_seed = 100.0 * np.array([b.astype(float) - w.astype(float) for b, w in hits])
    diff = per_seed.mean(axis=0)
    rng = np.random.default_rng(0)
    boot = diff[rng.integers(0, diff.size, (BOOTSTRAP_SAMPLES, diff.size))].mean(axis=1)
    only = [(int(np.sum(b & ~w)), int(np.sum(~b & w))) for b, w in hits]
    return {"kind": "paired, per image", "images": int(diff.size),
            "se": image_error(per_seed),
            "se_image_means": float(diff.std(ddof=1) / math.sqrt(diff.size)),
            "bootstrap_ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))],
            "better_only": [b for b, _ in only], "worse_only": [w for _, w in only],
            "mcnemar_p": [float(stats.binomtest(b, b + w).pvalue) if b + w else 1.0
                          for b, w in only]}
  counts = [better.get("num_examples", {}).get(s) or worse.get("num_examples", {}).get(s)
            for s in seeds]
  if not seeds or any(c is None for c in counts):
    return {"kind": "unknown", "se": None}
  n = min(counts)
  p = [np.mean([row_["top1"][s] for s in seeds]) / 100.0 for row_ in (better, worse)]
  return {"kind": "binomial, unpaired (no per-image records)", "images": int(n),
          "se": 100.0 * math.sqrt(sum(q * (1 - q) for q in p) / n)}


def image_error(per_seed: np.ndarray) -> float:
  """The test set's sampling error of the grand mean of a seeds x images matrix of differences,
  the part not already in the seeds' spread: in a two-way random-effects model (seed, image and
  their interaction) the grand mean's variance is (MS_seeds + MS_images - MS_residual) / (n N),
  and sd(d_s)^2 / n = MS_seeds / (n N) is the seeds' part, so this is the rest."""
  n, count = per_seed.shape
  image_means = per_seed.mean(axis=0)
  ms_images = n * image_means.var(ddof=1)
  residual = per_seed - per_seed.mean(axis=1, keepdims=True) - image_means + per_seed.mean()
  ms_residual = float(np.sum(residual ** 2)) / ((n - 1) * (count - 1)) if n > 1 else 0.0
  return math.sqrt(max(ms_images - ms_residual, 0.0) / (n * count))


def _t(probability: float, df: int) -> float:
  return float(stats.t.ppf(probability, df))


def detectable(se: float, df: int) -> float:
  """The smallest true difference a two-sided 95% test detects with 80% power at this error."""
  return (_t(1 - (1 - CONFIDENCE) / 2, df) + _t(POWER, df)) * se


def seeds_needed(distance: float, sd: float, se_test: float) -> int | None:
  """The fewest seeds whose interval would resolve `distance` points at 80% power, given the
  per-seed sd and the test set's fixed error; None when the test set's error alone forbids it."""
  for n in range(2, MAX_SEEDS + 1):
    if detectable(math.sqrt(sd ** 2 / n + se_test ** 2), n - 1) <= distance:
      return n
  return None


def check(results: dict[str, Any], claim: Claim, smallest_effect: float = SMALLEST_EFFECT,
          excluded: Sequence[str] = ()) -> dict[str, Any]:
  """The claim's fields, its seeds and per-seed differences, diff_mean, diff_sd, the standard
  error's parts, ci95, p_value (two-sided, against the boundary), mde80 and the verdict."""
  seeds = paired_seeds(results, claim, excluded)
  better, worse = row(results, claim.better)["top1"], row(results, claim.worse)["top1"]
  diffs = [better[s] - worse[s] for s in seeds]
  out = {**dataclasses.asdict(claim), "seeds": [int(s) for s in seeds], "diffs": diffs,
         "diff_mean": None, "diff_sd": None, "ci95": None, "p_value": None, "mde80": None}
  if not diffs:
    return {**out, "verdict": "not run yet"}
  mean = float(np.mean(diffs))
  out["diff_mean"] = mean
  if len(diffs) == 1:
    return {**out, "verdict": "one seed"}
  sd = float(np.std(diffs, ddof=1))
  test_error = test_set_error(results, claim, seeds)
  se_test = test_error["se"]
  if se_test is None and sd == 0:
    return {**out, "diff_sd": sd, "test_set": test_error,
            "verdict": "undecided: no spread over seeds and no test-set error to bound it"}
  df, se_seeds = len(diffs) - 1, sd / math.sqrt(len(diffs))
  se = math.hypot(se_seeds, se_test or 0.0)
  half = _t(1 - (1 - CONFIDENCE) / 2, df) * se
  distance = mean - claim.boundary
  out.update(diff_sd=sd, se_seeds=se_seeds, se_test=se_test, se=se, test_set=test_error,
             ci95=[mean - half, mean + half], mde80=detectable(se, df),
             p_value=(float(2 * stats.t.sf(abs(distance) / se, df)) if se > 0 else
                      1.0 if distance == 0 else 0.0))
  return {**out, "verdict": _verdict(claim, mean, half, sd, se_test or 0.0, smallest_effect)}


def _verdict(claim: Claim, mean: float, half: float, sd: float, se_test: float,
             smallest_effect: float) -> str:
  low, high = mean - half, mean + half
  if low > claim.boundary:
    return "holds"
  if high < claim.boundary:
    return "reversed"
  if claim.test == "superiority" and -smallest_effect < low and high < smallest_effect:
    return f"no effect larger than {smallest_effect:g} points"
  if claim.test == "non_inferiority" and high < 0:
    return (f"undecided: worse (the interval lies below 0), but not shown to be more than "
            f"{claim.margin:g} points worse")
  distance = abs(mean - claim.boundary)
  if claim.test == "non_inferiority" and distance < smallest_effect / 10:
    return "undecided: the difference sits at the margin"
  if claim.test == "superiority" and distance < smallest_effect / 2:
    distance = smallest_effect - distance  # too small to resolve: resolve "none larger than E"
  n = seeds_needed(distance, sd, se_test)
  return (f"undecided: ~{n} seeds would decide it" if n is not None else
          "undecided: the test set is too small to decide it")


def holm(checked: list[dict[str, Any]], alpha: float = 1 - CONFIDENCE) -> list[dict[str, Any]]:
  """Each claim with `p_holm` (Holm's step-down adjustment over the claims that have a p-value)
  and `verdict_corrected`: a "holds" or "reversed" whose adjusted p-value is not below `alpha`
  becomes "undecided after Holm's correction"."""
  tested = sorted((c["p_value"], i) for i, c in enumerate(checked) if c["p_value"] is not None)
  adjusted, running = {}, 0.0
  for rank, (p, i) in enumerate(tested):
    running = max(running, min(1.0, (len(tested) - rank) * p))
    adjusted[i] = running
  out = []
  for i, c in enumerate(checked):
    p_holm = adjusted.get(i)
    verdict = c["verdict"]
    if verdict in ("holds", "reversed") and not p_holm < alpha:
      verdict = "undecided after Holm's correction"
    out.append({**c, "p_holm": p_holm, "verdict_corrected": verdict})
  return out


def check_all(results: dict[str, Any], claims: Sequence[Claim],
              smallest_effect: float = SMALLEST_EFFECT,
              excluded: Sequence[str] = ()) -> list[dict[str, Any]]:
  """Every claim checked, then Holm's correction over all of them."""
  return holm([check(results, c, smallest_effect, excluded) for c in claims])


def _mean_sd(entry: dict[str, Any]) -> str:
  if entry["mean"] is None:
    return "-"
  return f"{entry['mean']:.1f} +- {entry['std']:.1f}"


def _claim_text(c: dict[str, Any]) -> str:
  if c["test"] == "non_inferiority":
    return f"{c['text']} (non-inferiority, margin {c['margin']:g})"
  return c["text"]


def _difference(c: dict[str, Any]) -> str:
  if c["diff_mean"] is None:
    return "-"
  text = f"{c['diff_mean']:+.1f}"
  if c["ci95"] is not None:
    text += f" [{c['ci95'][0]:+.1f}, {c['ci95'][1]:+.1f}]"
  return text


def format_table(results: dict[str, Any], checked: list[dict[str, Any]]) -> str:
  """Markdown: claim | paper | both rows (mean +- std) | difference [95% CI] | p, p (Holm) |
  verdict | after Holm."""
  lines = ["| claim | paper | nsjax: better vs worse (mean +- std) | difference [95% CI] | "
           "p (Holm) | verdict | after Holm |", "|---|---|---|---|---|---|---|"]
  for c in checked:
    rows = (f"{c['better']} {_mean_sd(row(results, c['better']))} vs {c['worse']} "
            f"{_mean_sd(row(results, c['worse']))}")
    p = ("-" if c["p_value"] is None else
         f"{c['p_value']:.2g} ({c['p_holm']:.2g})" if c.get("p_holm") is not None else
         f"{c['p_value']:.2g}")
    lines.append(f"| {_claim_text(c)} | {c['paper']} | {rows} | {_difference(c)} | {p} | "
                 f"{c['verdict']} | {c.get('verdict_corrected', c['verdict'])} |")
  return "\n".join(lines) + "\n"
