"""Serving exports: SavedModel (orbax-export) and TFLite agree with nsjax's own eval path.

Two models with random weights (random BatchNorm statistics too, so a misplaced tensor shows): the
smoke config's student (small-image view, 28 px, grey digits) and EfficientNet-B0 with 1000
classes at 64 px (centre crop + bicubic resize, RGB and grey). The reference is what nsjax's
evaluation does: `exported_model.load_exported`, the eval stage's `batch_view` (preprocess.eval_view
per image), `model.apply(train=False)`, softmax. The SavedModels and TFLite files are run in a
subprocess that refuses to import JAX, on batches of 1 and 3 images of another size than the
model's.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import flax.linen as nn
import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util

from nsjax import exported_model, models
from nsjax.stages import train as train_stage
from nsjax.data import preprocess
from nsjax.evaluate import corruption_suite as eval_stage
from nsjax.export import __main__ as export_cli
from nsjax.export import preprocessing, saved_model, tflite
from nsjax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4

# Runs in a fresh interpreter: JAX is blocked at import, so any use of it fails loudly.
NO_JAX_RUNNER = textwrap.dedent("""
    import json, sys

    class NoJax:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib"):
          raise ImportError("JAX is blocked in this process: " + name)
    sys.meta_path.insert(0, NoJax())

    import numpy as np
    import tensorflow as tf

    def error_of(call):
      try:
        call()
      except Exception as error:  # the message is what the test checks
        return type(error).__name__ + ": " + str(error)
      return None

    jobs = json.load(open(sys.argv[1]))
    results = {}
    for job in jobs:
      inputs = [np.load(p) for p in job["inputs"]]
      if job["kind"] == "saved_model":
        run = tf.saved_model.load(job["path"]).signatures["serving_default"]
        call = lambda x: {k: v.numpy() for k, v in run(images=tf.constant(x)).items()}
      else:
        interpreter = tf.lite.Interpreter(model_path=job["path"])
        runner = interpreter.get_signature_runner("serving_default")
        call = lambda x: runner(images=x)
      outputs = [call(x) for x in inputs]
      for i, out in enumerate(outputs):
        for key, value in out.items():
          if value.dtype == object:
            value = value.astype(str)
          np.save(job["out"] + f"-{i}-{key}.npy", value)
      results[job["out"]] = {
          "float_error": error_of(lambda: call(inputs[0].astype(np.float32))),
          "rank_error": error_of(lambda: call(inputs[0][0])),
          "channels_error": error_of(lambda: call(np.concatenate([inputs[0]] * 5, axis=-1)))}
    results["jax_imported"] = "jax" in sys.modules
    json.dump(results, open(sys.argv[2], "w"))
