"""Building blocks for experiment configs (configs/*.py): defaults for every key, in one place.

Every key nsjax reads from a config has its default here -- the sections of `base_config`, the
data sources, a stage (`model_stage`), its noise, its training settings (`train_defaults`, what
nsjax.train.loop reads) and its fine-tuning (`finetune_config`) -- plus a few keys a config may
add that stay out of the defaults (`OPTIONAL`), except the settings of a training objective,
which its class in nsjax.objectives declares (the caller passes their names and tables in, as the
model overrides', so that configs load without JAX). `schema()` assembles them into the tree of
accepted keys that nsjax.validate checks every config against, so a key added here is accepted
everywhere and a key not added here is refused before any compute (with the nearest valid name).
`with_defaults(config)` fills in every key a config leaves out, so no reader repeats a default;
`python -m nsjax.config_lib --markdown` writes docs/configuration.md from the same definitions.
"""
from __future__ import annotations

import copy
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """The config cannot run as written (the commands exit 2 with its message, nsjax.command)."""


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
    # Folder keys exist only on folder sources: on TFDS sources they would change the config
    # fingerprint of every workdir written before folders were supported.
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
  """nsjax.train.loop's settings and their defaults, the official recipe (MEANINGS explains each
  key); a stage's `train` dict and a fine-tune's `train` overrides take these keys, and those of
  its objective (nsjax.objectives: the loss's own settings, with their defaults)."""
  return ml_collections.ConfigDict(dict(
      seed=0, batch_size=None, num_train_steps=None, num_epochs=None, steps_per_epoch=None,
      num_labeled_examples=None, optimizer="rmsprop", base_learning_rate=0.016,
      lr_schedule="exponential", warmup_epochs=5.0, lr_decay_epochs=2.4, lr_decay_factor=0.97,
      rmsprop_decay=0.9, momentum=0.9, rmsprop_epsilon=1e-3, adamw_weight_decay=0.0,
      weight_decay=1e-5, unlabeled_ratio=1.0, objective="noisy_student", ema_decay=0.9999,
      compute_dtype="", fsdp=False, log_every_steps=100,
      checkpoint_every_steps=1000, keep_checkpoints=3, eval_every_steps=0, export=True,
      export_dir="", steps_per_call=1))


def finetune_config(resolution: int, epochs: float = 1.5, frozen_blocks: int = 0,
                    batch_size: int = 0, lr_mode: str = "final", learning_rate: float = 0.0,
                    flip: bool = False, train: dict[str, Any] | None = None
                    ) -> ml_collections.ConfigDict:
  """The `finetune` entry of a student (nsjax/stages/finetune.py's docstring explains each key);
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


def schema(model_override_keys=(), objective_keys=()) -> dict[str, Any]:
  """The accepted keys of a whole config, from the defaults above: nested dicts (a key maps to the
  schema of its value, or None for a plain value); a list of stages is a one-element list holding
  the stage's schema. `model_override_keys`: what nsjax.models accepts in `model_overrides`;
  `objective_keys`: the objectives' own settings (nsjax.objectives.accepted_keys())."""
  stage = _keys(model_stage("efficientnet-b0", 1, train={}))
  stage.update(dict.fromkeys(OPTIONAL["stage"]))
  stage["train"] = _keys(train_defaults())
  stage["train"].update(dict.fromkeys(objective_keys))
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


# ------------------------------------------------------------------------------------------------
# A config with every default filled in.

# Stage keys a config must set itself (no default), or that derive from others.
_STAGE_REQUIRED = ("model", "resolution", "test_resolution", "train", "noise")


def with_defaults(config) -> ml_collections.ConfigDict:
  """A copy of `config` with every key it leaves out set to its default here: readers then read
  `config.eval.severities`, never `config.eval.get("severities", [1, 2, 3, 4, 5])`.

  A stage's `train` gets train_defaults() (the loop resolves its settings from the same, and adds
  its objective's defaults), its `noise` noise(); a fine-tune's `train` stays as written (it
  overrides the student's settings).
  The config fingerprint of a workdir is of the config as written, taken before this."""
  full = _copy(config)
  _fill(full, base_config())
  for role in DATA_SOURCES:
    if full.data.get(role) is not None:
      _fill(full.data[role], {k: v for k, v in data_source("-", "-").items()
                              if k not in ("name", "split")})
  for stage in [full.teacher, full.baseline, *full.students]:
    if stage is not None:
      _fill_stage(stage)
  return full


