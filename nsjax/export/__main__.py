"""Command line: an nsjax export -> a SavedModel or TFLite model that serves without JAX.

  nsjax export --export=WORKDIR/student-2/export --format=saved_model --output=DIR
  nsjax export --export=WORKDIR/student-2/export --format=tflite --output=DIR
  nsjax export --export=WORKDIR/student-2/export --backbone --output=DIR   (features, no head)

(`python -m nsjax.export ...` is the same.) The signature `serving_default` takes uint8 images
[batch, height, width, channels] of any size, grey or RGB, applies the model's eval view inside the
graph and returns `probabilities` and `class_names` (or `features` and `pooled_features` with
--backbone). DIR/assets.extra/nsjax_serving.json (SavedModel) or DIR/nsjax_serving.json (TFLite)
records the preprocessing, the signature and the class names. See docs/export.md.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from nsjax import exported_model
from nsjax.export import saved_model, tflite

FORMATS = ("saved_model", "tflite")


def build_parser(prog: str = "python -m nsjax.export") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--export", required=True,
                      help="nsjax export directory (model.json + variables/), e.g. "
                           "WORKDIR/student-2/export")
  parser.add_argument("--output", required=True, help="directory to write (replaced atomically)")
  parser.add_argument("--format", choices=FORMATS, default="saved_model",
                      help="saved_model (TF Serving, TF) or tflite (model.tflite, builtin ops)")
  parser.add_argument("--backbone", action="store_true",
                      help="export the network without its classifier: features before pooling "
                           "and pooled features, for transfer learning")
  parser.add_argument("--platforms", default=",".join(saved_model.PLATFORMS),
                      help="saved_model: where the model may run, a subset of cpu,cuda,tpu "
                           "(default: all three; tflite always lowers for the CPU)")
  return parser


def export(args: argparse.Namespace) -> dict:
  """Writes what `args` asks for; returns the record written beside it."""
  if not exported_model.is_exported(args.export):
    exported_model.read_description(args.export)  # raises with what is missing and how to make it
  part = "backbone" if args.backbone else "classifier"
  if args.format == "tflite":
    return tflite.write_tflite(args.export, args.output, part)
  platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
  return saved_model.write_saved_model(args.export, args.output, part, platforms)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  args = build_parser(prog or "python -m nsjax.export").parse_args(argv)
  try:
    record = export(args)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  print(f"Wrote {record['format']} ({record['part']}, {record['signature']['num_classes']} "
        f"classes, {record['preprocessing']['view']} view at "
        f"{record['preprocessing']['resolution']} px) to {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
