"""benchmarks/throughput.py in its tiny mode: every required number is measured and sane.

Speed is never asserted; only that each measurement ran and produced a positive, finite value.
"""
import json
import math
import os
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import throughput  # noqa: E402

TINY = ["--width=0.1", "--depth=0.1", "--resolution=32", "--batch_size=4", "--num_classes=10",
        "--warmup=1", "--steps=1", "--label_images=8", "--fast_compile"]


def test_tiny_run_reports_every_required_number(tmp_path, capsys, monkeypatch):
  """In this process (the session's 4 CPU devices, so the steps run sharded); Keras in a worker
  process that serves both rounds."""
  output = tmp_path / "tiny.json"
  started = []

  class CountedWorker(throughput._PeerWorker):
    def __init__(self, args, which, argv):
      started.append(which)
      super().__init__(args, which, argv)

  monkeypatch.setattr(throughput, "_PeerWorker", CountedWorker)
  returned = throughput.main(TINY + [f"--output={output}"])
  results = json.loads(output.read_text())
  required = throughput.REQUIRED_KEYS + (
      "nsjax_train_compile_s", "nsjax_infer_compile_s", "keras_train_compile_s",
      "nsjax_train_peak_rss_mb", "label_peak_rss_mb", "keras_peak_rss_mb",
      "nsjax_train_flop_s", "nsjax_infer_flop_s", "label_e2e_vs_infer_only")
  for key in required:
    value = results.get(key)
    assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
  assert results["label_e2e_images"] == 8 and results["label_reused_compiled_step"] is True
  # Two rounds (nsjax, Keras, nsjax, Keras), each one's steps pooled: 1 timed step per round.
  assert results["rounds"] == 2
  # One Keras process serves both rounds (its second reuses the compiled model, as nsjax's does).
  pids = results["peer_worker_pids"]["keras"]
  assert len(pids) == 2 and pids[0] == pids[1] and pids[0] != os.getpid()
  assert started == list(results["peer_worker_pids"]), started  # no process started per round
  for prefix in ("nsjax_train", "nsjax_infer", "keras_train", "keras_infer"):
    assert len(results[f"{prefix}_img_s_per_round"]) == 2, prefix
    assert len(results[f"{prefix}_step_times"]) == 2, prefix
    assert math.isclose(results[f"{prefix}_img_s"],
                        4 / statistics.median(results[f"{prefix}_step_times"])), prefix
  # The ratio's parts: 2 batches of 4 timed as one pass, a pass per round each, alternating; the
  # rates are those of the mean pass.
  for key in ("nsjax_infer_only", "label_e2e"):
    per_round = results[f"{key}_img_s_per_round"]
    assert len(per_round) == 2 and all(r > 0 for r in per_round), key
    assert math.isclose(results[f"{key}_img_s"], 8 / statistics.mean(8 / r for r in per_round))
  assert math.isclose(results["nsjax_infer_only_img_s"], 8 / results["nsjax_infer_only_pass_s"])
  assert math.isclose(results["label_e2e_img_s"], 8 / results["label_e2e_s"])
  assert results["nsjax_infer_only_median_img_s"] > 0
  assert math.isclose(results["label_e2e_vs_infer_only"],
                      results["label_e2e_img_s"] / results["nsjax_infer_only_img_s"])
  # Each pass's CPU time per image, the stage's input alone included, and the ratio's CPU bound.
  cpu = {key: results[key] for key in ("nsjax_infer_only_cpu_ms_per_img", "label_e2e_cpu_ms_per_img",
                                       "label_input_only_cpu_ms_per_img", "label_input_only_img_s")}
  assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in cpu.values()), cpu
  infer, read = cpu["nsjax_infer_only_cpu_ms_per_img"], cpu["label_input_only_cpu_ms_per_img"]
  assert math.isclose(results["label_e2e_vs_infer_only_cpu_bound"], infer / (infer + read))
  assert results["flags"]["resolution"] == 32 and results["flags"]["batch_size"] == 4
  assert results["jax_version"] and results["device"] and results["threads"] >= 1
  assert returned["nsjax_train_img_s"] == results["nsjax_train_img_s"]
  printed = capsys.readouterr().out
  assert "nsjax train" in printed and "keras train" in printed and "label end to end" in printed
  assert "its input alone" in printed


def test_flags_default_to_the_b0_224_benchmark():
  args = throughput.parse_args([])
  assert (args.model, args.resolution, args.batch_size, args.num_classes) == (
      "efficientnet-b0", 224, 32, 1000)
  assert (args.steps, args.warmup, args.label_images, args.rounds) == (5, 2, 4096, 2)
  assert not args.skip_keras and not args.fast_compile


@pytest.mark.parametrize("flag", ["--warmup=0", "--steps=0", "--rounds=0"])
def test_counts_below_one_are_refused_by_name(flag, capsys):
  with pytest.raises(SystemExit):
    throughput.parse_args([flag])
  assert "--warmup, --steps and --rounds must be >= 1" in capsys.readouterr().err


def test_a_worker_that_dies_is_reported_with_its_exit_status():
  """The Keras worker refuses its flags (as any failure before it writes a round): the parent
  names the worker, its exit status and its command instead of waiting or reading stale output."""
  args = throughput.parse_args([])
  worker = throughput._PeerWorker(args, "keras", ["--steps=0"])
  try:
    with pytest.raises(RuntimeError, match=r"the keras worker failed \(exit 2\): .*--steps=0"):
      worker.next_round()
  finally:
    worker.close()
