"""Metrics and robustness bookkeeping against hand-computed values."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from PIL import Image

from nsjax.evaluate import metrics, robustness


# --------------------------------------------------------------------------------------------------
# Top-k with masks.

LOGITS = np.array([[0.1, 0.9, 0.3, 0.2, 0.0, 0.5],   # ranking 1, 5, 2, 3, 0, 4
                   [2.0, 1.0, 0.0, 3.0, 4.0, 5.0],   # ranking 5, 4, 3, 0, 1, 2
                   [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],   # ranking 2, then ties 0, 1, 3, 4, 5
                   [9.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
LABELS = np.array([1, 3, 5, 2])


def test_topk_correct_counts_hits_and_respects_the_mask():
  counts = metrics.topk_correct(LOGITS, LABELS, ks=(1, 2, 5))
  # Example 0: label 1 is top-1. Example 1: label 3 is 3rd. Example 2: label 5 is 6th (ties go to
  # lower indices). Example 3: label 2 ties with 1..5 behind 0; lower index first -> 3rd (0, 1, 2).
  assert float(counts["top1"]) == 1
  assert float(counts["top2"]) == 1
  assert float(counts["top5"]) == 3
  assert float(counts["count"]) == 4
  masked = metrics.topk_correct(LOGITS, LABELS, ks=(1, 5), mask=np.array([0, 1, 1, 1]))
  assert float(masked["top1"]) == 0 and float(masked["top5"]) == 2 and float(masked["count"]) == 3


def test_topk_accumulator_over_batches():
  acc = metrics.TopKAccumulator(ks=(1, 5))
  acc.update(LOGITS[:2], LABELS[:2], mask=np.array([1, 1]))
  acc.update(LOGITS[2:], LABELS[2:], mask=np.array([True, False]))  # example 3 is padding
  result = acc.result()
  assert result == {"top1": 1 / 3, "top5": 2 / 3, "count": 3.0}
  with pytest.raises(ValueError, match="No unmasked"):
    metrics.TopKAccumulator().result()


def test_topk_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="logits"):
    metrics.topk_correct(LOGITS, LABELS[:3])


# --------------------------------------------------------------------------------------------------
# Class subsets.

def test_subset_predict_ignores_classes_outside_the_subset():
  indices = np.array([1, 4, 7])
  logits = np.zeros((3, 10), np.float32)
  logits[0, [0, 4, 7]] = [9.0, 2.0, 1.0]   # global argmax 0 (outside) -> subset winner 4
  logits[1, [9, 1, 4, 7]] = [5.0, -1.0, -3.0, -2.0]  # global argmax 9 (outside) -> subset winner 1
  logits[2, [7, 3]] = [3.0, 8.0]            # global argmax 3 (outside) -> subset winner 7
  np.testing.assert_array_equal(metrics.subset_predict(logits, indices), [4, 1, 7])
  np.testing.assert_array_equal(metrics.subset_predict(logits, indices, "subset"), [1, 0, 2])
  # Both label conventions score the same examples as correct.
  full = metrics.subset_topk_correct(logits, np.array([4, 7, 7]), indices, "full", ks=(1, 2))
  local = metrics.subset_topk_correct(logits, np.array([1, 2, 2]), indices, "subset", ks=(1, 2))
  for counts in (full, local):
    assert float(counts["top1"]) == 2 and float(counts["top2"]) == 3 and float(counts["count"]) == 3
  # A plain 10-way argmax would have got none of them right.
  assert not np.any(np.argmax(logits, 1) == np.array([4, 7, 7]))


def test_subset_labels_outside_the_subset_raise_and_map_to_wrong_under_jit():
  import jax
  indices = np.array([1, 4, 7])
  logits = np.eye(10, dtype=np.float32)[[4, 2]]
  with pytest.raises(ValueError, match=r"\[2\] are not in the class subset"):
    metrics.subset_topk_correct(logits, np.array([4, 2]), indices)
  jitted = jax.jit(lambda l, y: metrics.subset_topk_correct(l, y, indices, ks=(1,)))
  assert float(jitted(logits, np.array([4, 2]))["top1"]) == 1
  with pytest.raises(ValueError, match="label_space"):
    metrics.subset_predict(logits, indices, "1k")


def test_shared_data_path_resolution(tmp_path, monkeypatch):
  (tmp_path / "shared" / "data").mkdir(parents=True)
  (tmp_path / "shared" / "data" / "x.txt").write_text("3\n5\n")
  monkeypatch.setenv(metrics.SHARED_DIR_ENV, str(tmp_path / "shared"))
  assert metrics.shared_data_path("x.txt") == tmp_path / "shared" / "data" / "x.txt"
  monkeypatch.setenv(metrics.SHARED_DIR_ENV, str(tmp_path / "shared" / "data"))
  assert metrics.shared_data_path("x.txt") == tmp_path / "shared" / "data" / "x.txt"
  # Without the env var: <repo>/../shared/data.
  monkeypatch.delenv(metrics.SHARED_DIR_ENV)
  monkeypatch.setattr(metrics, "REPO_ROOT", tmp_path / "repo")
  assert metrics.shared_data_path("x.txt") == tmp_path / "shared" / "data" / "x.txt"
  with pytest.raises(FileNotFoundError, match=metrics.SHARED_DIR_ENV):
    metrics.shared_data_path("missing.txt")


def test_read_class_indices_validates(tmp_path):
  good = tmp_path / "good.txt"
  good.write_text("2\n10\n999\n")
  np.testing.assert_array_equal(metrics.class_subset_indices(good), [2, 10, 999])
  for text, problem in [("5\n3\n", "strictly increasing"), ("1\n1000\n", r"\[0, 1000\)"),
                        ("1\nfoo\n", "one integer"), ("", "no class indices")]:
    bad = tmp_path / "bad.txt"
    bad.write_text(text)
    with pytest.raises(ValueError, match=problem):
      metrics.class_subset_indices(bad)
  with pytest.raises(FileNotFoundError, match="imagenet_a"):
    metrics.class_subset_indices(tmp_path / "nope.txt")


def test_imagenet_a_and_r_lists_from_the_shared_directory():
  try:
    a = metrics.class_subset_indices("imagenet_a")
    r = metrics.class_subset_indices("imagenet_r")
  except FileNotFoundError as err:
    pytest.skip(f"shared data directory not present: {err}")
  assert a.shape == r.shape == (200,)
  assert np.all(np.diff(a) > 0) and np.all(np.diff(r) > 0)
  assert not np.array_equal(a, r)  # different 200-class lists


# --------------------------------------------------------------------------------------------------
# ImageNet-C / CIFAR-10-C.

def test_alexnet_scores_mce_100_and_relative_mce_100():
  summary = robustness.imagenet_c_summary(robustness.alexnet_results(),
                                          clean_error=robustness.ALEXNET_CLEAN_ERROR)
  assert summary["mCE"] == pytest.approx(100.0, abs=1e-9)
  assert summary["relative_mCE"] == pytest.approx(100.0, abs=1e-9)
  assert all(ce == pytest.approx(1.0) for ce in summary["CE"].values())
  assert summary["num_settings"] == 75
  all_errors = [e for errors in robustness.ALEXNET_ERRORS.values() for e in errors]
  assert summary["top1"] == pytest.approx(1.0 - sum(all_errors) / 75)
  json.dumps(summary)  # JSON-ready


def test_ce_and_relative_ce_hand_computed():
  # Two corruptions with made-up baselines so the arithmetic is checkable by hand.
  baseline = {"a": (0.5, 0.6, 0.7, 0.8, 0.9), "b": (0.2, 0.2, 0.2, 0.2, 0.2)}
  results = {("a", s): e for s, e in zip(range(1, 6), (0.1, 0.2, 0.3, 0.4, 0.5))}
  results |= {("b", s): 0.3 for s in range(1, 6)}
  summary = robustness.imagenet_c_summary(results, clean_error=0.05, alexnet_errors=baseline,
                                          alexnet_clean_error=0.1, corruptions=("a", "b"))
  # CE_a = 1.5 / 3.5, CE_b = 1.5 / 1.0.
  assert summary["CE"]["a"] == pytest.approx(1.5 / 3.5)
  assert summary["CE"]["b"] == pytest.approx(1.5)
  assert summary["mCE"] == pytest.approx(100 * (1.5 / 3.5 + 1.5) / 2)
  # Relative: a = (1.5 - 0.25) / (3.5 - 0.5), b = (1.5 - 0.25) / (1.0 - 0.5).
  assert summary["relative_CE"]["a"] == pytest.approx(1.25 / 3.0)
  assert summary["relative_CE"]["b"] == pytest.approx(2.5)
  assert summary["relative_mCE"] == pytest.approx(100 * (1.25 / 3.0 + 2.5) / 2)
  assert summary["mean_error"] == pytest.approx((1.5 + 1.5) / 10)
  assert summary["top1"] == pytest.approx(0.7)
  assert robustness.corruption_error([0.2] * 5, [0.4] * 5) == pytest.approx(0.5)


def test_imagenet_c_summary_rejects_incomplete_or_percent_results():
  results = robustness.alexnet_results()
  del results[("fog", 3)]
  with pytest.raises(ValueError, match="fog_3"):
    robustness.imagenet_c_summary(results)
  results = {key: 100 * e for key, e in robustness.alexnet_results().items()}
  with pytest.raises(ValueError, match="fractions"):
    robustness.imagenet_c_summary(results)


def test_imagenet_c_summary_on_a_subset_of_severities():
  """Partial CEs: both sums run over the chosen severities only (AlexNet still scores 100)."""
  results = {k: e for k, e in robustness.alexnet_results().items() if k[1] in (2, 4)}
  summary = robustness.imagenet_c_summary(results, severities=(2, 4),
                                          clean_error=robustness.ALEXNET_CLEAN_ERROR)
  assert summary["mCE"] == pytest.approx(100.0) and summary["relative_mCE"] == pytest.approx(100.0)
  assert summary["num_settings"] == 30 and summary["severities"] == [2, 4]
  with pytest.raises(ValueError, match="gaussian_noise_1.*needs severity 1..5"):
    robustness.imagenet_c_summary(results)  # the default still needs all five
  for bad in ((), (2, 1), (0, 1), (6,)):
    with pytest.raises(ValueError, match="severities"):
      robustness.imagenet_c_summary(results, severities=bad)


def test_results_json_round_trip_and_key_spellings():
  results = robustness.alexnet_results()
  as_json = robustness.results_to_json(results)
  assert as_json["gaussian_noise_1"] == 0.69528
  assert robustness.parse_results(json.loads(json.dumps(as_json))) == results
  parsed = robustness.parse_results({"imagenet2012_corrupted/shot_noise_4": 0.5, "fog/2": 0.25,
                                     ("snow", 1): 0.75})
  assert parsed == {("shot_noise", 4): 0.5, ("fog", 2): 0.25, ("snow", 1): 0.75}
  with pytest.raises(ValueError, match="Cannot read"):
    robustness.parse_results({"fog_9": 0.1})


def test_cifar10_c_mean_error_accepts_both_spellings():
  results = {(c, s): 0.01 * s for c in robustness.CORRUPTIONS for s in range(1, 6)}
  results[("glass_blur", 5)] = 0.55  # ImageNet-C spelling of frosted_glass_blur
  summary = robustness.cifar10_c_summary(results)
  assert summary["per_corruption"]["frosted_glass_blur"] == pytest.approx((0.10 + 0.55) / 5)
  assert summary["per_corruption"]["elastic"] == pytest.approx(0.03)
  assert summary["mean_error"] == pytest.approx((14 * 0.15 + 0.65) / 75)
  assert summary["top1"] == pytest.approx(1 - summary["mean_error"])


def test_tfds_names():
  assert robustness.imagenet_c_tfds_name("gaussian_noise", 3) == \
      "imagenet2012_corrupted/gaussian_noise_3"
  assert robustness.cifar10_c_tfds_name("glass_blur", 2) == "cifar10_corrupted/frosted_glass_blur_2"
  assert robustness.cifar10_c_tfds_name("elastic_transform", 5) == "cifar10_corrupted/elastic_5"
  names = robustness.tfds_names("cifar10_corrupted")
  assert len(names) == 75 and names[("elastic", 1)] == "cifar10_corrupted/elastic_1"
  assert len(robustness.tfds_names()) == 75
  with pytest.raises(ValueError, match="severity"):
    robustness.imagenet_c_tfds_name("fog", 6)
  with pytest.raises(ValueError, match="Unknown corruption"):
    robustness.cifar10_c_tfds_name("rain", 1)


def test_list_imagenet_c_folder_layout(tmp_path):
  for c in ("fog", "snow"):
    for s in (1, 2):
      for wnid, n in (("n01440764", 2), ("n01443537", 1)):
        (tmp_path / c / str(s) / wnid).mkdir(parents=True)
        for i in range(n):
          (tmp_path / c / str(s) / wnid / f"ILSVRC_{i}.JPEG").write_bytes(b"")
  (tmp_path / "fog" / "1" / "n01440764" / "notes.txt").write_text("not an image")
  listing = robustness.list_imagenet_c(tmp_path, corruptions=("fog", "snow"), severities=(1, 2))
  assert sorted(listing) == [("fog", 1), ("fog", 2), ("snow", 1), ("snow", 2)]
  assert [(p.name, label) for p, label in listing[("fog", 1)]] == [
      ("ILSVRC_0.JPEG", 0), ("ILSVRC_1.JPEG", 0), ("ILSVRC_0.JPEG", 1)]
  # An explicit 1000-class wnid list sets the class index.
  wnids = ["n0000", "n01440764", "n01443537"]
  listing = robustness.list_imagenet_c(tmp_path, ("fog",), (2,), wnids=wnids)
  assert [label for _, label in listing[("fog", 2)]] == [1, 1, 2]
  with pytest.raises(FileNotFoundError, match="fog/3"):
    robustness.list_imagenet_c(tmp_path, ("fog",), (3,))


# --------------------------------------------------------------------------------------------------
# ImageNet-P.

VIDEOS = [[3, 3, 5, 3, 5], [1, 2, 2, 2, 2]]


def test_flip_probability_noise_compares_to_first_frame_others_consecutive():
  # Video 0 vs its first frame: 3|5 3 5 -> 0 1 0 1 -> 1/2; video 1: 1|2 2 2 2 -> 1. Mean 3/4.
  assert robustness.flip_probability(VIDEOS, "gaussian_noise") == pytest.approx(0.75)
  assert robustness.flip_probability(VIDEOS, "shot_noise") == pytest.approx(0.75)
  # Consecutive: video 0 pairs 33 35 53 35 -> 3/4; video 1 pairs 12 22 22 22 -> 1/4. Mean 1/2.
  assert robustness.flip_probability(VIDEOS, "rotate") == pytest.approx(0.5)
  assert robustness.flip_probability(VIDEOS, noise=False) == pytest.approx(0.5)
  # Mean over videos of per-video means (not over all pairs): lengths 3 and 5.
  assert robustness.flip_probability([[0, 1, 1], [0, 0, 0, 0, 1]], "tilt") == pytest.approx(
      (1 / 2 + 1 / 4) / 2)
  # Difficulty 2: frame t vs t - 2 -> video 0 pairs (3,5) (3,3) (5,5) -> 1/3.
  assert robustness.video_flip_rate(VIDEOS[0], noise=False, difficulty=2) == pytest.approx(1 / 3)
  with pytest.raises(ValueError, match="at least 2"):
    robustness.video_flip_rate([4], noise=True)


def test_imagenet_p_summary_normalised_and_not():
  fp = {p: 0.01 * (i + 1) for i, p in enumerate(robustness.PERTURBATIONS)}
  plain = robustness.imagenet_p_summary(fp)
  assert plain["normalized"] is False and "mFR" not in plain and "unnormalised" in plain["note"]
  assert plain["mFP"] == pytest.approx(100 * 0.055)
  alexnet = {p: 0.02 * (i + 1) for i, p in enumerate(robustness.PERTURBATIONS)}
  normalised = robustness.imagenet_p_summary(fp, alexnet)
  assert normalised["normalized"] is True
  assert normalised["mFR"] == pytest.approx(50.0)
  assert normalised["FR"]["tilt"] == pytest.approx(0.5)
  with pytest.raises(ValueError, match="lack"):
    robustness.imagenet_p_summary({"rotate": 0.1})


def _write_video(directory, values):
  directory.mkdir(parents=True)
  for i, value in enumerate(values):
    Image.fromarray(np.full((4, 6, 3), value, np.uint8)).save(directory / f"{i + 1}.png")


def test_imagenet_p_frame_folders_end_to_end(tmp_path):
  # Frame 10 must sort after frame 2 (natural order), so 11 frames.
  values = [10, 10, 200, 10, 200, 10, 10, 10, 10, 10, 200]
  for p in ("gaussian_noise", "rotate"):
    _write_video(tmp_path / p / "n01440764" / "vid0", values)
    _write_video(tmp_path / p / "n01443537" / "vid1", [200] * 3)
  (tmp_path / "rotate" / "n01443537" / "vid2.mp4").write_bytes(b"not really a video")
  listing = robustness.list_imagenet_p(tmp_path, perturbations=("gaussian_noise", "rotate"))
  assert [(v.name, label) for v, label in listing["rotate"]] == [
      ("vid0", 0), ("vid1", 1), ("vid2.mp4", 1)]
  frames = robustness.read_video(listing["rotate"][0][0])
  assert frames.shape == (11, 4, 6, 3) and frames.dtype == np.uint8
  np.testing.assert_array_equal(frames[:, 0, 0, 0], values)

  def predict(batch):  # "class" = bright or dark
    return (batch.reshape(len(batch), -1).mean(axis=1) > 100).astype(int)

  folders_only = {p: videos[:2] for p, videos in listing.items()}
  fp = robustness.imagenet_p_flip_probabilities(folders_only, predict)
  # vid0 noise: frames differing from frame 0: 3 of 10; vid1: 0. Consecutive: 5 of 10 changes.
  assert fp["gaussian_noise"] == pytest.approx((3 / 10 + 0) / 2)
  assert fp["rotate"] == pytest.approx((5 / 10 + 0) / 2)


def _write_mp4(path, values, size=(32, 48)):
  """An H.264 video (as ImageNet-P's) of flat grey frames, written with PyAV."""
  import av
  path.parent.mkdir(parents=True, exist_ok=True)
  with av.open(str(path), "w") as container:
    stream = container.add_stream("libx264", rate=10)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": "10"}
    for value in values:
      frame = av.VideoFrame.from_ndarray(np.full(size + (3,), value, np.uint8), format="rgb24")
      container.mux(stream.encode(frame))
    container.mux(stream.encode())  # flush


def test_imagenet_p_official_mp4_videos_decode_and_score(tmp_path):
  """The official layout (<perturbation>/<wnid>/<video>.mp4) decodes with PyAV (a requirement)."""
  values = [10, 10, 200, 10, 200, 10, 10, 10, 10, 10, 200]
  for p in ("gaussian_noise", "rotate"):
    _write_mp4(tmp_path / p / "n01440764" / "vid0.mp4", values)
    _write_mp4(tmp_path / p / "n01443537" / "vid1.mp4", [200] * 3)
  listing = robustness.list_imagenet_p(tmp_path, perturbations=("gaussian_noise", "rotate"))
  assert [(v.name, label) for v, label in listing["rotate"]] == [("vid0.mp4", 0), ("vid1.mp4", 1)]
  frames = robustness.read_video(listing["rotate"][0][0])
  assert frames.shape == (11, 32, 48, 3) and frames.dtype == np.uint8
  np.testing.assert_allclose(frames.reshape(11, -1).mean(axis=1), values, atol=3)  # lossy codec

  def predict(batch):
    return (batch.reshape(len(batch), -1).mean(axis=1) > 100).astype(int)

  fp = robustness.imagenet_p_flip_probabilities(listing, predict)
  assert fp["gaussian_noise"] == pytest.approx((3 / 10 + 0) / 2)
  assert fp["rotate"] == pytest.approx((5 / 10 + 0) / 2)


def test_mp4_without_decoder_gives_a_clear_error(tmp_path, monkeypatch):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "av", None)  # import now raises ImportError
  monkeypatch.setitem(sys.modules, "imageio", None)
  monkeypatch.setitem(sys.modules, "imageio.v3", None)
  with pytest.raises(RuntimeError, match="no mp4 decoder.*pip install av.*ffmpeg"):
    robustness.read_video(video)
  with pytest.raises(ValueError, match="mp4 file or a directory"):
    robustness.read_video(tmp_path / "v.avi")
