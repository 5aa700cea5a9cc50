"""What every stage runner gets: the config, the workdir, the data and the mesh of the run."""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from nsjax import schedule
from nsjax.data import input_pipeline, views
from nsjax.evaluate import accuracy
from nsjax.run_state import RunState


@dataclasses.dataclass
class Context:
  config: ml_collections.ConfigDict   # resolved: image folders converted, num_classes known
  workdir: str
  data_dir: str | None                # where the run's TFDS datasets are (None: TFDS's default)
  mesh: Any
  state: RunState
  started: float                      # time.time() when this process started the run

  def source(self, role: str) -> input_pipeline.Source:
    """The data source config.data.<role> ("labeled", "unlabeled" or "test")."""
    return source(self.config.data[role], self.data_dir)

  def eval_fn(self, model):
    """`eval_fn(variables) -> {"top1", "top5", ...}` of `model` on the test split."""
    test_src = self.source("test")
    batch_size = int(self.config.eval.batch_size)
    view = views.eval_view_fn(model.test_resolution, self.config.data.small_image,
                              test_src.image_key)
    return accuracy.make_eval_fn(model, self.mesh, lambda: input_pipeline.eval_batches(
        test_src, global_batch_size=batch_size, preprocess_fn=view))

  def stage_dir(self, name: str) -> str:
    return schedule.stage_dir(self.workdir, name)

  @property
  def record_index_dir(self) -> str:
    return schedule.record_index_dir(self.workdir)


def source(cfg, data_dir: str | None) -> input_pipeline.Source:
  """An input_pipeline.Source from a config data source (its own data_dir first)."""
  return input_pipeline.Source(cfg.name, cfg.split, cfg.data_dir or data_dir, cfg.image_key)


def num_examples(src: input_pipeline.Source) -> int:
  builder = input_pipeline.load_builder(src.name, src.data_dir)
  return int(builder.info.splits[src.split].num_examples)
