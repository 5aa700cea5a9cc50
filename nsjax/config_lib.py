"""Building blocks for experiment configs (configs/*.py): defaults for every key, in one place.

Every key nsjax reads from a config has its default here -- the sections of `base_config`, the
data sources, a stage (`model_stage`), its noise, its training settings (`train_defaults`, what
nsjax.train.loop reads) and its fine-tuning (`finetune_config`) -- plus a few keys a config may
add that stay out of the defaults (`OPTIONAL`). `schema()` assembles them into the tree of
accepted keys that nsjax.validate checks every config against, so a key added here is accepted
everywhere and a key not added here is refused before any compute (with the nearest valid name).
"""
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


# Keys a config may set that are not part of the defaults above: adding them to the defaults would
# change the config fingerprint (the sha256 of the config as written) of every existing workdir.
# data.class_names is filled in at run time (nsjax.data.folder.resolve_sources).
OPTIONAL = {
    "data": dict(folder_cache_dir="", class_names=[]),
    "stage": dict(finetune=None),
}
# Keys earlier versions read, refused with what replaced them.
REMOVED = {
    "data.host_input": "every host now reads only its rows of the one global stream (the same "
                       "batches on any number of hosts, 1/hosts of the I/O each); delete the line",
    "label.shard_batches": "pseudo-label shards are cut by size; use label.shard_bytes (default "
                           "256 MiB)",
}
# A stage's `model_overrides` take nsjax.models' keys (models.OVERRIDABLE): validate adds them.
DATA_SOURCES = ("labeled", "unlabeled", "test")  # the config.data keys that hold a data source


def train_defaults() -> ml_collections.ConfigDict:
  """nsjax.train.loop's settings and their defaults, the official recipe (loop's docstring
  explains each key); a stage's `train` dict and a fine-tune's `train` overrides take these keys."""
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=None, num_train_steps=None, num_epochs=None, steps_per_epoch=None,
      num_labeled_examples=None, optimizer="rmsprop", base_learning_rate=0.016,
      lr_schedule="exponential", warmup_epochs=5.0, lr_decay_epochs=2.4, lr_decay_factor=0.97,
      rmsprop_decay=0.9, momentum=0.9, rmsprop_epsilon=1e-3, adamw_weight_decay=0.0,
      weight_decay=1e-5, label_smoothing=0.1, unlabeled_ratio=1.0, pseudo_labels="soft",
      temperature=1.0, ema_decay=0.9999, compute_dtype="", fsdp=False, log_every_steps=100,
      checkpoint_every_steps=1000, keep_checkpoints=3, eval_every_steps=0, export=True,
      export_dir=""))


def finetune_config(resolution: int, epochs: float = 1.5, frozen_blocks: int = 0,
                    batch_size: int = 0, lr_mode: str = "final", learning_rate: float = 0.0,
                    flip: bool = False, train: dict[str, Any] | None = None
                    ) -> ml_collections.ConfigDict:
  """The `finetune` entry of a student (nsjax/finetune.py's docstring explains each key);
  `train` holds further train_defaults() overrides."""
  return ml_collections.ConfigDict(dict(
      resolution=resolution, epochs=epochs, frozen_blocks=frozen_blocks, batch_size=batch_size,
      lr_mode=lr_mode, learning_rate=learning_rate, flip=flip, train=dict(train or {})),
      type_safe=False)


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


def schema(model_override_keys=()) -> dict[str, Any]:
  """The accepted keys of a whole config, from the defaults above: nested dicts (a key maps to the
  schema of its value, or None for a plain value); a list of stages is a one-element list holding
  the stage's schema. `model_override_keys`: what nsjax.models accepts in `model_overrides`."""
  stage = _keys(model_stage("efficientnet-b0", 1, train={}))
  stage.update(dict.fromkeys(OPTIONAL["stage"]))
  stage["train"] = _keys(train_defaults())
  stage["noise"] = _keys(noise())
  stage["model_overrides"] = dict.fromkeys(model_override_keys)
  stage["finetune"] = _keys(finetune_config(1))
  stage["finetune"]["train"] = stage["train"]
  top = _keys(base_config())
  top["data"].update(dict.fromkeys(OPTIONAL["data"]))
  source = _keys(data_source(folder="any"))  # a folder source's keys include a TFDS source's
  top["data"].update({role: source for role in DATA_SOURCES})
  top.update(teacher=stage, students=[stage], baseline=stage)
  return top


def _keys(node) -> dict[str, Any]:
  """A ConfigDict of defaults as a schema: its keys, nested sections as their own schemas."""
  return {k: (_keys(v) if isinstance(v, (dict, ml_collections.ConfigDict)) else None)
          for k, v in node.items()}
