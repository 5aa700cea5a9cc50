"""Exported models: the artifact that hands a teacher to the next stage.

An export directory holds
  model.json   -- `nsjax.models.describe(model)`, `metadata` (class names, provenance, ...) and
                  `variables`: the shape and dtype of every variable, in the checkpoint's tree;
  variables/   -- an Orbax checkpoint of {"params", "batch_stats"} (the EMA values for trained runs).
Restoring needs nothing but the directory: the model is rebuilt from model.json, and the recorded
shapes give Orbax a target, so leaves come back as arrays in the right tree (Orbax restore without a
target turns tuples into lists). Exports without that record (older ones) and loads with overrides
that could change shapes trace the model (`models.abstract_variables`) instead, which costs the
labeling stage a trace per call where the record spares it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nsjax import artifacts, models, parallel
from nsjax.files import atomic_write_text

MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"


# Overrides that leave every variable's shape and dtype as exported (tested): with only these, the
# recorded shapes are the restore target.
SHAPE_PRESERVING_OVERRIDES = frozenset({"dtype", "dropout_rate", "stochastic_depth_rate",
                                        "frozen_blocks", "train_resolution", "test_resolution"})


def variables_spec(variables: Any) -> dict[str, Any]:
  """{"params": {...: [dtype, shape]}, ...}: the JSON record of a variables tree's leaves."""
  return jax.tree.map(lambda a: [np.dtype(a.dtype).name, list(a.shape)], variables)


def _abstract_from_spec(spec: Any) -> Any:
  if isinstance(spec, dict):
    return {k: _abstract_from_spec(v) for k, v in spec.items()}
  dtype, shape = spec
  return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype))


def export_model(directory: str | os.PathLike, model: models.EfficientNet, variables: Any,
                 metadata: dict[str, Any] | None = None) -> epath.Path:
  """Writes model.json and the variables; the variables are committed first, model.json last.

  model.json's presence marks a complete export (`is_exported`), so a crash mid-export never leaves
  a directory that looks finished. Multi-host safe: every process calls it, Orbax coordinates.
  """
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  var_dir = directory / VARIABLES_DIR
  if jax.process_index() == 0 and (directory / MODEL_JSON).exists():
    (directory / MODEL_JSON).unlink()  # re-export: never model.json beside half-replaced variables
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(var_dir, variables, force=True)
  if jax.process_index() == 0:
    description = {"model": models.describe(model), "metadata": metadata or {},
                   "variables": variables_spec(variables)}
    atomic_write_text(str(directory / MODEL_JSON), json.dumps(description, indent=2, sort_keys=True))
  return directory


def is_exported(directory: str | os.PathLike) -> bool:
  directory = epath.Path(directory)
  return (directory / MODEL_JSON).exists() and (directory / VARIABLES_DIR).exists()


def read_description(directory: str | os.PathLike) -> dict[str, Any]:
  """model.json; ArtifactError (with the fix) when the export is missing or damaged."""
  directory = epath.Path(directory)
  if not is_exported(directory):
    raise artifacts.MissingArtifact(
        str(directory), f"no exported model here (expected {MODEL_JSON} and {VARIABLES_DIR}/)",
        "Export one with nsjax.exported_model.export_model, run the stage that produces it, or convert "
        "an official TF checkpoint with `python -m nsjax.tools.convert_checkpoint`.")
  try:
    description = json.loads((directory / MODEL_JSON).read_text())
    if "model" not in description:
      raise ValueError(f"no 'model' entry among {sorted(description)}")
    return description
  except (ValueError, TypeError) as error:
    raise artifacts.DamagedArtifact(str(directory / MODEL_JSON), "the export's description "
                                    f"cannot be read ({artifacts.root_cause(error)})") from error


def load_exported(directory: str | os.PathLike, shardings: Any = None,
                  **model_overrides: Any) -> tuple[models.EfficientNet, Any, dict[str, Any]]:
  """(model, variables, metadata) from an export. `model_overrides` e.g. dtype="bfloat16".

  `shardings` None: replicated over all devices of this run. Never the shardings recorded at save
  time: an export written by 2 hosts x 2 devices must load on one laptop CPU (and vice versa).
  """
  description = read_description(directory)
  config = dict(description["model"], **model_overrides)
  model = models.model_from_config(config)
  if "variables" in description and set(model_overrides) <= SHAPE_PRESERVING_OVERRIDES:
    abstract = _abstract_from_spec(description["variables"])
  else:
    abstract = models.abstract_variables(model)
  if shardings is None:
    everywhere = parallel.replicated(parallel.make_mesh())
    shardings = jax.tree.map(lambda _: everywhere, abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return model, _restore_variables(epath.Path(directory) / VARIABLES_DIR, abstract), \
      description["metadata"]


def _restore_variables(var_dir: epath.Path, abstract: Any) -> Any:
  """Orbax restore; bad bytes become one DamagedArtifact naming the folder and the cause."""
  def restore():
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(var_dir, abstract)
  return artifacts.read_orbax(restore, lambda cause: artifacts.DamagedArtifact(
      str(var_dir), f"the exported variables cannot be read ({cause})"))


def params_sha256(params: Any) -> str:
  """A hash of the parameters' bytes in tree order (for summaries and bitwise-resume checks)."""
  h = hashlib.sha256()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()
