"""Preprocessing views: crop geometry against numpy references, seeds, flips, decoding, tf.data use."""
from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from nsjax.data import preprocess as pp
from nsjax.data import randaugment as ra


def _image(height, width, seed=0) -> np.ndarray:
  """Random pixels avoiding 128 (so cutout fills are recognisable)."""
  values = np.random.default_rng(seed).integers(0, 255, (height, width, 3)).astype(np.uint8)
  return np.where(values >= 128, values + 1, values).astype(np.uint8)


def _encode(image: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, fmt)
  return buffer.getvalue()


def _bicubic(image: np.ndarray, size: int) -> np.ndarray:
  return tf.image.resize(image.astype(np.float32), [size, size], method="bicubic").numpy()


# --- shapes and formats -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(61, 47, 3), (9, 13), (20, 20, 1), (15, 33, 4), (1, 1, 3)])
def test_views_output_float32_resolution_for_any_input(shape):
  image = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
  config = ra.RandAugmentConfig(magnitude=27)
  views = [pp.train_view(image, [1, 2], 40), pp.train_view(image, [1, 2], 40, randaugment=config),
           pp.eval_view(image, 40), pp.eval_view(image, 24, small_image=True),
           pp.train_view(image, [3, 4], 24, small_image=True, randaugment=config, cutout=16)]
  for view, size in zip(views, (40, 40, 40, 24, 24)):
    assert view.dtype == tf.float32 and tuple(view.shape) == (size, size, 3)
    assert np.isfinite(view.numpy()).all()


def test_grayscale_becomes_three_equal_channels():
  grey = _image(28, 28)[:, :, 0]
  for image in (grey, grey[:, :, None], np.stack([grey, grey], axis=2)):  # HxW, HxWx1, grey+alpha
    rgb = pp.to_rgb_uint8(image).numpy()
    assert rgb.shape == (28, 28, 3)
    for c in range(3):
      np.testing.assert_array_equal(rgb[:, :, c], grey)
  view = pp.eval_view(grey, 32, small_image=True, normalized=False).numpy()
  np.testing.assert_allclose(view[:, :, 0], view[:, :, 2])
  np.testing.assert_allclose(view, _bicubic(np.repeat(grey[:, :, None], 3, 2), 32), atol=1e-4)
  rgba = np.concatenate([_image(5, 6), np.zeros((5, 6, 1), np.uint8)], axis=2)
  np.testing.assert_array_equal(pp.to_rgb_uint8(rgba).numpy(), rgba[:, :, :3])


def test_channel_count_known_only_at_run_time():
  """The static fast paths and the run-time gather agree (decode_image without `channels`)."""
  dynamic = tf.function(pp.to_rgb_uint8,
                        input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
  rgb = _image(5, 6)
  grey = rgb[:, :, :1]
  rgba = np.concatenate([rgb, np.full((5, 6, 1), 7, np.uint8)], axis=2)
  for image, expected in ((rgb, rgb), (rgba, rgb), (grey, np.repeat(grey, 3, axis=2))):
    np.testing.assert_array_equal(dynamic(image).numpy(), expected)
    np.testing.assert_array_equal(pp.to_rgb_uint8(image).numpy(), expected)
  with pytest.raises(tf.errors.InvalidArgumentError, match="at most 4 channels"):
    dynamic(np.zeros((2, 2, 5), np.uint8))


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(TypeError, match="integer image"):
    pp.eval_view(np.zeros((8, 8, 3), np.float32), 8)
  with pytest.raises(ValueError, match="reflect-pads"):
    pp.train_view(np.zeros((8, 8, 3), np.uint8), [0, 0], 4, small_image=True)
  with pytest.raises(ValueError, match="resolution"):
    pp.eval_view(np.zeros((8, 8, 3), np.uint8), 0)


# --- eval view --------------------------------------------------------------------------------------


def test_eval_view_takes_the_center_224_of_a_256_image():
  image = _image(256, 256)
  view = pp.eval_view(image, 224, normalized=False).numpy()
  np.testing.assert_allclose(view, image[16:240, 16:240].astype(np.float32), atol=1e-3)


def test_eval_view_crop_window_matches_numpy_reference():
  image = _image(300, 400)
  size = int(64 / (64 + 32) * 300)  # 200: S/(S+32) of the short side
  top, left = (300 - size + 1) // 2, (400 - size + 1) // 2
  expected = _bicubic(image[top:top + size, left:left + size], 64)
  np.testing.assert_allclose(pp.eval_view(image, 64, normalized=False).numpy(), expected, atol=1e-3)


def test_small_image_eval_keeps_matching_size_unchanged():
  image = _image(32, 32)
  np.testing.assert_array_equal(
      pp.eval_view(image, 32, small_image=True, normalized=False).numpy(), image.astype(np.float32))


def test_normalize_uses_imagenet_mean_and_std():
  mean = np.array([0.485, 0.456, 0.406]) * 255
  std = np.array([0.229, 0.224, 0.225]) * 255
  pixels = np.stack([mean, mean + std, mean - 2 * std]).reshape(3, 1, 3).astype(np.float32)
  out = pp.normalize(pixels).numpy()
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[:, 0], [[0, 0, 0], [1, 1, 1], [-2, -2, -2]], atol=1e-5)
  np.testing.assert_allclose(pp.denormalize(out).numpy(), pixels, atol=1e-4)
  image = _image(40, 40)
  np.testing.assert_allclose(pp.eval_view(image, 40, small_image=True).numpy(),
                             (image - mean) / std, atol=1e-4)


