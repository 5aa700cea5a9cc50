"""Prints the model family as a Markdown table, computed from the code (for the README).

  python -m nsjax.tools.model_table [--num_classes=1000] [--models=efficientnet-b0,efficientnet-b7]

Parameter counts come from `jax.eval_shape` of the actual Flax modules (nothing is allocated;
`models.count_params`), so the table cannot drift from the code; tests check them against
the published counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

from nsjax import models

HEADER = ("model", "params", "width", "depth", "train res", "test res", "dropout")


@dataclasses.dataclass(frozen=True)
class ModelRow:
  name: str
  params: int
  width: float
  depth: float
  train_resolution: int
  test_resolution: int
  dropout_rate: float

  def cells(self) -> tuple[str, ...]:
    return (self.name, f"{self.params:,}", f"{self.width:.1f}", f"{self.depth:.1f}",
            str(self.train_resolution), str(self.test_resolution), f"{self.dropout_rate:.1f}")


def model_rows(num_classes: int = 1000, names: Sequence[str] | None = None) -> list[ModelRow]:
  """One row per model of `names` (default: all of MODEL_SPECS, in order)."""
  rows = []
  for name in names or list(models.MODEL_SPECS):
    model = models.create_model(name, num_classes)
    rows.append(ModelRow(name, models.count_params(model), model.width, model.depth,
                         model.train_resolution, model.test_resolution, model.dropout_rate))
  return rows


def markdown_table(rows: Sequence[ModelRow]) -> str:
  lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
  return "\n".join(lines)


def build_parser(prog: str = "python -m nsjax.tools.model_table") -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--models", default="", help="comma-separated model names (default: all)")
  return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
  args = (build_parser(prog) if prog else build_parser()).parse_args(argv)
  names = [n.strip() for n in args.models.split(",") if n.strip()]
  for name in names:
    models.get_spec(name)  # A clear error listing the valid names.
  print(markdown_table(model_rows(args.num_classes, names)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
