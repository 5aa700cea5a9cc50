"""Converts an official TF EfficientNet / Noisy Student checkpoint into an nsjax export.

  python -m nsjax.tools.convert_checkpoint --tf_checkpoint=PATH --model=efficientnet-b0 \
      [--num_classes=1000] [--output=DIR] [--scope=teacher_model/efficientnet-b0] [--no-use_ema]

The export (model.json + Orbax variables, see nsjax.exported_model) can then serve as a teacher or be
evaluated like any nsjax-trained model. EMA values are used when the checkpoint has them (as the
official evaluation does); optimizer slots and `global_step` are skipped. Variable-name rules:
nsjax/models/convert.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import nsjax
from nsjax import exported_model, models
from nsjax.models import convert


def build_parser(prog: str = "python -m nsjax.tools.convert_checkpoint") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=prog, description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tf_checkpoint", required=True,
                      help="checkpoint prefix (e.g. .../model.ckpt-1000) or a directory with a "
                           "`checkpoint` file (its latest checkpoint is used)")
  parser.add_argument("--model", required=True, choices=list(models.MODEL_SPECS), metavar="MODEL",
                      help="the model the checkpoint holds (also its variable scope): "
                           + ", ".join(models.MODEL_SPECS))
  parser.add_argument("--num_classes", type=int, default=None,
                      help="classifier outputs (default: read from head/dense in the checkpoint)")
  parser.add_argument("--output", default=None,
                      help="export directory (default: <checkpoint directory>/nsjax_export)")
  parser.add_argument("--scope", default=None,
                      help="variable scope (default: <model>, else teacher_model/<model>)")
  parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True,
                      help="use <var>/ExponentialMovingAverage values when present")
  parser.add_argument("--width", type=float, default=None, help="override the spec's width")
  parser.add_argument("--depth", type=float, default=None, help="override the spec's depth")
  parser.add_argument("--small_image", action="store_true",
                      help="32 px variant (stages 2 and 3 stride 1; same variables)")
  parser.add_argument("--train_resolution", type=int, default=None)
  parser.add_argument("--test_resolution", type=int, default=None)
  return parser


def parse_args(argv: Sequence[str] | None, prog: str | None = None) -> argparse.Namespace:
  return (build_parser(prog) if prog else build_parser()).parse_args(argv)


def default_output(tf_checkpoint: str) -> str:
  directory = tf_checkpoint if os.path.isdir(tf_checkpoint) else os.path.dirname(tf_checkpoint)
  return os.path.join(directory or ".", "nsjax_export")


def convert_checkpoint(args: argparse.Namespace) -> str:
  """Reads, converts and exports; returns the export directory."""
  tensors = convert.read_tf_checkpoint(args.tf_checkpoint)
  num_classes = args.num_classes or convert.infer_num_classes(tensors, args.model, args.scope)
  if num_classes is None:
    raise ValueError("The checkpoint has no head/dense/bias to read the number of classes from; "
                     "pass --num_classes.")
  overrides = {key: getattr(args, key) for key in
               ("width", "depth", "train_resolution", "test_resolution")
               if getattr(args, key) is not None}
  if args.small_image:
    overrides["small_image"] = True
  model = models.create_model(args.model, num_classes, **overrides)
  imported = convert.import_official(tensors, model, args.scope, args.use_ema)
  output = args.output or default_output(args.tf_checkpoint)
  metadata = {"source": {
      "format": "tf_checkpoint",
      "path": os.path.abspath(args.tf_checkpoint) if "://" not in args.tf_checkpoint
              else args.tf_checkpoint,
      "scope": imported.scope,
      "values": imported.values,
      "ignored_variables": imported.num_ignored,
      "converted_by": f"nsjax {nsjax.__version__} nsjax.tools.convert_checkpoint",
  }, "params_sha256": exported_model.params_sha256(imported.variables["params"])}
  exported_model.export_model(output, model, imported.variables, metadata)
  return str(output)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  args = parse_args(argv, prog)
  try:
    output = convert_checkpoint(args)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"Wrote {args.model} to {output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
