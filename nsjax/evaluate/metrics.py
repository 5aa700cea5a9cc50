"""Classification metrics: masked top-k counts and class-subset predictions (ImageNet-A / -R).

Counts (not means) are what the eval loop accumulates: batches are padded to a fixed shape for jit
and sharding, so every function takes an example mask and the padding never reaches the metric.

ImageNet-A and ImageNet-R each cover 200 of the 1000 ImageNet classes. A 1000-way model is scored on
them by restricting its logits to the subset and taking the argmax there; the prediction is reported
back in the 1000-class space as `indices[argmax(logits[:, indices])]`. The index lists ship inside the
package (nsjax/evaluate/class_indices/, copies of the project's ../shared/data/*.txt, kept equal by a
test) so an installed nsjax needs no checkout; `class_subset_indices` finds them (see
`shared_data_path`).
"""
from __future__ import annotations

import os
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SHARED_DIR_ENV = "NSJAX_SHARED_DIR"
SUBSET_FILES = {"imagenet_a": "imagenet_a_indices_in_1k.txt",
                "imagenet_r": "imagenet_r_indices_in_1k.txt"}
LABEL_SPACES = ("full", "subset")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGED_DIR = pathlib.Path(__file__).resolve().parent / "class_indices"


# --------------------------------------------------------------------------------------------------
# Top-k with masks.

def topk_correct(logits: Any, labels: Any, ks: Sequence[int] = (1, 5), mask: Any = None
                 ) -> dict[str, jax.Array]:
  """Per-k counts {"top1": n1, "top5": n5, "count": n} of correct, unmasked examples.

  jit-friendly (pure jnp). `mask` (bool or 0/1, shape [B]) marks real examples; None means all.
  Ties go to the lower class index, as `argmax` does, so top-1 agrees with `argmax` predictions.
  k larger than the number of classes counts every example as correct.
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim != 2 or labels.shape != logits.shape[:1]:
    raise ValueError(f"Expected logits [B, C] and labels [B]; got {logits.shape} and "
                     f"{labels.shape}.")
  weights = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  max_k = min(max(ks), logits.shape[1])
  _, top = jax.lax.top_k(logits, max_k)
  hits = top == labels[:, None]
  counts = {"count": weights.sum()}
  for k in ks:
    counts[f"top{k}"] = (hits[:, :min(k, max_k)].any(axis=1) * weights).sum()
  return counts


def top1_hits(logits: Any, labels: Any, mask: Any = None) -> jax.Array:
  """Per example: 1 where the argmax is the label, 0 where not, -1 for masked-out padding
  (int8 [B]; `real_hits` drops the padding on the host)."""
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.int8)
  return hit if mask is None else jnp.where(jnp.asarray(mask) > 0, hit, jnp.int8(-1))


def real_hits(batches: Sequence[Any]) -> np.ndarray:
  """The real examples' hits (bool, in order) from `top1_hits` outputs of consecutive batches."""
  flat = np.concatenate([np.asarray(b).reshape(-1) for b in batches]) if len(batches) else \
      np.zeros(0, np.int8)
  return flat[flat >= 0].astype(bool)


def pack_hits(hits: np.ndarray) -> str:
  """A compact text form of per-image hits: base64 of the bits, 8 images a byte (1,000 test
  images: 168 characters). `unpack_hits(text, len(hits))` gives them back."""
  import base64
  return base64.b64encode(np.packbits(np.asarray(hits, bool)).tobytes()).decode("ascii")


def unpack_hits(text: str, count: int) -> np.ndarray:
  """The `count` per-image hits (bool) that `pack_hits` wrote."""
  import base64
  bits = np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8))
  if bits.size < count or bits.size - count >= 8:
    raise ValueError(f"A per-image record of {bits.size} bits cannot hold exactly {count} images; "
                     "was it written for another test split?")
  return bits[:count].astype(bool)


class TopKAccumulator:
  """Sums masked top-k counts over batches; `result()` gives accuracies.

  Example:
    acc = TopKAccumulator()
    for batch in batches: acc.update(logits, batch["label"], batch["mask"])
    acc.result()  # {"top1": 0.76, "top5": 0.93, "count": 50000}
  """

  def __init__(self, ks: Sequence[int] = (1, 5)):
    self.ks = tuple(ks)
    self.totals = {f"top{k}": 0.0 for k in self.ks} | {"count": 0.0}

  def update(self, logits: Any, labels: Any, mask: Any = None) -> None:
    self.add_counts(topk_correct(logits, labels, self.ks, mask))

  def add_counts(self, counts: dict[str, Any]) -> None:
    """Adds counts computed elsewhere (e.g. by `topk_correct` inside a jitted eval step)."""
    for key in self.totals:
      self.totals[key] += float(counts[key])

  def result(self) -> dict[str, float]:
    count = self.totals["count"]
    if count == 0:
      raise ValueError("No unmasked examples were accumulated; check the eval masks.")
    return {key: (value / count if key != "count" else value) for key, value in self.totals.items()}


# --------------------------------------------------------------------------------------------------
# Class subsets (ImageNet-A, ImageNet-R).

