"""ImageNet with 10% of the labels: EfficientNet-B0 teacher -> noisy B1 student.

Data: labeled = TFDS imagenet2012_subset/10pct train (128,116 images), unlabeled = imagenet2012
train (1.28M, labels ignored), test = imagenet2012 validation (50,000). Both need the manual
ImageNet download (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar in <data_dir>/downloads/manual,
then `tfds build imagenet2012 imagenet2012_subset/10pct --data_dir=...`).
Recipe (REFERENCE.md section 2): TF1 RMSProp, lr 0.016 * batch / 256, 5 warmup epochs, staircase
0.97 every 4.8 epochs over 700 labeled epochs (small models), label smoothing 0.1, EMA 0.9999,
bf16 compute; B0/B1 get no RandAugment in the official scripts (dropout + stochastic depth only);
unlabeled ratio 3, soft labels, balancing to 1,280 images per class.

  python -m nsjax.main --config=configs/imagenet_10pct.py --workdir=gs://BUCKET/nsjax-10pct \
      --distributed

Hardware: a TPU v3-32 / 8-GPU node class machine (estimate); batch sizes are multiples of 32.
Published: no Noisy Student number for this exact setting; the released fully supervised
Noisy Student B0 / B1 reach 78.8 / 81.5% with all labels and JFT (REFERENCE.md section 3).
"""
from nsjax import config_lib

BATCH_SIZE = 1024  # nsjax's choice: the paper's 2048 for 10x fewer labeled images


def get_config():
  c = config_lib.base_config()
  c.data.num_classes = 1000
  c.data.labeled = config_lib.data_source("imagenet2012_subset/10pct", "train")
  c.data.unlabeled = config_lib.data_source("imagenet2012", "train")
  c.data.test = config_lib.data_source("imagenet2012", "validation")
  train = dict(batch_size=BATCH_SIZE, num_epochs=700, optimizer="rmsprop",
               base_learning_rate=0.016, warmup_epochs=5.0, lr_decay_epochs=4.8,
               weight_decay=1e-5, compute_dtype="bfloat16",
               log_every_steps=100, checkpoint_every_steps=2000)  # nsjax's choice: logging, saving
  c.teacher = config_lib.model_stage("efficientnet-b0", 224, train=train)
  c.students = [config_lib.model_stage(
      "efficientnet-b1", 240, seed_offset=1,
      train=dict(train, unlabeled_ratio=3.0, pseudo_labels="soft"))]
  c.balance.num_image_per_class = 1_280  # nsjax's choice: 1.28M unlabeled images / 1000 classes
  c.balance.min_threshold = 0.3
  c.label.batch_size = 1024  # nsjax's choice
  c.eval.batch_size = 1024  # nsjax's choice
  return c
