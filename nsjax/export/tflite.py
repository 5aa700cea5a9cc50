"""An nsjax export -> a TFLite model (`model.tflite` + `nsjax_serving.json` in one directory).

The SavedModel of `nsjax.export.saved_model` (lowered for the CPU only) goes through TensorFlow's
own converter, builtin ops only: TF 2.21's converter turns the XlaCallModule (StableHLO) into TFLite
ops, and the preprocessing avoids ResizeBicubic (see `nsjax.export.preprocessing`), so the file
needs no Flex delegate -- which the interpreter in the TensorFlow pip package lacks. Same
signature as the SavedModel (`serving_default`: images -> probabilities, class_names, or the
backbone's features), with one difference: TFLite drops assertions, so a wrong rank or channel
count fails inside the interpreter (e.g. in GATHER) instead of with the SavedModel's message.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Any

import tensorflow as tf

from nsjax.export import saved_model

MODEL_FILE = "model.tflite"
RECORD_FILE = "nsjax_serving.json"


def convert(saved_model_dir: str) -> bytes:
  """TFLite flatbuffer of a SavedModel's serving signature, builtin ops only."""
  converter = tf.lite.TFLiteConverter.from_saved_model(saved_model_dir, [saved_model.SIGNATURE])
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  return converter.convert()


def write_tflite(export_dir: str, output: str, part: str = "classifier") -> dict[str, Any]:
  """Writes DIR/model.tflite and DIR/nsjax_serving.json for the nsjax export at `export_dir`."""
  output = saved_model.local_output(output)
  scratch = tempfile.mkdtemp(prefix="nsjax-tflite-")
  try:
    record = saved_model.write_saved_model(export_dir, os.path.join(scratch, "saved_model"), part,
                                           platforms=("cpu",))
    flatbuffer = convert(os.path.join(scratch, "saved_model"))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  record = dict(record, format="nsjax-tflite", model_file=MODEL_FILE)
  os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
  tmp = f"{output}.tmp-{uuid.uuid4().hex[:8]}"
  try:
    os.makedirs(tmp)
    with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
      f.write(flatbuffer)
    with open(os.path.join(tmp, RECORD_FILE), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
    saved_model.replace_directory(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return record
