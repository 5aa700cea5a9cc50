"""benchmarks/throughput.py in its tiny mode: every required number is measured and sane.

Speed is never asserted; only that each measurement ran and produced a positive, finite value.
"""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "throughput.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput  # noqa: E402

TINY = ["--width=0.1", "--depth=0.1", "--resolution=32", "--batch_size=4", "--num_classes=10",
        "--warmup=1", "--steps=1", "--label_images=8", "--fast_compile"]


def test_tiny_run_reports_every_required_number(tmp_path):
  output = tmp_path / "tiny.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, SCRIPT, *TINY, f"--output={output}"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads(output.read_text())
  required = throughput.REQUIRED_KEYS + (
      "nsjax_train_compile_s", "nsjax_infer_compile_s", "keras_train_compile_s",
      "nsjax_train_peak_rss_mb", "label_peak_rss_mb", "keras_peak_rss_mb",
      "nsjax_train_flop_s", "nsjax_infer_flop_s", "label_e2e_vs_infer_only")
  for key in required:
    value = results.get(key)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
  assert results["label_e2e_images"] == 8
  assert results["flags"]["resolution"] == 32 and results["flags"]["batch_size"] == 4
  assert results["jax_version"] and results["device"] and results["threads"] >= 1
  assert "nsjax train" in proc.stdout and "keras train" in proc.stdout


def test_flags_default_to_the_b0_224_benchmark():
  args = throughput.parse_args([])
  assert (args.model, args.resolution, args.batch_size, args.num_classes) == (
      "efficientnet-b0", 224, 32, 1000)
  assert (args.steps, args.warmup, args.label_images) == (5, 2, 256)
  assert not args.skip_keras and not args.fast_compile
