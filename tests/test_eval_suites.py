"""The eval CLI and its benchmarks on mocked TFDS sets (never downloads) with tiny exported models.

The models have a zero classifier kernel, so their logits are the classifier bias whatever the
image: which class wins is set by hand, and every accuracy below is known exactly.
"""
import glob
import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags

from nsjax import exported_model, models
from nsjax.data import preprocess
from nsjax.evaluate import __main__ as cli
from nsjax.evaluate import suites, metrics, robustness

NUM_EXAMPLES = 8
TINY = dict(width=0.1, depth=0.1, block_stages=2, small_image=True, resolution=32)


def random_variables(model, seed=0):
  """Random weights of the right shapes without compiling an init (seconds instead of a minute
  on a busy CPU): normal(0, 0.1) everywhere, BatchNorm variances 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return np.ones(leaf.shape, np.float32)
    return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model))


def signal_preserving_variables(model, seed=0):
  """He-scaled kernels and unit BatchNorms: unlike `random_variables`, whose small BatchNorm
  scales shrink the signal to nothing, the prediction depends on the image."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (np.sqrt(2.0 / fan_in) * rng.standard_normal(leaf.shape)).astype(np.float32)
    ones = name.endswith(("['scale']", "['var']"))
    return (np.ones if ones else np.zeros)(leaf.shape, np.float32)
  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model))


def export_constant_model(directory, num_classes, bias):
  """A tiny EfficientNet whose logits are `bias` for every image."""
  model = models.create_model("efficientnet-b0", num_classes, **TINY)
  variables = random_variables(model)
  dense = variables["params"]["head"]["dense"]
  dense["kernel"] = np.zeros_like(dense["kernel"])
  dense["bias"] = np.asarray(bias, np.float32)
  exported_model.export_model(str(directory), model, variables, {"step": 7})
  return str(directory)


def fake_as_dataset(label_fn, size=40):
  """A mock_data `as_dataset_fn`: NUM_EXAMPLES random images, labels from label_fn(builder)."""
  def as_dataset(builder, split, decoders=None, read_config=None, **kwargs):
    del split, read_config, kwargs
    shape = builder.info.features["image"].shape  # fixed (224 px ImageNet-C) or free
    shape = shape if None not in shape else (size, size, 3)
    images = np.random.default_rng(0).integers(0, 256, (NUM_EXAMPLES,) + shape, np.uint8)
    if decoders and isinstance(decoders.get("image"), tfds.decode.SkipDecoding):
      images = [tf.io.encode_png(image).numpy() for image in images]
    labels = np.asarray(label_fn(builder), np.int64)
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
  return as_dataset


def run_cli(argv):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["nsjax.evaluate"] + argv)
  cli.main(["nsjax.evaluate"])


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory):
  """1000 classes; always answers OUTSIDE (in neither subset), runner-up SHARED (in both)."""
  a, r = metrics.class_subset_indices("imagenet_a"), metrics.class_subset_indices("imagenet_r")
  outside = int(np.setdiff1d(np.arange(1000), np.union1d(a, r))[0])
  shared = int(np.intersect1d(a, r)[3])
  only_r = int(np.setdiff1d(r, a)[0])
  bias = np.zeros(1000)
  bias[outside], bias[shared] = 100.0, 50.0
  export = export_constant_model(tmp_path_factory.mktemp("imagenet") / "export", 1000, bias)
  return dict(export=export, outside=outside, shared=shared, only_r=only_r)


