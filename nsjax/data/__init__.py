"""Input data for nsjax (TFDS datasets, tf.data pipelines)."""
from __future__ import annotations

import importlib.resources
import sys

# tensorflow-datasets 4.9.10 imports the `importlib_resources` backport when it builds a dataset, but
# no package it depends on installs it any more; the standard library's module has the same API.
try:
  import importlib_resources  # noqa: F401
except ImportError:
  sys.modules["importlib_resources"] = importlib.resources
