"""Robustness benchmarks: ImageNet-C / CIFAR-10-C error summaries and ImageNet-P flip rates.

Everything here is pure bookkeeping over error rates or predictions, so it can be checked against
hand computations and reused by any eval driver (TFDS or folder based):

* ImageNet-C (Hendrycks & Dietterich 2019): CE_c = sum_s E(s,c) / sum_s E_AlexNet(s,c),
  mCE = 100 * mean_c CE_c over the 15 benchmark corruptions; relative CE subtracts the clean error
  from both. Results are a dict {(corruption, severity): top-1 error as a fraction}.
* CIFAR-10-C: no AlexNet baseline; the usual number is the mean error over the 15 x 5 settings.
* ImageNet-P: flip probability of the top-1 prediction along each perturbation video. Noise videos
  (gaussian_noise, shot_noise) are independent draws, so every frame is compared with the FIRST
  frame; the others are smooth sequences, so consecutive frames are compared. FR_p = FP_p /
  FP_AlexNet_p and mFR = 100 * mean_p FR_p; AlexNet's FP values are not at hand, so the normaliser
  is a parameter and without it the summary reports the unnormalised mean FP instead (and says so).

Also here: the TFDS config names of the corrupted datasets, and listings of the official folder
releases (ImageNet-C `<corruption>/<severity>/<wnid>/*.JPEG`, ImageNet-P
`<perturbation>/<wnid>/<video>`).
"""
from __future__ import annotations

import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)

# --------------------------------------------------------------------------------------------------
# ImageNet-C.

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
               "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
               "elastic_transform", "pixelate", "jpeg_compression")
EXTRA_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")

# AlexNet top-1 error per corruption at severities 1..5 (the mCE normaliser of the benchmark).
ALEXNET_ERRORS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.94870, 0.98720, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.58430, 0.70048, 0.82108, 0.89750, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.91870, 0.94952),
    "frost": (0.61390, 0.79734, 0.88790, 0.89942, 0.93430),
    "fog": (0.67474, 0.76050, 0.84378, 0.87260, 0.94500),
    "brightness": (0.45140, 0.48502, 0.54048, 0.62166, 0.72440),
    "contrast": (0.64548, 0.76150, 0.88874, 0.97760, 0.99270),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.54620, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}
# AlexNet's clean top-1 error for relative mCE. Unverified against a primary source: pass your own
# `alexnet_clean_error` when you have a better number.
ALEXNET_CLEAN_ERROR = 0.4345

Results = Mapping[tuple[str, int], float]


def alexnet_results() -> dict[tuple[str, int], float]:
  """AlexNet's own ImageNet-C errors as a results dict (mCE of exactly 100 by construction)."""
  return {(c, s): errors[s - 1] for c, errors in ALEXNET_ERRORS.items() for s in SEVERITIES}


def corruption_error(errors: Sequence[float], baseline_errors: Sequence[float],
                     clean_error: float | None = None, baseline_clean_error: float | None = None
                     ) -> float:
  """CE over severities: sum_s E_s / sum_s B_s; the relative form when both clean errors are given.

  Relative: sum_s (E_s - E_clean) / sum_s (B_s - B_clean).
  """
  errors = np.asarray(errors, np.float64)
  baseline = np.asarray(baseline_errors, np.float64)
  if errors.shape != baseline.shape:
    raise ValueError(f"Need one error per severity for both; got {errors.shape} and "
                     f"{baseline.shape}.")
  if (clean_error is None) != (baseline_clean_error is None):
    raise ValueError("Relative CE needs both clean_error and baseline_clean_error (or neither).")
  if clean_error is not None:
    errors = errors - clean_error
    baseline = baseline - baseline_clean_error
  denominator = baseline.sum()
  if denominator == 0:
    raise ValueError("Baseline errors sum to zero; the CE normaliser is undefined.")
  return float(errors.sum() / denominator)