def _fill_stage(stage: ml_collections.ConfigDict) -> None:
  defaults = model_stage("efficientnet-b0", 1, train={})
  _fill(stage, {k: v for k, v in defaults.items() if k not in _STAGE_REQUIRED})
  _fill(stage, dict(train={}, noise=noise()))
  _fill(stage.train, train_defaults())
  _fill(stage.noise, noise())
  if stage.get("finetune"):
    _fill(stage.finetune, {k: v for k, v in finetune_config(1).items()
                           if k not in ("resolution", "train")})


def _fill(node, defaults) -> None:
  """Adds the keys of `defaults` that `node` lacks (sections recursively), keeping node's values."""
  for key, value in defaults.items():
    if key not in node:
      node[key] = _copy(value)
    elif isinstance(value, (dict, ml_collections.ConfigDict)) and node[key] is not None:
      _fill(node[key], value)


def _copy(node):
  """A deep, unlocked copy (ConfigDict's own copies keep the lock and share stages in lists)."""
  if isinstance(node, (dict, ml_collections.ConfigDict)):
    return ml_collections.ConfigDict({k: _copy(v) for k, v in node.items()}, type_safe=False)
  if isinstance(node, (list, tuple)):
    return type(node)(_copy(v) for v in node)
  return copy.deepcopy(node)


# ------------------------------------------------------------------------------------------------
# What each key means: docs/configuration.md is generated from these and the defaults above
# (`python -m nsjax.config_lib --markdown > docs/configuration.md`; tests/test_config_keys.py
# checks that every accepted key has a meaning and that the committed page is current).
# "stage" stands for teacher, students[i] and baseline; "source" for data.labeled/unlabeled/test.

