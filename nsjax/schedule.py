"""The Noisy Student schedule: its stages, which stage feeds which, and where each one writes.

One ml-collections config describes the whole run (see configs/demo.py; every key in
docs/configuration.md):

  iteration 0   "teacher"      train from labels (or import an exported / converted checkpoint)
  iteration i   "label-i"      the teacher of iteration i-1 labels the unlabeled split (skipped for
                               an online teacher), then filtering + balancing are planned
                "student-i"    a noised, equal-or-larger student trains on labeled + pseudo labels
  optional      "finetune-i"   (students[i-1].finetune) test-resolution fine-tuning of student i;
                               its export replaces the student's from then on
  optional      "baseline"     the final student's architecture and noise, labeled data only
                "eval-<name>"  test accuracy (+ the offline corruption suite) of every model
                "summary"      summary.json, a printed table, accuracy and corruption plots

Stages talk only through artifacts in the workdir: `<workdir>/<stage name>/` (a model stage's
export in its export/ folder), listed here so that the driver (nsjax.pipeline), the stages
(nsjax.stages) and validation (nsjax.validate) read one definition. Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

KINDS = ("teacher", "label", "student", "finetune", "baseline", "eval", "summary")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str           # "teacher", "label-1", "student-1", "baseline", "eval-student-1", "summary"
  kind: str           # one of KINDS
  iteration: int      # 0 for the teacher, i for the i-th student; -1 for the baseline/summary


def model_stage_names(config) -> list[str]:
  names = ["teacher"] + [f"student-{i}" for i in range(1, len(config.students) + 1)]
  return names + (["baseline"] if config.get("baseline") else [])


def schedule(config) -> list[Stage]:
  stages = [Stage("teacher", "teacher", 0)]
  for i, student in enumerate(config.students, start=1):
    if not student.get("online_teacher"):
      stages.append(Stage(f"label-{i}", "label", i))
    stages.append(Stage(f"student-{i}", "student", i))
    if student.get("finetune"):
      stages.append(Stage(f"finetune-{i}", "finetune", i))
  if config.get("baseline"):
    stages.append(Stage("baseline", "baseline", -1))
  for name in model_stage_names(config):
    stages.append(Stage(f"eval-{name}", "eval", iteration_of(name)))
  stages.append(Stage("summary", "summary", -1))
  return stages


def iteration_of(model_stage: str) -> int:
  return 0 if model_stage == "teacher" else (-1 if model_stage == "baseline"
                                             else int(model_stage.split("-")[1]))


def model_stage(name: str) -> Stage:
  """The Stage of a model name ("teacher", "student-2", "baseline")."""
  return Stage(name, name.split("-")[0], iteration_of(name))


def stage_config(stage: Stage, config):
  """The config section a model stage trains from (teacher, students[i-1] or baseline)."""
  if stage.kind == "teacher":
    return config.teacher
  if stage.kind == "baseline":
    return config.baseline
  return config.students[stage.iteration - 1]


def previous_model(stage: Stage) -> str:
  """The model stage whose export iteration i learns from: that of iteration i-1."""
  return "teacher" if stage.iteration == 1 else f"student-{stage.iteration - 1}"


def stage_inputs(stage_name: str, config) -> list[str]:
  """The stages whose artifacts `stage_name` reads."""
  stages = {s.name: s for s in schedule(config)}
  stage = stages[stage_name]
  if stage.kind == "label":
    return [previous_model(stage)]
  if stage.kind == "student":
    labels = f"label-{stage.iteration}"
    return [previous_model(stage)] + ([labels] if labels in stages else [])
  if stage.kind == "eval":
    return [stage_name[len("eval-"):]]
  if stage.kind == "summary":
    return [n for n in stages if n.startswith(("eval-", "label-"))]
  return []


def fingerprint(config) -> str:
  """Identifies the schedule, so a workdir is never resumed with a different one."""
  return hashlib.sha256(config.to_json(sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# Where each stage writes.

def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def export_dir(workdir: str, model_stage_name: str) -> str:
  return os.path.join(stage_dir(workdir, model_stage_name), "export")


def final_export_dir(config, workdir: str, model_stage_name: str) -> str:
  """The export that stands for a model stage: a fine-tuned student's replaces its own."""
  if model_stage_name.startswith("student-"):
    if config.students[iteration_of(model_stage_name) - 1].get("finetune"):
      return export_dir(workdir, model_stage_name.replace("student-", "finetune-"))
  return export_dir(workdir, model_stage_name)


def teacher_export_of(stage: Stage, config, workdir: str) -> str:
  """Iteration i learns from the (final) export of iteration i-1."""
  return final_export_dir(config, workdir, previous_model(stage))


def labels_dir(workdir: str, iteration: int) -> str:
  """The pseudo labels student i trains on."""
  return stage_dir(workdir, f"label-{iteration}")


def eval_results_path(workdir: str, model_stage_name: str) -> str:
  return os.path.join(stage_dir(workdir, "eval"), f"{model_stage_name}.json")


def record_index_dir(workdir: str) -> str:
  """Where the record offsets of the run's TFDS files are cached (nsjax.data.random_access)."""
  return os.path.join(workdir, "record_index")
