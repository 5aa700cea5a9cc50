"""Image folders as data sources: converted once into a TFDS dataset, then read like any other.

Why convert instead of reading files on the fly: the input pipeline's guarantees (even per-host
splits, stateless shuffles, exact resumption, masked single passes) rest on TFDS's sharded records
and known split sizes. A converted folder gets all of them, every later run reads a few large files
instead of many small ones (which is what makes gs:// fast), and bad files are found once, at build
time, instead of in every epoch.

Layouts (local paths or gs://, read through tf.io.gfile):
  labeled     <folder>/<class name>/**/<image>   one subfolder per class; labels: the sorted names
  unlabeled   <folder>/**/<image>                any nesting, any file names
Names starting with "." (.DS_Store, .ipynb_checkpoints/) are ignored. Every file is decoded once to
check it: JPEG and PNG bytes are stored as given (decodable by tf.io.decode_image, the decoder the
pipeline uses); other formats that PIL reads (BMP, GIF, TIFF, WebP, ...) are stored as PNG; empty,
unreadable, corrupt and non-image files are skipped and counted by reason in the build report.

Caching: the dataset `folder_<kind>_<hash of the folder path>` is written under `cache_dir` (the
pipeline's default: <workdir>/folder_datasets) together with `build.json`, written last, which holds
the folder's fingerprint -- sha256 over every file's (relative path, size, mtime) -- and the report.
An unchanged folder is reused; a changed one (a file added, removed, or rewritten) is rebuilt. Only
process 0 scans and builds; the other processes wait at a barrier and then read what it wrote.

Features: image (encoded bytes, decoded to [H, W, 3] uint8), id (the path relative to the folder),
and for labeled folders label (a ClassLabel holding the class names, which travel with every model
exported from them; see `check_class_names`).
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import hashlib
import io
import os
import posixpath
import types
from typing import Any, Iterator, Sequence

import jax
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image, UnidentifiedImageError

from nsjax import parallel
from nsjax.data import input_pipeline
from nsjax.files import atomic_write_json, read_json

KINDS = ("labeled", "unlabeled")
ROLES = ("labeled", "unlabeled", "test")  # config.data keys that hold a data source
SPLIT = "train"  # a folder is one split; carve it with split expressions, e.g. "train[:90%]"
VERSION = "1.0.0"
BUILD_FILE = "build.json"
SOURCES_FILE = "data_sources.json"  # in the workdir: how each source was resolved, skip counts
CACHE_SUBDIR = "folder_datasets"
_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_CHECK_THREADS = 16
_CHECK_CHUNK = 512  # files decoded ahead of the writer: bounds the memory held in flight
_MAX_LISTED = 20  # skipped files named in the report (all are counted)


class FolderError(ValueError):
  """An image folder cannot serve as the configured source."""


class ClassMismatchError(ValueError):
  """A model and a dataset (or two datasets) disagree on the classes."""


@dataclasses.dataclass(frozen=True)
class FolderFile:
  path: str  # relative to the folder, "/"-separated
  size: int
  mtime_ns: int


# ------------------------------------------------------------------------------------------------
# Scanning.

def _hidden(name: str) -> bool:
  return name.startswith(".")


def _join(*parts: str) -> str:
  return posixpath.join(*parts) if "://" in parts[0] else os.path.join(*parts)


def list_files(folder: str) -> list[FolderFile]:
  """Every non-hidden file under `folder` with its size and mtime, sorted by relative path."""
  if not tf.io.gfile.isdir(folder):
    raise FolderError(f"Image folder {folder} does not exist or is not a directory; check the "
                      "`folder` of the data source.")
  relative = []
  for root, dirs, files in tf.io.gfile.walk(folder):
    dirs[:] = [d for d in dirs if not _hidden(d)]
    remote = "://" in folder
    rel_root = root[len(folder):].strip("/") if remote else os.path.relpath(root, folder)
    rel_root = "" if rel_root in (".", "") else rel_root.replace(os.sep, "/")
    if any(_hidden(part) for part in rel_root.split("/") if part):
      continue  # gfile.walk on gs:// may not honour the pruning above
    relative += [posixpath.join(rel_root, f) if rel_root else f for f in files if not _hidden(f)]

  def stat(rel):
    info = tf.io.gfile.stat(_join(folder, *rel.split("/")))
    return FolderFile(rel, int(info.length), int(info.mtime_nsec))

  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    return sorted(pool.map(stat, relative), key=lambda f: f.path)


def fingerprint(files: Sequence[FolderFile], kind: str) -> str:
  """Changes when a file is added, removed, renamed, resized or rewritten (mtime)."""
  h = hashlib.sha256(f"{kind}\n{VERSION}\n".encode())
  for f in files:
    h.update(f"{f.path}\0{f.size}\0{f.mtime_ns}\n".encode())
  return h.hexdigest()


def labeled_classes(folder: str, files: Sequence[FolderFile]) -> list[str]:
  """Sorted class names (the top-level subfolders); a bad layout is a FolderError naming the fix."""
  top_files = [f.path for f in files if "/" not in f.path]
  if top_files:
    raise FolderError(
        f"The labeled folder {folder} has files at its top level ({_listing(top_files)}); a "
        "labeled folder holds one subfolder per class and images only inside them. Move them into "
        "their class subfolder, or use kind='unlabeled' for a folder without classes.")
  classes = sorted(d.rstrip("/") for d in tf.io.gfile.listdir(folder)
                   if not _hidden(d) and tf.io.gfile.isdir(_join(folder, d.rstrip("/"))))
  if not classes:
    raise FolderError(f"The labeled folder {folder} has no class subfolders; expected "
                      f"{folder}/<class name>/<image files>.")
  counts = {c: 0 for c in classes}
  for f in files:
    counts[f.path.split("/")[0]] += 1
  _raise_for_empty_classes(folder, [c for c in classes if counts[c] == 0], "no files")
  return classes


def _raise_for_empty_classes(folder: str, empty: Sequence[str], what: str) -> None:
  if empty:
    raise FolderError(f"Class folder(s) {_listing(empty)} of {folder} contain {what}; every class "
                      "needs at least one image. Add images or remove the class folder.")


def _listing(items: Sequence[str], limit: int = 10) -> str:
  shown = ", ".join(repr(x) for x in items[:limit])
  return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


# ------------------------------------------------------------------------------------------------
# Checking one file.

def check_image(data: bytes) -> tuple[bytes | None, str | None]:
  """(bytes to store, None) for a usable image, (None, reason) for one to skip.

  JPEG/PNG that tf.io.decode_image decodes are kept as given; anything else PIL can fully decode
  (including JPEGs TF rejects, e.g. CMYK) is re-encoded as PNG.
  """
  if not data:
    return None, "empty"
  if data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC):
    try:
      tf.io.decode_image(data, channels=3, expand_animations=False)
      return data, None
    except (tf.errors.InvalidArgumentError, tf.errors.OpError):
      pass  # PIL may still read it
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      rgb = image.convert("RGB")
  except UnidentifiedImageError:
    known = data.startswith(_PNG_MAGIC) or data.startswith(_JPEG_MAGIC)
    return None, "corrupt" if known else "not an image"
  except Exception:  # PIL raises many types for truncated or corrupt data  # noqa: BLE001
    return None, "corrupt"
  out = io.BytesIO()
  rgb.save(out, format="PNG")
  return out.getvalue(), None


def _read_and_check(path: str) -> tuple[bytes | None, str | None]:
  try:
    with tf.io.gfile.GFile(path, "rb") as f:
      data = f.read()
  except (tf.errors.OpError, OSError):
    return None, "unreadable"
  return check_image(data)


def _checked(folder: str, files: Sequence[FolderFile]) -> Iterator[tuple[FolderFile, bytes | None,
                                                                          str | None]]:
  """(file, bytes or None, skip reason or None) in file order, decoded by a thread pool."""
  with concurrent.futures.ThreadPoolExecutor(_CHECK_THREADS) as pool:
    for start in range(0, len(files), _CHECK_CHUNK):
      chunk = files[start:start + _CHECK_CHUNK]
      results = pool.map(lambda f: _read_and_check(_join(folder, *f.path.split("/"))), chunk)
      for f, (data, reason) in zip(chunk, results):
        yield f, data, reason


# ------------------------------------------------------------------------------------------------
# Building.

def dataset_name(folder: str, kind: str) -> str:
  """Stable per (folder, kind), so a rebuilt folder replaces its own dataset and nothing else."""
  digest = hashlib.sha256(f"{kind}:{folder.rstrip('/')}".encode()).hexdigest()[:12]
  return f"folder_{kind}_{digest}"


class _Report:
  """What the build kept and skipped (filled while the builder's generator runs)."""

  def __init__(self, classes: Sequence[str] | None):
    self.kept = 0
    self.per_class = {c: 0 for c in classes or []}
    self.reasons: dict[str, int] = {}
    self.skipped_paths: list[str] = []

  def add(self, f: FolderFile, reason: str | None) -> None:
    if reason is None:
      self.kept += 1
      if self.per_class:
        self.per_class[f.path.split("/")[0]] += 1
      return
    self.reasons[reason] = self.reasons.get(reason, 0) + 1
    if len(self.skipped_paths) < _MAX_LISTED:
      self.skipped_paths.append(f.path)

  def to_json(self) -> dict[str, Any]:
    out = {"num_examples": self.kept, "num_skipped": sum(self.reasons.values()),
           "skipped_by_reason": dict(sorted(self.reasons.items())),
           "skipped_files": list(self.skipped_paths)}
    if self.per_class:
      out["examples_per_class"] = dict(self.per_class)
    return out


def _builder_class(name: str, folder: str, kind: str, files: Sequence[FolderFile],
                   classes: Sequence[str] | None, report: _Report) -> type:
  """A one-off GeneratorBasedBuilder for this folder (not registered: readers load it from its
  files, as `tfds.builder(name, data_dir=...)` does for any dataset without code)."""
  features = {
      "image": tfds.features.Image(shape=(None, None, 3)),  # bytes as given: JPEG or PNG
      "id": tfds.features.Text(),
  }
  if classes is not None:
    features["label"] = tfds.features.ClassLabel(names=list(classes))

  def info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=f"The {kind} image folder {folder}, converted by nsjax.",
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("image", "label") if classes is not None else None)

  def split_generators(self, dl_manager):
    del dl_manager
    return {SPLIT: self._generate_examples()}

  def generate_examples(self):
    label_of = {c: i for i, c in enumerate(classes or [])}
    for f, data, reason in _checked(folder, files):
      report.add(f, reason)
      if data is None:
        continue
      example = {"image": data, "id": f.path}
      if classes is not None:
        example["label"] = label_of[f.path.split("/")[0]]
      yield f.path, example

  body = {"VERSION": tfds.core.Version(VERSION), "RELEASE_NOTES": {VERSION: "Folder build."},
          "name": name, "_info": info, "_split_generators": split_generators,
          "_generate_examples": generate_examples, "__module__": __name__}
  return types.new_class(f"Folder_{name}", (tfds.core.GeneratorBasedBuilder,),
                         {"skip_registration": True}, lambda ns: ns.update(body))