MEANINGS = {
    "seed": "the run's seed: stage seeds derive from it (seed * 1000 + stage.seed_offset)",
    "data.num_classes": "classes of the labeled data; 0 takes it from an image folder's classes",
    "data.small_image": "32 px-style inputs (MNIST, CIFAR, SVHN): small-image stem and views",
    "data.data_dir": "TFDS data_dir for every source ('' = TFDS's default; the embedded mnist5k "
                     "is built into <workdir>/tensorflow_datasets)",
    "data.folder_cache_dir": "where image folders are converted to TFDS datasets ('' = "
                             "<workdir>/folder_cache)",
    "data.class_names": "filled in at run time from a labeled image folder; not set by hand",
    "data.labeled": "the labeled training data (a source, below)",
    "data.unlabeled": "the unlabeled data the teacher labels (a source)",
    "data.test": "the test data every model is evaluated on (a source)",
    "source.name": "TFDS dataset name, with an optional '/config' (or set folder)",
    "source.split": "TFDS split, slices allowed ('train[:90%]'); a folder's default is 'train'",
    "source.data_dir": "this source's TFDS data_dir ('' = data.data_dir)",
    "source.image_key": "the feature holding the image",
    "source.folder": "an image folder, local or gs:// (instead of name and split)",
    "source.kind": "a folder's layout: 'labeled' (one subfolder per class) or 'unlabeled'",
    "label.batch_size": "GLOBAL batch size of the labeling pass",
    "label.shard_bytes": "pseudo-label shards are cut at the first batch that brings them to "
                         "this size",
    "label.top_k": "store the teacher's top-k probabilities per image (0 = all classes)",
    "balance.num_image_per_class": "images per class after filtering and balancing (0 = "
                                   "unlabeled images / classes; -1 = every image once, "
                                   "neither filtered nor balanced)",
    "balance.min_threshold": "a pseudo label below this confidence is never kept",
    "eval.batch_size": "GLOBAL batch size of every evaluation",
    "eval.corruptions": "offline corruption suite: names from nsjax.evaluate.corruptions",
    "eval.severities": "corruption severities to evaluate (1..5)",
    "eval.max_corruption_examples": "test images the corruption suite uses (0 = all)",
    "teacher": "the first model (a stage, below)",
    "students": "the noisy students, one stage each, in order; each learns from the one before",
    "baseline": "optional: a stage trained on the labeled data only, for comparison",
    "stage.model": "EfficientNet name, e.g. 'efficientnet-b0' .. 'efficientnet-l2'",
    "stage.resolution": "training image size",
    "stage.test_resolution": "evaluation and labeling image size (0 = resolution)",
    "stage.model_overrides": "model settings to change (below); the model's own otherwise",
    "stage.train": "training settings (below)",
    "stage.noise": "input and model noise (below)",
    "stage.online_teacher": "a student only: the previous model predicts inside each step "
                            "instead of a label stage",
    "stage.checkpoint": "the teacher only: an exported model to import instead of training",
    "stage.seed_offset": "added to seed * 1000 for this stage's seed",
    "stage.finetune": "a student only: test-resolution fine-tuning after it trains (below)",
    "noise.randaugment_magnitude": "RandAugment magnitude (0 = off)",
    "noise.randaugment_layers": "RandAugment operations per image",
    "noise.dropout_rate": "dropout before the classifier (None = the model's)",
    "noise.stochastic_depth_rate": "stochastic depth drop rate (None = the model's, 0.2)",
    "noise.cutout": "cutout square side in pixels (0 = off)",
    "noise.flip": "random horizontal flips (None = on unless data.small_image)",
    "train.seed": "init, dropout and stochastic-depth randomness (set from the run's seed)",
    "train.batch_size": "GLOBAL labeled batch size (required; scales the learning rate)",
    "train.num_train_steps": "run length in updates; or",
    "train.num_epochs": "run length in labeled epochs",
    "train.steps_per_epoch": "updates per pass over the labeled set (default: from its size)",
    "train.num_labeled_examples": "labeled set size (set from the data)",
    "train.optimizer": "'rmsprop' (TF1 RMSProp, official), 'adamw' or 'sgd'",
    "train.base_learning_rate": "per 256 labeled images: peak lr = it * batch_size / 256",
    "train.lr_schedule": "'exponential' (staircase), 'constant' or 'cosine'",
    "train.warmup_epochs": "linear warmup from 0, in labeled epochs",
    "train.lr_decay_epochs": "staircase interval (4.8 for 700-epoch runs)",
    "train.lr_decay_factor": "staircase factor",
    "train.rmsprop_decay": "RMSProp's moving-average decay",
    "train.momentum": "RMSProp / SGD momentum",
    "train.rmsprop_epsilon": "inside the square root (TF1)",
    "train.adamw_weight_decay": "decoupled decay, only for optimizer='adamw'",
    "train.weight_decay": "L2 in the loss, wd * sum(w^2) / 2, all params but BatchNorm's",
    "train.unlabeled_ratio": "unlabeled images per labeled one in a batch (noisy_student also "
                             "weights their mean cross-entropy by it)",
    "train.objective": "what a step minimises: a registered objective (nsjax/objectives/); its "
                       "own settings are train keys too (the tables below)",
    "train.ema_decay": "EMA of the weights: min(decay, (1 + t) / (10 + t)); the EMA is exported",
    "train.compute_dtype": "'bfloat16' trains with bf16 activations; '' keeps the model's",
    "train.fsdp": "shard params, EMA and optimizer slots over the devices",
    "train.log_every_steps": "scalars (means over the window) to TensorBoard and the console",
    "train.checkpoint_every_steps": "periodic checkpoints under <stage>/checkpoints",
    "train.keep_checkpoints": "checkpoints kept",
    "train.eval_every_steps": "test evaluation during training (0 = only at the end)",
    "train.export": "export the EMA variables + model.json at the end",
    "train.export_dir": "'' = <stage>/export",
    "train.steps_per_call": "updates per compiled call (a lax.scan over that many batches, like "
                            "Keras's steps_per_execution); calls end at every log, checkpoint, "
                            "evaluation and the last step. 1 = a call per step; other values "
                            "round differently but resume exactly (docs/models.md)",
    "finetune.resolution": "the test resolution to fine-tune at (required)",
    "finetune.epochs": "labeled epochs",
    "finetune.frozen_blocks": "k: the stem and blocks 0..k-1 frozen (-1 = none)",
    "finetune.batch_size": "0 = the student's labeled batch size",
    "finetune.lr_mode": "'final' (the student's last rate), 'continue' (its decay, continued) or "
                        "'constant' (learning_rate)",
    "finetune.learning_rate": "the rate for lr_mode='constant' (absolute, not per 256 images)",
    "finetune.flip": "random horizontal flips (False = the plain eval view)",
    "finetune.train": "train settings (as stage.train) overriding the student's, e.g. ema_decay",
    "model_overrides.width": "width multiplier",
    "model_overrides.depth": "depth multiplier",
    "model_overrides.block_stages": "the first k of the 7 stages of MBConv blocks (7 = the "
                                    "published network; fewer for plumbing tests)",
    "model_overrides.dropout_rate": "dropout before the classifier (noise.dropout_rate wins)",
    "model_overrides.stochastic_depth_rate": "stochastic depth (noise.stochastic_depth_rate wins)",
    "model_overrides.small_image": "set from data.small_image",
    "model_overrides.dtype": "'float32' or 'bfloat16' parameters and activations",
    "model_overrides.depthwise_impl": "depthwise convolution kernel ('auto' picks per backend)",
    "model_overrides.stem_impl": "stem convolution kernel ('auto' picks per backend)",
    "model_overrides.matmul_operands": "1x1 convolutions' operand dtype, accumulated in float32 "
                                       "('auto': bfloat16 on CPUs with AMX-bf16)",
    "model_overrides.frozen_blocks": "set by fine-tuning",
    "model_overrides.train_resolution": "set from resolution",
    "model_overrides.test_resolution": "set from test_resolution",
    "model_overrides.resolution": "both resolutions at once",
}
_REQUIRED = object()  # a key without a default: the reference page says "required"
# The sections of the reference page: (title, key prefix in MEANINGS, the section's defaults).
_SECTIONS = (
    ("Top level", "", lambda: {k: v for k, v in base_config().items()
                               if k in ("seed", "teacher", "students", "baseline")}),
    ("data", "data.", lambda: dict(base_config().data, **OPTIONAL["data"],
                                   **dict.fromkeys(DATA_SOURCES))),
    ("A data source (`data_source(...)`: data.labeled, data.unlabeled, data.test)", "source.",
     lambda: dict(data_source("-", "-"), name=_REQUIRED, split=_REQUIRED, folder="",
                  kind="labeled")),
    ("label", "label.", lambda: base_config().label),
    ("balance", "balance.", lambda: base_config().balance),
    ("eval", "eval.", lambda: base_config().eval),
    ("A stage (`model_stage(...)`: teacher, students[i], baseline)", "stage.",
     lambda: dict(model_stage("", 0, train={}), model=_REQUIRED, resolution=_REQUIRED,
                  **OPTIONAL["stage"])),
    ("stage.noise (`noise(...)`)", "noise.", noise),
    ("stage.train (and finetune.train): the training settings", "train.", train_defaults),
    ("stage.finetune (`finetune_config(...)`)", "finetune.",
     lambda: dict(finetune_config(0), resolution=_REQUIRED)),
    ("stage.model_overrides (defaults: the model's own)", "model_overrides.", None),
)