""")


def smoke_student():
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  return train_stage.build_model(config.students[0], config)


def calibrated_variables(model, seed, views, logit_std=2.0):
  """Random weights that behave like trained ones on `views` (the eval views of the test's
  images): kernels N(0, 1/fan_in), every BatchNorm's statistics those of `views` (as training
  settles them on the data), and the classifier scaled to logits of standard deviation
  `logit_std` over the classes (a trained B0's range). With statistics of mean 0 and variance 1
  activations collapse with depth and every image gets the same probabilities; with statistics
  from other random images they blow up (logits spread over hundreds): either would make the
  comparisons blind or chaotic."""
  rng = np.random.default_rng(seed)
  abstract = models.abstract_variables(model)
  params = {}
  for path, leaf in traverse_util.flatten_dict(abstract["params"]).items():
    if len(leaf.shape) == 1:  # BatchNorm scale 1, every bias and offset 0
      params[path] = np.full(leaf.shape, 1.0 if path[-1] == "scale" else 0.0, np.float32)
    else:
      params[path] = (rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(
          np.float32)
  params = traverse_util.unflatten_dict(params)
  # Momentum 0: one train-mode pass stores the batch's statistics, layer after layer. XLA's own
  # convolutions (same variables) compile faster than nsjax's CPU formulations.
  calibrating = model.clone(dropout_rate=0.0, stochastic_depth_rate=0.0, depthwise_impl="xla",
                            stem_impl="xla")
  with mock.patch.object(layers, "BatchNorm",
                         functools.partial(nn.BatchNorm, momentum=0.0, epsilon=1e-3)):
    batch_stats = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["batch_stats"])
    logits, updated = jax.jit(lambda v, x: calibrating.apply(
        v, x, train=True, mutable=["batch_stats"]))(
            {"params": params, "batch_stats": batch_stats}, views)
  scale = logit_std / float(np.std(np.asarray(logits), axis=1).mean())
  params["head"]["dense"] = {k: v * scale for k, v in params["head"]["dense"].items()}
  return {"params": params, "batch_stats": jax.device_get(updated["batch_stats"])}


CASES = {
    # name: (model factory, image batches [batch 1, batch 3], class names)
    "smoke": (smoke_student, lambda r: [r.integers(0, 256, (1, 28, 28, 1)),
                                       r.integers(0, 256, (3, 37, 30, 1))],
              [f"digit {i}" for i in range(10)]),
    "b0": (lambda: models.create_model("efficientnet-b0", 1000, resolution=64),
           lambda r: [r.integers(0, 256, (1, 50, 90, 1)), r.integers(0, 256, (3, 81, 70, 3))],
           None),
}


def nsjax_eval(model, variables, batches, small_image=None):
  """nsjax's evaluation of batches of uint8 images: the eval stage's view, eval-mode logits,
  softmax; [(probabilities, views)] per batch. The batches go through the model as one (eval mode
  treats every image alone), which compiles it once. `small_image` picks the other view for a
  negative control (default: the model's)."""
  views = [nsjax_views(model, images, small_image) for images in batches]
  logits = jitted(model, "apply")(variables, np.concatenate(views))
  probabilities = np.split(np.asarray(jax.nn.softmax(logits, axis=-1)),
                           np.cumsum([len(v) for v in views])[:-1])
  return list(zip(probabilities, views))


@functools.lru_cache(maxsize=8)
def jitted(model, what):
  """One jitted function per (model, what): the negative controls reuse the compilations."""
  if what == "apply":
    return jax.jit(lambda v, x: model.apply(v, x, train=False))
  return jax.jit(saved_model.backbone_fn(model))


def nsjax_views(model, images, small_image=None):
  small = model.small_image if small_image is None else small_image
  return eval_stage.batch_view(model.test_resolution, small)(tf.constant(images)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Per case: the nsjax export, its SavedModels and TFLite files, the reference outputs and the
  no-JAX subprocess's outputs and error messages."""
  root = tmp_path_factory.mktemp("serving")
  jobs, cases = [], {}
  for name, (factory, make_images, names) in CASES.items():
    model = factory()
    export_dir = str(root / name / "export")
    metadata = {"class_names": names} if names else {}
    images = [x.astype(np.uint8) for x in make_images(np.random.default_rng(0))]
    views = np.concatenate([nsjax_views(model, x) for x in images])
    exported_model.export_model(export_dir, model, calibrated_variables(model, len(name), views),
                            metadata)
    model, variables, metadata = exported_model.load_exported(export_dir)
    # Exports compute in float32; on a CPU with AMX-bf16 nsjax's own eval would give its large
    # 1x1 convolutions bfloat16 operands (tests/test_matmul_operands.py), so the reference is the
    # float32 path.
    model = model.clone(matmul_operands="float32")
    refs = nsjax_eval(model, variables, images)
    others = nsjax_eval(model, variables, images, small_image=not model.small_image)
    inputs = []
    for i, x in enumerate(images):
      inputs.append(str(root / name / f"images-{i}.npy"))
      np.save(inputs[-1], x)
    artifacts = {
        "saved_model": saved_model.write_saved_model(export_dir, str(root / name / "sm")),
        "backbone": saved_model.write_saved_model(export_dir, str(root / name / "bb"), "backbone"),
        "tflite": tflite.write_tflite(export_dir, str(root / name / "tfl"))}
    for kind, path in (("saved_model", "sm"), ("saved_model", "bb"),
                       ("tflite", os.path.join("tfl", tflite.MODEL_FILE))):
      jobs.append({"kind": kind, "path": str(root / name / path), "inputs": inputs,
                   "out": str(root / name / f"out-{path.split(os.sep)[0]}")})
    cases[name] = dict(model=model, variables=variables, metadata=metadata, images=images,
                       refs=refs, others=others, artifacts=artifacts, dir=root / name)
  (root / "jobs.json").write_text(json.dumps(jobs))
  (root / "runner.py").write_text(NO_JAX_RUNNER)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  subprocess.run([sys.executable, str(root / "runner.py"), str(root / "jobs.json"),
                  str(root / "results.json")], check=True, env=env, timeout=600)
  return cases, json.loads((root / "results.json").read_text())


def output(case, artifact, batch, key):
  value = np.load(case["dir"] / f"out-{artifact}-{batch}-{key}.npy")
  return value


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("artifact", ["sm", "tfl"])
def test_probabilities_match_nsjax_eval_without_jax(exported, name, artifact):
  cases, results = exported
  case = cases[name]
  assert results["jax_imported"] is False
  names = case["metadata"].get("class_names") or [str(i) for i in range(case["model"].num_classes)]
  for batch, (probabilities, _) in enumerate(case["refs"]):
    served = output(case, artifact, batch, "probabilities")
    assert served.shape == probabilities.shape == (len(case["images"][batch]),
                                                   case["model"].num_classes)
    diff = float(np.abs(served - probabilities).max())
    print(f"{name} {artifact} batch {len(served)}: max |prob diff| = {diff:.2e}")
    assert diff <= TOLERANCE
    # The comparison can fail: the other view's probabilities are far off.
    assert np.abs(served - case["others"][batch][0]).max() > 100 * TOLERANCE
    class_names = output(case, artifact, batch, "class_names")
    assert class_names.shape == served.shape
    assert all(list(row) == names for row in class_names)


@pytest.mark.parametrize("name", list(CASES))
def test_backbone_features_match_and_feed_the_classifier(exported, name):
  cases, _ = exported
  case = cases[name]
  model, variables = case["model"], case["variables"]
  dense = variables["params"]["head"]["dense"]
  all_views = np.concatenate([views for _, views in case["refs"]])
  all_features = jitted(model, "backbone")(variables, all_views)["features"]
  ends = np.cumsum([len(views) for _, views in case["refs"]])
  for batch, (probabilities, views) in enumerate(case["refs"]):
    ref = {"features": np.asarray(all_features[ends[batch] - len(views):ends[batch]])}
    served, pooled = (output(case, "bb", batch, k) for k in ("features", "pooled_features"))
    scale = float(np.abs(ref["features"]).max())
    assert served.shape == ref["features"].shape and served.shape[-1] == dense["kernel"].shape[0]
    assert np.abs(served - ref["features"]).max() <= TOLERANCE * scale
    np.testing.assert_allclose(pooled, served.mean(axis=(1, 2)), atol=TOLERANCE * scale)
    # The pooled features are what the classifier reads: its dense layer gives nsjax's probabilities.
    logits = pooled @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
    np.testing.assert_allclose(jax.nn.softmax(logits, axis=-1), probabilities, atol=TOLERANCE)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("artifact", ["sm", "bb"])
def test_saved_model_rejects_float_wrong_rank_and_channels_clearly(exported, name, artifact):
  cases, results = exported
  errors = results[str(cases[name]["dir"] / f"out-{artifact}")]
  assert "uint8" in errors["float_error"] and "float" in errors["float_error"]
  assert "[batch, height, width, channels]" in errors["rank_error"]
  assert "images[None]" in errors["rank_error"]
  assert "got channels" in errors["channels_error"] and "5" in errors["channels_error"]


def test_tflite_rejects_a_float_input_by_dtype(exported):
  cases, results = exported
  errors = results[str(cases["smoke"]["dir"] / "out-tfl")]
  assert "UINT8" in errors["float_error"] and "FLOAT32" in errors["float_error"]


@pytest.mark.parametrize("name", list(CASES))
def test_records_describe_preprocessing_signature_and_classes(exported, name):
  cases, _ = exported
  case = cases[name]
  model = case["model"]
  record = saved_model.read_record(str(case["dir"] / "sm"))
  assert record == case["artifacts"]["saved_model"]
  prep = record["preprocessing"]
  assert prep["view"] == ("small_image" if model.small_image else "center_crop")
  assert prep["resolution"] == model.test_resolution and prep["crop_padding"] == 32
  assert record["signature"]["outputs"].keys() == {"probabilities", "class_names"}
  assert case["artifacts"]["backbone"]["signature"]["outputs"].keys() == {"features",
                                                                         "pooled_features"}
  tflite_record = json.loads((case["dir"] / "tfl" / tflite.RECORD_FILE).read_text())
  assert tflite_record["format"] == "nsjax-tflite" and tflite_record["platforms"] == ["cpu"]
  assert record["platforms"] == ["cpu", "cuda", "tpu"]
  assert len(record["class_names"]) == model.num_classes


@pytest.mark.parametrize("shape,resolution,small_image", [
    ((2, 40, 36, 1), 28, True), ((2, 28, 28, 1), 28, True), ((2, 20, 17, 3), 28, True),
    ((2, 300, 200, 3), 64, False), ((2, 50, 90, 4), 64, False), ((1, 64, 64, 1), 224, False),
    ((1, 97, 131, 2), 32, False)])
def test_serving_view_is_the_eval_view(shape, resolution, small_image):
  """Batched, TFLite-friendly preprocessing == preprocess.eval_view image by image (float32
  rounding only: ~1e-6 of the normalised range)."""
  images = np.random.default_rng(sum(shape)).integers(0, 256, shape).astype(np.uint8)
  served = preprocessing.serving_view(tf.constant(images), resolution, small_image).numpy()
  for image, view in zip(images, served):
    expected = preprocess.eval_view(tf.constant(image), resolution, small_image=small_image)
    np.testing.assert_allclose(view, expected.numpy(), atol=1e-5, rtol=0)


def test_serving_view_refuses_a_float_tensor_when_built():
  with pytest.raises(TypeError, match="uint8.*tf.cast"):
    preprocessing.serving_view(tf.zeros([1, 8, 8, 3], tf.float32), 8, True)


def test_cli_errors_name_the_problem(exported, tmp_path, capsys):
  assert export_cli.main([f"--export={tmp_path}/nothing", f"--output={tmp_path}/out"]) == 1
  assert "no exported model here" in capsys.readouterr().err
  export = str(exported[0]["smoke"]["dir"] / "export")
  assert export_cli.main([f"--export={export}", "--output=gs://bucket/x"]) == 1
  assert "local directory" in capsys.readouterr().err
  assert export_cli.main([f"--export={export}", f"--output={tmp_path}/o",
                          "--platforms=cpu,gpu"]) == 1
  assert "subset of" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()
