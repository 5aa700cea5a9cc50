"""RandAugment ops: one property per op that a wrong implementation would break, plus the policy."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageOps

from nsjax.data import randaugment as ra

SEED = tf.constant([7, 11], tf.int64)


def _smooth_image(height=37, width=45, seed=0, low=40, high=170) -> np.ndarray:
  """A natural-ish (spatially smooth, low contrast) uint8 RGB image."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)
  resized = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), np.float32)
  return (low + resized * (high - low) / 255.0).astype(np.uint8)


def _noise_image(height=37, width=53, seed=1) -> np.ndarray:
  """Random pixels that avoid 128, so any 128 in an output was written by a fill."""
  values = np.random.default_rng(seed).integers(0, 255, (height, width, 3)).astype(np.uint8)
  return np.where(values >= 128, values + 1, values).astype(np.uint8)


def _max_diff(a, b) -> int:
  return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


# --- level mapping and config -----------------------------------------------------------------------


def test_level_mapping_matches_official_table():
  imagenet = ra.RandAugmentConfig()
  svhn = ra.RandAugmentConfig.for_small_images()
  expected = {
      ("Rotate", 10): 30.0, ("Rotate", 27): 81.0, ("ShearX", 10): 0.3, ("ShearY", 5): 0.15,
      ("TranslateX", 10): 100.0, ("TranslateY", 27): 270.0, ("Color", 0): 0.1, ("Contrast", 5): 1.0,
      ("Brightness", 10): 1.9, ("Sharpness", 27): 0.1 + 1.8 * 2.7, ("Posterize", 10): 4,
      ("Posterize", 5): 2, ("Posterize", 27): 8, ("Posterize", 0): 1, ("Solarize", 10): 256,
      ("Solarize", 5): 128, ("SolarizeAdd", 10): 110, ("SolarizeAdd", 27): 297, ("Cutout", 10): 40,
      ("Cutout", 27): 108,
  }
  for (name, magnitude), value in expected.items():
    assert ra.op_argument(name, magnitude, imagenet) == pytest.approx(value), (name, magnitude)
  for name in ("AutoContrast", "Equalize", "Invert"):
    assert ra.op_argument(name, 10, imagenet) is None
  assert ra.op_argument("TranslateX", 10, svhn) == pytest.approx(4.0)
  assert ra.op_argument("Cutout", 5, svhn) == 2
  assert (svhn.num_layers, svhn.magnitude) == (2, 5.0)
  with pytest.raises(ValueError, match="Unknown RandAugment op"):
    ra.op_argument("Blur", 10, imagenet)


def test_official_imagenet_magnitudes_and_op_list():
  assert ra.imagenet_config("efficientnet-b0") is None
  assert ra.imagenet_config("efficientnet-b4").magnitude == 15
  b7 = ra.imagenet_config("efficientnet-b7")
  assert (b7.num_layers, b7.magnitude) == (2, 27)
  assert ra.imagenet_config("efficientnet-l2").magnitude == 27
  with pytest.raises(ValueError, match="No official RandAugment magnitude"):
    ra.imagenet_config("resnet-50")
  assert len(ra.OP_NAMES) == 16 and ra.OP_NAMES[-1] == "Cutout"
  assert ra.RandAugmentConfig(cutout_op=False).op_names == ra.OP_NAMES[:-1]
  with pytest.raises(ValueError, match="magnitude"):
    ra.RandAugmentConfig(magnitude=-1)
  with pytest.raises(ValueError, match="contrast_mode"):
    ra.RandAugmentConfig(contrast_mode="torch")


# --- every op: shape, dtype, robustness ---------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 53), (2, 3)])
def test_all_ops_keep_shape_and_dtype(size):
  image = tf.constant(_noise_image(*size))
  config = ra.RandAugmentConfig()
  for magnitude in (0, 5, 10, 27):
    for name in ra.OP_NAMES:
      out = ra.apply_op(image, name, magnitude, SEED, config)
      assert out.dtype == tf.uint8 and tuple(out.shape) == (*size, 3), (name, magnitude, out.shape)


# --- geometric ops ----------------------------------------------------------------------------------


def test_geometric_ops_by_zero_are_identity():
  image = _noise_image()
  for op in (ra.rotate, ra.shear_x, ra.shear_y, ra.translate_x, ra.translate_y):
    np.testing.assert_array_equal(op(image, 0.0).numpy(), image, err_msg=op.__name__)
  for name in ra.GEOMETRIC_OPS:
    np.testing.assert_array_equal(ra.apply_op(image, name, 0, SEED).numpy(), image, err_msg=name)


def test_rotate_90_is_a_quarter_turn_and_matches_pil():
  square = _noise_image(31, 31)
  np.testing.assert_array_equal(ra.rotate(square, 90.0).numpy(), np.rot90(square, 1))
  image = _smooth_image()
  expected = Image.fromarray(image).rotate(20, fillcolor=(128, 128, 128))
  np.testing.assert_array_equal(ra.rotate(image, 20.0).numpy(), np.asarray(expected))


