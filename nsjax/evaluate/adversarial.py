"""White-box attacks (FGSM, PGD) in pixel space, an epsilon sweep, and its JSON / PNG outputs.

The attacker perturbs the raw image in [0, 1] -- the thing a camera produces -- so epsilon is in
pixel units (8/255 = eight grey levels) whatever normalisation the model applies. Gradients
therefore flow through `normalize` into the model, which runs in eval mode (BatchNorm moving
statistics, no dropout or stochastic depth), as in the paper's FGSM robustness study.

Attacks take `apply_fn(variables, images01) -> logits` and the variables as a jit argument (not a
closure) so large models are not baked into the compiled program as constants; `model_apply_fn`
builds `apply_fn` for an nsjax EfficientNet (or any flax module with a `train` flag).
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nsjax import parallel
from nsjax.models import inputs as model_inputs

IMAGENET_MEAN = model_inputs.MEAN  # [0, 1] units: the attacks perturb [0, 1] images
IMAGENET_STD = model_inputs.STDDEV
DEFAULT_EPSILONS = tuple(e / 255.0 for e in (0, 1, 2, 4, 8, 16))
METHODS = ("fgsm", "pgd")

ApplyFn = Callable[[Any, jax.Array], jax.Array]


def normalize_imagenet(images01: jax.Array) -> jax.Array:
  """[0, 1] pixels -> the model's input: (x - mean) / std with ImageNet statistics per channel."""
  return (images01 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


def model_apply_fn(model: Any,
                   normalize: Callable[[jax.Array], jax.Array] | None = normalize_imagenet
                   ) -> ApplyFn:
  """apply_fn(variables, images01) = model.apply(variables, normalize(images01), train=False)."""
  normalize = normalize or (lambda x: x)

  def apply_fn(variables: Any, images01: jax.Array) -> jax.Array:
    return model.apply(variables, normalize(images01), train=False)
  return apply_fn


def _loss_gradient(apply_fn: ApplyFn, variables: Any, images01: jax.Array, labels: jax.Array
                   ) -> jax.Array:
  def loss(x):
    logits = apply_fn(variables, x).astype(jnp.float32)
    # Summed, not averaged: each example's gradient is then independent of the batch size.
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()
  return jax.grad(loss)(images01)


def fgsm(apply_fn: ApplyFn, variables: Any, images01: jax.Array, labels: jax.Array,
         epsilon: float | jax.Array) -> jax.Array:
  """One step x + epsilon * sign(grad_x CE), clipped to [0, 1]."""
  images01 = jnp.asarray(images01, jnp.float32)
  step = epsilon * jnp.sign(_loss_gradient(apply_fn, variables, images01, labels))
  return jnp.clip(images01 + step, 0.0, 1.0)


def pgd(apply_fn: ApplyFn, variables: Any, images01: jax.Array, labels: jax.Array,
        epsilon: float | jax.Array, steps: int = 10, step_ratio: float = 0.25,
        key: jax.Array | None = None) -> jax.Array:
  """`steps` signed-gradient steps of size step_ratio * epsilon, each projected back onto the
  L-infinity ball of radius epsilon around the image and onto [0, 1].

  With `key`, starts at a uniform random point in the ball (Madry et al.); otherwise at the image.
  """
  images01 = jnp.asarray(images01, jnp.float32)
  step_size = step_ratio * epsilon

  def project(x):
    return jnp.clip(jnp.clip(x, images01 - epsilon, images01 + epsilon), 0.0, 1.0)

  start = images01
  if key is not None:
    start = project(images01 + jax.random.uniform(key, images01.shape, minval=-1.0, maxval=1.0)
                    * epsilon)

  def body(_, x):
    return project(x + step_size * jnp.sign(_loss_gradient(apply_fn, variables, x, labels)))
  return jax.lax.fori_loop(0, steps, body, start)


def make_attack(apply_fn: ApplyFn, method: str = "pgd", steps: int = 10, step_ratio: float = 0.25,
                random_start: bool = False, jit: bool = True) -> Callable[..., jax.Array]:
  """A jitted attack(variables, images01, labels, epsilon[, key]) -> adversarial images01.

  epsilon is a traced argument, so a sweep compiles once per input shape, not once per epsilon.
  `jit=False`: the plain function, for use inside another jitted function (`parallel.jit`'s
  compiler options are allowed on the outermost jit only).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
  if method == "pgd" and (steps < 1 or step_ratio <= 0):
    raise ValueError(f"PGD needs steps >= 1 and step_ratio > 0, got {steps} and {step_ratio}.")

  def attack(variables, images01, labels, epsilon, key=None):
    if method == "fgsm":
      return fgsm(apply_fn, variables, images01, labels, epsilon)
    return pgd(apply_fn, variables, images01, labels, epsilon, steps, step_ratio,
               key if random_start else None)
  return parallel.jit(attack) if jit else attack


def make_correct_counter(apply_fn: ApplyFn, attack: Callable[..., jax.Array]
                         ) -> Callable[..., jax.Array]:
  """A jitted count(variables, images01, labels, mask, epsilon, key) -> [correct, examples].

  `attack`: an un-jitted attack (`make_attack(..., jit=False)`). Both counts come out of the compiled function, so sharded (multi-host) batches work too.
  """
  @parallel.jit
  def count(variables, images01, labels, mask, epsilon, key):
    adversarial = attack(variables, images01, labels, epsilon, key)
    predictions = jnp.argmax(apply_fn(variables, adversarial), axis=-1)
    return jnp.stack([jnp.sum((predictions == labels) * mask), jnp.sum(mask)])
  return count


def epsilon_sweep(apply_fn: ApplyFn, variables: Any, batches: Iterable[Any],
                  epsilons: Sequence[float] = DEFAULT_EPSILONS, method: str = "fgsm",
                  steps: int = 10, step_ratio: float = 0.25, random_start: bool = False,
                  seed: int = 0) -> dict[str, Any]:
  """Accuracy under attack at each epsilon (pixel units; 0 gives clean accuracy).

  `batches` yields (images01, labels) or (images01, labels, mask) with images in [0, 1]; the data
  is read once (epsilons are the inner loop), so a one-shot iterator is fine.
  Returns {"method", "epsilons", "accuracy", "count", ...}: JSON-ready, input of `plot_sweep`.
  """
  epsilons = [float(e) for e in epsilons]
  if not epsilons or any(e < 0 for e in epsilons):
    raise ValueError(f"Need one or more epsilons >= 0 (pixel units, e.g. 8/255), got {epsilons}.")
  attack = make_attack(apply_fn, method, steps, step_ratio, random_start, jit=False)
  count = make_correct_counter(apply_fn, attack)
  correct = np.zeros(len(epsilons))
  total = 0.0
  key = jax.random.key(seed)
  for batch in batches:
    images01, labels, mask = _unpack(batch)
    for i, epsilon in enumerate(epsilons):
      key, sub = jax.random.split(key)
      num_correct, num_examples = np.asarray(
          count(variables, images01, labels, mask, jnp.float32(epsilon), sub))
      correct[i] += num_correct
    total += num_examples
  if total == 0:
    raise ValueError("The sweep saw no (unmasked) examples.")
  result = {"method": method, "epsilons": epsilons,
            "epsilons_255": [round(e * 255.0, 4) for e in epsilons],
            "accuracy": (correct / total).tolist(), "count": int(total)}
  if method == "pgd":
    result.update(steps=steps, step_ratio=step_ratio, random_start=random_start)
  return result


def _unpack(batch: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  if isinstance(batch, dict):
    images01, labels = batch["image"], batch["label"]
    mask = batch.get("mask")
  elif len(batch) in (2, 3):
    images01, labels, mask = (*batch, None) if len(batch) == 2 else batch
  else:
    raise ValueError("Each batch must be (images01, labels), (images01, labels, mask) or a dict "
                     "with 'image', 'label' and optionally 'mask'.")
  # Host arrays are checked; device (possibly multi-host sharded) arrays are trusted as they are.
  if isinstance(images01, np.ndarray) and images01.size and (
      images01.min() < 0.0 or images01.max() > 1.0):
    raise ValueError("Images must be raw pixels scaled to [0, 1] (not normalised, not 0..255).")
  images01 = jnp.asarray(images01, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  return images01, labels, mask


# --------------------------------------------------------------------------------------------------
# Outputs.

def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, pathlib.PurePath):
    return str(value)
  raise TypeError(f"Cannot write {type(value).__name__} to JSON.")


def save_json(path: str | os.PathLike, data: Any) -> pathlib.Path:
  """Writes `data` as indented JSON atomically (temp file, then rename); numpy/jax values are ok."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
  tmp.replace(path)
  return path


def plot_sweep(sweeps: dict[str, Any] | Sequence[dict[str, Any]], path: str | os.PathLike,
               title: str = "Accuracy under attack", labels: Sequence[str] | None = None
               ) -> pathlib.Path:
  """Accuracy (%) versus epsilon (x 255) for one or several `epsilon_sweep` results, as a PNG.

  Uses the Agg canvas directly, so it never changes the process-wide matplotlib backend.
  """
  # matplotlib on first use: only plotting needs it, and it is slow to import.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  sweeps = [sweeps] if isinstance(sweeps, dict) else list(sweeps)
  labels = list(labels) if labels is not None else [s.get("method", "").upper() for s in sweeps]
  if len(labels) != len(sweeps):
    raise ValueError(f"Got {len(labels)} labels for {len(sweeps)} sweeps.")
  figure = Figure(figsize=(5, 3.5), dpi=120)
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  for sweep, label in zip(sweeps, labels):
    axes.plot(np.asarray(sweep["epsilons"]) * 255.0, 100.0 * np.asarray(sweep["accuracy"]),
              marker="o", label=label)
  axes.set_xlabel("epsilon (x 1/255)")
  axes.set_ylabel("top-1 accuracy (%)")
  axes.set_ylim(0, 100)
  axes.set_title(title)
  axes.grid(alpha=0.3)
  if any(labels):
    axes.legend()
  figure.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  figure.savefig(tmp, format="png")
  tmp.replace(path)
  return path
