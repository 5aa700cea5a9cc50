"""The eval stage: test accuracy and the offline corruption suite of a model's (final) export.

Results go to state.json and to <workdir>/eval/<model>.json (nsjax.evaluate.corruption_suite does
the work; `python -m nsjax.evaluate` runs the accuracy suites on any export).
"""
from __future__ import annotations

import os

import jax

from nsjax import exported_model, schedule
from nsjax.data import folder
from nsjax.evaluate import corruption_suite
from nsjax.files import atomic_write_json
from nsjax.stages.context import Context


def run(stage: schedule.Stage, ctx: Context) -> dict:
  """Test top-1/top-5 of an exported model, plus the offline corruption suite if configured."""
  config, workdir, mesh = ctx.config, ctx.workdir, ctx.mesh
  model_stage = stage.name[len("eval-"):]
  export = schedule.final_export_dir(config, workdir, model_stage)
  test_src = ctx.source("test")
  folder.check_class_names(
      exported_model.read_description(export)["metadata"].get("class_names"),
      folder.source_class_names(test_src), f"the {model_stage} model", "the test data",
      "Evaluate on data with the classes the model was trained on.")
  results = corruption_suite.evaluate_export(
      export, test_src, mesh=mesh,
      batch_size=int(config.eval.batch_size), small_image=config.data.small_image,
      corruptions=list(config.eval.corruptions), severities=list(config.eval.severities),
      max_corruption_examples=int(config.eval.max_corruption_examples),
      seed=int(config.seed))
  if jax.process_index() == 0:
    os.makedirs(ctx.stage_dir("eval"), exist_ok=True)
    atomic_write_json(schedule.eval_results_path(workdir, model_stage), results)
  return results
