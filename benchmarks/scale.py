"""Scale benchmark: does the pseudo-label data path's cost grow with the data set or the hosts?

For synthetic pseudo-label sets of 20k, 80k and 320k small records (28x28 PNGs, 10 classes, balanced
to 1/10 of the records per class; `--large` adds 1.28M), written by the real labeling writer
(`nsjax.data.synthetic`) as `--label_hosts` hosts would, it measures (one process writes every set
and times the readers' starts; each set's reader then runs in a fresh process of its own):

  manifest_bytes_written  metadata bytes written while labeling and planning: shard sidecars,
                          host summaries, manifest.json, the plan's read tables (not the shards);
  start_s                 a fresh student reader (`student_input.pseudo_label_batches`, batch 64,
                          host 0 of 1) until its first batch is in hand: open plan + manifest,
                          locate, read, decode, view;
  resume_90_s             the same, started at the step 90% into the first epoch (both the median
                          of --rounds (5) rounds that alternate the sizes in one process);
  peak_rss_mb             peak RSS of a process (one per set) that starts a reader, resumes one at
                          90% and reads an epoch as host 0 of 1, 2, 4 and 8;
  bytes_read_host0        bytes host 0 reads from storage (records and read tables) during one
                          epoch of global batches of 64, for P = 1, 2, 4, 8 simulated hosts;
  epoch_size, num_shards, num_blocks   the balanced epoch, the shards, the plan's blocks.

Targets (issue #20): start_s and resume_90_s at 320k within 1.5x of 20k; bytes_read_host0[P] at
most 1.2 x bytes_read_host0[1] / P; manifest bytes at 320k at most 20x those at 20k; peak RSS at
320k at most 1.2x that at 20k. The projection to the paper's scale is written with its
assumptions (see `project`).

  python benchmarks/scale.py --output=benchmarks/results/scale.json      # ~5 min on 2 cores
  python benchmarks/scale.py --sizes=2000,8000 --output=/tmp/scale.json  # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HOSTS = (1, 2, 4, 8)
GLOBAL_BATCH = 64
SHARD_BYTES = 2**20  # 1 MiB: ~1,150 small records; the default 256 MiB holds ~2,500 ImageNet JPEGs


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_set(directory: str, n: int, label_hosts: int) -> dict:
  """Writes the set, its plan and the plan's balance.json (as the label stage would)."""
  from nsjax.stages import label
  from nsjax.data import pseudo_labels, synthetic
  from nsjax.files import atomic_write_json
  began = time.perf_counter()
  plan, written = synthetic.write_label_set(directory, n, num_classes=10, num_hosts=label_hosts,
                                            shard_bytes=SHARD_BYTES, num_image=n // 10)
  atomic_write_json(os.path.join(directory, label.BALANCE_FILE), plan.to_json())
  return {"manifest_bytes_written": written, "write_s": time.perf_counter() - began,
          "epoch_size": int(sum(plan.block_counts)), "num_blocks": len(plan.block_counts),
          "num_shards": len(pseudo_labels.read_manifest(directory)["shards"])}


def first_batch_s(directory: str, plan, start_step: int) -> float:
  import tensorflow as tf
  from nsjax.data import student_input

  def view(image, seed):
    return tf.image.resize(tf.cast(image, tf.float32), [32, 32]) + tf.random.stateless_uniform(
        [32, 32, 1], seed)

  began = time.perf_counter()
  batches = student_input.pseudo_label_batches(directory, plan, local_batch_size=GLOBAL_BATCH,
                                               view_fn=view, seed=0, start_step=start_step)
  next(batches)
  return time.perf_counter() - began


def epoch_bytes_host0(directory: str, plan, hosts: int) -> int:
  """Bytes host 0 of `hosts` reads for one epoch of global batches (reader only, no decoding)."""
  import numpy as np
  from nsjax.data import student_input
  order, blocks, reader, _ = student_input.open_stream(directory, plan, seed=0)
  local = GLOBAL_BATCH // hosts
  for step in range(order.epoch_size // GLOBAL_BATCH):
    positions = step * GLOBAL_BATCH + np.arange(local)
    reader.read(*student_input.locate_records(order, blocks, positions))
  reader.close()
  return reader.bytes_read


def measure_reader(directory: str) -> dict:
  """Peak RSS and bytes per host of one set's reader, in a process of its own."""
  from nsjax.stages import label
  plan = label.read_plan(directory)
  first_batch_s(directory, plan, 0)
  first_batch_s(directory, plan, int(0.9 * sum(plan.block_counts)) // GLOBAL_BATCH)
  out = {"bytes_read_host0": {str(p): epoch_bytes_host0(directory, plan, p) for p in HOSTS}}
  out["peak_rss_mb"] = peak_rss_mb()
  return out


def measure_times(directories: list[str], rounds: int = 5) -> list[dict]:
  """start_s and resume_90_s of every set, alternated over `rounds` in one process (this VM's
  speed drifts by 10-20% within minutes; alternating puts the drift on every size alike)."""
  from nsjax.stages import label
  plans = [label.read_plan(d) for d in directories]
  first_batch_s(directories[0], plans[0], 0)  # TF's one-time start-up (tracing, thread pools)
  times = [{"start_s": [], "resume_90_s": []} for _ in directories]
  for _ in range(rounds):
    for d, plan, t in zip(directories, plans, times):
      t["start_s"].append(first_batch_s(d, plan, 0))
      t["resume_90_s"].append(first_batch_s(d, plan, int(0.9 * sum(plan.block_counts))
                                            // GLOBAL_BATCH))
  return [{k: statistics.median(v) for k, v in t.items()} | {f"{k}_rounds": v for k, v in t.items()}
          for t in times]


def write_and_time(directories: list[str], sizes: list[int], label_hosts: int,
                   rounds: int) -> list[dict]:
  """Every set written, then the readers' start and resume times: one process, one start-up
  (a process is ~8 s of imports here); what is written does not change what is timed."""
  runs = [write_set(d, n, label_hosts) for d, n in zip(directories, sizes)]
  return [run | times for run, times in zip(runs, measure_times(directories, rounds))]


def child(args) -> None:
  """Phase "write" (every set in --directory, comma-separated: written, then timed) or "read"
  (one set's reader, in a process of its own for its peak RSS)."""
  if args.phase == "write":
    result = write_and_time(args.directory.split(","), [int(n) for n in args.n.split(",")],
                            args.label_hosts, args.rounds)
  else:
    result = measure_reader(args.directory)
  print(json.dumps(result))


def run_child(phase: str, directory: str, sizes: str | None = None, label_hosts: int = 0,
              rounds: int = 0) -> dict | list:
  """A child process's JSON result: "write" (every set, with `sizes`, `label_hosts`, `rounds`) or
  "read" (one set's reader; it needs only the directory)."""
  command = [sys.executable, __file__, "--child", phase, "--directory", directory]
  if phase == "write":
    command += ["--n", sizes, "--label_hosts", str(label_hosts), "--rounds", str(rounds)]
  out = subprocess.run(command, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def project(runs: list[dict], records: float = 130e6, hosts: int = 256,
            record_bytes: float = 110e3) -> dict:
  """Extrapolates the measured per-record and fixed costs to the paper's student input."""
  small, large = runs[0], runs[-1]
  per_record = (large["manifest_bytes_written"] - small["manifest_bytes_written"]) / (
      large["n"] - small["n"])
  table_bytes = 5  # read tables: uint32 offset + uint8 copies per record
  return {
      "assumptions": (f"{records:.3g} balanced records of {record_bytes / 1e3:.0f} kB (ImageNet "
                      f"JPEG + 2 kB of float16 probabilities), {hosts} hosts, shards of 256 MiB "
                      "(~2,400 records); start/resume times stay those measured (they do not "
                      "grow with the data, only with the shards of one window); metadata per "
                      "record as measured here, per shard constant."),
      "num_shards": records * record_bytes / 2**28,
      "manifest_bytes_written": per_record * records,
      # its own rows' records, plus the offset tables of every window (each host has rows in all)
      "bytes_read_per_host_per_epoch": records * record_bytes / hosts + records * table_bytes,
      "start_s": large["start_s"], "resume_90_s": large["resume_90_s"],
  }


def plot(runs: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  ns = [r["n"] for r in runs]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  axes[0].loglog(ns, [r["start_s"] for r in runs], "o-", label="start")
  axes[0].loglog(ns, [r["resume_90_s"] for r in runs], "s-", label="resume at 90%")
  axes[0].set(title="time to first batch (s)", xlabel="records", ylim=(0.05, 5))
  axes[1].loglog(ns, [r["manifest_bytes_written"] for r in runs], "o-", label="metadata written")
  axes[1].loglog(ns, [r["peak_rss_mb"] * 2**20 for r in runs], "s-", label="reader peak RSS")
  axes[1].set(title="bytes", xlabel="records")
  for r in runs:
    axes[2].loglog(HOSTS, [r["bytes_read_host0"][str(p)] for p in HOSTS], "o-", label=f"n={r['n']}")
  axes[2].set(title="bytes host 0 reads per epoch", xlabel="hosts")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def check_targets(runs: list[dict]) -> dict:
  small, large = runs[0], runs[-1]
  hosts = {str(p): all(r["bytes_read_host0"][str(p)] <= 1.2 * r["bytes_read_host0"]["1"] / p
                       for r in runs) for p in HOSTS}
  return {"start_within_1.5x": large["start_s"] <= 1.5 * small["start_s"],
          "resume_within_1.5x": large["resume_90_s"] <= 1.5 * small["resume_90_s"],
          "host_bytes_within_1.2_over_P": all(hosts.values()),
          "manifest_within_20x": large["manifest_bytes_written"] <= 20 * small["manifest_bytes_written"],
          "rss_within_1.2x": large["peak_rss_mb"] <= 1.2 * small["peak_rss_mb"]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="20000,80000,320000")
  parser.add_argument("--large", action="store_true", help="also 1,280,000 records")
  parser.add_argument("--label_hosts", type=int, default=4, help="hosts that wrote the shards")
  parser.add_argument("--rounds", type=int, default=5,
                      help="timing rounds, alternated over the sizes; the median is reported")
  parser.add_argument("--output", default="")
  parser.add_argument("--workdir", default="", help="where the sets go (default: a temp dir)")
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  parser.add_argument("--phase", default="", help=argparse.SUPPRESS)
  parser.add_argument("--directory", default="", help=argparse.SUPPRESS)
  parser.add_argument("--n", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    args.phase = args.child
    return child(args)
  sizes = [int(s) for s in args.sizes.split(",")] + ([1_280_000] if args.large else [])
  runs = []
  with tempfile.TemporaryDirectory(dir=args.workdir or None) as root:
    directories = [os.path.join(root, f"n{n}") for n in sizes]
    written = run_child("write", ",".join(directories), ",".join(map(str, sizes)),
                        args.label_hosts, args.rounds)
    for n, directory, run in zip(sizes, directories, written):
      runs.append({"n": n, **run, **run_child("read", directory)})
      print(json.dumps(runs[-1]), flush=True)
  result = {"runs": runs, "targets_met": check_targets(runs), "projection": project(runs),
            "global_batch": GLOBAL_BATCH, "shard_bytes": SHARD_BYTES,
            "label_hosts": args.label_hosts, "cpu": _cpu()}
  if args.output:
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
    plot(runs, os.path.splitext(args.output)[0] + ".png")
  print(json.dumps(result["targets_met"]))
  return result


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return "unknown"


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
