"""The smoke schedule shrunk for the end-to-end multi-host test (tests/test_multihost.py).

Same stages (teacher, label-1, student-1, eval, summary) with fewer steps and images: on a 2-core
machine nearly all of a run's time is XLA compilation, which this cannot shrink, so the steps and
images are cut only as far as the comparisons stay meaningful.
"""
import importlib.util
import os

from nsjax import config_lib


def _smoke():
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                      "smoke.py")
  spec = importlib.util.spec_from_file_location("nsjax_smoke_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _smoke()
  c.data.unlabeled = config_lib.data_source("mnist5k/labels_10", "unlabeled[:256]")
  c.data.test = config_lib.data_source("mnist5k/labels_10", "test[:128]")
  for stage in [c.teacher] + list(c.students):
    stage.train.num_train_steps = 8
    stage.train.checkpoint_every_steps = 4
    stage.train.log_every_steps = 4
    # float32 products: the tolerances below are float32's, and the bfloat16 operands an AMX CPU
    # would give the wider 1x1 convolutions move 2 x 2 and 1 x 4 devices further apart (observed:
    # student top-1 3 of 128 examples apart, where float32 stays within 2).
    stage.model_overrides.matmul_operands = "float32"
  c.label.batch_size = 64  # 4 batches: 2 shards per host on 2 hosts
  c.label.shard_bytes = 1  # a shard per batch
  # Every pseudo-labeled image once: this 8-step teacher is near uniform (top-2 probabilities ~2e-4
  # apart), so the float differences between 2 x 2 and 1 x 4 devices flip argmax classes, and
  # per-class balancing would hand the two students different data (observed: 12 vs 21 images of
  # one class, student parameters 6e-3 apart). The same images, then only float differences.
  c.balance.num_image_per_class = -1
  c.eval.batch_size = 64
  c.eval.corruptions = ["contrast"]
  c.eval.severities = [3]
  c.eval.max_corruption_examples = 64
  return c
