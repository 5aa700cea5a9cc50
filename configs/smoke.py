"""Smoke schedule: the smallest whole run (teacher, labeling, one student, evaluation).

Hardware: any CPU; about a minute on a 2-core machine. Used by the tests and for quick checks.
Every value is nsjax's own (tiny models with 2 of EfficientNet's 7 block stages, a few steps):
nothing here reproduces the paper.

  python -m nsjax.main --config=configs/smoke.py --workdir=/tmp/nsjax-smoke
"""
from nsjax import config_lib


def get_config():
  c = config_lib.base_config()
  c.seed = 0
  c.data.num_classes = 10
  c.data.small_image = True
  c.data.labeled = config_lib.data_source("mnist5k/labels_10", "train")
  c.data.unlabeled = config_lib.data_source("mnist5k/labels_10", "unlabeled[:512]")
  c.data.test = config_lib.data_source("mnist5k/labels_10", "test[:256]")
  # Two of the seven block stages (2 blocks): the tests check plumbing, and the train step
  # compiles in about half the time of the 7-block network.
  tiny = dict(width=0.1, depth=0.1, block_stages=2)
  # Two updates per compiled call, as the demo makes ten: the tests that run this schedule (resume,
  # preemption, several hosts) then go through that path; 2 divides every log and checkpoint step.
  train = dict(batch_size=32, num_train_steps=12, optimizer="adamw", base_learning_rate=0.02,
               warmup_epochs=0.5, lr_schedule="cosine", ema_decay=0.9, log_every_steps=4,
               checkpoint_every_steps=6, weight_decay=1e-4, steps_per_call=2)
  c.teacher = config_lib.model_stage("efficientnet-b0", 28, model_overrides=tiny, train=train,
                                     noise_cfg=config_lib.noise(randaugment_magnitude=5))
  c.students = [config_lib.model_stage(
      "efficientnet-b0", 28, model_overrides=tiny, train=dict(train, unlabeled_ratio=1.0),
      noise_cfg=config_lib.noise(randaugment_magnitude=5), seed_offset=1)]
  c.label.batch_size = 128
  c.label.shard_bytes = 64 * 1024  # 2 batches of 128 digits a shard: 2 shards, to exercise them
  c.balance.num_image_per_class = 40
  c.balance.min_threshold = 0.0  # a 12-step teacher is not confident; keep everything
  c.eval.batch_size = 128
  c.eval.corruptions = ["gaussian_noise", "contrast"]
  c.eval.severities = [1, 5]
  c.eval.max_corruption_examples = 128
  return c