def test_translate_moves_content_and_fills_128():
  image = _noise_image()
  out = ra.translate_x(image, 5.0).numpy()
  np.testing.assert_array_equal(out[:, :-5], image[:, 5:])
  assert (out[:, -5:] == 128).all()
  out = ra.translate_y(image, -3.0).numpy()
  np.testing.assert_array_equal(out[3:], image[:-3])
  assert (out[:3] == 128).all()


def test_shear_x_by_one_shifts_each_row_by_its_index():
  image = _noise_image(10, 30)
  out = ra.shear_x(image, 1.0).numpy()
  for y in range(10):
    np.testing.assert_array_equal(out[y, :30 - y], image[y, y:])
    assert (out[y, 30 - y:] == 128).all()
  out = ra.shear_y(image, 1.0).numpy()
  for x in range(10):
    np.testing.assert_array_equal(out[:10 - x, x], image[x:, x])


# --- colour ops -------------------------------------------------------------------------------------


def test_invert_twice_is_identity():
  image = _noise_image()
  once = ra.invert(image).numpy()
  np.testing.assert_array_equal(once, 255 - image)
  np.testing.assert_array_equal(ra.invert(once).numpy(), image)


def test_solarize_inverts_only_pixels_at_or_above_threshold():
  image = _noise_image()
  out = ra.solarize(image, 100).numpy()
  below = image < 100
  np.testing.assert_array_equal(out[below], image[below])
  np.testing.assert_array_equal(out[~below], 255 - image[~below])
  np.testing.assert_array_equal(ra.solarize(image, 256).numpy(), image)


def test_solarize_add_adds_only_below_threshold():
  image = _noise_image()
  out = ra.solarize_add(image, 30).numpy().astype(int)
  below = image < 128
  np.testing.assert_array_equal(out[below], np.minimum(image[below].astype(int) + 30, 255))
  np.testing.assert_array_equal(out[~below], image[~below])
  assert below.any() and (out[below] != image[below]).all()


def test_posterize_keeps_only_top_bits():
  image = _noise_image()
  np.testing.assert_array_equal(ra.posterize(image, 3).numpy(), image & 0b11100000)
  np.testing.assert_array_equal(ra.posterize(image, 1).numpy(), image & 0b10000000)
  np.testing.assert_array_equal(ra.posterize(image, 8).numpy(), image)
  np.testing.assert_array_equal(
      ra.apply_op(image, "Posterize", 27, SEED).numpy(), image)  # 10.8 bits clipped to 8


def test_enhance_ops_with_factor_one_are_identity():
  image = _noise_image()
  for op in (ra.brightness, ra.color, ra.contrast, ra.sharpness):
    np.testing.assert_array_equal(op(image, 1.0).numpy(), image, err_msg=op.__name__)
  np.testing.assert_array_equal(ra.contrast(image, 1.0, mode="official").numpy(), image)


@pytest.mark.parametrize("factor", [0.0, 0.5, 1.9])
def test_enhance_ops_match_pil(factor):
  image = _smooth_image()
  pil = Image.fromarray(image)
  assert _max_diff(ra.brightness(image, factor), ImageEnhance.Brightness(pil).enhance(factor)) == 0
  assert _max_diff(ra.contrast(image, factor), ImageEnhance.Contrast(pil).enhance(factor)) == 0
  assert _max_diff(ra.sharpness(image, factor), ImageEnhance.Sharpness(pil).enhance(factor)) == 0
  # Colour's grey uses TF's luma weights (PIL: integer 299/587/114): off by at most one level.
  assert _max_diff(ra.color(image, factor), ImageEnhance.Color(pil).enhance(factor)) <= 1


def test_contrast_official_mode_blends_towards_pixel_count_over_256():
  image = _noise_image(32, 32)  # 1024 pixels -> the official code's "mean" is 4
  np.testing.assert_array_equal(ra.contrast(image, 0.0, mode="official").numpy(), 4)
  assert (ra.color(image, 0.0).numpy() == ra.color(image, 0.0).numpy()[:, :, :1]).all()


def test_autocontrast_stretches_each_channel_to_full_range():
  image = _smooth_image(low=40, high=170)
  out = ra.autocontrast(image).numpy()
  assert (out.reshape(-1, 3).min(0) == 0).all() and (out.reshape(-1, 3).max(0) == 255).all()
  assert image.reshape(-1, 3).max(0).max() <= 170  # the input did not span the range
  assert _max_diff(out, ImageOps.autocontrast(Image.fromarray(image))) <= 1
  flat = np.full((5, 5, 3), 77, np.uint8)
  np.testing.assert_array_equal(ra.autocontrast(flat).numpy(), flat)


def test_equalize_matches_pil_and_flattens_histogram():
  image = _smooth_image(low=60, high=140)
  out = ra.equalize(image).numpy()
  np.testing.assert_array_equal(out, np.asarray(ImageOps.equalize(Image.fromarray(image))))

  def cdf_distance_from_uniform(x):
    cdf = np.cumsum(np.bincount(x[:, :, 0].ravel(), minlength=256)) / x[:, :, 0].size
    return np.abs(cdf - np.linspace(1 / 256, 1, 256)).max()
  assert cdf_distance_from_uniform(out) < 0.5 * cdf_distance_from_uniform(image)


