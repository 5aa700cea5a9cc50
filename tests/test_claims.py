"""nsjax.claims: intervals, verdicts, Holm's correction and per-image comparisons (no compute)."""
import math

import numpy as np
import pytest
from scipy import stats

from nsjax import claims
from nsjax.claims import Claim
from nsjax.evaluate import metrics


def row(values, images=None, num_examples=None):
  top1 = {str(s): v for s, v in enumerate(values)}
  out = {"top1": top1, "mean": float(np.mean(values)) if values else None,
         "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
  if images is not None:
    out["top1_per_image"] = {str(s): metrics.pack_hits(h) for s, h in enumerate(images)}
    out["num_examples"] = {str(s): len(h) for s, h in enumerate(images)}
  elif num_examples:
    out["num_examples"] = {s: num_examples for s in top1}
  return out


def results(full, other, teacher=(), n=1000):
  return {"variants": {"full": row(full, num_examples=n), "other": row(other, num_examples=n)},
          "teacher": row(list(teacher), num_examples=n), "baseline": row([])}


CLAIM = Claim("full beats other", "1 point", "full", "other")
NOT_WORSE = Claim("full is not worse", "-", "full", "other", "non_inferiority", 1.0)


def test_the_interval_adds_the_seeds_spread_and_the_test_sets_error():
  # diffs +1, +2, +3 over 3 seeds: mean 2, sd 1; the binomial error of 95% vs 94% on 1,000 images.
  checked = claims.check(results([95.0, 96.0, 97.0], [94.0, 94.0, 94.0]), CLAIM)
  se_test = 100 * math.sqrt((0.96 * 0.04 + 0.94 * 0.06) / 1000)
  se = math.hypot(1 / math.sqrt(3), se_test)
  half = stats.t.ppf(0.975, 2) * se
  assert checked["diff_sd"] == pytest.approx(1.0)
  assert checked["se_test"] == pytest.approx(se_test)
  assert checked["ci95"] == pytest.approx([2 - half, 2 + half])
  assert checked["p_value"] == pytest.approx(2 * stats.t.sf(2 / se, 2))
  # the unpaired error of 1,000 images (~1 point) is too large for any number of seeds to detect
  # a 2-point effect at 80% power: only per-image records (paired) can
  assert 2 - half < 0 and claims.detectable(se_test, 10**6) > 2.0
  assert checked["verdict"] == "undecided: the test set is too small to decide it"


@pytest.mark.parametrize("full, other, verdict", [
    ([94.0, 94.5, 93.8, 94.2, 94.1], [91.0, 91.4, 90.9, 91.3, 91.0], "holds"),
    ([91.0, 91.4, 90.9, 91.3, 91.0], [94.0, 94.5, 93.8, 94.2, 94.1], "reversed"),
    ([94.0, 93.0, 94.5, 93.6], [93.5, 93.6, 94.1, 93.4], "no effect larger than 1 points"),
])
def test_superiority_verdicts(full, other, verdict):
  checked = claims.check(results(full, other, n=100000), CLAIM)
  assert checked["verdict"] == verdict
  assert checked["diff_mean"] == pytest.approx(np.mean(np.subtract(full, other)))


def test_an_undecided_claim_says_how_many_seeds_would_decide_it():
  # diffs +1.5, -0.5, +2.5: mean 1.17, sd 1.53: 3 seeds cannot tell.
  checked = claims.check(results([95.5, 93.5, 96.5], [94.0, 94.0, 94.0], n=100000), CLAIM)
  match = __import__("re").fullmatch(r"undecided: ~(\d+) seeds would decide it",
                                     checked["verdict"])
  assert match, checked["verdict"]
  n = int(match.group(1))
  sd, mean = checked["diff_sd"], checked["diff_mean"]
  assert claims.detectable(math.hypot(sd / math.sqrt(n), checked["se_test"]), n - 1) <= mean
  assert claims.detectable(math.hypot(sd / math.sqrt(n - 1), checked["se_test"]), n - 2) > mean


def test_a_zero_spread_over_seeds_is_bounded_by_the_test_sets_error():
  # +0.4 on every seed: sd 0, but on 1,000 images the test set's error alone is ~1 point.
  checked = claims.check(results([94.4] * 4, [94.0] * 4), CLAIM)
  assert checked["diff_sd"] == 0 and checked["se_test"] > 0.9
  assert checked["verdict"].startswith("undecided")
  unknown = {"variants": {"full": row([94.4] * 4), "other": row([94.0] * 4)},
             "teacher": row([]), "baseline": row([])}
  assert claims.check(unknown, CLAIM)["verdict"] == \
      "undecided: no spread over seeds and no test-set error to bound it"


def test_non_inferiority_holds_within_the_margin_and_fails_beyond_it():
  level = claims.check(results([94.0, 94.2, 93.9, 94.1, 94.0], [94.1, 94.0, 94.1, 94.0, 94.1],
                               n=100000), NOT_WORSE)
  assert level["verdict"] == "holds" and level["ci95"][0] > -1.0 and level["ci95"][0] < 0
  # (the same numbers could never confirm a superiority claim)
  assert not claims.check(results([94.0, 94.2, 93.9, 94.1, 94.0],
                                  [94.1, 94.0, 94.1, 94.0, 94.1], n=100000),
                          CLAIM)["verdict"] == "holds"
  worse = claims.check(results([92.0, 92.2, 91.9, 92.1, 92.0], [94.1, 94.0, 94.1, 94.0, 94.1],
                               n=100000), NOT_WORSE)
  assert worse["verdict"] == "reversed" and worse["ci95"][1] < -1.0


def test_non_inferiority_worse_but_not_beyond_the_margin_is_said_so():
  # -0.5 .. -1.5 around -1.0: worse than "other" for sure, but not shown beyond the 1-point margin
  checked = claims.check(results([93.0, 93.5, 92.5, 93.2, 92.8], [94.0, 94.3, 93.8, 94.1, 93.9],
                                 n=100000), NOT_WORSE)
  assert checked["ci95"][1] < 0 < checked["ci95"][1] + 1.0 and checked["ci95"][0] < -1.0
  assert checked["verdict"] == ("undecided: worse (the interval lies below 0), but not shown to "
                                "be more than 1 points worse")


def test_a_non_inferiority_claim_needs_a_margin():
  with pytest.raises(ValueError, match="needs a margin"):
    Claim("x", "-", "a", "b", "non_inferiority")
  with pytest.raises(ValueError, match="test must be one of"):
    Claim("x", "-", "a", "b", "equivalence", 1.0)


def test_holm_adjusts_step_down_and_keeps_the_raw_verdict_beside():
  checked = [{"p_value": p, "verdict": v} for p, v in
             [(0.01, "holds"), (0.04, "holds"), (0.03, "reversed"), (None, "one seed")]]
  out = claims.holm(checked)
  # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> max(0.06, 0.04) = 0.06
  assert [c["p_holm"] for c in out] == pytest.approx([0.03, 0.06, 0.06, None], nan_ok=True) \
      or [c["p_holm"] for c in out][:3] == pytest.approx([0.03, 0.06, 0.06])
  assert [c["verdict_corrected"] for c in out] == [
      "holds", "undecided after Holm's correction", "undecided after Holm's correction",
      "one seed"]
  assert [c["verdict"] for c in out] == ["holds", "holds", "reversed", "one seed"]


def test_per_image_records_give_the_paired_test_set_error_and_mcnemar():
  rng = np.random.default_rng(1)
  worse = [rng.random(1000) < 0.90 for _ in range(3)]
  # better: right wherever worse is, and on 30 more images per seed
  better = []
  for w in worse:
    b = w.copy()
    b[np.flatnonzero(~w)[:30]] = True
    better.append(b)
  res = {"variants": {"full": row([100 * b.mean() for b in better], images=better),
                      "other": row([100 * w.mean() for w in worse], images=worse)},
         "teacher": row([]), "baseline": row([])}
  checked = claims.check(res, CLAIM)
  test_set = checked["test_set"]
  assert test_set["kind"] == "paired, per image"
  assert test_set["better_only"] == [30, 30, 30] and test_set["worse_only"] == [0, 0, 0]
  assert all(p < 1e-8 for p in test_set["mcnemar_p"])
  d = 100 * np.array([b.astype(float) - w for b, w in zip(better, worse)])
  u = d.mean(axis=0)
  assert test_set["se_image_means"] == pytest.approx(u.std(ddof=1) / math.sqrt(1000))
  # two-way decomposition: (MS_images - MS_residual) / (n N), by hand
  resid = d - d.mean(axis=1, keepdims=True) - u + d.mean()
  ms_images, ms_resid = 3 * u.var(ddof=1), (resid ** 2).sum() / (2 * 999)
  assert checked["se_test"] == pytest.approx(math.sqrt((ms_images - ms_resid) / 3000))
  assert checked["se_test"] < test_set["se_image_means"]
  low, high = test_set["bootstrap_ci95"]
  assert low < 3.0 < high and high - low < 3.0
  # the paired error is smaller than the unpaired binomial one of the same accuracies
  unpaired = claims.check(results([100 * b.mean() for b in better],
                                  [100 * w.mean() for w in worse]), CLAIM)
  assert checked["se_test"] < unpaired["se_test"]


def test_the_image_error_of_identical_seeds_is_the_image_means_error():
  """The same models on every seed (sd over seeds 0): the test set's error is all that is left."""
  rng = np.random.default_rng(2)
  row_ = 100 * (rng.random(500) < 0.1).astype(float)  # +1 point on ~10% of the images
  same = np.stack([row_] * 4)
  assert claims.image_error(same) == pytest.approx(row_.std(ddof=1) / math.sqrt(500))
  assert claims.image_error(same) > 0


def test_only_seeds_both_rows_have_and_not_excluded_are_compared():
  partial = results([94.0, 94.5, 93.8], [93.0, 93.4])
  checked = claims.check(partial, CLAIM)
  assert checked["seeds"] == [0, 1] and checked["diff_mean"] == pytest.approx(1.05)
  assert claims.check(partial, CLAIM, excluded=["1"])["verdict"] == "one seed"
  empty = claims.check(results([94.0], [93.0], teacher=[]),
                       Claim("full beats the teacher", "-", "full", "teacher"))
  assert empty["verdict"] == "not run yet" and empty["diff_mean"] is None


def test_the_table_names_rows_interval_p_values_and_both_verdicts():
  res = results([94.0, 94.5, 93.8, 94.2], [91.0, 91.4, 90.9, 91.1], teacher=[91.0, 91.5, 91.2],
                n=100000)
  checked = claims.check_all(res, [CLAIM, NOT_WORSE])
  table = claims.format_table(res, checked)
  first = table.splitlines()[2]
  assert first.startswith("| full beats other | 1 point | full 94.1 +- 0.3 vs other 91.1 +- 0.2 "
                          "| +3.0 [+")
  assert first.endswith("| holds | holds |")
  assert "(non-inferiority, margin 1)" in table.splitlines()[3]
  assert table.count("\n") == 4


def test_hits_pack_and_unpack():
  hits = np.random.default_rng(0).random(1001) < 0.5
  text = metrics.pack_hits(hits)
  assert len(text) == 4 * math.ceil(math.ceil(1001 / 8) / 3)
  assert (metrics.unpack_hits(text, 1001) == hits).all()
  with pytest.raises(ValueError, match="another test split"):
    metrics.unpack_hits(text, 500)
  assert metrics.real_hits([np.array([1, 0, -1], np.int8), np.array([-1], np.int8)]).tolist() == \
      [True, False]
