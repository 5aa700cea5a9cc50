"""Command line: score an exported model on one benchmark; JSON + TensorBoard in --output.

  python -m nsjax.evaluate --export=WORKDIR/student-2/export --dataset=imagenet2012 \
      --split=validation --resolution=800 --output=/tmp/eval
  python -m nsjax.evaluate --export=... --benchmark=imagenet_a --output=/tmp/eval
  python -m nsjax.evaluate --export=... --benchmark=imagenet_c --clean_dataset=imagenet2012 \
      --output=/tmp/eval
  python -m nsjax.evaluate --export=... --benchmark=imagenet_c --imagenet_c_dir=/data/ImageNet-C \
      --imagenet_c_wnids=imagenet_wnids.txt --clean_error=0.12 --output=/tmp/eval
  python -m nsjax.evaluate --export=... --benchmark=imagenet_p --imagenet_p_dir=/data/ImageNet-P \
      --alexnet_flip_probabilities=alexnet_fp.json --output=/tmp/eval
  python -m nsjax.evaluate --export=... --benchmark=fgsm --dataset=imagenet2012 \
      --split='validation[:5000]' --epsilons=0,1,2,4,8,16 --output=/tmp/eval

Benchmarks: clean (top-1/top-5 of any TFDS split), imagenet_a / imagenet_r (logits restricted to
the benchmark's 200 classes), imagenet_v2 (plain top-1), imagenet_c (15 corruptions x 5 severities
of imagenet2012_corrupted -> mCE, relative mCE, top-1), cifar10_c (cifar10_corrupted -> mean
error), fgsm / pgd (accuracy per epsilon; epsilons in 1/255 units; also a PNG). The corrupted and
robustness sets default to their usual TFDS names and splits; they must be prepared in --data_dir
(`tfds build NAME --data_dir=...`): nothing is downloaded here. ImageNet-C can also be read from
its official folder release (--imagenet_c_dir; class index = position of the wnid in the sorted
--imagenet_c_wnids list, by default the sorted class folders, which for all 1000 is ImageNet's
label order). ImageNet-P (imagenet_p) reads its official release of mp4 videos (decoded with
PyAV) or frame folders from --imagenet_p_dir -> flip probability per perturbation, and mFR when
--alexnet_flip_probabilities gives the normalisers.

Exit codes: 0 done; 2 the export is damaged or missing (one line naming the path and the fix).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags

from nsjax import artifacts
from nsjax.evaluate import suites

_EXPORT = flags.DEFINE_string("export", None, "Exported model directory (model.json + variables/).")
_DATASET = flags.DEFINE_string("dataset", "", "TFDS name (default: the benchmark's own dataset).")
_SPLIT = flags.DEFINE_string("split", "", "TFDS split, e.g. validation or 'test[:1000]'.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: TFDS's).")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "Eval resolution (0: the model's own).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size (a multiple of the "
                                   "device count).")
_BENCHMARK = flags.DEFINE_enum("benchmark", "clean", suites.BENCHMARKS, "What to measure.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for <benchmark>.json and TensorBoard.")
_CORRUPTIONS = flags.DEFINE_list("corruptions", [], "imagenet_c / cifar10_c: a subset of the 15 "
                                 "benchmark corruptions (default: all).")
_CLEAN_ERROR = flags.DEFINE_float("clean_error", None, "imagenet_c: the clean top-1 error (a "
                                  "fraction) for the relative mCE.")
_CLEAN_DATASET = flags.DEFINE_string("clean_dataset", "", "imagenet_c: measure the clean error on "
                                     "this TFDS dataset (e.g. imagenet2012).")
_CLEAN_SPLIT = flags.DEFINE_string("clean_split", "validation", "Split of --clean_dataset.")
_EPSILONS = flags.DEFINE_list("epsilons", ["0", "1", "2", "4", "8", "16"], "fgsm / pgd: attack "
                              "sizes in 1/255 pixel units.")
_IMAGENET_C_DIR = flags.DEFINE_string("imagenet_c_dir", "", "imagenet_c: read the official folder "
                                      "release <dir>/<corruption>/<severity>/<wnid>/*.JPEG "
                                      "instead of TFDS imagenet2012_corrupted.")
_IMAGENET_C_WNIDS = flags.DEFINE_string("imagenet_c_wnids", "", "With --imagenet_c_dir: a file of "
                                        "wnids, one per line, sorted; a class's index is its "
                                        "line (default: the sorted class folders).")
_SEVERITIES = flags.DEFINE_list("severities", ["1", "2", "3", "4", "5"], "imagenet_c: severities "
                                "to score (a subset gives partial CEs, not the benchmark's mCE).")
_IMAGENET_P_DIR = flags.DEFINE_string("imagenet_p_dir", "", "imagenet_p: the official release "
                                      "<dir>/<perturbation>/<wnid>/<video>.mp4 (or frame "
                                      "folders <video>/<frame>.png).")
_IMAGENET_P_WNIDS = flags.DEFINE_string("imagenet_p_wnids", "", "With --imagenet_p_dir: the sorted "
                                        "wnid list (default: the sorted class folders).")
_PERTURBATIONS = flags.DEFINE_list("perturbations", [], "imagenet_p: a subset of the 10 "
                                   "perturbations (default: all).")
_ALEXNET_FP = flags.DEFINE_string("alexnet_flip_probabilities", "", "imagenet_p: a JSON file "
                                  "{perturbation: AlexNet's flip probability}; with it the result "
                                  "has mFR, without it the unnormalised mFP.")
_DIFFICULTY = flags.DEFINE_integer("difficulty", 1, "imagenet_p: compare frame t with t - "
                                   "difficulty (non-noise perturbations).")
_PGD_STEPS = flags.DEFINE_integer("pgd_steps", 10, "pgd: projected steps.")
_SEED = flags.DEFINE_integer("seed", 0, "pgd random starts.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Checked here, not with mark_flags_as_required: that would bind every program importing this
  # module (flags are process-global) to --export and --output.
  missing = [f"--{name}" for name, flag in (("export", _EXPORT), ("output", _OUTPUT)) if not flag.value]
  if missing:
    raise app.UsageError(f"{' and '.join(missing)} required (see --helpfull).")
  import tensorflow_datasets as tfds  # after flag parsing: `--help` stays fast without TF
  tfds.disable_progress_bar()
  try:
    result = _run()
  except artifacts.ArtifactError as error:  # one line naming the path and the fix, no traceback
    print(f"Damaged or missing artifact: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Not sys.exit: Orbax's reader threads of the failed restore may still be running; exiting
    # at once neither waits for them nor tears the interpreter down under them (their late
    # completions are dropped by artifacts.quiet_abandoned_reads).
    os._exit(2)
  path = suites.write_results(_OUTPUT.value, result)
  print(f"{_BENCHMARK.value}: {suites.scalars(result)} -> {path}", flush=True)


def _run():
  """The benchmark the flags describe."""
  return suites.run_benchmark(
      _EXPORT.value, _BENCHMARK.value, dataset=_DATASET.value, split=_SPLIT.value,
      data_dir=_DATA_DIR.value, resolution=_RESOLUTION.value, batch_size=_BATCH_SIZE.value,
      corruptions=_CORRUPTIONS.value or None, clean_error=_CLEAN_ERROR.value,
      clean_dataset=_CLEAN_DATASET.value, clean_split=_CLEAN_SPLIT.value,
      epsilons=[float(e) / 255.0 for e in _EPSILONS.value], pgd_steps=_PGD_STEPS.value,
      seed=_SEED.value, imagenet_c_dir=_IMAGENET_C_DIR.value,
      imagenet_c_wnids=(suites.read_wnids(_IMAGENET_C_WNIDS.value)
                        if _IMAGENET_C_WNIDS.value else None),
      severities=[int(s) for s in _SEVERITIES.value], imagenet_p_dir=_IMAGENET_P_DIR.value,
      imagenet_p_wnids=(suites.read_wnids(_IMAGENET_P_WNIDS.value)
                        if _IMAGENET_P_WNIDS.value else None),
      perturbations=_PERTURBATIONS.value or None,
      alexnet_flip_probabilities=(suites.read_flip_probabilities(_ALEXNET_FP.value)
                                  if _ALEXNET_FP.value else None),
      difficulty=_DIFFICULTY.value)


if __name__ == "__main__":
  app.run(main)
