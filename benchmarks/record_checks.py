"""What verifying every record costs the student's input (nsjax.data.random_access.record_problem).

The student's input of the demo, as a student stage builds it: each step 32 labeled mnist5k digits
(`input_pipeline.train_batches`: the labeled TFDS file read by offset) and 64 pseudo-labeled ones
(`student_input.pseudo_label_batches` over a label set written by the real writer,
`nsjax.data.synthetic`: 28x28 PNGs and float16 probabilities of 10 classes), both through the
demo's noised training view (RandAugment magnitude 5), as one host reading all rows.

It is read with the checks ("after") and without them ("before": `record_problem` replaced by one
that finds nothing, which is the read path as it was before the checks), alternated in one
process (before, after, after, before, ...) for `--passes` passes each; a pass starts both streams
afresh, reads `--warmup` steps, then times `--steps` steps. Reported per mode, as medians over the
passes: CPU seconds per step of this process (all its threads: the input pipeline's cost per host
core, which a loaded machine changes less than wall time) and wall seconds per step; and the ratios
after / before (the target: at most 1.05). Also the checksum itself, in microseconds per record of
the sizes read.

  nice -n 19 python benchmarks/record_checks.py --output=benchmarks/results/record_checks.json
  python benchmarks/record_checks.py --passes=1 --steps=2 --warmup=1 --output=/tmp/rc.json  # quick
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LABELED_BATCH, UNLABELED_BATCH = 32, 64  # the demo's students: unlabeled_ratio 2
NUM_CLASSES, NUM_PSEUDO_LABELS = 10, 4000


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--output", required=True)
  parser.add_argument("--passes", type=int, default=6, help="passes per mode, alternated")
  parser.add_argument("--steps", type=int, default=12, help="timed steps per pass")
  parser.add_argument("--warmup", type=int, default=3, help="steps per pass before timing")
  return parser.parse_args(argv)


def prepare(folder: str):
  """(labeled Source, pseudo-label directory, its balance plan), written into `folder`."""
  from nsjax.data import input_pipeline, mnist5k, synthetic
  data_dir = os.path.join(folder, "tfds")
  mnist5k.build(data_dir, "labels_10")
  labels = os.path.join(folder, "label-1")
  plan, _ = synthetic.write_label_set(labels, NUM_PSEUDO_LABELS, num_classes=NUM_CLASSES,
                                      shard_bytes=2**20)
  return input_pipeline.Source("mnist5k/labels_10", "train", data_dir), labels, plan


def student_streams(source, labels, plan, index_dir):
  """The two iterators a demo student stage reads, with its noised view."""
  import tensorflow as tf
  from nsjax import config_lib
  from nsjax.data import input_pipeline, student_input, views
  view = views.train_view_fn(config_lib.noise(randaugment_magnitude=5), True, 28)

  def labeled_fn(features, seed):
    return {"image": view(features["image"], seed), "label": tf.cast(features["label"], tf.int32)}

  labeled = input_pipeline.train_batches(source, global_batch_size=LABELED_BATCH,
                                         preprocess_fn=labeled_fn, seed=1, index_dir=index_dir,
                                         process_index=0, process_count=1)
  pseudo = student_input.pseudo_label_batches(labels, plan, local_batch_size=UNLABELED_BATCH,
                                              view_fn=view, seed=1, process_index=0,
                                              process_count=1)
  return labeled, pseudo


def one_pass(streams_fn, checked: bool, warmup: int, steps: int) -> dict:
  """CPU and wall seconds per step of `steps` steps, after `warmup`, with or without checks."""
  from nsjax.data import random_access
  original = random_access.record_problem
  if not checked:
    random_access.record_problem = lambda framed: None
  try:
    labeled, pseudo = streams_fn()
    for _ in range(warmup):
      next(labeled), next(pseudo)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
      next(labeled), next(pseudo)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    labeled.close()
    pseudo.close()
    del labeled, pseudo
    gc.collect()
  finally:
    random_access.record_problem = original
  return {"cpu_s_per_step": cpu / steps, "wall_s_per_step": wall / steps}


def checksum_us(sizes) -> dict:
  """Microseconds per masked CRC-32C of a record of each size (the check's whole arithmetic)."""
  from nsjax.data import random_access
  out = {}
  for size in sizes:
    data = os.urandom(size)
    repeats = max(2000, 20_000_000 // max(size, 1))
    began = time.perf_counter()
    for _ in range(repeats):
      random_access.masked_crc(data)
    out[str(size)] = (time.perf_counter() - began) / repeats * 1e6
  return out


def record_sizes(source, labels) -> dict:
  """Mean bytes per record of each stream's files."""
  import glob
  import numpy as np
  from nsjax.data import random_access
  labeled = glob.glob(os.path.join(source.data_dir, "mnist5k", "labels_10", "*",
                                   "mnist5k-train.tfrecord*"))
  pseudo = glob.glob(os.path.join(labels, "*.tfrecord"))
  mean = lambda paths: float(np.mean(np.concatenate(
      [np.diff(random_access.tfrecord_offsets(p)) for p in paths])))
  return {"labeled": mean(labeled), "pseudo_labeled": mean(pseudo)}


def summarize(passes: list[dict]) -> dict:
  out = {}
  for mode in ("before", "after"):
    rows = [p for p in passes if p["mode"] == mode]
    for key in ("cpu_s_per_step", "wall_s_per_step"):
      out[f"{mode}_{key}"] = statistics.median(r[key] for r in rows)
  out["cpu_ratio_after_before"] = out["after_cpu_s_per_step"] / out["before_cpu_s_per_step"]
  out["wall_ratio_after_before"] = out["after_wall_s_per_step"] / out["before_wall_s_per_step"]
  # Paired: each pass's "after" against the "before" next to it (ABBA order).
  befores = [p for p in passes if p["mode"] == "before"]
  afters = [p for p in passes if p["mode"] == "after"]
  out["cpu_ratio_per_pair"] = [a["cpu_s_per_step"] / b["cpu_s_per_step"]
                               for a, b in zip(afters, befores)]
  return out


def machine() -> dict:
  model = ""
  if os.path.exists("/proc/cpuinfo"):
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                  if l.startswith("model name")), "")
  return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
          "load_average_at_start": list(os.getloadavg()), "niceness": os.nice(0)}