def imagenet_c_summary(results: Results, clean_error: float | None = None,
                       alexnet_errors: Mapping[str, Sequence[float]] | None = None,
                       alexnet_clean_error: float = ALEXNET_CLEAN_ERROR,
                       corruptions: Sequence[str] = CORRUPTIONS,
                       severities: Sequence[int] = SEVERITIES) -> dict[str, Any]:
  """mCE, per-corruption CE, top-1 over all settings, and (given `clean_error`) relative mCE.

  `results`: {(corruption, severity): top-1 error in [0, 1]} for every corruption x severity 1..5.
  Returns a JSON-ready dict; CE values are fractions (1.0 = AlexNet), mCE values are percentages.
  `severities`: a subset of 1..5 gives a partial CE (sums over those severities only, AlexNet's
  included); it is not the benchmark's mCE, and the result says which severities it covers.
  """
  alexnet_errors = ALEXNET_ERRORS if alexnet_errors is None else alexnet_errors
  severities = _check_severities(severities)
  table = _error_table(results, corruptions, severities)
  missing_baseline = [c for c in corruptions if c not in alexnet_errors]
  if missing_baseline:
    raise ValueError(f"No AlexNet errors for {missing_baseline}; pass `alexnet_errors` for them.")
  baseline = {c: [alexnet_errors[c][s - 1] for s in severities] for c in corruptions}
  ce = {c: corruption_error(table[c], baseline[c]) for c in corruptions}
  summary: dict[str, Any] = {
      "mCE": 100.0 * float(np.mean(list(ce.values()))),
      "CE": ce,
      "mean_error": float(np.mean([table[c] for c in corruptions])),
      "top1": 1.0 - float(np.mean([table[c] for c in corruptions])),
      "num_settings": len(corruptions) * len(severities),
      "errors": {c: list(table[c]) for c in corruptions},
      "severities": list(severities),
  }
  if clean_error is not None:
    _check_fraction(clean_error, "clean_error")
    relative = {c: corruption_error(table[c], baseline[c], clean_error, alexnet_clean_error)
                for c in corruptions}
    summary.update({"relative_mCE": 100.0 * float(np.mean(list(relative.values()))),
                    "relative_CE": relative, "clean_error": clean_error,
                    "alexnet_clean_error": alexnet_clean_error,
                    "alexnet_clean_error_note": "0.4345 is unverified; configurable"})
  return summary


# --------------------------------------------------------------------------------------------------
# CIFAR-10-C.

# TFDS `cifar10_corrupted` spells two of the benchmark corruptions differently.
CIFAR10_C_RENAMES = {"glass_blur": "frosted_glass_blur", "elastic_transform": "elastic"}
CIFAR10_C_CORRUPTIONS = tuple(CIFAR10_C_RENAMES.get(c, c) for c in CORRUPTIONS)
CIFAR10_C_EXTRA_CORRUPTIONS = EXTRA_CORRUPTIONS


def cifar10_c_summary(results: Results, corruptions: Sequence[str] = CIFAR10_C_CORRUPTIONS
                      ) -> dict[str, Any]:
  """Mean top-1 error over corruptions x severities 1..5, plus the per-corruption means.

  Accepts either spelling (glass_blur / frosted_glass_blur, elastic_transform / elastic).
  """
  results = {(CIFAR10_C_RENAMES.get(c, c), s): e for (c, s), e in results.items()}
  corruptions = [CIFAR10_C_RENAMES.get(c, c) for c in corruptions]
  table = _error_table(results, corruptions)
  mean_error = float(np.mean([table[c] for c in corruptions]))
  return {"mean_error": mean_error, "top1": 1.0 - mean_error,
          "per_corruption": {c: float(np.mean(table[c])) for c in corruptions},
          "num_settings": len(corruptions) * len(SEVERITIES),
          "errors": {c: list(table[c]) for c in corruptions}}


# --------------------------------------------------------------------------------------------------
# Results <-> JSON.

def results_to_json(results: Results) -> dict[str, float]:
  """{(c, s): e} -> {"c_s": e}: JSON keys must be strings; the TFDS config spelling is used."""
  return {f"{c}_{s}": float(e) for (c, s), e in sorted(results.items())}


def parse_results(raw: Mapping[Any, Any]) -> dict[tuple[str, int], float]:
  """Reads results with keys (c, s), "c_s" (TFDS config name, optionally "dataset/c_s") or "c/s"."""
  parsed = {}
  for key, error in raw.items():
    if isinstance(key, tuple) and len(key) == 2:
      corruption, severity = key
    else:
      match = re.fullmatch(r"(?:.*/)?([a-z_]+?)[_/]([1-5])", str(key))
      if not match:
        raise ValueError(f"Cannot read results key {key!r}; use (corruption, severity), "
                         "'corruption_severity' or 'corruption/severity'.")
      corruption, severity = match.group(1), match.group(2)
    parsed[(str(corruption), int(severity))] = float(error)
  return parsed


