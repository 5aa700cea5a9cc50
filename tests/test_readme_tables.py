"""The README's result tables are what benchmarks/readme_tables.py makes of the committed results
(benchmarks/results/*.json): a number edited by hand, or a results file rerun without regenerating
the README, fails here."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import readme_tables  # noqa: E402


def test_every_generated_section_matches_its_results_file():
  with open(readme_tables.README) as f:
    found = readme_tables.sections_in(f.read())
  assert set(found) == set(readme_tables.SECTIONS)
  for name, body in found.items():
    assert body == readme_tables.generated(name), (
        f"README section {name} is stale: run python benchmarks/readme_tables.py")


def _row(values):
  return {"top1": {str(s): v for s, v in enumerate(values) if v is not None}}


def test_the_demo_table_shows_each_seed_and_the_means_of_complete_seeds():
  study = {"study": {"seeds": [0, 1]}, "teacher": _row([91.0, 92.0]),
           "baseline": _row([90.5, None]),
           "variants": {"iterations_1": _row([93.0, 94.0]), "full": _row([94.0, 95.0])}}
  table = readme_tables.demo_table(study).splitlines()
  assert table[2] == "| 0 | 91.0 | 93.0 | 94.0 | 90.5 |"
  assert table[3] == "| 1 | 92.0 | 94.0 | 95.0 | - |"
  assert table[4] == "| **mean of 1** | **91.0** | **93.0** | **94.0** | **90.5** |"


def test_a_number_edited_by_hand_is_put_back():
  with open(readme_tables.README) as f:
    text = f.read()
  body = readme_tables.sections_in(text)["demo-table"]
  edited = text.replace(body, body.replace("|", "| 99.9", 1))
  assert readme_tables.sections_in(edited)["demo-table"] != body
  assert readme_tables.rewrite(edited) == text


def test_the_verdicts_group_claims_by_their_corrected_verdict():
  study = {"claims": [{"text": "a", "verdict_corrected": "holds"},
                      {"text": "b", "verdict_corrected": "undecided: ~12 seeds would decide it"},
                      {"text": "c", "verdict_corrected": "holds"},
                      {"text": "d", "verdict_corrected": "reversed"}]}
  assert readme_tables.verdicts(study).splitlines() == [
      "- **holds** (2): a; c.", "- **reversed** (1): d.",
      "- **undecided: ~12 seeds would decide it** (1): b."]
