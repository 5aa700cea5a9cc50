"""Filtering and balancing math against hand-computed cases."""
import numpy as np
import pytest

from nsjax.data import balance


def test_bins_are_hundredths_and_top_bin_includes_one():
  np.testing.assert_array_equal(balance.confidence_bins([0.0, 0.009, 0.01, 0.305, 0.999, 1.0]),
                                [0, 0, 1, 30, 99, 99])


def test_histograms_merge_by_addition():
  a = balance.class_histograms([0, 0, 1], [0.95, 0.5, 0.99], 2)
  b = balance.class_histograms([1], [0.991], 2)
  merged = a + b
  assert merged[0, 95] == 1 and merged[0, 50] == 1 and merged[1, 99] == 2
  assert merged.sum() == 4


def test_thresholds_walk_down_from_the_top_bin():
  # Class 0: 3 images at 0.95, 4 at 0.80, 10 at 0.50. num_image = 5: 3 (at .95) < 5, 3+4 >= 5 -> 0.80.
  # Class 1: only 2 images above the floor -> min_threshold. Class 2: 6 at 0.99 -> 0.99.
  pred = [0] * 17 + [1, 1, 1] + [2] * 6
  conf = [0.95] * 3 + [0.80] * 4 + [0.50] * 10 + [0.90, 0.40, 0.20] + [0.99] * 6
  hist = balance.class_histograms(pred, conf, 3)
  thresholds = balance.class_thresholds(hist, num_image=5, min_threshold=0.3)
  np.testing.assert_allclose(thresholds, [0.80, 0.30, 0.99])
  kept = balance.kept_counts(hist, thresholds)
  np.testing.assert_array_equal(kept, [7, 2, 6])  # 0.20 is below the 0.3 floor
  np.testing.assert_allclose(balance.copy_factors(kept, 5), [5 / 7, 2.5, 5 / 6])
  mask = balance.keep_mask(pred, conf, thresholds)
  assert mask.sum() == kept.sum()
  assert not mask[pred.index(1) + 2]  # the 0.20 image of class 1


def test_empty_class_gets_no_copies():
  hist = balance.class_histograms([0, 0], [0.9, 0.9], 2)
  plan = balance.plan_balance(hist, num_image=4)
  assert plan.kept == [2, 0] and plan.factors == [2.0, 0.0]


def test_stochastic_rounding_is_unbiased_and_deterministic():
  plan = balance.plan_balance(balance.class_histograms([0] * 4, [0.9] * 4, 1), num_image=10, seed=3)
  assert plan.factors == [2.5]
  copies = [plan.copies(0, 0.9, f"img{i}") for i in range(4000)]
  assert set(copies) == {2, 3}
  assert abs(np.mean(copies) - 2.5) < 0.05
  assert copies == [plan.copies(0, 0.9, f"img{i}") for i in range(4000)]  # same seed, same copies
  other = balance.BalancePlan(**dict(plan.to_json(), seed=4))
  assert copies != [other.copies(0, 0.9, f"img{i}") for i in range(4000)]


def test_filtered_images_get_zero_copies():
  plan = balance.plan_balance(balance.class_histograms([0, 0], [0.9, 0.5], 1), num_image=1)
  assert plan.thresholds == [0.9]
  assert plan.copies(0, 0.5, "a") == 0
  assert plan.copies(0, 0.91, "b") == 1


def test_json_round_trip():
  plan = balance.plan_balance(balance.class_histograms([0, 1], [0.9, 0.6], 2), num_image=3, seed=7)
  assert balance.BalancePlan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_image=0), "num_image"), (dict(num_image=3, min_threshold=1.5), "min_threshold")])
def test_bad_arguments_fail_clearly(kwargs, message):
  with pytest.raises(ValueError, match=message):
    balance.plan_balance(np.zeros((2, 100), np.int64), **kwargs)