def test_subset_benchmarks_ignore_logits_outside_the_subset(tmp_path, imagenet_model):
  export, shared = imagenet_model["export"], imagenet_model["shared"]
  with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset(lambda b: [shared] * NUM_EXAMPLES)):
    run_cli([f"--export={export}", "--benchmark=imagenet_a", f"--output={tmp_path}",
             "--batch_size=4", "--resolution=32"])
    under_r = suites.run_benchmark(export, "imagenet_r", batch_size=4)
    plain = suites.run_benchmark(export, "imagenet_v2", batch_size=4)
  result = json.loads((tmp_path / "imagenet_a.json").read_text())
  assert result["top1"] == 1.0 and result["num_examples"] == NUM_EXAMPLES
  assert result["num_classes"] == 200 and result["labels_outside_subset"] == 0
  assert result["dataset"] == "imagenet_a" and result["resolution"] == 32 and result["step"] == 7
  assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
  assert under_r["top1"] == 1.0 and under_r["dataset"] == "imagenet_r"
  # Unrestricted (ImageNet-V2 is plain 1000-way top-1), the model always says OUTSIDE.
  assert plain["top1"] == 0.0 and plain["dataset"] == "imagenet_v2/matched-frequency"


def test_imagenet_a_and_r_use_their_own_lists(imagenet_model):
  """A label in ImageNet-R's list but not ImageNet-A's cannot be right under A (and is counted)."""
  only_r = imagenet_model["only_r"]
  with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset(lambda b: [only_r] * NUM_EXAMPLES)):
    under_a = suites.run_benchmark(imagenet_model["export"], "imagenet_a", batch_size=4)
  assert under_a["top1"] == 0.0 and under_a["labels_outside_subset"] == NUM_EXAMPLES


def severity_labels(correct_class, wrong_class):
  """Setting <c>_<s>: the first NUM_EXAMPLES - s labels are right, so the error is s / 8."""
  def label_fn(builder):
    severity = int(builder.builder_config.name.rsplit("_", 1)[1])
    return [correct_class] * (NUM_EXAMPLES - severity) + [wrong_class] * severity
  return label_fn


def test_imagenet_c_mce_from_every_setting(tmp_path, imagenet_model):
  export = imagenet_model["export"]
  corruptions = ["gaussian_noise", "contrast", "jpeg_compression"]
  with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset(
      severity_labels(imagenet_model["outside"], imagenet_model["shared"]))):
    run_cli([f"--export={export}", "--benchmark=imagenet_c", f"--output={tmp_path}",
             "--batch_size=4", f"--corruptions={','.join(corruptions)}", "--clean_error=0.25"])
  result = json.loads((tmp_path / "imagenet_c.json").read_text())
  errors = {(c, s): s / NUM_EXAMPLES for c in corruptions for s in robustness.SEVERITIES}
  assert result["per_setting"] == pytest.approx(robustness.results_to_json(errors))
  expected = robustness.imagenet_c_summary(errors, clean_error=0.25, corruptions=corruptions)
  assert result["mCE"] == pytest.approx(expected["mCE"])
  assert result["relative_mCE"] == pytest.approx(expected["relative_mCE"])
  assert result["top1"] == pytest.approx(1 - 3 / NUM_EXAMPLES)  # mean severity 3


