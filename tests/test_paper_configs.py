"""Each config in configs/ against the values ../shared/REFERENCE.md states for it.

A config is resolved the way the pipeline resolves it (training defaults filled in by
nsjax.train.loop, dropout and stochastic depth from the built model), flattened to paths such as
`students[2].train.num_epochs`, and compared with a table of the reference's values; a difference
fails with its key. Values the reference does not state must carry an "nsjax's choice" comment in
the config (checked by key name), and configs with no paper recipe say they are nsjax's own.
"""
from __future__ import annotations

import io
import os
import re
import tokenize

import pytest

from nsjax.stages import train as train_stage
from nsjax.train import settings
from test_configs import CONFIGS, ROOT, load_config

RECIPE = {  # REFERENCE.md section 2, the official ImageNet recipe, every model stage
    "*.train.optimizer": "rmsprop", "*.train.rmsprop_decay": 0.9, "*.train.momentum": 0.9,
    "*.train.rmsprop_epsilon": 1e-3, "*.train.lr_schedule": "exponential",
    "*.train.base_learning_rate": 0.016, "*.train.warmup_epochs": 5.0,
    "*.train.lr_decay_factor": 0.97, "*.train.weight_decay": 1e-5,
    "*.train.label_smoothing": 0.1, "*.train.ema_decay": 0.9999,
    "*.train.compute_dtype": "bfloat16", "*.stochastic_depth_rate": 0.2,
    "students*.train.pseudo_labels": "soft", "students*.train.temperature": 1.0,
    "balance.min_threshold": 0.3, "*.noise.randaugment_layers": 2,
}

PAPER = {
    "imagenet_b7_l2": dict(RECIPE, **{
        "data.num_classes": 1000, "data.labeled.name": "imagenet2012",
        "teacher.model": "efficientnet-b7", "teacher.resolution": 600,
        "teacher.test_resolution": 600, "teacher.dropout_rate": 0.5,
        "students[0].model": "efficientnet-l0", "students[1].model": "efficientnet-l1",
        "students[2].model": "efficientnet-l2",
        "students[0].resolution": 380, "students[0].test_resolution": 500,  # (unverified)
        "students[1].resolution": 380, "students[1].test_resolution": 500,  # (unverified)
        "students[2].resolution": 475, "students[2].test_resolution": 800,
        "students*.dropout_rate": 0.5,
        "*.train.batch_size": 2048, "students*.train.unlabeled_ratio": 3.0,
        "*.train.num_epochs": 350, "*.train.lr_decay_epochs": 2.4,
        "*.noise.randaugment_magnitude": 27, "balance.num_image_per_class": 130_000,
        "students[2].finetune.resolution": 800, "students[2].finetune.epochs": 1.5,
        "students[2].finetune.flip": False,
    }),
    "imagenet_10pct": dict(RECIPE, **{
        "data.num_classes": 1000, "data.labeled.name": "imagenet2012_subset/10pct",
        "data.labeled.split": "train", "data.test.name": "imagenet2012",
        "data.test.split": "validation",
        "teacher.model": "efficientnet-b0", "teacher.resolution": 224,
        "teacher.test_resolution": 224, "teacher.dropout_rate": 0.2,
        "students[0].model": "efficientnet-b1", "students[0].resolution": 240,
        "students[0].test_resolution": 240, "students[0].dropout_rate": 0.2,
        "students[0].train.unlabeled_ratio": 3.0,  # B1..B7 in the size study
        "*.train.num_epochs": 700, "*.train.lr_decay_epochs": 4.8,  # small models
        "*.noise.randaugment_magnitude": 0,  # B0, B1: none in the official scripts
    }),
    "svhn_b0": {  # REFERENCE.md section 3 (official repo) and section 2's SVHN recipe
        "data.num_classes": 10, "data.small_image": True, "data.labeled.name": "svhn_cropped",
        "data.labeled.split": "train[4000:]", "data.unlabeled.split": "extra",
        "data.test.split": "test",
        "*.model": "efficientnet-b0", "*.resolution": 32, "*.test_resolution": 32,
        "*.train.batch_size": 128, "students*.train.unlabeled_ratio": 5.0,
        "students*.train.pseudo_labels": "soft", "*.train.weight_decay": 1e-4,
        "*.train.peak_learning_rate": 0.008, "*.train.final_learning_rate": 2e-4,
        "*.train.num_train_steps": 109_474, "*.train.optimizer": "rmsprop",
        "*.noise.randaugment_layers": 2, "*.noise.randaugment_magnitude": 5,
        "*.noise.cutout": 16, "*.noise.flip": False, "*.stochastic_depth_rate": 0.2,
        "balance.num_image_per_class": 53_113, "balance.min_threshold": 0.3,
    },
    "cifar10_4000": {  # only the data is stated (section 3): 4,000 labels, the rest unlabeled
        "data.num_classes": 10, "data.labeled.name": "cifar10",
        "data.labeled.split": "train[:4000]", "data.unlabeled.split": "train[4000:]",
        "data.test.split": "test",
    },
    "demo": None, "smoke": None, "folder_example": None,  # nsjax's own: no paper values
}

