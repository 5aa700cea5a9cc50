"""Weight import: official TF EfficientNet checkpoints and `keras.applications` models -> nsjax.

Everything goes through ONE table keyed by the official TF variable names (REFERENCE.md section 1),
relative to a scope such as `efficientnet-b0` or `teacher_model/efficientnet-b0`:
  stem/conv2d/kernel, blocks_3/tpu_batch_normalization_1/moving_mean,
  blocks_3/depthwise_conv2d/depthwise_kernel, head/dense/bias, ...
The nsjax Flax modules already carry these names, so the table is derived from the model's own
variable tree (no hand-written list to drift): only the leaf names and the depthwise layout differ.
  flax params   .../tpu_batch_normalization_k/{scale, bias}  <-> .../{gamma, beta}
  flax batch_stats ...                      /{mean, var}     <-> .../{moving_mean, moving_variance}
  flax .../depthwise_conv2d/kernel [k,k,1,C]                 <-> .../depthwise_kernel [k,k,C,1]
Keras models are first renamed to official names (`keras_to_official`), so the Keras equivalence
test also checks the TF layouts the official-checkpoint path relies on.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from nsjax import models

EMA_SUFFIX = "/ExponentialMovingAverage"
# Optimizer slots (`<var>/RMSProp`, `<var>/RMSProp_1`; `<var>/Momentum` for the official code's
# momentum optimizer) and the step counter carry no model weights.
OPTIMIZER_SLOTS = ("RMSProp", "RMSProp_1", "Momentum")
IGNORED_NAMES = ("global_step",)
TEACHER_SCOPE = "teacher_model"

_BN_TO_OFFICIAL = {("params", "scale"): "gamma", ("params", "bias"): "beta",
                   ("batch_stats", "mean"): "moving_mean",
                   ("batch_stats", "var"): "moving_variance"}


def _is_depthwise(module: str) -> bool:
  return module == "depthwise_conv2d"


def _official_leaf_name(path: tuple[str, ...]) -> str:
  """('params', 'blocks_1', 'tpu_batch_normalization', 'scale')
  -> 'blocks_1/tpu_batch_normalization/gamma'."""
  collection, *modules, leaf = path
  if modules[-1].startswith("tpu_batch_normalization"):
    leaf = _BN_TO_OFFICIAL[(collection, leaf)]
  elif _is_depthwise(modules[-1]):
    leaf = "depthwise_kernel"
  return "/".join(modules + [leaf])


def _to_tf_layout(path: tuple[str, ...], shape_or_array: Any) -> Any:
  """Depthwise kernels are [k,k,1,C] in flax and [k,k,C,1] in TF; the swap is its own inverse."""
  if not _is_depthwise(path[-2]):
    return shape_or_array
  if isinstance(shape_or_array, tuple):
    kh, kw, a, b = shape_or_array
    return (kh, kw, b, a)
  return np.transpose(shape_or_array, (0, 1, 3, 2))


_from_tf_layout = _to_tf_layout


def _join(scope: str, name: str) -> str:
  return f"{scope.strip('/')}/{name}" if scope.strip("/") else name


def _official_table(model: models.EfficientNet) -> dict[tuple[str, ...], tuple[str, tuple]]:
  """Flax variable path -> (official name without scope, shape in TF layout)."""
  flat = traverse_util.flatten_dict(models.abstract_variables(model))
  return {path: (_official_leaf_name(path), _to_tf_layout(path, tuple(leaf.shape)))
          for path, leaf in flat.items()}


def official_shapes(model: models.EfficientNet) -> dict[str, tuple[int, ...]]:
  """Official variable name (without scope) -> shape in TF layout, for every variable of `model`."""
  return dict(_official_table(model).values())


def flax_to_official(variables: Any, scope: str = "") -> dict[str, np.ndarray]:
  """nsjax {"params", "batch_stats"} -> {official name: float32 array in TF layout} under `scope`.

  The inverse of `official_to_flax`; with `write_tf_checkpoint` it produces checkpoints the official
  TF code (and this importer) can read.
  """
  flat = traverse_util.flatten_dict({"params": variables["params"],
                                     "batch_stats": variables["batch_stats"]})
  return {_join(scope, _official_leaf_name(path)):
          _to_tf_layout(path, np.asarray(leaf, np.float32)) for path, leaf in flat.items()}


def _is_ignored(name: str) -> bool:
  parts = name.split("/")
  return name in IGNORED_NAMES or any(p in OPTIMIZER_SLOTS for p in parts)


def _top_scopes(names: Any) -> list[str]:
  """Model scopes present: first component, or the first two under `teacher_model/`."""
  scopes = set()
  for name in names:
    parts = name.split("/")
    if len(parts) > 1 and not _is_ignored(name):
      scopes.add("/".join(parts[:2]) if parts[0] == TEACHER_SCOPE and len(parts) > 2 else parts[0])
  return sorted(scopes)


def resolve_scope(names: Any, model_name: str, scope: str | None = None) -> str:
  """The scope holding `model_name`'s weights: `scope` if given, else `<model>` (a student or plain
  run) before `teacher_model/<model>` (the teacher stored inside a student run)."""
  names = list(names)
  candidates = [scope.strip("/")] if scope else [model_name, f"{TEACHER_SCOPE}/{model_name}"]
  for candidate in candidates:
    if any(n.startswith(candidate + "/") for n in names):
      return candidate
  raise ValueError(
      f"No variables under {' or '.join(repr(c + '/') for c in candidates)} in the checkpoint; "
      f"model scopes found: {_top_scopes(names) or 'none'}. Pass the model name the checkpoint was "
      "trained as (--model) or the scope explicitly (--scope).")


def _belongs_elsewhere(name: str) -> bool:
  """Another network of the same file (the student next to a teacher, or vice versa)."""
  first = name.split("/")[0]
  return first == TEACHER_SCOPE or first in models.MODEL_SPECS


@dataclasses.dataclass(frozen=True)
class OfficialImport:
  """Result of `import_official`: the variables and where they came from (for export metadata)."""
  variables: dict[str, Any]
  scope: str
  num_ema: int   # variables taken from `<name>/ExponentialMovingAverage`
  num_raw: int   # variables taken from the raw (training) value
  num_ignored: int  # optimizer slots, global_step, other networks' variables

  @property
  def values(self) -> str:
    if self.num_raw == 0:
      return "ExponentialMovingAverage"
    return "raw" if self.num_ema == 0 else "mixed (EMA where present, raw otherwise)"


def import_official(tensors: Mapping[str, Any], model: models.EfficientNet,
                    scope: str | None = None, use_ema: bool = True) -> OfficialImport:
  """Official-named tensors (e.g. `read_tf_checkpoint(path)`) -> nsjax variables for `model`.

  Uses `<name>/ExponentialMovingAverage` when present (unless `use_ema=False`). Ignores optimizer
  slots, `global_step` and variables of other networks in the file. Raises ONE ValueError listing
  every missing, unexpected and mis-shaped variable.
  """
  scope = resolve_scope(tensors.keys(), model.model_name, scope)
  prefix = scope + "/"
  table = _official_table(model)
  expected = dict(table.values())
  raw, ema, unexpected, ignored = {}, {}, [], 0
  for name in tensors.keys():
    if _is_ignored(name):
      ignored += 1
    elif name.startswith(prefix):
      relative = name[len(prefix):]
      is_ema = relative.endswith(EMA_SUFFIX)
      relative = relative[:-len(EMA_SUFFIX)] if is_ema else relative
      if relative in expected:
        (ema if is_ema else raw)[relative] = name
      else:
        unexpected.append(name)
    elif _belongs_elsewhere(name):
      ignored += 1
    else:
      unexpected.append(name)

  chosen, missing, misshaped = {}, [], []
  for relative, shape in expected.items():
    source = (ema.get(relative) if use_ema else None) or raw.get(relative)
    if source is None:
      missing.append(f"{prefix}{relative} {shape}")
      continue
    value = np.asarray(tensors[source])
    if value.shape != shape:
      misshaped.append(f"{source}: {value.shape}, expected {shape}")
    chosen[relative] = value.astype(np.float32)
  problems = [(f"{len(missing)} missing", missing), (f"{len(unexpected)} unexpected", unexpected),
              (f"{len(misshaped)} mis-shaped", misshaped)]
  if any(items for _, items in problems):
    details = "\n".join(f"  {title}:\n" + "\n".join(f"    {i}" for i in sorted(items))
                        for title, items in problems if items)
    raise ValueError(
        f"Checkpoint variables under {prefix!r} do not match {model.model_name} (width "
        f"{model.width}, depth {model.depth}, {model.num_classes} classes):\n{details}\n"
        "Check the model name, its width/depth overrides and num_classes against the checkpoint.")

  flat = {path: _from_tf_layout(path, chosen[relative]) for path, (relative, _) in table.items()}
  num_ema = sum(1 for r in expected if use_ema and r in ema)
  return OfficialImport(variables=traverse_util.unflatten_dict(flat), scope=scope, num_ema=num_ema,
                        num_raw=len(expected) - num_ema, num_ignored=ignored)


def official_to_flax(tensors: Mapping[str, Any], model: models.EfficientNet,
                     scope: str | None = None, use_ema: bool = True) -> dict[str, Any]:
  """`import_official(...).variables`: {"params", "batch_stats"} as float32 numpy arrays."""
  return import_official(tensors, model, scope, use_ema).variables


def infer_num_classes(tensors: Mapping[str, Any], model_name: str,
                      scope: str | None = None) -> int | None:
  """Classifier outputs from `<scope>/head/dense/bias` (or its EMA); None when absent."""
  scope = resolve_scope(tensors.keys(), model_name, scope)
  for name in (f"{scope}/head/dense/bias{EMA_SUFFIX}", f"{scope}/head/dense/bias"):
    if name in tensors:
      return int(np.shape(tensors[name])[0])
  return None


# ---------------------------------------------------------------------------------------------
# TF checkpoint files


class _LazyCheckpoint(Mapping):
  """Name -> tensor, read on access: optimizer slots and unused copies are never loaded."""

  def __init__(self, reader):
    self._reader = reader
    self._names = frozenset(reader.get_variable_to_shape_map())

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._names:
      raise KeyError(name)
    return self._reader.get_tensor(name)

  def __iter__(self):
    return iter(sorted(self._names))

  def __len__(self) -> int:
    return len(self._names)


def read_tf_checkpoint(path: str | os.PathLike) -> Mapping[str, np.ndarray]:
  """A TF checkpoint (a prefix, or a directory with a `checkpoint` file) as a lazy name -> array
  map."""
  import tensorflow as tf  # Deferred: TF is only needed for checkpoint files.
  try:
    reader = tf.train.load_checkpoint(os.fspath(path))
  except (ValueError, tf.errors.OpError) as e:
    raise ValueError(f"Cannot read a TF checkpoint at {path!r} ({e}). Pass a checkpoint prefix "
                     "(e.g. .../model.ckpt-1000, without .index) or a directory holding a "
                     "`checkpoint` file.") from e
  return _LazyCheckpoint(reader)


def write_tf_checkpoint(prefix: str | os.PathLike, tensors: Mapping[str, Any]) -> str:
  """Writes name -> array as a TF (V2 bundle) checkpoint at `prefix` and records it in the
  directory's `checkpoint` file, so both the prefix and the directory can be loaded."""
  import tensorflow as tf
  prefix = os.fspath(prefix)
  names = sorted(tensors)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.convert_to_tensor(np.asarray(tensors[n])) for n in names])
  tf.compat.v1.train.update_checkpoint_state(os.path.dirname(prefix) or ".", prefix)
  return prefix


