"""An nsjax export (model.json + Orbax variables) -> a TF SavedModel that serves without JAX.

Built with orbax-export (`JaxModule` + `ServingConfig` + `ExportManager`): the model runs as one
XlaCallModule op (jax2tf, native serialization -- the only lowering jax 0.10.2 has), with the
batch dimension symbolic; the preprocessing (`nsjax.export.preprocessing.serving_view`) and the
outputs around it are plain TensorFlow ops. Two kinds of SavedModel:

  classifier  serving_default(images: uint8 [batch, height, width, channels])
              -> probabilities float32 [batch, num_classes], class_names string [batch, num_classes]
  backbone    serving_default(images) -> features float32 [batch, h, w, C] (the head's 1x1
              convolution + BatchNorm + swish, before pooling), pooled_features [batch, C] (their
              spatial mean: what the classifier's dense layer reads)

The model is rebuilt with XLA's own convolutions (`depthwise_impl` and `stem_impl` "xla"; same
variables) and float32 matrix products (`matmul_operands`, never a CPU's bfloat16 tiles): nsjax's
CPU formulations (shifted multiply-adds, stem taps) lower to gathers with a symbolic batch size,
which TFLite cannot convert, and the XLA convolutions are what every other backend runs anyway. Every SavedModel carries `assets.extra/nsjax_serving.json`: the preprocessing
it does, its signature, class names and where it came from.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import tensorflow as tf
from orbax import export as orbax_export

import nsjax
from nsjax import exported_model, models
from nsjax.data import preprocess
from nsjax.export import preprocessing
from nsjax.models.inputs import MEAN_RGB, STDDEV_RGB

PARTS = ("classifier", "backbone")
PLATFORMS = ("cpu", "cuda", "tpu")
SIGNATURE = "serving_default"
INPUT_NAME = "images"
RECORD_FILE = os.path.join("assets.extra", "nsjax_serving.json")
HEAD_FEATURES = ("head", "tpu_batch_normalization")  # module whose output (after swish) is the
                                                      # backbone's unpooled feature map


def serving_model(model: models.EfficientNet) -> models.EfficientNet:
  """The same network with XLA's convolutions and float32 compute (see the module docstring)."""
  return model.clone(depthwise_impl="xla", stem_impl="xla", dtype="float32",
                     matmul_operands="float32")


def class_names(model: models.EfficientNet, metadata: dict[str, Any]) -> list[str]:
  """The export's recorded class names, or "0".."N-1" when it recorded none (e.g. a converted
  official checkpoint, or a TFDS source without label names)."""
  names = [str(n) for n in metadata.get("class_names") or []]
  if names and len(names) != model.num_classes:
    raise ValueError(f"The export records {len(names)} class names for a model with "
                     f"{model.num_classes} outputs; re-export it with matching class names.")
  return names or [str(i) for i in range(model.num_classes)]


def probabilities_fn(model: models.EfficientNet) -> Callable[[Any, jax.Array], dict[str, Any]]:
  """(variables, normalised views) -> {"probabilities"}: softmax of the eval-mode logits."""
  def fn(variables, views):
    logits = model.apply(variables, views, train=False).astype(jnp.float32)
    return {"probabilities": jax.nn.softmax(logits, axis=-1)}
  return fn


def backbone_fn(model: models.EfficientNet) -> Callable[[Any, jax.Array], dict[str, Any]]:
  """(variables, normalised views) -> {"features" [B, h, w, C], "pooled_features" [B, C]}.

  The head's BatchNorm output is captured (flax `capture_intermediates`) rather than the model
  split in two, so the features come from the very module the classifier trains; swish and the
  spatial mean then follow `Head.__call__`. XLA drops the unused classifier layer.
  """
  def fn(variables, views):
    _, state = model.apply(variables, views, train=False, mutable=["intermediates"],
                           capture_intermediates=lambda m, _: m.path == HEAD_FEATURES)
    normalised = state["intermediates"]["head"]["tpu_batch_normalization"]["__call__"][0]
    features = nn.swish(normalised).astype(jnp.float32)
    return {"features": features, "pooled_features": jnp.mean(features, axis=(1, 2))}
  return fn


def preprocessing_record(model: models.EfficientNet) -> dict[str, Any]:
  """What the signature does to the images before the network: the record users can rely on."""
  view = ("small_image: the whole image, bicubic resize to resolution x resolution when its size "
          "differs" if model.small_image else
          "center_crop: the centred square of side resolution / (resolution + crop_padding) x the "
          "short side, bicubic resize to resolution x resolution")
  return {"view": "small_image" if model.small_image else "center_crop", "description": view,
          "resolution": model.test_resolution, "crop_padding": preprocess.CROP_PADDING,
          "resize": "bicubic, half-pixel centres (TensorFlow's ResizeBicubic, Keys a=-0.5)",
          "channels": "1 (grey) repeated to RGB; 2 and 4 lose their alpha channel",
          "normalisation": {"mean_rgb": list(MEAN_RGB), "stddev_rgb": list(STDDEV_RGB),
                            "formula": "(pixel - mean_rgb) / stddev_rgb, pixels in 0..255"}}