@pytest.mark.parametrize("shape", [(5, 7, 3), (2, 5, 7, 3), (1, 1, 3), (4, 3)])
def test_normalize_rows_equal_the_channel_broadcast_bit_for_bit(shape):
  """The fast row form gives exactly the per-channel broadcast's values, static or dynamic shape."""
  pixels = np.random.default_rng(1).integers(0, 256, shape).astype(np.uint8)
  broadcast = (pixels.astype(np.float32) - np.float32(pp.MEAN_RGB)) / np.float32(pp.STDDEV_RGB)
  np.testing.assert_array_equal(pp.normalize(pixels).numpy(), broadcast)
  dynamic = tf.function(pp.normalize, input_signature=[
      tf.TensorSpec([None] * (len(shape) - 1) + [3], tf.uint8)])
  np.testing.assert_array_equal(dynamic(pixels).numpy(), broadcast)
  assert pp.normalize(pixels).shape == shape


def test_normalize_refuses_other_channel_counts():
  with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
    pp.normalize(np.zeros((4, 4, 2), np.uint8))


# --- train view -------------------------------------------------------------------------------------


def test_train_view_is_deterministic_per_seed():
  image = _image(90, 70)
  config = ra.RandAugmentConfig(magnitude=10)
  a = pp.train_view(image, [5, 9], 48, randaugment=config).numpy()
  np.testing.assert_array_equal(pp.train_view(image, [5, 9], 48, randaugment=config).numpy(), a)
  others = {pp.train_view(image, [s, 9], 48, randaugment=config).numpy().tobytes() for s in range(5)}
  assert len(others | {a.tobytes()}) >= 5


def test_random_crop_window_respects_area_and_aspect_ranges():
  shape = tf.constant([200, 300, 3])
  areas, fallbacks = [], 0
  for s in range(60):
    _, size = pp.random_crop_window(shape, tf.constant([s, 1]))
    h, w = size.numpy()
    if h == 200 and w == 300:
      fallbacks += 1  # no valid box found in 10 attempts: the view uses the centre crop instead
      continue
    areas.append(h * w / (200 * 300))
    assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03, (h, w)
  assert min(areas) >= 0.08 - 0.01 and max(areas) <= 1.0
  assert np.std(areas) > 0.1 and fallbacks < 30