def main(argv=None) -> dict:
  args = parse_args(argv)
  started, at_start = time.time(), machine()
  with tempfile.TemporaryDirectory(prefix="nsjax-record-checks-") as folder:
    source, labels, plan = prepare(folder)
    index_dir = os.path.join(folder, "record_index")
    streams = lambda: student_streams(source, labels, plan, index_dir)
    one_pass(streams, True, args.warmup, 1)  # TF's one-time start-up, and the labeled index
    passes = []
    for n in range(args.passes):
      order = (False, True) if n % 2 == 0 else (True, False)
      for checked in order:
        row = one_pass(streams, checked, args.warmup, args.steps)
        passes.append({"mode": "after" if checked else "before", "pass": n, **row})
        print(json.dumps(passes[-1]), flush=True)
    sizes = record_sizes(source, labels)
  results = {"passes": passes, **summarize(passes), "record_bytes": sizes,
             "checksum_us_per_record": checksum_us([int(sizes["labeled"]),
                                                    int(sizes["pseudo_labeled"]), 110_000]),
             "steps_per_pass": args.steps, "warmup_steps": args.warmup,
             "labeled_batch": LABELED_BATCH, "unlabeled_batch": UNLABELED_BATCH,
             "machine": dict(at_start, load_average_at_end=list(os.getloadavg())),
             "seconds": time.time() - started}
  with open(args.output, "w") as f:
    json.dump(results, f, indent=1)
  print(json.dumps({k: v for k, v in results.items() if k != "passes"}, indent=1))
  return results


if __name__ == "__main__":
  main()
