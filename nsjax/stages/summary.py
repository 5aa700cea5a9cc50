"""The summary stage: one row per model (accuracy, corruptions, size, params_sha256), the plots,
and the images each stage had to skip."""
from __future__ import annotations

import os
import time

import jax

from nsjax import cpu_features, exported_model, models, report, schedule
from nsjax.data import folder
from nsjax.run_state import RunState
from nsjax.stages.context import Context


def summary_rows(config, workdir: str, state: RunState) -> list[dict]:
  rows = []
  for name in schedule.model_stage_names(config):
    model, variables, _ = exported_model.load_exported(
        schedule.final_export_dir(config, workdir, name))
    results = state.result(f"eval-{name}")
    role = "teacher" if name == "teacher" else ("baseline" if name == "baseline" else "student")
    row = {"iteration": (schedule.iteration_of(name) if role != "baseline"
                         else len(config.students)),
           "role": role, "model": model.model_name, "params": models.count_params(model),
           "test_top1": results["top1"], "test_top5": results["top5"],
           "params_sha256": exported_model.params_sha256(variables["params"])}
    if "corruption_top1" in results:
      row["corruption_top1"] = results["corruption_top1"]
      row["corruptions"] = results["corruptions"]
    rows.append(row)
  return rows


def environment(config) -> dict:
  """What a run's numbers depend on besides its config: the CPU (another CPU may round
  differently), the thread count of XLA's CPU operations and the matrix products' operand dtype."""
  sections = [config.teacher, *config.students] + ([config.baseline] if config.get("baseline")
                                                    else [])
  settings = [(s.get("model_overrides") or {}).get("matmul_operands", "auto") for s in sections]
  backend = jax.default_backend()
  return {"backend": backend, "cpu": cpu_features.describe(), "cpu_threads": cpu_features.threads(),
          "product_dtype": cpu_features.product_dtype(settings, backend)}


def skipped_images(state: RunState) -> dict[str, dict[str, int]]:
  """Undecodable images dropped per stage: unlabeled ones once each by the label stages (or, per
  epoch read, by online-teacher students), labeled ones once per epoch read by training stages."""
  unlabeled, labeled = {}, {}
  for name, result in state.data["completed"].items():
    if name.startswith("label-"):
      unlabeled[name] = result.get("num_skipped", 0)
    if "num_skipped_unlabeled" in result:
      unlabeled[name] = result["num_skipped_unlabeled"]
    if "num_skipped_labeled" in result:
      labeled[name] = result["num_skipped_labeled"]
  return {"skipped_unlabeled_images": unlabeled, "skipped_labeled_images": labeled}


def run(stage: schedule.Stage, ctx: Context) -> dict:
  """Writes summary.json, prints the table and plots accuracy and corruption results."""
  del stage
  workdir, state = ctx.workdir, ctx.state
  rows = summary_rows(ctx.config, workdir, state)
  wall = time.time() - state.data.get("started_at", ctx.started)
  if jax.process_index() == 0:
    extra = {**skipped_images(state), "skipped_files": folder.skipped_files(workdir),
             "environment": environment(ctx.config)}
    report.write_summary(workdir, rows, wall, extra)
    report.plot_accuracy(rows, os.path.join(workdir, "summary.png"))
    report.plot_corruptions(rows, os.path.join(workdir, "corruptions.png"))
    print(report.format_table(rows), flush=True)
    print(f"wall time {wall:.0f} s; summary.json, summary.png in {workdir}", flush=True)
  return {"wall_seconds": wall, "rows": len(rows)}