def signature_record(part: str, model: models.EfficientNet) -> dict[str, Any]:
  outputs = ({"probabilities": "float32 [batch, num_classes]",
              "class_names": "string [batch, num_classes] (the same row for every image)"}
             if part == "classifier" else
             {"features": "float32 [batch, h, w, channels] (before pooling)",
              "pooled_features": "float32 [batch, channels] (spatial mean of features)"})
  return {"name": SIGNATURE, "inputs": {INPUT_NAME: preprocessing.INPUT_DESCRIPTION},
          "outputs": outputs, "num_classes": model.num_classes}


def _check_part_and_platforms(part: str, platforms: Sequence[str]) -> None:
  if part not in PARTS:
    raise ValueError(f"part must be one of {PARTS}, got {part!r}.")
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be a non-empty subset of {PLATFORMS}, got {list(platforms)}.")


def build_export_manager(model: models.EfficientNet, variables: Any, names: Sequence[str],
                         part: str, platforms: Sequence[str]) -> orbax_export.ExportManager:
  """orbax-export's manager for one serving signature around `model` (already `serving_model`)."""
  jax_fn = probabilities_fn(model) if part == "classifier" else backbone_fn(model)
  module = orbax_export.JaxModule(
      jax.device_get(variables), jax_fn, trainable=False, input_polymorphic_shape="b, ...",
      jax2tf_kwargs={"native_serialization_platforms": tuple(platforms), "with_gradient": False})
  resolution, small = model.test_resolution, model.small_image

  def preprocess_images(images):
    return preprocessing.serving_view(images, resolution, small)

  def postprocess(outputs):
    if part == "backbone":
      return outputs
    probabilities = outputs["probabilities"]
    row = tf.constant(list(names), tf.string)[None, :]
    return {"probabilities": probabilities,
            "class_names": tf.tile(row, [tf.shape(probabilities)[0], 1])}

  config = orbax_export.ServingConfig(
      SIGNATURE, input_signature=[tf.TensorSpec(None, tf.uint8, name=INPUT_NAME)],
      tf_preprocessor=preprocess_images, tf_postprocessor=postprocess)
  return orbax_export.ExportManager(module, [config])


def replace_directory(tmp: str, final: str) -> None:
  """Moves the finished `tmp` to `final`: a reader sees the old directory or the new one, never
  a half-written SavedModel (an old `final` is moved aside first, then deleted)."""
  old = None
  if os.path.exists(final):
    old = f"{final}.old-{uuid.uuid4().hex[:8]}"
    os.rename(final, old)
  os.rename(tmp, final)
  if old:
    shutil.rmtree(old)


def local_output(output: str) -> str:
  if "://" in output:
    raise ValueError(f"--output={output}: write the SavedModel to a local directory (it is "
                     "renamed into place atomically, which object stores cannot do), then copy "
                     "it, e.g. with `gcloud storage cp -r`.")
  return os.path.abspath(output)


def write_saved_model(export_dir: str, output: str, part: str = "classifier",
                      platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Writes the SavedModel for the nsjax export at `export_dir` to `output`; returns its record."""
  _check_part_and_platforms(part, platforms)
  output = local_output(output)
  model, variables, metadata = exported_model.load_exported(export_dir)
  model = serving_model(model)
  names = class_names(model, metadata)
  manager = build_export_manager(model, variables, names, part, platforms)
  record = {"format": "nsjax-saved-model", "format_version": 1, "part": part,
            "signature": signature_record(part, model),
            "preprocessing": preprocessing_record(model), "class_names": names,
            "model": models.describe(model), "platforms": list(platforms),
            "source": {"export": os.path.abspath(export_dir),
                       "params_sha256": metadata.get("params_sha256"),
                       "exported_by": f"nsjax {nsjax.__version__} nsjax.export"}}
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    manager.save(tmp)
    os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
    with open(os.path.join(tmp, RECORD_FILE), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
    replace_directory(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return record


def read_record(saved_model_dir: str) -> dict[str, Any]:
  """The `nsjax_serving.json` of a SavedModel written by `write_saved_model` (no JAX needed)."""
  with tf.io.gfile.GFile(os.path.join(saved_model_dir, RECORD_FILE)) as f:
    return json.load(f)