# ---------------------------------------------------------------------------------------------
# keras.applications.EfficientNetB0..B7

_KERAS_FIXED = {"stem_conv": "stem/conv2d", "stem_bn": "stem/tpu_batch_normalization",
                "top_conv": "head/conv2d", "top_bn": "head/tpu_batch_normalization",
                "predictions": "head/dense"}
_KERAS_BLOCK = re.compile(r"^block(\d+)([a-z])_(\w+)$")
# Keras block layer suffix -> official module, for blocks with and without the expansion conv.
_KERAS_EXPANDED = {"expand_conv": "conv2d", "expand_bn": "tpu_batch_normalization",
                   "dwconv": "depthwise_conv2d", "bn": "tpu_batch_normalization_1",
                   "se_reduce": "se/conv2d", "se_expand": "se/conv2d_1",
                   "project_conv": "conv2d_1", "project_bn": "tpu_batch_normalization_2"}
_KERAS_UNEXPANDED = {"dwconv": "depthwise_conv2d", "bn": "tpu_batch_normalization",
                     "se_reduce": "se/conv2d", "se_expand": "se/conv2d_1",
                     "project_conv": "conv2d", "project_bn": "tpu_batch_normalization_1"}
# Input preprocessing (x / 255, mean/std): nsjax models take already normalised images.
_KERAS_PREPROCESSING = re.compile(r"^(rescaling|normalization)(_\d+)?$")