# Keys each paper config sets that the reference does not state: marked "nsjax's choice".
CHOICES = {
    "imagenet_b7_l2": ["frozen_blocks", "batch_size=512", "lr_mode", "label.batch_size",
                       "eval.batch_size", "checkpoint_every_steps", "fsdp=True"],
    "imagenet_10pct": ["BATCH_SIZE = 1024", "num_image_per_class", "label.batch_size",
                       "eval.batch_size", "checkpoint_every_steps"],
    "svhn_b0": ["Warmup", "label.batch_size", "eval.batch_size"],
    "cifar10_4000": ["train = dict", "flip=True", "num_image_per_class", "label.batch_size",
                     "eval.batch_size"],
}


def flatten(node, prefix=""):
  if hasattr(node, "items"):
    out = {}
    for key, value in node.items():
      out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out
  return {prefix: node}


def resolved(config) -> dict:
  """The config as the pipeline runs it, flattened: training defaults filled in, the built
  model's dropout and stochastic depth, and each stage's peak and final learning rate."""
  values = flatten({k: config[k] for k in ("data", "label", "balance", "eval")})
  for where, stage in pipeline_stages(config):
    for key, value in flatten(stage).items():
      if not key.startswith("train."):
        values[f"{where}.{key}"] = value
    cfg = settings.resolve_config(dict(stage.train), num_labeled_examples=stage.train.batch_size)
    values.update({f"{where}.train.{k}": v for k, v in cfg.items()})
    schedule = settings.make_schedule(settings.resolve_config(
        dict(stage.train), num_labeled_examples=labeled_examples(config)))
    steps = settings.num_train_steps(settings.resolve_config(
        dict(stage.train), num_labeled_examples=labeled_examples(config)))
    values[f"{where}.train.peak_learning_rate"] = cfg.base_learning_rate * cfg.batch_size / 256
    values[f"{where}.train.final_learning_rate"] = float(schedule(steps - 1))
    model = train_stage.build_model(stage, config)
    values[f"{where}.dropout_rate"] = model.dropout_rate
    values[f"{where}.stochastic_depth_rate"] = model.stochastic_depth_rate
  return values


def labeled_examples(config) -> int:
  """The labeled set's size where the reference gives it (epoch-based schedules need it)."""
  return {"svhn_cropped": 73_257 - 4_000, "cifar10": 4_000, "imagenet2012": 1_281_167,
          "imagenet2012_subset/10pct": 128_116}[config.data.labeled.name]


def pipeline_stages(config):
  stages = [("teacher", config.teacher)]
  stages += [(f"students[{i}]", s) for i, s in enumerate(config.students)]
  return stages + ([("baseline", config.baseline)] if config.get("baseline") else [])


def matches(pattern: str, key: str) -> bool:
  """`*` stands for one path component (`students*` for every student, `*` for every stage)."""
  return re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]*"), key) is not None


def differences(values: dict, expected: dict) -> list[str]:
  """One line per expected key that differs (or that no resolved key matches)."""
  problems = []
  for pattern, want in expected.items():
    keys = [k for k in values if matches(pattern, k)]
    if not keys:
      problems.append(f"{pattern}: not in the config")
    for key in keys:
      got = values[key]
      same = got == pytest.approx(want, rel=0.03) if isinstance(want, float) and not isinstance(
          got, (str, bool, type(None))) else got == want
      if not same:
        problems.append(f"{key} = {got!r}, the paper: {want!r}")
  return problems


def test_every_config_has_an_entry():
  assert set(CONFIGS) == set(PAPER), "add the new config's paper values (or None) to PAPER"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_config_matches_the_paper(name):
  module, config = load_config(name)
  expected = PAPER[name]
  if expected is None:
    assert "nsjax's own" in " ".join(module.__doc__.split()), \
        f"configs/{name}.py has no paper recipe: its docstring must say its values are nsjax's own"
    return
  problems = differences(resolved(config), expected)
  assert not problems, f"configs/{name}.py differs from REFERENCE.md:\n" + "\n".join(problems)


def test_a_changed_value_fails_with_its_key():
  _, config = load_config("imagenet_b7_l2")
  config.students[1].train.num_epochs = 300
  config.students[2].finetune.epochs = 1.0
  problems = differences(resolved(config), PAPER["imagenet_b7_l2"])
  assert problems == ["students[1].train.num_epochs = 300, the paper: 350",
                      "students[2].finetune.epochs = 1.0, the paper: 1.5"]


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_values_the_paper_does_not_state_are_marked(name):
  lines = open(os.path.join(ROOT, "configs", f"{name}.py")).read().splitlines()
  for key in CHOICES[name]:
    marked = [i for i, line in enumerate(lines) if key in line
              and any("nsjax's choice" in l for l in lines[max(0, i - 2):i + 2])]
    assert marked, f"configs/{name}.py: mark {key!r} as nsjax's choice (a comment)"


@pytest.mark.parametrize("name", CONFIGS)
def test_no_setting_hides_in_a_comment(name):
  """The bug the fine-tune line had: `key=value,` after a `#` is lost."""
  source = open(os.path.join(ROOT, "configs", f"{name}.py")).read()
  comments = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
              if t.type == tokenize.COMMENT]
  hidden = [c for c in comments if re.search(r"\b[a-z_]+=[\w\"'.-]+,", c)]
  assert not hidden, f"configs/{name}.py: settings inside comments: {hidden}"
