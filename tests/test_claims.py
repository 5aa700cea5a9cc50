"""nsjax.claims: the verdicts of a study's claims from per-seed numbers (no compute)."""
import pytest

from nsjax import claims
from nsjax.claims import Claim


def results(full, other, teacher=None):
  row = lambda t: {"top1": {str(s): v for s, v in enumerate(t)}, "mean": sum(t) / len(t) if t
                   else None, "std": 0.0 if t else None}
  return {"variants": {"full": row(full), "other": row(other)}, "teacher": row(teacher or []),
          "baseline": row([])}


CLAIM = Claim("full beats other", "1 point", "full", "other")


@pytest.mark.parametrize("full, other, verdict", [
    ([94.0, 94.5, 93.8], [93.0, 93.4, 92.9], "yes"),               # +1.0, +1.1, +0.9
    ([93.0, 93.4, 92.9], [94.0, 94.5, 93.8], "no: reversed"),
    ([94.0, 93.0, 94.5], [93.5, 93.6, 94.1], "no: within noise"),  # +0.5, -0.6, +0.4
    ([94.0, 94.0, 94.0], [94.0, 94.0, 94.0], "no: within noise"),  # the same model
    ([94.0], [93.0], "one seed"),
])
def test_verdicts_from_paired_seeds(full, other, verdict):
  checked = claims.check(results(full, other), CLAIM)
  assert checked["verdict"] == verdict
  assert checked["diff_mean"] == pytest.approx(
      sum(f - o for f, o in zip(full, other)) / len(full))


def test_the_bound_is_the_one_sided_t_bound():
  # diffs +1, +2, +3: mean 2, sd 1, t(0.95, 2 df) = 2.919986 -> bound 2.919986 / sqrt(3).
  checked = claims.check(results([95.0, 96.0, 97.0], [94.0, 94.0, 94.0]), CLAIM)
  assert checked["diff_sd"] == pytest.approx(1.0)
  assert checked["bound"] == pytest.approx(2.919986 / 3 ** 0.5, rel=1e-5)
  assert checked["verdict"] == "yes"


def test_only_seeds_both_rows_have_are_compared():
  partial = results([94.0, 94.5, 93.8], [93.0, 93.4])
  checked = claims.check(partial, CLAIM)
  assert checked["seeds"] == [0, 1] and checked["diff_mean"] == pytest.approx(1.05)
  empty = claims.check(results([94.0], [93.0], teacher=[]),
                       Claim("full beats the teacher", "-", "full", "teacher"))
  assert empty["verdict"] == "not run yet" and empty["diff_mean"] is None


def test_the_table_names_both_rows_the_difference_and_the_verdict():
  res = results([94.0, 94.5, 93.8], [93.0, 93.4, 92.9], teacher=[91.0, 91.5, 91.2])
  checked = [claims.check(res, CLAIM),
             claims.check(res, Claim("full beats the teacher", "+0.7", "full", "teacher"))]
  table = claims.format_table(res, checked)
  assert "| full beats other | 1 point | full 94.1 +- 0.0 vs other 93.1 +- 0.0; difference " \
         "+1.0 (noise bound " in table
  assert table.rstrip().endswith("| yes |")
  assert table.count("\n") == 4
