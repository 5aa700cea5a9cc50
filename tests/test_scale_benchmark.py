"""benchmarks/scale.py on tiny sets: the JSON has the issue's shape and the numbers are consistent.

Times are never asserted (they are the benchmark's job); sizes, bytes and their ratios are exact
properties of the data path and are checked.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import scale  # noqa: E402


def test_tiny_scale_run_has_the_required_shape(tmp_path):
  output = tmp_path / "scale.json"
  scale.main(["--sizes=1500,3000", "--rounds=2", f"--output={output}", f"--workdir={tmp_path}"])
  result = json.loads(output.read_text())
  runs = result["runs"]
  assert [r["n"] for r in runs] == [1500, 3000]
  assert all(len(r["start_s_rounds"]) == len(r["resume_90_s_rounds"]) == 2 for r in runs)
  for run in runs:
    for key in ("start_s", "resume_90_s", "manifest_bytes_written", "peak_rss_mb"):
      assert run[key] > 0, key
    hosts = run["bytes_read_host0"]
    assert sorted(hosts) == ["1", "2", "4", "8"]
    for p in (2, 4, 8):  # each host reads its share, plus the small offset tables
      assert hosts[str(p)] <= 1.2 * hosts["1"] / p, (p, hosts)
  # Metadata grows with the records, not with their square.
  assert runs[1]["manifest_bytes_written"] < 2.6 * runs[0]["manifest_bytes_written"]
  assert set(result["targets_met"]) == {"start_within_1.5x", "resume_within_1.5x",
                                        "host_bytes_within_1.2_over_P", "manifest_within_20x",
                                        "rss_within_1.2x"}
  assert "assumptions" in result["projection"]
  assert (tmp_path / "scale.png").stat().st_size > 0
