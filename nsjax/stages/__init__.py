"""The stage kinds of a schedule, one module each; nsjax.stages.registry maps a kind to its runner.

  train     teacher, student and baseline training (nsjax.train.loop on the stage's data)
  label     the teacher labels the unlabeled split; filtering and balancing are planned
  finetune  test-resolution fine-tuning of a student
  evaluate  test accuracy and the offline corruption suite of a model's export
  summary   summary.json, the printed table and the plots

Every runner is `run(stage, context) -> result dict` (recorded in state.json); what a stage reads
and where it writes are nsjax.schedule's. This package imports nothing itself, so validation can
import one stage module without the others.
"""
