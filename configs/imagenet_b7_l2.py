"""The paper's ImageNet schedule: EfficientNet-B7 teacher -> L0 -> L1 -> L2, then L2 fine-tuned
at 800 px (FixRes-style).

Data: labeled = TFDS imagenet2012 train (manual download, see configs/imagenet_10pct.py),
test = validation. The paper's unlabeled set is JFT-300M, which is not public: UNLABELED names any
prepared TFDS dataset (with an `image` feature) to use instead -- set it before running.
Recipe (REFERENCE.md section 2): TF1 RMSProp (decay 0.9, momentum 0.9, eps 1e-3), lr 0.016 *
batch / 256 with 5 warmup epochs and staircase 0.97 every 2.4 epochs, 350 labeled epochs, weight
decay 1e-5, label smoothing 0.1, EMA 0.9999, bf16 compute, RandAugment N=2 M=27, dropout 0.5 and
stochastic depth 0.2, labeled batch 2048, unlabeled ratio 3 (the final L2 used 14:1, unverified),
soft pseudo labels, 130,000 images per class after balancing; L1 and L2 shard parameters,
EMA and optimizer slots (fsdp). L2 trains at 475 px and is fine-tuned 1.5 epochs at 800 px on
un-augmented labeled images with the stem and first blocks frozen (k not published).

  python -m nsjax.main --config=configs/imagenet_b7_l2.py --workdir=gs://BUCKET/nsjax-l2 \
      --distributed

Hardware: Cloud TPU pods; the paper trained L2 for about 6 days on a TPU v3 pod with 2048 cores.
The batch sizes (2048 labeled, 6144 unlabeled, 512 fine-tuning) divide evenly over up to 512
devices. Published (REFERENCE.md section 3): B7 -> L0 -> L1 -> L2
reached 87.4% top-1 (paper v1); released L2 at 800 px 88.4%; ImageNet-A 61.0 -> 83.7%,
ImageNet-C mCE 45.7 -> 28.3, ImageNet-P mFR 27.8 -> 12.2.
"""
from nsjax import config_lib
from nsjax.stages import finetune

UNLABELED = "imagenet2012"  # replace: JFT-300M is not public (any prepared TFDS image dataset)
UNLABELED_SPLIT = "train"
BATCH_SIZE = 2048
RATIO = 3.0  # the final L2 used 14:1 (unverified)


def get_config():
  c = config_lib.base_config()
  c.data.num_classes = 1000
  c.data.labeled = config_lib.data_source("imagenet2012", "train")
  c.data.unlabeled = config_lib.data_source(UNLABELED, UNLABELED_SPLIT)
  c.data.test = config_lib.data_source("imagenet2012", "validation")
  train = dict(batch_size=BATCH_SIZE, num_epochs=350, optimizer="rmsprop",
               base_learning_rate=0.016, warmup_epochs=5.0, lr_decay_epochs=2.4,
               lr_decay_factor=0.97, weight_decay=1e-5, label_smoothing=0.1, ema_decay=0.9999,
               compute_dtype="bfloat16",
               log_every_steps=100, checkpoint_every_steps=1000)  # nsjax's choice: logging, saving
  noise = config_lib.noise(randaugment_magnitude=27, randaugment_layers=2,
                           stochastic_depth_rate=0.2)
  student_train = dict(train, unlabeled_ratio=RATIO, pseudo_labels="soft")
  c.teacher = config_lib.model_stage("efficientnet-b7", 600, train=train, noise_cfg=noise)
  c.students = [
      config_lib.model_stage("efficientnet-l0", 380, test_resolution=500, noise_cfg=noise,
                             train=student_train, seed_offset=1),
      # fsdp=True: nsjax's choice (L1 and L2 do not fit replicated; the paper used TPU v3 pods).
      config_lib.model_stage("efficientnet-l1", 380, test_resolution=500, noise_cfg=noise,
                             train=dict(student_train, fsdp=True), seed_offset=2),
      config_lib.model_stage("efficientnet-l2", 475, test_resolution=800, noise_cfg=noise,
                             train=dict(student_train, fsdp=True), seed_offset=3),
  ]
  c.students[2].finetune = finetune.finetune_config(
      resolution=800, epochs=1.5, flip=False,  # the paper: 1.5 epochs at 800 px, no augmentation
      frozen_blocks=40,  # nsjax's choice (k is not published): the stem + 40 of L2's 88 blocks
      batch_size=512,  # nsjax's choice (not published): 800 px images need a smaller batch
      lr_mode="final",  # nsjax's choice: "the tail of the schedule" as its last learning rate
      train=dict(fsdp=True))  # nsjax's choice: shard L2 as in its training stage
  c.balance.num_image_per_class = 130_000
  c.balance.min_threshold = 0.3
  c.label.batch_size = 2048  # nsjax's choice (the paper does not say): inference batch size
  c.eval.batch_size = 1024  # nsjax's choice
  return c