def documented_keys() -> set[str]:
  """Every key of the reference page, as MEANINGS names them."""
  keys = set()
  for _, prefix, defaults in _SECTIONS:
    if defaults is not None:
      keys |= {prefix + k for k in defaults()}
  return keys


def markdown(model_override_keys=(), objective_tables=()) -> str:
  """docs/configuration.md: every key, its default and its meaning, from this module and
  `objective_tables` (nsjax.objectives.reference(): per objective its keys' defaults and
  meanings)."""
  lines = ["# Configuration reference", "",
           "Generated by `python -m nsjax.config_lib --markdown > docs/configuration.md` from",
           "nsjax/config_lib.py, the one home of every default (a test keeps this page current).",
           "A config is `config_lib.base_config()` plus data sources and stages; configs/*.py are",
           "examples. Keys not listed here are refused before anything runs.",
           "On the command line, `--config.a.b=value` overrides any key listed here, also one the",
           "config file leaves to its default (e.g. `--config.teacher.train.label_smoothing=0.0`,",
           "`--config.students[0].train.temperature=2.0`).", ""]
  for title, prefix, defaults in _SECTIONS:
    lines += [f"## {title}", "", "| key | default | meaning |", "|---|---|---|"]
    values = (defaults() if defaults is not None
              else dict.fromkeys(tuple(model_override_keys) + ("resolution",), "-"))
    for key, value in values.items():
      lines.append(f"| `{key}` | {_format_default(value)} | {MEANINGS[prefix + key]} |")
    lines.append("")
    if prefix == "train.":
      lines += _objective_sections(objective_tables)
  lines += ["## Removed keys", "", "| key | what replaced it |", "|---|---|"]
  lines += [f"| `{key}` | {fix} |" for key, fix in REMOVED.items()]
  return "\n".join(lines) + "\n"


def _objective_sections(objective_tables) -> list[str]:
  """A table per objective (`train.objective = NAME`), of its own settings."""
  lines = []
  for name, summary, rows in objective_tables:
    lines += [f"## stage.train with `objective = {name!r}`", "", summary, "",
              "| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | {_format_default(value)} | {meaning} |"
              for key, value, meaning in rows]
    lines.append("")
  return lines


def _format_default(value) -> str:
  if value is _REQUIRED:
    return "required"
  if isinstance(value, str) and value == "-":
    return "-"
  if isinstance(value, (dict, ml_collections.ConfigDict)):
    return "see below" if value else "`{}`"
  return f"`{value!r}`"


if __name__ == "__main__":
  import sys  # noqa: E402  (the command line only)

  from nsjax import models, objectives  # noqa: E402  (they import jax; config helpers do not)
  if sys.argv[1:] != ["--markdown"]:
    sys.exit("usage: python -m nsjax.config_lib --markdown > docs/configuration.md")
  sys.stdout.write(markdown(models.OVERRIDABLE, objectives.reference()))