def shared_data_path(filename: str) -> pathlib.Path:
  """Finds `filename`: an explicit shared directory first, else the copy shipped in the package.

  Order: $NSJAX_SHARED_DIR (the shared directory holding data/, or the data directory itself; an
  override for other lists), then the package's own class_indices/ (present in a checkout and in an
  installed wheel), then `<repo>/../shared/data` and `shared/data` under any further ancestor of
  the repository (files the package does not ship). Raises FileNotFoundError listing every place
  tried.
  """
  candidates = []
  env = os.environ.get(SHARED_DIR_ENV)
  if env:
    candidates += [pathlib.Path(env) / "data" / filename, pathlib.Path(env) / filename]
  candidates.append(PACKAGED_DIR / filename)
  candidates += [parent / "shared" / "data" / filename for parent in REPO_ROOT.parents]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  tried = "\n  ".join(str(c) for c in candidates)
  raise FileNotFoundError(
      f"Could not find {filename!r}. Tried:\n  {tried}\nSet {SHARED_DIR_ENV} to the shared "
      f"directory (the one holding data/{filename}) or pass the file's path explicitly.")


def read_class_indices(path: str | os.PathLike, num_classes: int = 1000) -> np.ndarray:
  """Reads one class index per line; checks they are unique, sorted and within [0, num_classes)."""
  lines = pathlib.Path(path).read_text().split()
  try:
    indices = np.array([int(line) for line in lines], dtype=np.int32)
  except ValueError as err:
    raise ValueError(f"{path}: expected one integer class index per line ({err}).") from None
  if indices.size == 0:
    raise ValueError(f"{path}: no class indices found.")
  if np.any(np.diff(indices) <= 0):
    raise ValueError(f"{path}: class indices must be strictly increasing (sorted, no duplicates); "
                     "the subset label space 0..N-1 follows this order.")
  if indices[0] < 0 or indices[-1] >= num_classes:
    raise ValueError(f"{path}: class indices must lie in [0, {num_classes}); "
                     f"got {indices[0]}..{indices[-1]}.")
  return indices


def class_subset_indices(name_or_path: str | os.PathLike, num_classes: int = 1000) -> np.ndarray:
  """Sorted 1000-class indices of a subset: "imagenet_a", "imagenet_r" or an index file's path."""
  if str(name_or_path) in SUBSET_FILES:
    path = shared_data_path(SUBSET_FILES[str(name_or_path)])
  else:
    path = pathlib.Path(name_or_path)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no such index file; use one of {sorted(SUBSET_FILES)} or a "
                              "path to a file with one class index per line.")
  return read_class_indices(path, num_classes)


def subset_logits(logits: Any, indices: Any) -> jax.Array:
  """logits[:, indices]: the subset's columns, in the subset's (0..N-1) order."""
  return jnp.take(jnp.asarray(logits), jnp.asarray(indices), axis=1)


def subset_predict(logits: Any, indices: Any, label_space: str = "full") -> jax.Array:
  """Argmax restricted to the subset; in the 1000-class space ("full") or as 0..N-1 ("subset")."""
  _check_label_space(label_space)
  local = jnp.argmax(subset_logits(logits, indices), axis=1)
  return jnp.asarray(indices)[local] if label_space == "full" else local


def full_to_subset_labels(labels: Any, indices: Any, num_classes: int = 1000) -> np.ndarray:
  """Maps labels from the 1000-class space to 0..N-1 positions in `indices` (numpy, eager).

  Raises on labels outside the subset: such an example cannot be scored (wrong index file?).
  """
  labels = np.asarray(labels)
  lookup = np.full(num_classes, -1, dtype=np.int32)
  lookup[np.asarray(indices)] = np.arange(len(indices), dtype=np.int32)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"Labels must lie in [0, {num_classes}); got {labels.min()}..{labels.max()}.")
  mapped = lookup[labels]
  if np.any(mapped < 0):
    missing = sorted(set(labels[mapped < 0].tolist()))[:10]
    raise ValueError(f"Labels {missing} are not in the class subset; is it the right index file "
                     "(ImageNet-A and ImageNet-R use different lists)?")
  return mapped


def subset_topk_correct(logits: Any, labels: Any, indices: Any, label_space: str = "full",
                        ks: Sequence[int] = (1, 5), mask: Any = None) -> dict[str, jax.Array]:
  """`topk_correct` among the subset's classes only.

  label_space="full": labels in the 1000-class space (TFDS imagenet_a); "subset": labels 0..N-1 in
  the order of `indices`. Top-1 equals `subset_predict(...) == label`. `indices` must be concrete
  (numpy); outside jit, labels not in the subset raise; inside jit they count as wrong.
  """
  _check_label_space(label_space)
  if label_space == "full":
    num_classes = np.shape(logits)[1]
    if isinstance(labels, jax.core.Tracer):
      # Under jit nothing can raise: a label outside the subset maps to -1 and counts as wrong.
      lookup = np.full(num_classes, -1, dtype=np.int32)
      lookup[np.asarray(indices)] = np.arange(len(indices), dtype=np.int32)
      labels = jnp.asarray(lookup)[labels]
    else:
      labels = full_to_subset_labels(labels, indices, num_classes)
  return topk_correct(subset_logits(logits, indices), labels, ks, mask)


def _check_label_space(label_space: str) -> None:
  if label_space not in LABEL_SPACES:
    raise ValueError(f"label_space must be one of {LABEL_SPACES}, got {label_space!r}: 'full' for "
                     "labels in the 1000-class space, 'subset' for labels 0..N-1.")
