"""CIFAR-10 with 4,000 labels: EfficientNet-B0 teacher -> noisy B0 student at 32 px.

Data (TFDS cifar10): labeled = the first 4,000 training images (not exactly class-balanced:
TFDS's stored order), unlabeled = the other 46,000 training images, test = test (10,000).
Hyperparameters transplant the SVHN recipe (configs/svhn_b0.py) with random flips on; they are not
tuned for CIFAR-10.

  python -m nsjax.main --config=configs/cifar10_4000.py --workdir=/tmp/nsjax-cifar10

Hardware: one accelerator (B0 at 32 px). Published error rates to compare with are for
WRN-28-2, not B0 (USB benchmark): supervised 15.5%, pseudo-label 14.9%, FixMatch 4.3%, Meta Pseudo
Labels 3.9% (REFERENCE.md section 3).
"""
from nsjax import config_lib

NUM_LABELED = 4_000
BATCH_SIZE = 128


def get_config():
  c = config_lib.base_config()
  c.data.num_classes = 10
  c.data.small_image = True
  c.data.labeled = config_lib.data_source("cifar10", f"train[:{NUM_LABELED}]")
  c.data.unlabeled = config_lib.data_source("cifar10", f"train[{NUM_LABELED}:]")
  c.data.test = config_lib.data_source("cifar10", "test")
  # Everything below but the data is nsjax's choice: the paper publishes no CIFAR-10 recipe, so
  # this transplants the SVHN one (configs/svhn_b0.py) untuned.
  train = dict(batch_size=BATCH_SIZE, num_train_steps=100_000, optimizer="rmsprop",
               base_learning_rate=0.016, lr_schedule="exponential", lr_decay_epochs=24.0,
               warmup_epochs=5.0, weight_decay=1e-4)
  noise = config_lib.noise(randaugment_magnitude=5, randaugment_layers=2, cutout=16,
                           flip=True)  # nsjax's choice: flips suit CIFAR-10 (not SVHN's digits)
  c.teacher = config_lib.model_stage("efficientnet-b0", 32, train=train, noise_cfg=noise)
  c.students = [config_lib.model_stage(
      "efficientnet-b0", 32, noise_cfg=noise, seed_offset=1,
      train=dict(train, unlabeled_ratio=5.0, pseudo_labels="soft"))]
  c.balance.num_image_per_class = 46_000 // 10  # nsjax's choice: unlabeled images / classes
  c.label.batch_size = 1024  # nsjax's choice
  c.eval.batch_size = 1000  # nsjax's choice
  return c
