"""The `--config` flag of the commands that take a schedule (run, study, memory): a config file or
a bundled config's name, and `--config.a.b=value` overrides of any key.

`--config=` accepts a config file path or the name of a config shipped with the package (`smoke`,
`demo`, `configs/smoke.py` from outside a checkout): see `resolve_config`.
"""
from __future__ import annotations

import difflib
import importlib.util
import pathlib
import re
from typing import Sequence

from absl import flags  # light (no JAX or TensorFlow): `nsjax --help` stays fast
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from nsjax import command

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# Installed: the configs ship as nsjax/configs/ (pyproject.toml maps the repository's configs/
# there). In a checkout they sit beside the package.
CONFIG_DIRS = (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs")


class ConfigNotFound(ValueError):
  """A `--config` value that is neither a file nor a bundled config's name."""


def bundled_configs() -> dict[str, pathlib.Path]:
  """{name: path} of the configs shipped with nsjax (first directory of CONFIG_DIRS wins)."""
  found: dict[str, pathlib.Path] = {}
  for directory in CONFIG_DIRS:
    for path in sorted(directory.glob("*.py")) if directory.is_dir() else ():
      if not path.name.startswith("_"):
        found.setdefault(path.stem, path)
  return found


def define_config_flag(help_string: str, flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None):
  """The `--config` flag of the commands that take a schedule (run, study, memory).

  Its `--config.a.b=value` overrides may also set keys the file leaves out: a config file writes
  only what it changes, and every other key nsjax reads has its default in nsjax.config_lib, so
  `--config.teacher.train.label_smoothing=0` must work for a file that never mentions it. A value
  for such a key is read as a Python literal (a number, True, a list), else as a string. A
  mistyped key is then not refused by the flag parser, with a traceback, but by the config check
  each command makes before computing anything (nsjax.validate.check_keys): exit 2, naming the key
  and the nearest one nsjax reads. `sys_argv`: the command line the overrides are read from
  (default: this process's).
  """
  return config_flags.DEFINE_config_file("config", None, help_string, flag_values=flag_values,
                                         lock_config=False, accept_new_attributes=True,
                                         sys_argv=sys_argv)


def resolve_config(value: str) -> str:
  """A `--config` value with its file part made a real path.

  An existing file is used as given; otherwise a bundled config of that name (`smoke`,
  `smoke.py` or `configs/smoke.py`, so the README's commands work from any directory). The part
  after the first ':' (ml_collections' config argument, e.g. `folder_example.py:/data,tiny`) is
  kept. Raises ValueError naming the bundled configs when neither exists.
  """
  file_part, sep, argument = value.partition(":")
  if pathlib.Path(file_part).expanduser().is_file():
    return value
  configs = bundled_configs()
  name = pathlib.Path(file_part).stem
  if name in configs and pathlib.Path(file_part).suffix in ("", ".py"):
    return str(configs[name]) + sep + argument
  raise ConfigNotFound(f"--config={value}: no file {file_part!r} and no bundled config named "
                   f"{name!r}. Pass a config file's path or one of: {', '.join(configs) or '(none)'}.")


def resolve_config_flags(argv: Sequence[str]) -> list[str]:
  """argv with every `--config=X` / `--config X` resolved (`--config.key=...` overrides untouched),
  after `check_override_paths`."""
  out = list(argv)
  config = None  # the last --config value, resolved
  for i, arg in enumerate(out):
    if arg.startswith("--config="):
      config = resolve_config(arg[len("--config="):])
      out[i] = "--config=" + config
    elif arg == "--config" and i + 1 < len(out):
      config = out[i + 1] = resolve_config(out[i + 1])
  if config is not None:
    check_override_paths(out, config)
  return out


def resolve_config_flags_or_exit(argv: Sequence[str]) -> list[str]:
  """`resolve_config_flags`, or the commands' one-line config error and exit 2."""
  try:
    return resolve_config_flags(argv)
  except ConfigNotFound as error:
    command.exit_with(command.EXIT_BAD_CONFIG, f"Config error: {error}")


def check_override_paths(argv: Sequence[str], config_value: str) -> None:
  """Raises UnknownOverride for a `--config.a.b.c=...` whose holder (`a.b`) the config lacks.

  The last key may be new (define_config_flag; validate.check_keys judges it), but the flag parser
  cannot create the sections above it, and fails with a traceback: `--config.teachr.train.x=1`,
  or a section the file leaves as None. Loads the config (`config_value`, a resolved --config)
  only when there are overrides.
  """
  overrides = [a.split("=", 1)[0].lstrip("-").removeprefix("no")[len("config."):]
               for a in argv if re.match(r"^--?(no)?config\.", a)]
  if not overrides:
    return
  config = _load_config(config_value)
  for override in overrides:
    node, where = config, "config"
    for key in config_path.split(override)[:-1]:
      if not _holds(node, key):
        raise UnknownOverride(_missing_holder_message(override, node, key, where))
      node, where = node[key], f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]"


class UnknownOverride(ConfigNotFound):
  """A `--config.a.b=...` override naming a section the config does not have."""


def _load_config(value: str):
  file_part, _, argument = value.partition(":")
  spec = importlib.util.spec_from_file_location("nsjax_cli_config", file_part)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(argument) if argument else module.get_config()


def _holds(node, key) -> bool:
  if isinstance(key, int):
    return isinstance(node, (list, tuple)) and -len(node) <= key < len(node)
  return hasattr(node, "keys") and key in node.keys() and node[key] is not None


def _missing_holder_message(override: str, node, key, where: str) -> str:
  if isinstance(key, int):
    size = f"{len(node)} entries" if isinstance(node, (list, tuple)) else "not a list"
    return f"--config.{override}: {where} has no entry [{key}] ({size}). Fix the flag's path."
  if hasattr(node, "keys") and key in node.keys():  # present but None
    return (f"--config.{override}: {where}.{key} is None in this config, so it has no keys to "
            f"override; give it a value in the config file first.")
  keys = [str(k) for k in node.keys()] if hasattr(node, "keys") else []
  close = difflib.get_close_matches(str(key), keys, n=1, cutoff=0.6)
  hint = f" Did you mean {where}.{close[0]}?" if close else ""
  return (f"--config.{override}: {where} has no {key!r} (it has: {', '.join(sorted(keys)) or 'no keys'})."
          f"{hint} Fix the flag's path.")