def _error_table(results: Results, corruptions: Sequence[str],
                 severities: Sequence[int] = SEVERITIES) -> dict[str, list[float]]:
  results = parse_results(results)
  missing = [f"{c}_{s}" for c in corruptions for s in severities if (c, s) not in results]
  if missing:
    wanted = ("1..5" if tuple(severities) == SEVERITIES
              else ", ".join(str(s) for s in severities))
    raise ValueError(f"Results lack {len(missing)} setting(s): {', '.join(missing[:8])}"
                     f"{' ...' if len(missing) > 8 else ''}. Each corruption needs severity "
                     f"{wanted}.")
  table = {c: [results[(c, s)] for s in severities] for c in corruptions}
  for c, errors in table.items():
    for s, error in zip(severities, errors):
      _check_fraction(error, f"error for {c}_{s}")
  return table


def _check_severities(severities: Sequence[int]) -> tuple[int, ...]:
  severities = tuple(int(s) for s in severities)
  if not severities or list(severities) != sorted(set(severities)) or not set(severities) <= set(
      SEVERITIES):
    raise ValueError(f"severities must be sorted, unique and among {SEVERITIES}; got "
                     f"{list(severities)}.")
  return severities


def _check_fraction(value: float, what: str) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{what} = {value} is not in [0, 1]; give error rates as fractions, not %.")


# --------------------------------------------------------------------------------------------------
# TFDS names.

def imagenet_c_tfds_name(corruption: str, severity: int) -> str:
  """'imagenet2012_corrupted/<corruption>_<severity>' (TFDS regenerates the corruptions itself)."""
  _check_setting(corruption, severity, CORRUPTIONS + EXTRA_CORRUPTIONS)
  return f"imagenet2012_corrupted/{corruption}_{severity}"


def cifar10_c_tfds_name(corruption: str, severity: int) -> str:
  """'cifar10_corrupted/<name>_<severity>'; ImageNet-C spellings are mapped to TFDS's."""
  corruption = CIFAR10_C_RENAMES.get(corruption, corruption)
  _check_setting(corruption, severity, CIFAR10_C_CORRUPTIONS + CIFAR10_C_EXTRA_CORRUPTIONS)
  return f"cifar10_corrupted/{corruption}_{severity}"


def tfds_names(dataset: str = "imagenet2012_corrupted", corruptions: Sequence[str] | None = None
               ) -> dict[tuple[str, int], str]:
  """{(corruption, severity): TFDS name} for all benchmark settings of one dataset."""
  namers = {"imagenet2012_corrupted": (imagenet_c_tfds_name, CORRUPTIONS),
            "cifar10_corrupted": (cifar10_c_tfds_name, CIFAR10_C_CORRUPTIONS)}
  if dataset not in namers:
    raise ValueError(f"dataset must be one of {sorted(namers)}, got {dataset!r}.")
  namer, default = namers[dataset]
  return {(c, s): namer(c, s) for c in (corruptions or default) for s in SEVERITIES}


def _check_setting(corruption: str, severity: int, known: Sequence[str]) -> None:
  if corruption not in known:
    raise ValueError(f"Unknown corruption {corruption!r}; known: {', '.join(known)}.")
  if severity not in SEVERITIES:
    raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}.")


# --------------------------------------------------------------------------------------------------
# ImageNet-C folder release.

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def list_imagenet_c(root: str | os.PathLike, corruptions: Sequence[str] = CORRUPTIONS,
                    severities: Sequence[int] = SEVERITIES, wnids: Sequence[str] | None = None
                    ) -> dict[tuple[str, int], list[tuple[pathlib.Path, int]]]:
  """{(corruption, severity): [(image, class index)]} from <root>/<corruption>/<severity>/<wnid>/.

  Class index = position of the wnid in `wnids` (must be sorted, as ImageNet's 1000 classes are);
  by default the sorted wnid folders of the first setting, and every setting must have the same set.
  """
  root = pathlib.Path(root)
  settings = [(c, s) for c in corruptions for s in severities]
  missing = [f"{c}/{s}" for c, s in settings if not (root / c / str(s)).is_dir()]
  if missing:
    raise FileNotFoundError(f"{root}: missing ImageNet-C folder(s) {', '.join(missing[:8])}"
                            f"{' ...' if len(missing) > 8 else ''}; expected "
                            "<root>/<corruption>/<severity>/<wnid>/*.JPEG.")
  class_index = _class_index(wnids, root / settings[0][0] / str(settings[0][1]))
  listing = {}
  for c, s in settings:
    setting_dir = root / c / str(s)
    found = sorted(p.name for p in setting_dir.iterdir() if p.is_dir())
    unknown = sorted(set(found) - set(class_index))
    if unknown:
      raise ValueError(f"{setting_dir}: class folders {unknown[:5]} are not in the wnid list.")
    listing[(c, s)] = [(path, class_index[wnid]) for wnid in found
                       for path in sorted((setting_dir / wnid).iterdir())
                       if path.suffix.lower() in IMAGE_SUFFIXES]
  return listing