def _keras_weights(layer) -> dict[str, np.ndarray]:
  out = {}
  for w in layer.weights:
    name = w.name.split("/")[-1].split(":")[0]
    if name == "depthwise_kernel" or (name == "kernel" and layer.name.endswith("dwconv")):
      name = "depthwise_kernel"
    out[name] = np.asarray(w.numpy(), np.float32)
  return out


def keras_to_official(keras_model, scope: str = "") -> dict[str, np.ndarray]:
  """A `keras.applications.EfficientNetB*` model's weights under official names (TF layouts).

  Keras blocks `block<stage><letter>_` are numbered globally in (stage, letter) order, as the
  official `blocks_<i>`. Any weighted layer this mapping does not know raises a ValueError.
  """
  weighted = [layer for layer in keras_model.layers if layer.weights]
  block_keys = sorted({(int(m.group(1)), m.group(2)) for m in
                       (_KERAS_BLOCK.match(layer.name) for layer in weighted) if m})
  block_index = {key: i for i, key in enumerate(block_keys)}
  expanded = {(int(m.group(1)), m.group(2)) for m in
              (_KERAS_BLOCK.match(layer.name) for layer in weighted)
              if m and m.group(3) == "expand_conv"}
  out, unknown = {}, []
  for layer in weighted:
    match = _KERAS_BLOCK.match(layer.name)
    if layer.name in _KERAS_FIXED:
      module = _KERAS_FIXED[layer.name]
    elif match:
      key = (int(match.group(1)), match.group(2))
      table = _KERAS_EXPANDED if key in expanded else _KERAS_UNEXPANDED
      if match.group(3) not in table:
        unknown.append(layer.name)
        continue
      module = f"blocks_{block_index[key]}/{table[match.group(3)]}"
    elif _KERAS_PREPROCESSING.match(layer.name):
      continue
    else:
      unknown.append(layer.name)
      continue
    for leaf, value in _keras_weights(layer).items():
      out[_join(scope, f"{module}/{leaf}")] = value
  if unknown:
    raise ValueError(f"Keras layers with weights that have no EfficientNet counterpart: {unknown}. "
                     "Pass a keras.applications.EfficientNetB0..B7 model.")
  return out


def keras_to_flax(keras_model, model: models.EfficientNet) -> dict[str, Any]:
  """nsjax variables for `model` from a `keras.applications.EfficientNetB*` model (its input
  rescaling/normalisation layers are preprocessing and are not part of the nsjax model)."""
  return official_to_flax(keras_to_official(keras_model, scope=model.model_name), model)