# --- cutout -----------------------------------------------------------------------------------------


def test_cutout_fills_exactly_the_square_with_128():
  image = _noise_image()
  out = ra.cutout(image, 5, (20, 25)).numpy()
  expected = image.copy()
  expected[15:25, 20:30] = 128
  np.testing.assert_array_equal(out, expected)
  assert (out != image).all(axis=2).sum() == 100


def test_random_cutout_is_seeded_and_clipped_to_the_image():
  image = _noise_image()
  outs = [ra.random_cutout(image, 6, tf.constant([s, 3])).numpy() for s in range(6)]
  for out in outs:
    changed = (out != image).any(axis=2)
    assert 0 < changed.sum() <= 144 and (out[changed] == 128).all()
  assert len({o.tobytes() for o in outs}) > 1
  np.testing.assert_array_equal(ra.random_cutout(image, 6, tf.constant([0, 3])).numpy(), outs[0])


# --- the policy -------------------------------------------------------------------------------------


def test_same_seed_same_output_different_seed_different():
  image = _smooth_image()
  config = ra.RandAugmentConfig(magnitude=15)
  first = ra.randaugment(image, SEED, config).numpy()
  np.testing.assert_array_equal(ra.randaugment(image, SEED, config).numpy(), first)
  others = [ra.randaugment(image, tf.constant([s, 1]), config).numpy() for s in range(6)]
  assert len({o.tobytes() for o in others + [first]}) >= 4


def test_layers_are_applied_in_order_with_uniform_op_choice():
  image = _smooth_image()
  config = ra.RandAugmentConfig(num_layers=3, magnitude=9)
  seed = tf.constant([5, 6], tf.int64)
  choices, op_seeds = ra.layer_plan(seed, config)
  expected = tf.constant(image)
  for layer in range(3):
    expected = ra.apply_op(expected, config.op_names[int(choices[layer])], 9, op_seeds[layer], config)
  np.testing.assert_array_equal(ra.randaugment(image, seed, config).numpy(), expected.numpy())
  np.testing.assert_array_equal(
      ra.randaugment(image, seed, ra.RandAugmentConfig(num_layers=0)).numpy(), image)

  counts = np.zeros(16, int)
  for s in range(320):
    for op_index in ra.layer_plan(tf.constant([s, 0]), ra.RandAugmentConfig())[0].numpy():
      counts[op_index] += 1
  assert counts.sum() == 640 and counts.min() >= 15 and counts.max() <= 70, counts


def test_randaugment_rejects_wrong_input():
  with pytest.raises(TypeError, match="uint8"):
    ra.randaugment(tf.zeros([8, 8, 3], tf.float32), SEED)
  with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
    ra.randaugment(tf.zeros([8, 8, 1], tf.uint8), SEED)


def test_randaugment_inside_parallel_tf_data_map():
  image = tf.constant(_noise_image(33, 29))
  config = ra.RandAugmentConfig(magnitude=27)
  dataset = tf.data.Dataset.range(16).map(
      lambda i: (i, ra.randaugment(image, tf.stack([i, i + 1]), config)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  by_index = {int(i): out.numpy() for i, out in dataset}
  assert sorted(by_index) == list(range(16))
  for i in (0, 9):
    np.testing.assert_array_equal(
        by_index[i], ra.randaugment(image, tf.constant([i, i + 1], tf.int64), config).numpy())


def test_each_layer_calls_its_op_instead_of_being_lowered_into_all_sixteen():
  """tf.switch_case's Case is lowered into Switch/Merge (all 16 ops' nodes in every image's graph,
  dead tensors through 15 of them); randaugment's Case stays a call of the drawn op's function.
  The images are the same as applying the drawn ops in turn (test above), for int32 and int64
  seeds alike."""
  config = ra.RandAugmentConfig(num_layers=2, magnitude=9)
  for dtype in (tf.int32, tf.int64):
    fn = tf.function(lambda image, seed: ra.randaugment(image, seed, config))
    graph = fn.get_concrete_function(tf.TensorSpec([None, None, 3], tf.uint8),
                                     tf.TensorSpec([2], dtype)).graph
    cases = [op for op in graph.get_operations() if op.type == "Case"]
    assert len(cases) == 2
    for op in cases:
      try:
        lowered = op.get_attr("_lower_using_switch_merge")
      except ValueError:
        lowered = False
      assert not lowered
    image = _smooth_image()
    seed = tf.constant([3, 4], dtype)
    choices, op_seeds = ra.layer_plan(seed, config)
    expected = tf.constant(image)
    for layer in range(2):
      expected = ra.apply_op(expected, config.op_names[int(choices[layer])], 9, op_seeds[layer],
                             config)
    np.testing.assert_array_equal(fn(image, seed).numpy(), expected.numpy())