def write_imagenet_c_tree(root, corruptions, severities, right_wnid, wrong_wnid):
  """<root>/<c>/<s>/<wnid>/*.JPEG: 2 images of `right_wnid`, s images of `wrong_wnid`."""
  rng = np.random.default_rng(0)
  for c in corruptions:
    for s in severities:
      for wnid, count in ((right_wnid, 2), (wrong_wnid, s)):
        folder = root / c / str(s) / wnid
        folder.mkdir(parents=True)
        for i in range(count):
          image = rng.integers(0, 256, (40, 36, 3), np.uint8)
          (folder / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(tf.io.encode_jpeg(image).numpy())


def test_imagenet_c_from_the_official_folder_layout(tmp_path):
  """--imagenet_c_dir: class indices from the wnid list, errors per setting, partial mCE."""
  wnids = ["n00000001", "n01440764", "n01443537"]  # indices 0, 1, 2
  bias = np.zeros(3)
  bias[1] = 5.0  # always answers n01440764
  export = export_constant_model(tmp_path / "export", 3, bias)
  corruptions, severities = ["gaussian_noise", "fog"], [1, 2]
  root = tmp_path / "ImageNet-C"
  write_imagenet_c_tree(root, corruptions, severities, "n01440764", "n01443537")
  (root / "extra").mkdir()  # other corruptions' folders are ignored unless asked for
  wnid_file = tmp_path / "wnids.txt"
  wnid_file.write_text("\n".join(wnids) + "\n")
  run_cli([f"--export={export}", "--benchmark=imagenet_c", f"--output={tmp_path / 'out'}",
           "--batch_size=4", f"--imagenet_c_dir={root}", f"--imagenet_c_wnids={wnid_file}",
           f"--corruptions={','.join(corruptions)}", "--severities=1,2", "--clean_error=0.25"])
  result = json.loads((tmp_path / "out" / "imagenet_c.json").read_text())
  errors = {(c, s): s / (2 + s) for c in corruptions for s in severities}  # s wrong of 2 + s
  assert result["per_setting"] == pytest.approx(robustness.results_to_json(errors))
  expected = robustness.imagenet_c_summary(errors, clean_error=0.25, corruptions=corruptions,
                                           severities=severities)
  alexnet = robustness.ALEXNET_ERRORS["fog"]
  assert expected["CE"]["fog"] == pytest.approx((1 / 3 + 1 / 2) / (alexnet[0] + alexnet[1]))
  assert result["mCE"] == pytest.approx(expected["mCE"])
  assert result["relative_mCE"] == pytest.approx(expected["relative_mCE"])
  assert result["severities"] == [1, 2] and result["num_settings"] == 4
  assert result["dataset"] == str(root) and result["split"] == "folder"
  # Without the list, the sorted class folders are the classes: n01440764 -> 0, n01443537 -> 1,
  # so the model's answer (1) is now right for the s images of n01443537 only.
  plain = suites.run_benchmark(export, "imagenet_c", batch_size=4, imagenet_c_dir=str(root),
                                   corruptions=corruptions, severities=severities)
  assert plain["per_setting"]["fog_1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("process", [0, 1, 2])
def test_folder_batches_give_each_host_its_contiguous_share(tmp_path, monkeypatch, process):
  """7 files over 3 hosts: shares [0,3) [3,5) [5,7) (as the eval stage's), padded to 2 batches."""
  items = []
  for i in range(7):
    path = tmp_path / f"{i}.png"
    path.write_bytes(tf.io.encode_png(np.full((8, 8, 3), i, np.uint8)).numpy())
    items.append((str(path), i))
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  monkeypatch.setattr(jax, "process_index", lambda: process)
  model = models.create_model("efficientnet-b0", 10, **TINY)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  batches = list(suites.folder_batches(items, model, mesh=mesh, batch_size=6))
  assert len(batches) == 2 and all(len(b["label"]) == 2 for b in batches)
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  start, end = [(0, 3), (3, 5), (5, 7)][process]
  assert labels[mask].tolist() == list(range(start, end))


def test_imagenet_p_cli_on_official_mp4_videos(tmp_path):
  """--benchmark=imagenet_p on <dir>/<perturbation>/<wnid>/<video>.mp4: the flip probabilities of
  the model's own per-frame predictions, and mFR against a normaliser table."""
  from test_eval_metrics import _write_mp4
  rng = np.random.default_rng(0)
  perturbations = ["gaussian_noise", "rotate"]
  for p in perturbations:
    for wnid, video in (("n01440764", "a"), ("n01440764", "b"), ("n01443537", "c")):
      _write_mp4(tmp_path / "P" / p / wnid / f"{video}.mp4", list(rng.integers(0, 256, 6)))
  model = models.create_model("efficientnet-b0", 3, **TINY)
  variables = signal_preserving_variables(model, seed=2)
  exported_model.export_model(str(tmp_path / "export"), model, variables, {"step": 1})
  table = {"gaussian_noise": 0.5, "rotate": 0.25}
  (tmp_path / "alexnet.json").write_text(json.dumps(table))
  run_cli([f"--export={tmp_path / 'export'}", "--benchmark=imagenet_p",
           f"--imagenet_p_dir={tmp_path / 'P'}", f"--perturbations={','.join(perturbations)}",
           f"--alexnet_flip_probabilities={tmp_path / 'alexnet.json'}", "--batch_size=4",
           f"--output={tmp_path / 'out'}"])
  result = json.loads((tmp_path / "out" / "imagenet_p.json").read_text())

  def predict(frames):  # the same eval view and model, without the benchmark's batching
    views = np.stack([preprocess.eval_view(tf.constant(f), 32, small_image=True).numpy()
                      for f in frames])
    return np.asarray(model.apply(variables, views, train=False)).argmax(-1)
  listing = robustness.list_imagenet_p(tmp_path / "P", perturbations)
  expected = robustness.imagenet_p_flip_probabilities(listing, predict)
  assert result["FP"] == pytest.approx(expected)
  assert max(expected.values()) > 0  # the model's answer does change along the videos
  assert result["mFR"] == pytest.approx(100 * np.mean([expected[p] / table[p]
                                                      for p in perturbations]))
  assert result["normalized"] and result["num_videos"] == {p: 3 for p in perturbations}
  with pytest.raises(ValueError, match="needs imagenet_p_dir"):
    suites.run_benchmark(str(tmp_path / "export"), "imagenet_p")


def test_cifar10_c_mean_error_uses_tfds_spellings(tmp_path):
  bias = np.zeros(10)
  bias[2] = 1.0
  export = export_constant_model(tmp_path / "export", 10, bias)
  seen = []

  def label_fn(builder):
    seen.append(builder.builder_config.name)
    return severity_labels(2, 3)(builder)

  with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset(label_fn, size=32)):
    result = suites.run_benchmark(export, "cifar10_c", batch_size=4,
                                      corruptions=["glass_blur", "elastic_transform"])
  path = suites.write_results(str(tmp_path), result)
  assert sorted(set(seen)) == sorted(f"{c}_{s}" for c in ("frosted_glass_blur", "elastic")
                                     for s in robustness.SEVERITIES)
  assert json.loads(open(path).read())["mean_error"] == pytest.approx(3 / NUM_EXAMPLES)


def test_adversarial_sweeps_write_json_and_plot(tmp_path):
  model = models.create_model("efficientnet-b0", 10, **TINY)
  variables = random_variables(model, seed=1)
  export = str(tmp_path / "export")
  exported_model.export_model(export, model, variables)
  with tfds.testing.mock_data(as_dataset_fn=fake_as_dataset(
      lambda b: np.arange(NUM_EXAMPLES) % 10, size=32)):
    clean = suites.run_benchmark(export, "clean", dataset="cifar10", split="test",
                                     batch_size=4)
    run_cli([f"--export={export}", "--benchmark=pgd", "--dataset=cifar10", "--split=test",
             f"--output={tmp_path / 'out'}", "--batch_size=4", "--epsilons=0,16",
             "--pgd_steps=2"])
  result = json.loads((tmp_path / "out" / "pgd.json").read_text())
  assert result["epsilons_255"] == [0, 16] and result["count"] == NUM_EXAMPLES
  assert result["accuracy"][0] == pytest.approx(clean["top1"])  # epsilon 0 is the clean view
  assert result["accuracy"][1] <= result["accuracy"][0]
  assert os.path.getsize(tmp_path / "out" / "pgd.png") > 0


def test_clear_errors():
  with pytest.raises(ValueError, match="needs --dataset and --split"):
    suites.run_benchmark("/nonexistent", "fgsm")
  with pytest.raises(ValueError, match="Unknown benchmark"):
    suites.run_benchmark("/nonexistent", "imagenet_q")
  with pytest.raises(ValueError, match="imagenet_c only"):
    suites.run_benchmark("/nonexistent", "clean", dataset="x", split="y", imagenet_c_dir="/c")