def test_flip_happens_about_half_the_time():
  image = _image(50, 64)
  flipped = 0
  for s in range(40):
    plain = pp.train_view(image, [s, 2], 32, flip=False, normalized=False).numpy()
    view = pp.train_view(image, [s, 2], 32, normalized=False).numpy()
    if np.array_equal(view, plain[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(view, plain)
  assert 10 <= flipped <= 30, flipped


def _matching_windows(view: np.ndarray, padded: np.ndarray, size: int) -> list[tuple[int, int]]:
  span = padded.shape[0] - size + 1
  return [(y, x) for y in range(span) for x in range(span)
          if np.array_equal(padded[y:y + size, x:x + size], view)]


def test_small_image_recipe_is_a_reflect_padded_crop_without_flip():
  image = _image(32, 32)
  padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode="reflect")
  offsets = set()
  for s in range(12):
    view = pp.train_view(image, [s, 0], 32, small_image=True, normalized=False).numpy()
    assert view.shape == (32, 32, 3)
    matches = _matching_windows(view.astype(np.uint8), padded, 32)
    assert len(matches) == 1, f"seed {s}: not an unflipped 32 px window of the padded image"
    offsets.add(matches[0])
  assert len(offsets) >= 6


def _unreflect(padded_index: np.ndarray, size: int, pad: int = 4) -> np.ndarray:
  """Index into a reflect-padded axis -> the source index in the unpadded axis."""
  index = np.abs(padded_index - pad)
  return np.where(index > size - 1, 2 * (size - 1) - index, index)


def test_small_image_cutout_is_one_16px_square_before_padding():
  image = _image(32, 32)
  padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode="reflect")
  filled_any = False
  for s in range(8):
    view = pp.train_view(image, [s, 1], 32, small_image=True, cutout=16, normalized=False).numpy()
    filled = (view == 128).all(axis=2)
    offsets = [(y, x) for y in range(9) for x in range(9)
               if np.array_equal(padded[y:y + 32, x:x + 32][~filled], view[~filled])]
    assert len(offsets) == 1, f"seed {s}: the rest of the view is not one window of the padded image"
    rows, cols = np.nonzero(filled)
    if rows.size:
      filled_any = True
      # Cutout runs before the reflect-pad (official order): in source coordinates it is one square.
      source_rows = _unreflect(rows + offsets[0][0], 32)
      source_cols = _unreflect(cols + offsets[0][1], 32)
      assert np.ptp(source_rows) < 16 and np.ptp(source_cols) < 16
  assert filled_any


def test_teacher_and_student_views_share_the_record():
  image = _image(120, 90)
  config = ra.RandAugmentConfig(magnitude=12)
  teacher, student = pp.teacher_and_student_views(image, [4, 4], 56, 40, randaugment=config)
  assert teacher.shape == (56, 56, 3) and student.shape == (40, 40, 3)
  np.testing.assert_array_equal(teacher.numpy(), pp.eval_view(image, 56).numpy())
  np.testing.assert_array_equal(student.numpy(),
                                pp.train_view(image, [4, 4], 40, randaugment=config).numpy())


# --- decoding and tf.data ---------------------------------------------------------------------------


def test_decode_flags_corrupt_bytes_instead_of_raising():
  image = _image(20, 30)
  png = _encode(image, "PNG")
  bad_crc = bytearray(png)
  bad_crc[100:140] = b"\x55" * 40
  cases = {"png": (png, True), "jpeg": (_encode(image, "JPEG"), True), "gif": (_encode(image, "GIF"), True),
           "empty": (b"", False), "garbage": (b"not an image at all", False),
           "truncated jpeg": (_encode(image, "JPEG")[:300], False), "bad crc png": (bytes(bad_crc), False)}
  for name, (data, expect_ok) in cases.items():
    decoded, ok = pp.decode(tf.constant(data))
    assert bool(ok) == expect_ok, name
    assert decoded.dtype == tf.uint8 and decoded.shape[2] == 3
    if expect_ok:
      assert tuple(decoded.shape) == (20, 30, 3)
  np.testing.assert_array_equal(pp.decode(png)[0].numpy(), image)
  grey_png = _encode(image[:, :, 0], "PNG")
  np.testing.assert_array_equal(pp.decode(grey_png)[0].numpy()[:, :, 2], image[:, :, 0])


def test_parallel_pipeline_skips_and_counts_bad_records_deterministically():
  good = [_encode(_image(24 + i, 30, seed=i), "PNG") for i in range(6)]
  records = [good[0], b"junk", good[1], good[2], b"", good[3], good[4], b"\x89PNG", good[5]]
  config = ra.RandAugmentConfig(magnitude=9)

  def prepare(index, data):
    image, ok = pp.decode(data)
    seed = pp.example_seed(1234, index, epoch=0)
    return {"index": index, "ok": ok,
            "image": pp.train_view(image, seed, 24, randaugment=config)}

  def run():
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(records), dtype=tf.int64), tf.constant(records)))
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return list(pp.drop_bad_records(dataset).as_numpy_iterator())

  first, second = run(), run()
  assert [int(r["index"]) for r in first] == [0, 2, 3, 5, 6, 8]
  assert [int(r["num_skipped"]) for r in first] == [0, 1, 1, 2, 2, 3]
  for a, b in zip(first, second):
    assert a["image"].shape == (24, 24, 3)
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_example_seed_depends_on_seed_epoch_and_index():
  seeds = {tuple(pp.example_seed(s, i, e).numpy()) for s in (0, 1) for i in (0, 1) for e in (0, 1)}
  assert len(seeds) == 8
  np.testing.assert_array_equal(pp.example_seed(3, 5, 2).numpy(), pp.example_seed(3, 5, 2).numpy())
