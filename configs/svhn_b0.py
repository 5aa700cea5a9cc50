"""SVHN, the official Noisy Student recipe: EfficientNet-B0 teacher -> noisy B0 student at 32 px.

Data (TFDS svhn_cropped, prepare once with `tfds build svhn_cropped`): labeled = train minus the
first 4,000 images (kept out as a dev set; 69,257 images), unlabeled = extra (531,131), test = test.
Recipe (REFERENCE.md sections 2-3): B0 small_image at 32 px, labeled batch 128, unlabeled ratio 5,
soft pseudo labels, weight decay 1e-4, TF1 RMSProp at lr 0.008 staircase-decayed to 2e-4 over
109,474 steps, RandAugment N=2 M=5 plus a 16x16 cutout, reflect-pad + crop, no flip; offline
labeling with 53,113 images per class after balancing.

  python -m nsjax.main --config=configs/svhn_b0.py --workdir=/tmp/nsjax-svhn

Hardware: one accelerator is enough (B0 at 32 px); about a day per stage on one V100-class GPU
(estimate, not measured), 8-core TPU faster. Published result (official repo): teacher 97.9% ->
student 98.6 +- 0.1% test top-1.
"""
import math

from nsjax import config_lib

NUM_LABELED = 73_257 - 4_000
BATCH_SIZE = 128
NUM_STEPS = 109_474
PEAK_LR, FINAL_LR, DECAY_FACTOR = 0.008, 2e-4, 0.97


def decay_epochs() -> float:
  """The staircase interval (in labeled epochs) that takes PEAK_LR to FINAL_LR at the last step."""
  num_decays = math.log(FINAL_LR / PEAK_LR) / math.log(DECAY_FACTOR)
  return NUM_STEPS / num_decays / (NUM_LABELED / BATCH_SIZE)


def get_config():
  c = config_lib.base_config()
  c.data.num_classes = 10
  c.data.small_image = True
  c.data.labeled = config_lib.data_source("svhn_cropped", "train[4000:]")
  c.data.unlabeled = config_lib.data_source("svhn_cropped", "extra")
  c.data.test = config_lib.data_source("svhn_cropped", "test")
  # Warmup: the default 5 epochs of the ImageNet recipe; not stated for SVHN, so nsjax's choice.
  train = dict(batch_size=BATCH_SIZE, num_train_steps=NUM_STEPS, optimizer="rmsprop",
               base_learning_rate=PEAK_LR * 256 / BATCH_SIZE,  # peak = base * batch / 256
               lr_schedule="exponential", lr_decay_factor=DECAY_FACTOR,
               lr_decay_epochs=decay_epochs(), weight_decay=1e-4)
  noise = config_lib.noise(randaugment_magnitude=5, randaugment_layers=2, cutout=16, flip=False)
  c.teacher = config_lib.model_stage("efficientnet-b0", 32, train=train, noise_cfg=noise)
  c.students = [config_lib.model_stage(
      "efficientnet-b0", 32, noise_cfg=noise, seed_offset=1,
      train=dict(train, unlabeled_ratio=5.0, pseudo_labels="soft"))]
  c.balance.num_image_per_class = 53_113
  c.balance.min_threshold = 0.3
  c.label.batch_size = 1024  # nsjax's choice (not published): inference batch size
  c.eval.batch_size = 1024  # nsjax's choice
  return c