def _class_index(wnids: Sequence[str] | None, first_dir: pathlib.Path) -> dict[str, int]:
  if wnids is None:
    wnids = sorted(p.name for p in first_dir.iterdir() if p.is_dir())
    if not wnids:
      raise FileNotFoundError(f"{first_dir}: no class folders (<wnid>/) found.")
  wnids = list(wnids)
  if wnids != sorted(wnids) or len(set(wnids)) != len(wnids):
    raise ValueError("wnids must be sorted and unique: a class index is the position in that list.")
  return {wnid: i for i, wnid in enumerate(wnids)}


# --------------------------------------------------------------------------------------------------
# ImageNet-P.

PERTURBATIONS = ("gaussian_noise", "shot_noise", "motion_blur", "zoom_blur", "snow", "brightness",
                 "translate", "rotate", "tilt", "scale")
NOISE_PERTURBATIONS = ("gaussian_noise", "shot_noise")
# AlexNet flip probabilities per perturbation are not at hand; None means "report unnormalised FP".
ALEXNET_FLIP_PROBABILITIES: Mapping[str, float] | None = None


def video_flip_rate(predictions: Sequence[int], noise: bool, difficulty: int = 1) -> float:
  """Fraction of frame comparisons whose top-1 prediction differs.

  noise=True: frame t vs frame 0 for t >= 1. Otherwise frame t vs frame t - difficulty (consecutive
  frames for difficulty 1; the benchmark's harder settings skip frames). Needs two or more frames.
  """
  preds = np.asarray(predictions)
  if preds.ndim != 1 or preds.size < 2:
    raise ValueError(f"Need a 1-D sequence of at least 2 frame predictions, got {preds.shape}.")
  if difficulty < 1:
    raise ValueError(f"difficulty must be >= 1, got {difficulty}.")
  if noise:
    changed = preds[1:] != preds[0]
  else:
    if preds.size <= difficulty:
      raise ValueError(f"{preds.size} frames are too few for difficulty {difficulty}.")
    changed = preds[difficulty:] != preds[:-difficulty]
  return float(changed.mean())


def flip_probability(videos: Iterable[Sequence[int]], perturbation: str | None = None,
                     noise: bool | None = None, difficulty: int = 1) -> float:
  """Mean over videos of `video_flip_rate` (each video's mean over its frames).

  The comparison kind follows from `perturbation` (noise for gaussian_noise / shot_noise) unless
  `noise` is given explicitly. Videos may have different lengths.
  """
  if noise is None:
    if perturbation is None:
      raise ValueError("Give `perturbation` (e.g. 'gaussian_noise') or `noise` explicitly.")
    noise = perturbation in NOISE_PERTURBATIONS
  rates = [video_flip_rate(v, noise, difficulty) for v in videos]
  if not rates:
    raise ValueError("No videos given.")
  return float(np.mean(rates))


def imagenet_p_summary(flip_probabilities: Mapping[str, float],
                       alexnet_flip_probabilities: Mapping[str, float] | None = (
                           ALEXNET_FLIP_PROBABILITIES),
                       perturbations: Sequence[str] = PERTURBATIONS) -> dict[str, Any]:
  """mFR = 100 * mean_p FP_p / FP_AlexNet_p, or, without normalisers, the unnormalised mean FP.

  The output says which one it is ("normalized"): an unnormalised number is never taken for mFR.
  """
  missing = [p for p in perturbations if p not in flip_probabilities]
  if missing:
    raise ValueError(f"Flip probabilities lack perturbation(s) {missing}.")
  fp = {p: float(flip_probabilities[p]) for p in perturbations}
  summary: dict[str, Any] = {"FP": fp, "mFP": 100.0 * float(np.mean(list(fp.values())))}
  if alexnet_flip_probabilities is None:
    summary.update(normalized=False, note="No AlexNet flip probabilities configured: mFP is the "
                   "unnormalised mean flip probability (%), not the benchmark's mFR.")
    return summary
  lacking = [p for p in perturbations if not alexnet_flip_probabilities.get(p)]
  if lacking:
    raise ValueError(f"AlexNet flip probabilities missing or zero for {lacking}.")
  fr = {p: fp[p] / float(alexnet_flip_probabilities[p]) for p in perturbations}
  summary.update(normalized=True, FR=fr, mFR=100.0 * float(np.mean(list(fr.values()))))
  return summary


