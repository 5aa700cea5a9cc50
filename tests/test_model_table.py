"""The model table (docs/models.md) is computed from the code and agrees with the published counts."""
from __future__ import annotations

from nsjax import models
from nsjax.tools import model_table


def test_rows_match_specs_and_published_param_counts():
  rows = model_table.model_rows()
  assert [r.name for r in rows] == list(models.MODEL_SPECS)
  for row in rows:
    spec = models.get_spec(row.name)
    assert row.params == spec.reference_params, row.name
    assert (row.width, row.depth, row.dropout_rate) == (spec.width, spec.depth, spec.dropout_rate)
    assert (row.train_resolution, row.test_resolution) == (spec.train_resolution,
                                                           spec.test_resolution)


def test_markdown_output(capsys):
  argv = ["--num_classes", "10", "--models", "efficientnet-b0,efficientnet-l2"]
  assert model_table.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0] == "| model | params | width | depth | train res | test res | dropout |"
  assert lines[1] == "|---|---|---|---|---|---|---|"
  # B0 with a 10-class head: 5,288,548 - 1280 * 990 - 990 parameters.
  assert lines[2] == "| efficientnet-b0 | 4,020,358 | 1.0 | 1.0 | 224 | 224 | 0.2 |"
  assert lines[3].startswith("| efficientnet-l2 | ")
  assert lines[3].endswith(" | 4.3 | 5.3 | 475 | 800 | 0.5 |")
  assert len(lines) == 4
