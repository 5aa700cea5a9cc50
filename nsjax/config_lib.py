"""Building blocks for experiment configs (configs/*.py): defaults for every key, in one place."""
from __future__ import annotations

from typing import Any

import ml_collections


def data_source(name: str = "", split: str = "", data_dir: str | None = None,
                image_key: str = "image", *, folder: str = "",
                kind: str = "labeled") -> ml_collections.ConfigDict:
  """A TFDS dataset (`name` with optional "/config", `split`, optional `data_dir`), or an image
  folder, local or gs:// (`folder`; `kind` "labeled": one subfolder per class, "unlabeled": any
  nested images; `split` defaults to the whole folder, "train", and takes slices like
  "train[:90%]"). Folders are converted once into TFDS datasets (nsjax.data.folder)."""
  if bool(name) == bool(folder):
    raise ValueError("A data source needs exactly one of `name` (a TFDS dataset) or `folder` (an "
                     f"image folder); got name={name!r}, folder={folder!r}.")
  if folder:
    if kind not in ("labeled", "unlabeled"):
      raise ValueError(f"data_source kind={kind!r}; use 'labeled' or 'unlabeled'.")
    # Folder keys exist only on folder sources, so TFDS sources (and their workdirs' config
    # fingerprints) are exactly as before.
    return ml_collections.ConfigDict(dict(name="", split=split or "train", data_dir="",
                                          image_key=image_key, folder=folder, kind=kind))
  if not split:
    raise ValueError(f"The TFDS data source {name!r} needs a split, e.g. 'train'.")
  return ml_collections.ConfigDict(dict(name=name, split=split, data_dir=data_dir or "",
                                        image_key=image_key))


def noise(randaugment_magnitude: float = 0, randaugment_layers: int = 2,
          dropout_rate: float | None = None, stochastic_depth_rate: float | None = None,
          cutout: int = 0, flip: bool | None = None) -> ml_collections.ConfigDict:
  """Student noise. RandAugment magnitude 0 = off; dropout / stochastic depth None = the model's
  defaults (REFERENCE.md: per-model dropout, stochastic depth 0.2)."""
  return ml_collections.ConfigDict(dict(
      randaugment_magnitude=randaugment_magnitude, randaugment_layers=randaugment_layers,
      dropout_rate=dropout_rate, stochastic_depth_rate=stochastic_depth_rate, cutout=cutout,
      flip=flip), type_safe=False)


def model_stage(model: str, resolution: int, *, train: dict[str, Any],
                noise_cfg: ml_collections.ConfigDict | None = None,
                model_overrides: dict[str, Any] | None = None, test_resolution: int = 0,
                online_teacher: bool = False, checkpoint: str = "",
                seed_offset: int = 0) -> ml_collections.ConfigDict:
  """A teacher, student or baseline: model, resolutions, noise and nsjax.train.loop settings.

  `train` holds nsjax.train.loop keys (batch_size, num_epochs, optimizer, base_learning_rate,
  warmup_epochs, lr_decay_epochs, unlabeled_ratio, pseudo_labels, temperature, ...).
  `checkpoint` (teacher only): an exported model to import instead of training.
  """
  return ml_collections.ConfigDict(dict(
      model=model, resolution=resolution, test_resolution=test_resolution or resolution,
      model_overrides=dict(model_overrides or {}), train=dict(train),
      noise=noise_cfg if noise_cfg is not None else noise(), online_teacher=online_teacher,
      checkpoint=checkpoint, seed_offset=seed_offset), type_safe=False)


def base_config() -> ml_collections.ConfigDict:
  """Everything but the data sources and the model stages."""
  c = ml_collections.ConfigDict(type_safe=False)
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(num_classes=1000, small_image=False, data_dir=""))
  # shard_bytes: pseudo-label shards are cut at the first batch that brings them to this size.
  c.label = ml_collections.ConfigDict(dict(batch_size=256, shard_bytes=256 * 2**20, top_k=0))
  # Official offline filtering: per-class threshold keeping ~num_image_per_class (0 = unlabeled
  # images / num_classes), never below min_threshold; then copies num_image / kept. -1: neither
  # filtering nor balancing, every pseudo-labeled image once.
  c.balance = ml_collections.ConfigDict(dict(num_image_per_class=0, min_threshold=0.3))
  c.eval = ml_collections.ConfigDict(dict(batch_size=256, corruptions=[], severities=[1, 2, 3, 4, 5],
                                          max_corruption_examples=0))
  c.teacher = None
  c.students = []
  c.baseline = None
  return c
