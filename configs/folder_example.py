"""Noisy Student on your own images: labeled, unlabeled and test image folders (local or gs://).

Layout under ROOT (JPEG/PNG; other formats PIL reads are converted; bad files are skipped and
counted in summary.json):

  ROOT/labeled/<class name>/**/*.jpg     one subfolder per class, at least one image in each
  ROOT/unlabeled/**/*.jpg                any nesting; no labels needed
  ROOT/test/<class name>/**/*.jpg        the same class names as labeled/

The number of classes and the class names come from labeled/ (data.num_classes = 0 means "count
them"); they are stored with every exported model. Each folder is converted once into a TFDS dataset
under <workdir>/folder_datasets (or data.folder_cache_dir) and rebuilt only when its files change.

Schedule: EfficientNet-B0 teacher at 224 px -> noisy B1 student (240 px) -> noisy B2 student
(260 px), each student on labeled + filtered, balanced soft pseudo labels (3 unlabeled per labeled
image), with RandAugment, dropout and stochastic depth. Hardware: one GPU or TPU host; hours for a
few thousand labeled images. Tune num_epochs to your data (an epoch is a pass over labeled/).
The values are nsjax's own starting points for small data sets, not the paper's ImageNet recipe.

  python -m nsjax.main --config=configs/folder_example.py:/data/flowers --workdir=/tmp/ns-flowers
  # A one-minute check of the layout and the whole schedule with tiny models on the CPU:
  python -m nsjax.main --config=configs/folder_example.py:/data/flowers,tiny --workdir=/tmp/ns-check
"""
from nsjax import config_lib


def _parse(arg: str | None) -> tuple[str, bool]:
  parts = [p for p in (arg or "").split(",") if p]
  tiny = "tiny" in parts[1:]
  unknown = [p for p in parts[1:] if p != "tiny"]
  if unknown:
    raise ValueError(f"configs/folder_example.py takes 'ROOT' or 'ROOT,tiny'; got extra {unknown}.")
  return (parts[0] if parts else "my_images"), tiny


def get_config(arg: str | None = None):
  root, tiny = _parse(arg)
  c = config_lib.base_config()
  c.seed = 0
  c.data.num_classes = 0  # from the labeled folder's class subfolders
  c.data.small_image = False  # any image size: random-sized crops, centre-crop evaluation
  c.data.labeled = config_lib.data_source(folder=f"{root}/labeled", kind="labeled")
  c.data.unlabeled = config_lib.data_source(folder=f"{root}/unlabeled", kind="unlabeled")
  c.data.test = config_lib.data_source(folder=f"{root}/test", kind="labeled")
  c.data.folder_cache_dir = ""  # "" = <workdir>/folder_datasets; set to share builds across runs
  return _tiny(c) if tiny else _full(c)


def _full(c):
  def train(epochs, **kw):
    return dict(batch_size=64, num_epochs=epochs, optimizer="adamw", base_learning_rate=0.004,
                lr_schedule="cosine", lr_decay_epochs=epochs, warmup_epochs=5,
                weight_decay=1e-5, ema_decay=0.999, label_smoothing=0.1, log_every_steps=50,
                checkpoint_every_steps=500, **kw)

  student = train(100, unlabeled_ratio=3.0, pseudo_labels="soft", temperature=1.0)
  c.teacher = config_lib.model_stage("efficientnet-b0", 224, train=train(100),
                                     noise_cfg=config_lib.noise(randaugment_magnitude=5))
  c.students = [
      config_lib.model_stage("efficientnet-b1", 240, train=student, seed_offset=1,
                             noise_cfg=config_lib.noise(randaugment_magnitude=9)),
      config_lib.model_stage("efficientnet-b2", 260, train=student, seed_offset=2,
                             noise_cfg=config_lib.noise(randaugment_magnitude=9)),
  ]
  c.label.batch_size = 128
  c.balance.num_image_per_class = 0  # unlabeled images / classes
  c.balance.min_threshold = 0.3
  c.eval.batch_size = 128
  c.eval.corruptions = ["gaussian_noise", "motion_blur", "contrast", "jpeg_compression"]
  c.eval.severities = [1, 3, 5]
  c.eval.max_corruption_examples = 1000
  return c


def _tiny(c):
  """Tiny models, 8 steps per stage: checks the folders and the schedule, learns nothing much."""
  tiny = dict(width=0.1, depth=0.1, block_stages=2)  # 2 blocks: compiles in half the time
  train = dict(batch_size=16, num_train_steps=8, optimizer="adamw", base_learning_rate=0.02,
               warmup_epochs=0.5, lr_schedule="cosine", ema_decay=0.9, log_every_steps=4,
               checkpoint_every_steps=4, weight_decay=1e-4)
  noise = config_lib.noise(randaugment_magnitude=5)
  c.teacher = config_lib.model_stage("efficientnet-b0", 32, model_overrides=tiny, train=train,
                                     noise_cfg=noise)
  c.students = [config_lib.model_stage("efficientnet-b0", 32, model_overrides=tiny,
                                       train=dict(train, unlabeled_ratio=1.0), noise_cfg=noise,
                                       seed_offset=1)]
  c.label.batch_size = 32
  c.label.shard_bytes = 64 * 1024
  c.balance.num_image_per_class = 0
  c.balance.min_threshold = 0.0  # an 8-step teacher is not confident; keep everything
  c.eval.batch_size = 32
  c.eval.corruptions = []
  return c