def _dataset_root(cache_dir: str, name: str) -> str:
  return _join(cache_dir, name)


def read_build(cache_dir: str, name: str) -> dict[str, Any] | None:
  path = _join(_dataset_root(cache_dir, name), BUILD_FILE)
  return read_json(path) if tf.io.gfile.exists(path) else None


def build(folder: str, kind: str, cache_dir: str) -> dict[str, Any]:
  """Builds the folder's TFDS dataset unless an identical build exists; returns build.json's
  content ({"rebuilt": bool, ...}). Single process: use `materialize` in multi-host code."""
  if kind not in KINDS:
    raise FolderError(f"Unknown folder kind {kind!r}; use one of {KINDS}.")
  name = dataset_name(folder, kind)
  files = list_files(folder)
  classes = labeled_classes(folder, files) if kind == "labeled" else None
  digest = fingerprint(files, kind)
  existing = read_build(cache_dir, name)
  if existing is not None and existing.get("fingerprint") == digest:
    return dict(existing, rebuilt=False)
  if not files:
    raise FolderError(f"The image folder {folder} holds no files; expected images anywhere "
                      "below it.")
  root = _dataset_root(cache_dir, name)
  if tf.io.gfile.exists(root):
    logging.info("Image folder %s changed since its last build; rebuilding %s.", folder, name)
    tf.io.gfile.rmtree(root)
  report = _Report(classes)
  builder_cls = _builder_class(name, folder, kind, files, classes, report)
  builder = builder_cls(data_dir=cache_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  summary = report.to_json()
  if summary["num_examples"] == 0:
    tf.io.gfile.rmtree(root)
    raise FolderError(f"No readable image in {folder} ({summary['num_skipped']} files skipped: "
                      f"{summary['skipped_by_reason']}); expected JPEG or PNG files.")
  if classes is not None:
    empty = [c for c, n in summary["examples_per_class"].items() if n == 0]
    if empty:
      tf.io.gfile.rmtree(root)
      _raise_for_empty_classes(folder, empty, "no readable image")
  result = {"folder": folder, "kind": kind, "name": name, "data_dir": cache_dir, "split": SPLIT,
            "fingerprint": digest, "num_files": len(files), "class_names": classes, **summary}
  atomic_write_json(_join(root, BUILD_FILE), result)  # last: marks the build complete
  logging.info("Converted image folder %s into TFDS dataset %s (data_dir %s): %d images, %d files "
               "skipped %s.", folder, name, cache_dir, summary["num_examples"],
               summary["num_skipped"], summary["skipped_by_reason"])
  return dict(result, rebuilt=True)


def materialize(folder: str, kind: str, cache_dir: str) -> tuple[str, str, str]:
  """(TFDS name, data_dir, split) of the folder's dataset, built (or reused) by process 0."""
  name = dataset_name(folder, kind)
  error = None
  if jax.process_index() == 0:
    try:
      build(folder, kind, cache_dir)
    except Exception as e:  # noqa: BLE001  -- reach the barrier first, so no host hangs
      error = e
  parallel.sync(f"folder-built-{name}")
  if error is not None:
    raise error
  if read_build(cache_dir, name) is None:
    raise FolderError(f"Process 0 failed to convert the image folder {folder} (no {BUILD_FILE} in "
                      f"{_dataset_root(cache_dir, name)}); see process 0's log.")
  return name, cache_dir, SPLIT


# ------------------------------------------------------------------------------------------------
# Class names.

def source_class_names(src: input_pipeline.Source) -> list[str] | None:
  """The class names of a TFDS source's "label" ClassLabel; None when it has none (or no info)."""
  try:
    features = input_pipeline.load_builder(src.name, src.data_dir).info.features
  except Exception:  # noqa: BLE001  -- unknown or unprepared dataset: names are simply unknown
    return None
  label = features["label"] if "label" in features.keys() else None
  if isinstance(label, tfds.features.ClassLabel) and label.names:
    return list(label.names)
  return None


def class_difference(expected: Sequence[str], actual: Sequence[str], expected_what: str,
                     actual_what: str) -> str:
  """A short description of how two class lists differ ('' when equal)."""
  expected, actual = list(expected), list(actual)
  if expected == actual:
    return ""
  only_expected = [c for c in expected if c not in set(actual)]
  only_actual = [c for c in actual if c not in set(expected)]
  if not only_expected and not only_actual:
    if len(expected) != len(actual):
      return f"{expected_what} has {len(expected)} class names, {actual_what} {len(actual)}"
    i = next(i for i, (a, b) in enumerate(zip(expected, actual)) if a != b)
    return (f"the same classes in a different order (label {i} is {expected[i]!r} in "
            f"{expected_what} but {actual[i]!r} in {actual_what})")
  parts = []
  if only_expected:
    parts.append(f"only in {expected_what}: [{_listing(only_expected)}]")
  if only_actual:
    parts.append(f"only in {actual_what}: [{_listing(only_actual)}]")
  return "; ".join(parts)


def check_class_names(expected: Sequence[str] | None, actual: Sequence[str] | None,
                      expected_what: str, actual_what: str, fix: str) -> None:
  """Raises ClassMismatchError naming the difference; unknown (None) lists are not checked."""
  if not expected or not actual:
    return
  difference = class_difference(expected, actual, expected_what, actual_what)
  if difference:
    raise ClassMismatchError(f"The classes of {actual_what} differ from those of {expected_what}: "
                             f"{difference}. {fix}")


# ------------------------------------------------------------------------------------------------
# Config resolution (used by nsjax.pipeline).

def cache_dir_for(config, workdir: str) -> str:
  return config.data.get("folder_cache_dir") or _join(workdir, CACHE_SUBDIR)


def _check_role(role: str, cfg) -> str:
  kind = cfg.get("kind") or "labeled"
  if kind not in KINDS:
    raise FolderError(f"config.data.{role}.kind = {kind!r}; use one of {KINDS}.")
  if role != "unlabeled" and kind != "labeled":
    raise FolderError(f"config.data.{role} is an unlabeled folder, but {role} data needs labels: "
                      "use kind='labeled' with one subfolder per class.")
  if cfg.get("name"):
    raise FolderError(f"config.data.{role} names both a folder ({cfg.folder}) and a TFDS dataset "
                      f"({cfg.name}); give one of them.")
  return kind


def resolve_sources(config, workdir: str, data_dir: str | None = None):
  """A copy of `config` where every folder source names its built TFDS dataset (name, data_dir,
  split), `data.num_classes` is filled in from the labeled source when it is 0, and
  `data.class_names` holds the labeled source's class names ([] when it has none).

  Writes <workdir>/data_sources.json (process 0): each source's resolution and skipped files.
  """
  resolved = copy.deepcopy(config)
  kinds = {role: _check_role(role, config.data[role]) for role in ROLES
           if config.data[role].get("folder")}  # every config error before any build
  sources: dict[str, Any] = {}
  with resolved.unlocked():
    for role in ROLES:
      cfg = resolved.data[role]
      if role not in kinds:
        sources[role] = {"name": cfg.name, "split": cfg.split}
        continue
      kind = kinds[role]
      cache_dir = cache_dir_for(config, workdir)
      name, built_dir, _ = materialize(cfg.folder, kind, cache_dir)
      cfg.name, cfg.data_dir = name, built_dir
      cfg.split = cfg.get("split") or SPLIT
      report = read_build(cache_dir, name)
      sources[role] = {k: report[k] for k in ("folder", "kind", "name", "data_dir", "num_examples",
                                              "num_skipped", "skipped_by_reason",
                                              "skipped_files")}
      sources[role]["split"] = cfg.split
    labeled_names = _names(resolved.data.labeled, data_dir)
    check_class_names(labeled_names, _names(resolved.data.test, data_dir), "the labeled data",
                      "the test data", "Evaluate on data with the labeled data's classes.")
    resolved.data.num_classes = resolve_num_classes(config.data.get("num_classes"), labeled_names)
    resolved.data.class_names = list(labeled_names or [])
  if jax.process_index() == 0:
    tf.io.gfile.makedirs(workdir)
    atomic_write_json(_join(workdir, SOURCES_FILE), sources)
  return resolved


def _names(cfg, data_dir: str | None) -> list[str] | None:
  return source_class_names(input_pipeline.Source(cfg.name, cfg.split,
                                                  cfg.get("data_dir") or data_dir))


def resolve_num_classes(configured: int | None, class_names: Sequence[str] | None) -> int:
  """config.data.num_classes, or (when 0 / unset) the number of classes of the labeled data."""
  configured = int(configured or 0)
  if class_names is None:
    if configured <= 0:
      raise FolderError("config.data.num_classes is 0 (take it from the data), but the labeled "
                        "source has no ClassLabel 'label' feature to count; set "
                        "config.data.num_classes.")
    return configured
  if configured and configured != len(class_names):
    raise FolderError(f"config.data.num_classes = {configured}, but the labeled data has "
                      f"{len(class_names)} classes ({_listing(list(class_names))}); set it to "
                      f"{len(class_names)}, or to 0 to take it from the data.")
  return len(class_names)


def skipped_files(workdir: str) -> dict[str, Any]:
  """Per folder source: {"num_skipped", "skipped_by_reason", "skipped_files"} (for summary.json)."""
  path = _join(workdir, SOURCES_FILE)
  if not tf.io.gfile.exists(path):
    return {}
  return {role: {k: s[k] for k in ("folder", "num_skipped", "skipped_by_reason", "skipped_files")}
          for role, s in read_json(path).items() if "folder" in s}
