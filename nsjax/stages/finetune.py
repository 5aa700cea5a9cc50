"""Test-resolution fine-tuning (FixRes-style): a trained student, briefly, at its test resolution.

Training at a lower resolution than the test one leaves a train/test discrepancy in apparent object
size; the paper fine-tunes the final student for 1.5 epochs at the test resolution on UN-augmented
labeled images (the eval view, optionally flipped), with the shallow layers frozen -- the stem and
the first k blocks, BatchNorm in inference mode, no gradient (model override `frozen_blocks=k`,
and `nsjax.train.optimizer.freeze` zeroes their updates) -- running the tail of the learning-rate
schedule. The frozen layers, their BatchNorm statistics and EMA copies therefore come out
bit-identical; only the deeper blocks and the head move.

The learning rate (`lr_mode`):
  "final"     constant, the student's last learning rate (its schedule at its final step)
  "continue"  the student's staircase exponential decay, continued from that value
  "constant"  `learning_rate` (an absolute value, not per 256 images); needed when the student
              was imported rather than trained here (its export carries no schedule)

A config (`finetune_config`, one per student in the pipeline as `students[i].finetune`):
  resolution     the test resolution to fine-tune at (required)
  epochs         1.5 (labeled epochs)
  frozen_blocks  k: stem + blocks 0..k-1 frozen (-1 freezes nothing; k is not published)
  batch_size     0 = the student's labeled batch size
  lr_mode, learning_rate   see above
  flip           random horizontal flips (False: the plain eval view)
  train          further nsjax.train.settings overrides (e.g. ema_decay, log_every_steps)
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import ml_collections
import tensorflow as tf

from nsjax import config_lib, exported_model, models, schedule
from nsjax.data import input_pipeline, student_input, views
from nsjax.stages.context import Context, num_examples
from nsjax.train import loop, settings


LR_MODES = ("final", "continue", "constant")


# Defined with every other config default in nsjax.config_lib (config validation reads them there).
finetune_config = config_lib.finetune_config


def check_config(ft, where: str = "finetune") -> None:
  """Raises ValueError naming the key and the fix (nsjax.validate checks the batch size's
  divisibility with every other batch size's)."""
  if int(ft.resolution) < 8:
    raise ValueError(f"{where}.resolution = {ft.resolution}: set the test resolution to "
                     "fine-tune at (e.g. 800 for L2, 32 for SVHN).")
  if float(ft.epochs) <= 0:
    raise ValueError(f"{where}.epochs = {ft.epochs} must be > 0 (the paper uses 1.5).")
  if ft.lr_mode not in LR_MODES:
    raise ValueError(f"{where}.lr_mode = {ft.lr_mode!r}; use one of {LR_MODES}.")
  if ft.lr_mode == "constant" and float(ft.learning_rate) <= 0:
    raise ValueError(f"{where}.learning_rate must be > 0 with lr_mode='constant'.")
  if int(ft.frozen_blocks) < -1:
    raise ValueError(f"{where}.frozen_blocks = {ft.frozen_blocks}: use -1 (none) or k >= 0.")


def student_train_config(metadata: dict[str, Any]) -> ml_collections.ConfigDict | None:
  """The resolved loop config an export was trained with (None for an imported model)."""
  saved = metadata.get("train_config")
  if not saved:
    return None
  known = settings.default_config()
  given = {k: (None if v == "none" else v) for k, v in saved.items() if k in known}
  return settings.resolve_config(given)


def learning_rate_settings(ft, student: ml_collections.ConfigDict | None, student_step: int,
                           batch_size: int) -> dict[str, Any]:
  """Loop keys (base_learning_rate per 256 images, schedule, no warmup) for `ft.lr_mode`."""
  if ft.lr_mode == "constant":
    lr, lr_schedule = float(ft.learning_rate), "constant"
  else:
    if student is None:
      raise ValueError(f"lr_mode={ft.lr_mode!r} needs the student's schedule, but its export "
                       "has no train_config (imported?); use lr_mode='constant' with "
                       "learning_rate.")
    lr = float(settings.make_schedule(student)(student_step))
    lr_schedule = "constant" if ft.lr_mode == "final" else "exponential"
  lr_settings = dict(base_learning_rate=lr * 256.0 / batch_size, lr_schedule=lr_schedule,
                     warmup_epochs=0.0)
  if student is not None and ft.lr_mode == "continue":
    lr_settings.update(lr_decay_epochs=student.lr_decay_epochs,
                       lr_decay_factor=student.lr_decay_factor)
  return lr_settings


def finetune_train_config(ft, metadata: dict[str, Any], num_labeled: int,
                          seed: int) -> ml_collections.ConfigDict:
  """The loop config of a fine-tuning run: the student's optimizer and loss settings, labeled
  data only, `ft.epochs` long, the learning rate from `learning_rate_settings`."""
  student = student_train_config(metadata)
  base = student.to_dict() if student is not None else {}
  batch_size = int(ft.batch_size) or int(base.get("batch_size") or 0)
  if not batch_size:
    raise ValueError("finetune.batch_size must be set: the student's export does not say its "
                     "batch size.")
  for key in ("num_train_steps", "steps_per_epoch", "num_epochs", "export_dir",
              "unlabeled_ratio"):
    base.pop(key, None)
  base.update(batch_size=batch_size, num_labeled_examples=num_labeled, num_epochs=float(ft.epochs),
              seed=seed, export=False)
  base.update(learning_rate_settings(ft, student, int(metadata.get("step", 0)), batch_size))
  base.update(dict(ft.get("train", {}) or {}))
  return settings.resolve_config(base)


def finetune_model(student: models.EfficientNet, ft) -> models.EfficientNet:
  res = int(ft.resolution)
  return student.clone(frozen_blocks=int(ft.frozen_blocks), train_resolution=res,
                       test_resolution=res)


def labeled_batches(src: input_pipeline.Source, model: models.EfficientNet, batch_size: int,
                    seed: int, flip: bool, mesh, index_dir: str | None = None
                    ) -> Callable[[int], Iterator[dict]]:
  """start_step -> global batches of the eval view (plus optional flips) of labeled images."""
  eval_view = views.eval_view_fn(model.test_resolution, model.small_image, src.image_key)

  def view(features, example_seed):
    out = eval_view(features, example_seed)
    if flip:
      out["image"] = tf.image.stateless_random_flip_left_right(out["image"], example_seed)
    return out

  def batches(start_step: int, input_position: dict | None = None) -> Iterator[dict]:
    labeled = input_pipeline.train_batches(
        src, global_batch_size=batch_size, preprocess_fn=view, seed=seed, start_step=start_step,
        position=(input_position or {}).get("labeled"), index_dir=index_dir)
    return student_input.StageBatches(labeled, None, mesh)  # reports positions
  return batches


def finetune(student_export: str, labeled: input_pipeline.Source, workdir: str, ft, *, mesh,
             num_labeled: int, seed: int = 0, eval_fn=None, export_dir: str = "",
             batches: Callable[[int], Iterator[dict]] | None = None,
             index_dir: str | None = None) -> dict[str, Any]:
  """Fine-tunes the export at `student_export`; writes the result to `export_dir` (default
  workdir/export) as an ordinary model (nothing frozen, test resolution = ft.resolution).

  `batches` (start_step -> global batches {"labeled": ...}) replaces the TFDS labeled data.
  `eval_fn(model)` -> an eval_fn for the loop (it needs the fine-tuned model's resolution).
  `index_dir`: where the labeled files' record offsets are cached (input_pipeline.train_batches).
  """
  student, variables, metadata = exported_model.load_exported(student_export)
  model = finetune_model(student, ft)
  cfg = finetune_train_config(ft, metadata, num_labeled, seed)
  if batches is None:
    batches = labeled_batches(labeled, model, cfg.batch_size, cfg.seed, bool(ft.flip), mesh,
                              index_dir)
  result = loop.train(cfg, model, batches, workdir, eval_fn=eval_fn(model) if eval_fn else None,
                      mesh=mesh, initial_variables=variables)
  out = export_dir or f"{workdir.rstrip('/')}/export"
  exported = model.clone(frozen_blocks=-1)
  final_metrics = {k: float(v) for k, v in result.metrics.items()
                   if isinstance(v, (int, float)) or getattr(v, "ndim", 1) == 0}
  exported_model.export_model(out, exported, result.state.ema_variables, {
      "step": int(result.step), "finetuned_from": str(student_export),
      "student_step": int(metadata.get("step", 0)),
      "train_config": {k: ("none" if v is None else v) for k, v in cfg.to_dict().items()},
      "metrics": final_metrics})
  return {"step": int(result.step), "export_dir": out, "final_metrics": final_metrics,
          "learning_rate": float(settings.make_schedule(cfg)(0)),
          "num_train_steps": settings.num_train_steps(cfg),
          **result.skipped_fields()}


def run(stage: schedule.Stage, ctx: Context) -> dict:
  """Fine-tunes student i on the labeled data; its export replaces the student's from then on."""
  labeled = ctx.source("labeled")
  return finetune(
      schedule.export_dir(ctx.workdir, f"student-{stage.iteration}"), labeled,
      ctx.stage_dir(stage.name), ctx.config.students[stage.iteration - 1].finetune, mesh=ctx.mesh,
      num_labeled=num_examples(labeled),
      seed=int(ctx.config.seed) * 1000 + 500 + stage.iteration, eval_fn=ctx.eval_fn,
      index_dir=ctx.record_index_dir)
