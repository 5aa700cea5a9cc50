"""Why hard pseudo labels beat soft ones on the demo: measurements from a finished paper study.

  python benchmarks/soft_vs_hard.py --study_dir=DIR --output=benchmarks/results/soft_vs_hard.json

DIR is the folder of `python -m nsjax.study --config=configs/demo.py --study=paper ...`. For each
seed it reads the full recipe's first pseudo labels (label-1: the teacher's probabilities for the
3,900 unlabeled digits) and the digits' true labels, and reports the teacher's confidence
histogram, the accuracy of its labels by confidence, what the confidence filter keeps, and the
same histogram on the out-of-domain patches (ood_soft's label-1). From study.json it takes the
one-iteration comparisons of the investigation (temperature, no filter, twice as many steps), as
paired differences with 95% intervals (nsjax.claims; exploratory, so no Holm correction), and
checks that each seed's teacher and baseline are independent runs (their seeds, parameter hashes
and the test images on which exactly one of them is right). Writes the JSON and a PNG beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nsjax import claims  # noqa: E402
from nsjax.claims import Claim  # noqa: E402
from nsjax.data import mnist5k, pseudo_labels  # noqa: E402
from nsjax.evaluate import metrics  # noqa: E402

BINS = np.linspace(0.0, 1.0, 21)
# (better, worse, what the difference measures): one-iteration students of seeds 0-3.
COMPARISONS = (
    ("hard_1", "iterations_1", "hard - soft labels (T = 1), first student"),
    ("soft_t0.5_1", "iterations_1", "soft T = 0.5 (sharper) - soft T = 1"),
    ("soft_t2_1", "iterations_1", "soft T = 2 (flatter) - soft T = 1"),
    ("soft_t0.5_1", "hard_1", "soft T = 0.5 - hard labels"),
    ("soft_no_filter_1", "iterations_1", "soft, no confidence threshold - soft with it"),
    ("soft_long_1", "iterations_1", "soft, 1,200 steps - 600 steps"),
    ("hard_long_1", "hard_1", "hard, 1,200 steps - 600 steps"),
    ("hard_long_1", "soft_long_1", "hard - soft labels, both 1,200 steps"),
    ("hard_labels", "full", "hard - soft labels, two iterations (the study's claim)"),
)


def read_labels(label_dir: str) -> dict[str, np.ndarray]:
  """The teacher's probabilities and the records' source ids, in shard order."""
  probs, ids = [], []
  for record in pseudo_labels.read_dataset(label_dir).as_numpy_iterator():
    probs.append(record["probs"])
    ids.append(int(record["id"]))
  return {"probs": np.stack(probs), "id": np.asarray(ids)}


def confidence_report(probs: np.ndarray, truth: np.ndarray | None, threshold: float
                      ) -> dict[str, object]:
  confidence, label = probs.max(axis=1), probs.argmax(axis=1)
  entropy = -np.sum(probs * np.log(np.maximum(probs, 1e-12)), axis=1)
  out = {"images": int(len(probs)),
         "histogram": np.histogram(confidence, BINS)[0].tolist(), "bins": BINS.tolist(),
         "mean_confidence": float(confidence.mean()),
         "median_confidence": float(np.median(confidence)),
         "mean_entropy_nats": float(entropy.mean()),
         "kept_by_threshold": float(np.mean(confidence >= threshold))}
  if truth is not None:
    right = label == truth
    out["label_accuracy"] = float(right.mean())
    out["label_accuracy_kept"] = float(right[confidence >= threshold].mean())
    out["label_accuracy_dropped"] = (float(right[confidence < threshold].mean())
                                     if np.any(confidence < threshold) else None)
    out["accuracy_by_confidence"] = [
        float(right[(confidence >= lo) & (confidence < hi)].mean())
        if np.any((confidence >= lo) & (confidence < hi)) else None
        for lo, hi in zip(BINS[:-1], BINS[1:] + 1e-9 * (BINS[1:] == 1.0))]
    # the mass a soft target puts on the true class, against a hard one's 0.9 + 0.1 / 10
    out["mean_prob_of_true_class"] = float(probs[np.arange(len(probs)), truth].mean())
  return out


def independence(study: dict, seed: str) -> dict[str, object]:
  """Teacher and baseline of one seed: their seeds, hashes, and where exactly one is right."""
  teacher, baseline = study["teacher"], study["baseline"]
  out = {"train_seeds": [teacher["train_seed"].get(seed), baseline["train_seed"].get(seed)],
         "top1": [teacher["top1"].get(seed), baseline["top1"].get(seed)],
         "same_parameters": teacher["params_sha256"].get(seed) == baseline["params_sha256"].get(seed)}
  if seed in teacher.get("top1_per_image", {}) and seed in baseline.get("top1_per_image", {}):
    t = metrics.unpack_hits(teacher["top1_per_image"][seed], teacher["num_examples"][seed])
    b = metrics.unpack_hits(baseline["top1_per_image"][seed], baseline["num_examples"][seed])
    out["images_only_teacher_right"] = int(np.sum(t & ~b))
    out["images_only_baseline_right"] = int(np.sum(~t & b))
  return out


def comparisons(study: dict) -> list[dict[str, object]]:
  rows = set(study["variants"])
  out = []
  for better, worse, what in COMPARISONS:
    if {better, worse} <= rows:
      checked = claims.check(study, Claim(what, "-", better, worse))
      out.append({k: checked.get(k) for k in ("text", "better", "worse", "seeds", "diffs",
                                               "diff_mean", "ci95", "verdict")})
  return out


def analyse(study_dir: str, threshold: float) -> dict[str, object]:
  study = json.load(open(os.path.join(study_dir, "study.json")))
  _, truth_by_id = mnist5k.load_source()
  per_seed = {}
  for seed in map(str, study["study"]["seeds"]):
    entry = {"teacher_and_baseline": independence(study, seed)}
    label_dir = os.path.join(study_dir, "runs", "full", f"seed-{seed}", "label-1")
    if os.path.exists(os.path.join(label_dir, pseudo_labels.MANIFEST)):
      labels = read_labels(label_dir)
      entry["in_domain"] = confidence_report(labels["probs"], truth_by_id[labels["id"]], threshold)
    ood_dir = os.path.join(study_dir, "runs", "ood_soft", f"seed-{seed}", "label-1")
    if os.path.exists(os.path.join(ood_dir, pseudo_labels.MANIFEST)):
      entry["out_of_domain"] = confidence_report(read_labels(ood_dir)["probs"], None, threshold)
    per_seed[seed] = entry
  return {"study_dir_name": os.path.basename(os.path.normpath(study_dir)),
          "threshold": threshold, "per_seed": per_seed, "comparisons": comparisons(study)}


def plot(result: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
  centres = (BINS[:-1] + BINS[1:]) / 2
  for seed, entry in result["per_seed"].items():
    for key, style in (("in_domain", "-"), ("out_of_domain", ":")):
      if key in entry:
        h = np.asarray(entry[key]["histogram"], float)
        left.plot(centres, h / h.sum(), style, label=f"seed {seed} {key.replace('_', ' ')}")
  left.axvline(result["threshold"], color="gray", lw=0.8)
  left.set_xlabel("teacher's top-1 probability on the unlabeled images")
  left.set_ylabel("fraction of images")
  left.set_yscale("log")
  left.legend(fontsize=6, ncol=2)
  rows = [c for c in result["comparisons"] if c["ci95"]]
  for y, c in enumerate(rows):
    low, high = c["ci95"]
    right.errorbar([c["diff_mean"]], [y], xerr=[[c["diff_mean"] - low], [high - c["diff_mean"]]],
                   fmt="o", capsize=3)
  right.axvline(0, color="black", lw=0.8)
  right.set_yticks(range(len(rows)), [c["text"] for c in rows], fontsize=7)
  right.invert_yaxis()
  right.set_xlabel("paired difference, points of test top-1 (95% CI)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--study_dir", required=True)
  parser.add_argument("--output", required=True, help="the JSON; the PNG goes beside it")
  parser.add_argument("--threshold", type=float, default=0.3,
                      help="the demo's balance.min_threshold")
  args = parser.parse_args()
  result = analyse(args.study_dir, args.threshold)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  plot(result, os.path.splitext(args.output)[0] + ".png")
  print(json.dumps(result["comparisons"], indent=1))


if __name__ == "__main__":
  main()
