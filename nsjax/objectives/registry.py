"""The registry of training objectives: an objective is a frozen dataclass, found by its name.

Its fields are its settings, keys of a stage's `train` section: each field with a default is the
objective's own key (`setting(default, meaning)`: the one place of its default and meaning, from
which config validation and docs/configuration.md take them); a field without a default reads
the general training setting of that name (nsjax.config_lib.train_defaults, e.g. unlabeled_ratio).
Its `loss` method is the objective (the step's contract is in nsjax/objectives/__init__.py).
Settings objects are hashable and compare by class and values, so one keys a compiled train step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

DEFAULT = "noisy_student"  # train.objective when a config leaves it out
_REGISTRY: dict[str, type] = {}


def setting(default: Any, meaning: str) -> Any:
  """An objective's own setting: a dataclass field with its default and its meaning."""
  return dataclasses.field(default=default, metadata={"meaning": meaning})


def register(name: str) -> Callable[[type], type]:
  """Class decorator: registers a frozen dataclass with a `loss` method as objective `name`."""
  def add(cls: type) -> type:
    _check_objective_class(name, cls)
    if _REGISTRY.get(name, cls) is not cls:
      raise ValueError(f"An objective named {name!r} is already registered "
                       f"({_REGISTRY[name].__qualname__}); choose another name.")
    _REGISTRY[name] = cls
    return cls
  return add


def unregister(name: str) -> None:
  """Removes objective `name` (for tests that register their own)."""
  _REGISTRY.pop(name, None)


def _check_objective_class(name: str, cls: type) -> None:
  if not (dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen):
    raise TypeError(f"Objective {name!r}: {cls.__qualname__} must be a frozen dataclass "
                    "(@dataclasses.dataclass(frozen=True)), so that it keys compiled steps.")
  if not callable(getattr(cls, "loss", None)):
    raise TypeError(f"Objective {name!r}: {cls.__qualname__} needs a method "
                    "loss(self, logits, labels, teacher_probs) -> (loss, parts).")
  for field in own_settings(cls):
    if not field.metadata.get("meaning"):
      raise TypeError(f"Objective {name!r}: setting {field.name!r} needs a meaning; declare it "
                      "with nsjax.objectives.setting(default, meaning).")


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> type:
  """The objective class registered as `name`; a ValueError naming the registered ones if none."""
  if name not in _REGISTRY:
    raise ValueError(f"objective = {name!r} is not a registered objective; use one of "
                     f"{', '.join(names())} (nsjax/objectives/).")
  return _REGISTRY[name]


def own_settings(cls: type) -> list[dataclasses.Field]:
  """The objective's own keys (fields with a default), in declaration order."""
  return [f for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING]


def general_settings(cls: type) -> list[str]:
  """The general training settings the objective reads (fields without a default)."""
  return [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]


def defaults(name: str) -> dict[str, Any]:
  """{key: default} of objective `name`'s own settings."""
  return {f.name: f.default for f in own_settings(get(name))}


def owners(key: str) -> list[str]:
  """The registered objectives that have `key` as their own setting."""
  return [n for n in names() if key in defaults(n)]


def accepted_keys() -> list[str]:
  """Every registered objective's own keys: what a `train` section may hold besides the general
  settings (which objective reads one is checked when the settings resolve)."""
  return sorted({f.name for n in names() for f in own_settings(get(n))})


def reference() -> list[tuple[str, str, list[tuple[str, Any, str]]]]:
  """(name, summary, [(key, default, meaning)]) per registered objective: the docs' tables."""
  out = []
  for name in names():
    cls = get(name)
    summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
    out.append((name, summary, [(f.name, f.default, f.metadata["meaning"])
                                for f in own_settings(cls)]))
  return out


def from_settings(values: Any) -> Any:
  """The objective a resolved `train` section selects (its `objective` key), built from its keys
  (each field read by its name); the class's own checks run here."""
  cls = get(values["objective"])
  return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)})
