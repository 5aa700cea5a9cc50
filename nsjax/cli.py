"""The `nsjax` command: one entry point whose subcommands are nsjax's command-line modules.

  nsjax --help                 the subcommands, each with an example
  nsjax SUBCOMMAND --help      that subcommand's example and flags

Each subcommand runs an existing module's `main` (so `python -m nsjax.main ...` and the other
`python -m` forms keep working and mean the same). Only the chosen module is imported: absl flags
are process-global, and two modules define `--config` / `--output`; importing one module per
process also keeps `nsjax --help` free of JAX's and TensorFlow's start-up time.

`--config=` of `run` and `memory` accepts a config file path or the name of a config shipped with
the package (`smoke`, `demo`, `configs/smoke.py` from outside a checkout): see
nsjax.config_flag.resolve_config.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Sequence

from absl import app, flags  # light (no JAX or TensorFlow): `nsjax --help` stays fast

from nsjax import command
from nsjax.config_flag import (CONFIG_DIRS, ConfigNotFound, bundled_configs, define_config_flag,
                               resolve_config_flags, resolve_config_flags_or_exit)

# nsjax.study reads CONFIG_DIRS, define_config_flag and resolve_config_flags_or_exit from here.
__all__ = ["BY_NAME", "CONFIG_DIRS", "ConfigNotFound", "SUBCOMMANDS", "Subcommand",
           "define_config_flag", "main", "resolve_config_flags_or_exit"]

@dataclasses.dataclass(frozen=True)
class Subcommand:
  name: str
  module: str
  style: str  # "absl": main(argv) under absl.app.run; "argparse": main(argv, prog) -> exit code
  summary: str
  example: str


SUBCOMMANDS = (
    Subcommand("run", "nsjax.main", "absl", "Run a schedule (teacher, labels, students, eval).",
               "nsjax run --config=smoke --workdir=/tmp/nsjax-smoke"),
    Subcommand("evaluate", "nsjax.evaluate.__main__", "absl",
               "Score an exported model on a benchmark (clean, ImageNet-A/R/C/P, FGSM, PGD).",
               "nsjax evaluate --export=/tmp/nsjax-smoke/student-1/export "
               "--dataset=mnist5k/labels_10 --split='test[:256]' --output=/tmp/nsjax-eval"),
    Subcommand("convert-checkpoint", "nsjax.tools.convert_checkpoint", "argparse",
               "Convert an official TF EfficientNet / Noisy Student checkpoint (e.g. the unpacked "
               "noisy_student_efficientnet-b0.tar.gz) to an nsjax export.",
               "nsjax convert-checkpoint --tf_checkpoint=noisy_student_efficientnet-b0 "
               "--model=efficientnet-b0 --output=/tmp/b0-export"),
    Subcommand("export", "nsjax.export.__main__", "argparse",
               "Export a trained model for serving: TF SavedModel or TFLite, or the backbone.",
               "nsjax export --export=/tmp/nsjax-smoke/student-1/export --format=saved_model "
               "--output=/tmp/nsjax-serving"),
    Subcommand("memory", "nsjax.tools.device_memory", "absl",
               "Per-device memory of a schedule's models, replicated vs FSDP, before running.",
               "nsjax memory --config=smoke --num_devices=8"),
    Subcommand("model-table", "nsjax.tools.model_table", "argparse",
               "Print the EfficientNet family's parameter counts and resolutions.",
               "nsjax model-table --models=efficientnet-b0,efficientnet-b1"),
)
BY_NAME = {s.name: s for s in SUBCOMMANDS}


HELP_FLAGS = ("-h", "--help")


def overview() -> str:
  """`nsjax --help`: every subcommand with its summary and example."""
  lines = ["usage: nsjax SUBCOMMAND [flags]   (nsjax SUBCOMMAND --help for its flags)", "",
           "Noisy Student Training in JAX/Flax.", "", "subcommands:"]
  for s in SUBCOMMANDS:
    lines += [f"  {s.name:<20}{s.summary}", f"  {'':<20}e.g. {s.example}"]
  lines += ["", "--config= (run, memory) takes a file or a bundled config: "
            + ", ".join(bundled_configs())]
  return "\n".join(lines)


def subcommand_help(sub: Subcommand, module) -> str:
  """`nsjax SUB --help`: usage, summary, a working example, then the module's own flags."""
  head = f"usage: nsjax {sub.name} [flags]\n\n{sub.summary}\n\nExample:\n  {sub.example}\n"
  if sub.style == "argparse":
    parser = module.build_parser(f"nsjax {sub.name}")
    return head + "\n" + parser.format_help().split("\n\n", 1)[-1]
  if hasattr(module, "define_flags"):
    module.define_flags()
  return head + "\nflags:\n" + flags.FLAGS.module_help(module.__name__)


def run_subcommand(sub: Subcommand, args: Sequence[str]) -> int:
  """Imports the subcommand's module and runs its main with `args`; returns the exit code."""
  module = importlib.import_module(sub.module)
  if any(a in HELP_FLAGS for a in args):
    print(subcommand_help(sub, module))
    return 0
  if sub.name in ("run", "memory"):
    args = resolve_config_flags(args)
  prog = f"nsjax {sub.name}"
  if sub.style == "argparse":
    return int(module.main(list(args), prog=prog) or 0)
  if hasattr(module, "define_flags"):
    module.define_flags()
  app.run(module.main, argv=[prog, *args])  # exits the process with main's status
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """The `nsjax` program; argv None means this process's own command line, which `nsjax run`
  may start again with malloc's huge pages (command.start_again_with_huge_pages)."""
  if argv is None and sys.argv[1:2] == ["run"]:
    command.start_again_with_huge_pages()
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in HELP_FLAGS:
    print(overview())
    return 0 if argv else 2
  sub = BY_NAME.get(argv[0])
  if sub is None:
    print(f"nsjax: unknown subcommand {argv[0]!r}; choose one of {', '.join(BY_NAME)} "
          "(nsjax --help shows examples).", file=sys.stderr)
    return 2
  try:
    return run_subcommand(sub, argv[1:])
  except ConfigNotFound as error:
    print(f"nsjax {sub.name}: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
