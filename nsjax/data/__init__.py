"""Input data for nsjax: the offline `mnist5k` TFDS dataset and tf.data pipelines over any TFDS data.

    from nsjax.data import Source, train_batches, eval_batches
    it = train_batches(Source("mnist5k/labels_10", "train", data_dir), global_batch_size=128,
                       preprocess_fn=my_preprocess, seed=0, mesh=mesh)
"""
from __future__ import annotations

import importlib.resources
import sys

# tensorflow-datasets 4.9.10 imports the `importlib_resources` backport when it builds a dataset, but
# no package it depends on installs it any more; the standard library's module has the same API.
try:
  import importlib_resources  # noqa: F401
except ImportError:
  sys.modules["importlib_resources"] = importlib.resources

from nsjax.data import mnist5k, natural_patches  # noqa: E402,F401  (register them with TFDS)
from nsjax.data.input_pipeline import (  # noqa: E402
    BatchIterator, DatasetNotPreparedError, PreprocessFn, Source, eval_batches,
    identity_preprocess, single_pass_batches, train_batches, unlabeled_batches)

__all__ = [
    "BatchIterator", "DatasetNotPreparedError", "PreprocessFn", "Source", "eval_batches",
    "identity_preprocess", "mnist5k", "single_pass_batches", "train_batches", "unlabeled_batches",
]