def list_imagenet_p(root: str | os.PathLike, perturbations: Sequence[str] = PERTURBATIONS,
                    wnids: Sequence[str] | None = None
                    ) -> dict[str, list[tuple[pathlib.Path, int]]]:
  """{perturbation: [(video, class index)]} from `<root>/<perturbation>/<wnid>/<video>`.

  A video is either the official `<video>.mp4` or a directory of frame images
  (`<video>/<frame>.png|jpg`, e.g. extracted with `ffmpeg -i v.mp4 v/%03d.png`). Read frames with
  `read_video`.
  """
  root = pathlib.Path(root)
  missing = [p for p in perturbations if not (root / p).is_dir()]
  if missing:
    raise FileNotFoundError(f"{root}: missing ImageNet-P folder(s) {missing}; expected "
                            "<root>/<perturbation>/<wnid>/<video>.mp4 (or <video>/ frame folders).")
  class_index = _class_index(wnids, root / perturbations[0])
  listing = {}
  for p in perturbations:
    videos = []
    for wnid_dir in sorted(d for d in (root / p).iterdir() if d.is_dir()):
      if wnid_dir.name not in class_index:
        raise ValueError(f"{wnid_dir}: class folder not in the wnid list.")
      videos += [(v, class_index[wnid_dir.name]) for v in sorted(wnid_dir.iterdir())
                 if v.is_dir() or v.suffix.lower() == ".mp4"]
    listing[p] = videos
  return listing


def read_video(path: str | os.PathLike) -> np.ndarray:
  """Frames of one ImageNet-P video as uint8 [T, H, W, 3].

  A directory is read as frame images in natural order (2.png before 10.png). An .mp4 needs a
  decoder: PyAV (`pip install av`) or imageio with its pyav plugin; without one a RuntimeError
  explains how to install it or extract the frames.
  """
  path = pathlib.Path(path)
  if path.is_dir():
    return _read_frame_dir(path)
  if path.suffix.lower() == ".mp4":
    return _decode_mp4(path)
  raise ValueError(f"{path}: expected an .mp4 file or a directory of frame images.")


def _read_frame_dir(path: pathlib.Path) -> np.ndarray:
  frames = [f for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
  if not frames:
    raise FileNotFoundError(f"{path}: no frame images (.png/.jpg) found.")
  frames.sort(key=lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.stem)])
  arrays = []
  for frame in frames:
    with Image.open(frame) as image:
      arrays.append(np.asarray(image.convert("RGB")))
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f"{path}: frames differ in size {sorted(shapes)}.")
  return np.stack(arrays)


def _decode_mp4(path: pathlib.Path) -> np.ndarray:
  # PyAV and imageio are optional (either decodes mp4), so they are imported only when needed.
  try:
    import av  # PyAV
  except ImportError:
    av = None
  if av is not None:
    with av.open(str(path)) as container:
      return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
  try:
    import imageio.v3 as iio
  except ImportError:
    iio = None
  if iio is not None:
    return np.asarray(iio.imread(path, plugin="pyav"))
  raise RuntimeError(
      f"Cannot decode {path}: no mp4 decoder is installed. Either `pip install av` (PyAV), or "
      "extract the frames once, e.g. `ffmpeg -i video.mp4 video/%03d.png`, and point the reader "
      "at the frame folders (<perturbation>/<wnid>/<video>/<frame>.png).")


def video_predictions(predict: Callable[[np.ndarray], Any], frames: np.ndarray) -> np.ndarray:
  """Top-1 class per frame; `predict` maps uint8 frames [T, H, W, 3] to logits [T, C] or classes."""
  out = np.asarray(predict(frames))
  return out.argmax(axis=-1) if out.ndim == 2 else out


def imagenet_p_flip_probabilities(listing: Mapping[str, Sequence[tuple[Any, int]]],
                                  predict: Callable[[np.ndarray], Any],
                                  read: Callable[[Any], np.ndarray] = read_video,
                                  difficulty: int = 1) -> dict[str, float]:
  """{perturbation: FP} for a `list_imagenet_p` listing; `predict` does preprocessing + model."""
  return {p: flip_probability((video_predictions(predict, read(video)) for video, _ in videos),
                              perturbation=p, difficulty=difficulty)
          for p, videos in listing.items()}
