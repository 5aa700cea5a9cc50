"""The checks that a teacher's export fits the stage that learns from it: the classes it predicts
(count, and names where both sides know them) and, for an imported teacher (teacher.checkpoint),
that the export is there and holds the architecture teacher.model names.

The train stages run them when they read a teacher; config validation (nsjax.validate) runs the
imported teacher's before any compute. A mismatch is a ConfigError (the commands exit 2).
"""
from __future__ import annotations

from nsjax import exported_model, models
from nsjax.config_lib import ConfigError
from nsjax.data import folder


def check_imported_teacher(stage, num_classes: int) -> models.EfficientNet:
  """teacher.checkpoint holds an export predicting num_classes; returns its model."""
  path = stage.checkpoint
  if not exported_model.is_exported(path):
    raise ConfigError(f"teacher.checkpoint {path} holds no exported model (model.json + "
                      "variables/). Convert an official checkpoint with `python -m "
                      "nsjax.tools.convert_checkpoint`, or point to a stage's export/ folder.")
  teacher = exported_model.read_description(path)["model"]
  check_teacher_classes(f"teacher.checkpoint {path}", teacher["num_classes"], num_classes,
                        "config.data.num_classes")
  if stage.get("model") and stage.model != teacher["model_name"]:
    raise ConfigError(f"teacher.model is {stage.model!r} but teacher.checkpoint {path} holds "
                      f"{teacher['model_name']!r}; the checkpoint decides the architecture, so "
                      f"set teacher.model = {teacher['model_name']!r}.")
  return models.model_from_config(teacher)


def check_teacher_export(teacher_dir: str, num_classes: int, class_names, student: str) -> None:
  """The check, when a stage has the teacher's export at hand, that it predicts what `student`
  (e.g. "the student's labeled data") learns: the class count, and the class names when both
  sides know them (image folders)."""
  description = exported_model.read_description(teacher_dir)
  folder.check_class_names(description["metadata"].get("class_names"), class_names,
                           f"the teacher at {teacher_dir}", student,
                           "Use a teacher trained on these classes (or a new workdir).")
  check_teacher_classes(f"The teacher at {teacher_dir}", description["model"]["num_classes"],
                        num_classes, "config.data.num_classes")


def check_teacher_classes(teacher: str, teacher_classes: int, num_classes: int,
                          student: str) -> None:
  """The one check that a teacher predicts the classes its student (or the config) has."""
  if teacher_classes != num_classes:
    raise ConfigError(f"{teacher} predicts {teacher_classes} classes but {student} is "
                      f"{num_classes}; use a teacher trained on these classes (or set "
                      "config.data.num_classes to match).")
