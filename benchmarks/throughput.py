"""Throughput benchmark: nsjax vs Keras (and timm when importable) on the same machine, in one run.

Measures, for one model / resolution / batch size (default EfficientNet-B0, 224 px, batch 32,
1000 classes):

  nsjax_train_img_s       nsjax's real train step (`nsjax.train.loop`'s cached run functions and
                          `steps.make_train_step`: TF1 RMSProp, EMA, label smoothing, weight decay,
                          the non-finite guard; state donated as in the loop) on a device-resident
                          labeled batch. Median over the timed steps, after warm-up.
  nsjax_infer_img_s       the jitted inference step the pseudo-labeling stage uses
                          (`label.make_pseudo_label_step`: eval-mode softmax plus the record
                          fields, label, confidence and float16 probabilities) on a
                          device-resident batch.
  nsjax_infer_only_img_s  the labeling loop's per-batch work without the input pipeline: a host
                          (numpy) batch already in memory -> `parallel.to_global_batch` -> that step
                          -> its outputs back on the host (`parallel.process_local_rows`). Timed
                          like the labeling pass it is compared with: as many batches, back to
                          back, wall time over all of them, just before that pass (a per-step
                          median would leave out the hiccups a long pass pays; it is kept as
                          nsjax_infer_only_median_img_s). With --skip_label, the median.
  label_e2e_img_s         `nsjax.stages.label.label_unlabeled` end to end on a TFDS dataset built locally
                          from a folder of synthetic JPEGs (`nsjax.data.folder`): read -> decode
                          -> centre crop + resize -> infer -> write pseudo-label shards, with
                          the predict step compiled above; the reported number is the second of
                          two passes (the first pays one-time tf.data / Orbax start-up). label_e2e_vs_infer_only = label_e2e / infer_only.
  keras_train_img_s       `tf.keras.applications.EfficientNetB0(weights=None)` (or the same
  keras_infer_img_s       width/depth coefficients for other sizes) trained with
                          `model.train_on_batch` (SGD + momentum, sparse CE from logits) and run
                          with `model.predict_on_batch`, in a separate process.
  timm_*                  `timm.create_model("efficientnet_b0")` with torch SGD, if timm imports.

Compile times are wall times of `jitted.lower(...).compile()` (nsjax) or of the first call minus a
steady step (Keras). Achieved FLOP/s use XLA's compiled cost analysis (`compiled.cost_analysis()`)
divided by the median step time. Memory is the process's peak RSS (/proc VmHWM, else `getrusage` ru_maxrss), read
after each phase (it only grows, so a phase's value is the peak up to the end of that phase).

Threads: the benchmark process pins itself to `--threads` CPUs (default: all it may use) before
JAX or TensorFlow start, and the Keras/timm worker process inherits that affinity; XLA:CPU and TF
size their pools from the CPUs they may use, TF's intra-op pool is also set to `--threads`
explicitly, and torch gets `torch.set_num_threads(--threads)`. The Keras part runs in its own
process, never alongside the JAX part, so the two never compete for the CPUs or share thread pools.

Rounds: a shared machine's speed drifts by 10-20% over minutes, more than the differences being
measured. So the step timings alternate, `--rounds` times (default 2): nsjax (compile, time),
labeling, Keras worker (compile, time), nsjax again (the compiled steps), the same Keras worker
again (its compiled model; it waits idle in between), ... Each img/s is the median over the timed
steps of all rounds (`*_img_s_per_round` keeps each round's); compile times are the first round's.

  python benchmarks/throughput.py --output=benchmarks/results/cpu_b0_224.json
  python benchmarks/throughput.py --width=0.1 --depth=0.1 --resolution=32 --batch_size=4 \
      --warmup=1 --steps=1 --num_classes=10 --label_images=8 --output=/tmp/tiny.json   # seconds
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nsjax import host_memory  # noqa: E402  (imports no JAX: runs before any thread pool starts)

REQUIRED_KEYS = ("nsjax_train_img_s", "keras_train_img_s", "nsjax_infer_img_s", "keras_infer_img_s",
                 "label_e2e_img_s", "nsjax_infer_only_img_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="efficientnet-b0")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--num_classes", type=int, default=1000)
  p.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation (>= 1)")
  p.add_argument("--rounds", type=int, default=2,
                 help="alternate the nsjax and the peers' step timings this many times (nsjax, "
                      "Keras, nsjax, Keras, ...) and pool each one's steps: a shared machine's "
                      "speed drifts over minutes, and this spreads the drift over both sides")
  p.add_argument("--width", type=float, default=None, help="width multiplier override (tiny runs)")
  p.add_argument("--depth", type=float, default=None, help="depth multiplier override (tiny runs)")
  p.add_argument("--optimizer", default="rmsprop", help="nsjax optimizer (the recipe: rmsprop)")
  p.add_argument("--matmul_operands", default="auto", choices=("auto", "float32", "bfloat16"),
                 help="nsjax's 1x1-convolution operand dtype (auto: bfloat16 on AMX-bf16 CPUs)")
  p.add_argument("--label_images", type=int, default=None,
                 help="images labeled end to end (default: 128 batches; the stage's fixed costs, "
                      "about 1.5 s for B0 -- loading the teacher, starting tf.data, writing "
                      "manifests -- are part of the measurement)")
  p.add_argument("--threads", type=int, default=None,
                 help="CPUs both frameworks may use (default: all this process may use)")
  p.add_argument("--skip_keras", action="store_true", help="no Keras (and no timm) measurement")
  p.add_argument("--skip_label", action="store_true", help="no end-to-end labeling measurement")
  p.add_argument("--peers_retain_freed_memory", action="store_true",
                 help="give Keras/timm nsjax's allocator settings (nsjax.host_memory) too; by "
                      "default they run with glibc's defaults, as their users run them")
  p.add_argument("--keras_jit_compile", action="store_true",
                 help="compile the Keras model with XLA (default: TF graph mode)")
  p.add_argument("--compilation_cache_dir", default="",
                 help="persistent XLA cache (off by default, so compile times are cold)")
  p.add_argument("--fast_compile", action="store_true",
                 help="quick tests only, not representative: XLA:CPU backend optimisation "
                      "level 0 for the nsjax steps, and the train state starts from random numpy "
                      "variables (the loop's initial_variables path) instead of the compiled init")
  p.add_argument("--output", default="", help="write the results as JSON here")
  p.add_argument("--_worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--_worker_output", default="", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
    p.error(f"--warmup, --steps and --rounds must be >= 1, got {args.warmup}, {args.steps} and "
            f"{args.rounds}")
  if args.label_images is None:
    args.label_images = 128 * args.batch_size
  if args.threads is None:
    args.threads = len(os.sched_getaffinity(0))
  return args


# ------------------------------------------------------------------------------------------------
# Helpers.

def _pin_threads(threads: int) -> list[int]:
  cpus = sorted(os.sched_getaffinity(0))
  if threads < len(cpus):
    os.sched_setaffinity(0, cpus[:threads])
  return sorted(os.sched_getaffinity(0))


def _rss_mb() -> float:
  """This process's peak RSS in MiB: VmHWM (per address space, so a worker started from a big
  parent does not inherit the parent's peak, as ru_maxrss can), else getrusage's ru_maxrss."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
  """Per-call wall seconds of `steps` calls after `warmup` untimed ones; `fn` must block."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def _summary(prefix: str, times: list[float], batch: int) -> dict[str, float]:
  median = statistics.median(times)
  return {f"{prefix}_img_s": batch / median, f"{prefix}_step_s": median,
          f"{prefix}_step_s_min": min(times), f"{prefix}_step_s_max": max(times),
          f"{prefix}_step_times": list(times)}


def _pool_rounds(results: dict[str, Any], rounds: list[dict[str, Any]], batch: int) -> None:
  """Each timed step's summary over the steps of all rounds, and each round's own img/s."""
  for prefix in ("nsjax_train", "nsjax_infer", "keras_train", "keras_infer", "timm_train",
                 "timm_infer"):
    per_round = [r[f"{prefix}_step_times"] for r in rounds if f"{prefix}_step_times" in r]
    if not per_round:
      continue
    results.update(_summary(prefix, [t for times in per_round for t in times], batch))
    results[f"{prefix}_img_s_per_round"] = [batch / statistics.median(t) for t in per_round]
    flops = results.get(f"{prefix}_flops_per_step")
    if flops:
      results[f"{prefix}_flop_s"] = flops / results[f"{prefix}_step_s"]


def _compiler_options(args) -> dict[str, Any] | None:
  import jax
  if args.fast_compile and jax.default_backend() == "cpu":
    return {"xla_backend_optimization_level": 0}
  return None


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  -- not every backend implements it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


# ------------------------------------------------------------------------------------------------
# nsjax: train step, inference step, labeling end to end.

def _nsjax_model(args):
  from nsjax import models
  overrides = {"resolution": args.resolution, "matmul_operands": args.matmul_operands}
  if args.width is not None:
    overrides["width"] = args.width
  if args.depth is not None:
    overrides["depth"] = args.depth
  return models.create_model(args.model, args.num_classes, **overrides)


def _random_variables(model) -> Any:
  """normal(0, 0.05) weights (BatchNorm variances 1) of the model's shapes, without compiling."""
  import jax
  import numpy as np
  from nsjax import models
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return np.ones(leaf.shape, np.float32)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, models.abstract_variables(model))


def bench_nsjax(args) -> tuple[dict[str, Any], dict[str, Any]]:
  """Train and inference steps. Returns (results, what the labeling part reuses)."""
  import jax
  import numpy as np

  from nsjax import parallel
  from nsjax.stages import label
  from nsjax.train import compile_cache, loop, settings, steps

  out: dict[str, Any] = {}
  mesh = parallel.make_mesh()
  model = _nsjax_model(args)
  res, batch_size = args.resolution, args.batch_size
  image_shape = (res, res, 3)
  cfg = settings.resolve_config(dict(batch_size=batch_size, steps_per_epoch=1000,
                                 num_train_steps=10**6, optimizer=args.optimizer))
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch_size,) + image_shape).astype(np.float32)
  labels = rng.integers(0, args.num_classes, batch_size).astype(np.int32)

  # The loop's own (cached) run functions: optimizer, schedule, shardings, init, train step.
  t = time.perf_counter()
  fns = compile_cache.run_functions(model, mesh, settings.step_settings(cfg), image_shape,
                            int(model.frozen_blocks))
  if args.fast_compile:  # skip compiling the init: random variables through the loop's
    state = loop._state_from_variables(fns, _random_variables(model))  # initial_variables path
  else:
    state = fns.init(steps.init_key(cfg.seed))
  state = jax.block_until_ready(state)
  out["nsjax_init_s"] = time.perf_counter() - t
  step_fn = compile_cache.train_step(fns, None, None, cfg.fsdp)
  batch = parallel.to_global_batch({"labeled": {"image": images, "label": labels}}, mesh)
  seed = steps.seed_argument(cfg.seed, mesh)

  t = time.perf_counter()
  train = step_fn.lower(state, batch, seed).compile(compiler_options=_compiler_options(args))
  out["nsjax_train_compile_s"] = time.perf_counter() - t
  flops = _flops(train)

  def train_once():
    nonlocal state
    state, metrics = train(state, batch, seed)  # the state is donated, as in the loop
    jax.block_until_ready((state, metrics))

  times = _time_calls(train_once, args.warmup, args.steps)
  out.update(_summary("nsjax_train", times, batch_size))
  out["nsjax_train_flops_per_step"] = flops
  out["nsjax_train_flop_s"] = flops / out["nsjax_train_step_s"] if flops else None
  out["nsjax_train_peak_rss_mb"] = _rss_mb()

  # Inference: the pseudo-labeling stage's jitted predict step, EMA variables (eval mode).
  # A copy: the train step donates the state, so its own buffers die with the next round's steps.
  variables = jax.block_until_ready(jax.tree.map(lambda a: a.copy(), state.ema_variables))
  # As the labeling stage runs it: eval views in pixel units, normalised inside the step.
  pixels = rng.uniform(0.0, 255.0, images.shape).astype(np.float32)
  predict = label.make_pseudo_label_step(model, mesh)
  device_images = parallel.to_global_batch(pixels, mesh)
  t = time.perf_counter()
  infer = predict.lower(variables, device_images).compile(compiler_options=_compiler_options(args))
  out["nsjax_infer_compile_s"] = time.perf_counter() - t
  flops = _flops(infer)
  infer_once = lambda: jax.block_until_ready(infer(variables, device_images))
  times = _time_calls(infer_once, args.warmup, args.steps)
  out.update(_summary("nsjax_infer", times, batch_size))
  out["nsjax_infer_flops_per_step"] = flops
  out["nsjax_infer_flop_s"] = flops / out["nsjax_infer_step_s"] if flops else None

  # The labeling loop's per-batch work minus the input pipeline (batch already in host memory).
  # `infer` is the predict step compiled for exactly the shapes and shardings the loop feeds it,
  # so it stands in for the jitted `predict` here and in the labeling stage (one compilation).
  def infer_only():
    for field in infer(variables, parallel.to_global_batch(pixels, mesh)).values():
      parallel.process_local_rows(field)

  times = _time_calls(infer_only, args.warmup, args.steps)
  out.update(_summary("nsjax_infer_only", times, batch_size))
  out["nsjax_infer_only_median_img_s"] = out["nsjax_infer_only_img_s"]
  out["nsjax_infer_peak_rss_mb"] = _rss_mb()

  def another_round() -> dict[str, list[float]]:  # the same compiled steps, one warm-up call each
    return {"nsjax_train_step_times": _time_calls(train_once, 1, args.steps),
            "nsjax_infer_step_times": _time_calls(infer_once, 1, args.steps)}

  return out, dict(model=model, variables=variables, predict=infer, mesh=mesh,
                   infer_only=infer_only, another_round=another_round)


def _write_jpegs(folder: str, count: int, resolution: int) -> None:
  """ImageNet-like JPEGs: about 1.75 x 1.5 the resolution (392 x 336 at 224), smooth content."""
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  w, h = max(int(resolution * 1.75), 8), max(int(resolution * 1.5), 8)
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    coarse = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-12, 13, (h, w, 3))
    pixels = np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:06d}.JPEG"), quality=90)


def bench_label(args, model, variables, predict, mesh, infer_only, workdir: str) -> dict[str, Any]:
  """`nsjax.stages.label.label_unlabeled` end to end over a locally built TFDS (folder) dataset,
  `infer_only` over as many batches, and the stage's input alone, alternating, `--rounds` passes
  of each, with each pass's wall and CPU time."""
  from nsjax import exported_model, parallel
  from nsjax.data import folder, input_pipeline
  from nsjax.stages import label

  out: dict[str, Any] = {}
  t = time.perf_counter()
  images_dir = os.path.join(workdir, "images")
  _write_jpegs(images_dir, args.label_images, args.resolution)
  built = folder.build(images_dir, "unlabeled", os.path.join(workdir, "tfds"))
  out["label_dataset_build_s"] = time.perf_counter() - t
  source = input_pipeline.Source(built["name"], folder.SPLIT, data_dir=built["data_dir"])
  teacher = os.path.join(workdir, "teacher")
  exported_model.export_model(teacher, model, variables)

  # label_unlabeled builds (and compiles) its predict step afresh on each call; hand it the one
  # compiled above (same model, mesh, shapes and shardings: a mismatch would raise), so the
  # passes measure labeling, not compilation. A first pass over two batches pays the process's
  # one-time costs (tf.data, Orbax start-up); the passes over all images after it are reported.
  original = label.make_pseudo_label_step
  fresh = []

  def shared_predict_step(m, mesh_, top_k=0):
    if (m.num_classes, m.test_resolution, mesh_, top_k) == (
        model.num_classes, model.test_resolution, mesh, 0):
      return predict
    fresh.append(1)  # the stage asked for something else: it compiles its own (and is timed)
    return original(m, mesh_, top_k)

  kwargs = dict(global_batch_size=args.batch_size, mesh=mesh, small_image=False)
  num_batches = -(-args.label_images // args.batch_size)

  def infer_pass() -> None:
    for _ in range(num_batches):
      infer_only()

  def label_pass(name: str) -> None:
    manifest = label.label_unlabeled(teacher, source, os.path.join(workdir, name), **kwargs)
    if manifest["num_examples"] != args.label_images:
      raise RuntimeError(f"labeled {manifest['num_examples']} images, expected {args.label_images}")

  def input_pass() -> None:  # the stage's own input alone: read, decode, eval view, to the device
    batches = label.labeling_batches(source, model.test_resolution, **kwargs)
    for batch in batches:
      parallel.process_local_rows(batch["image"])

  # The passes alternate A B C C B A ... (inference alone, labeling, input alone, ...): the
  # machine's drift over the minutes they take falls on every side of the ratios.
  passes = {"infer": infer_pass, "label": label_pass, "input": input_pass}
  wall = {name: [] for name in passes}
  cpu = {name: [] for name in passes}
  label.make_pseudo_label_step = shared_predict_step
  try:
    t = time.perf_counter()
    warmup = input_pipeline.Source(built["name"], f"{folder.SPLIT}[:{2 * args.batch_size}]",
                                   data_dir=built["data_dir"])
    label.label_unlabeled(teacher, warmup, os.path.join(workdir, "labels_cold"), **kwargs)
    out["label_e2e_first_pass_s"] = time.perf_counter() - t
    for r in range(args.rounds):
      for name in (passes if r % 2 == 0 else reversed(passes)):
        t, c = time.perf_counter(), time.process_time()  # CPU time of every thread
        passes[name](*([f"labels_{r}"] if name == "label" else []))
        wall[name].append(time.perf_counter() - t)
        cpu[name].append(time.process_time() - c)
  finally:
    label.make_pseudo_label_step = original
  infer_s, label_s = wall["infer"], wall["label"]
  images = num_batches * args.batch_size
  out["nsjax_infer_only_pass_s"] = sum(infer_s) / len(infer_s)
  out["nsjax_infer_only_img_s"] = images / out["nsjax_infer_only_pass_s"]
  out["nsjax_infer_only_step_s"] = out["nsjax_infer_only_pass_s"] / num_batches
  out["nsjax_infer_only_img_s_per_round"] = [images / s for s in infer_s]
  out["label_reused_compiled_step"] = not fresh
  out["label_e2e_s"] = sum(label_s) / len(label_s)
  out["label_e2e_images"] = args.label_images
  out["label_e2e_img_s"] = args.label_images / out["label_e2e_s"]
  out["label_e2e_img_s_per_round"] = [args.label_images / s for s in label_s]
  # Where labeling's extra time goes: the CPU time (all threads) each pass spends per image. On a
  # CPU whose cores inference keeps busy, the input's work adds to inference's, so even a labeling
  # loop that added nothing else could reach at most infer / (infer + input) of inference's rate.
  per_image = {name: 1e3 * statistics.mean(c) / images for name, c in cpu.items()}
  out["nsjax_infer_only_cpu_ms_per_img"] = per_image["infer"]
  out["label_e2e_cpu_ms_per_img"] = per_image["label"]
  out["label_input_only_cpu_ms_per_img"] = per_image["input"]
  out["label_input_only_img_s"] = images / statistics.mean(wall["input"])
  out["label_e2e_vs_infer_only_cpu_bound"] = per_image["infer"] / (per_image["infer"]
                                                                    + per_image["input"])
  out["label_peak_rss_mb"] = _rss_mb()
  return out


# ------------------------------------------------------------------------------------------------
# Keras and timm (run in a worker process).

def _keras_model(args):
  import tensorflow as tf
  from nsjax.models import specs
  spec = specs.get_spec(args.model)
  width = spec.width if args.width is None else args.width
  depth = spec.depth if args.depth is None else args.depth
  common = dict(weights=None, input_shape=(args.resolution, args.resolution, 3),
                classes=args.num_classes, classifier_activation=None)
  if args.model == "efficientnet-b0" and width == 1.0 and depth == 1.0:
    return tf.keras.applications.EfficientNetB0(**common), "tf.keras.applications.EfficientNetB0"
  from keras.src.applications import efficientnet as keras_efficientnet
  model = keras_efficientnet.EfficientNet(width, depth, args.resolution,
                                          dropout_rate=spec.dropout_rate, **common)
  return model, f"keras EfficientNet(width_coefficient={width}, depth_coefficient={depth})"


def bench_keras(args) -> Iterator[dict[str, Any]]:
  """Keras rounds: the first builds, compiles and times the model; each later one times the same
  compiled calls again, one warm-up call each (as nsjax's later rounds do)."""
  import numpy as np
  import tensorflow as tf
  tf.config.threading.set_intra_op_parallelism_threads(args.threads)
  out: dict[str, Any] = {"tensorflow_version": tf.__version__, "keras_version": tf.keras.__version__}
  model, out["keras_model"] = _keras_model(args)
  model.compile(optimizer=tf.keras.optimizers.SGD(0.01, momentum=0.9),
                loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                jit_compile=bool(args.keras_jit_compile))
  rng = np.random.default_rng(0)
  res, batch_size = args.resolution, args.batch_size
  images = tf.constant(rng.uniform(0, 255, (batch_size, res, res, 3)).astype(np.float32))
  labels = tf.constant(rng.integers(0, args.num_classes, batch_size).astype(np.int32))

  t = time.perf_counter()
  model.train_on_batch(images, labels)
  first = time.perf_counter() - t
  times = _time_calls(lambda: model.train_on_batch(images, labels), args.warmup - 1, args.steps)
  out.update(_summary("keras_train", times, batch_size))
  out["keras_train_compile_s"] = max(first - out["keras_train_step_s"], 0.0)

  t = time.perf_counter()
  np.asarray(model.predict_on_batch(images))
  first = time.perf_counter() - t
  times = _time_calls(lambda: np.asarray(model.predict_on_batch(images)), args.warmup - 1,
                      args.steps)
  out.update(_summary("keras_infer", times, batch_size))
  out["keras_infer_compile_s"] = max(first - out["keras_infer_step_s"], 0.0)
  out["keras_peak_rss_mb"] = _rss_mb()
  yield out
  while True:
    yield {"keras_train_step_times": _time_calls(lambda: model.train_on_batch(images, labels), 1,
                                                 args.steps),
           "keras_infer_step_times": _time_calls(
               lambda: np.asarray(model.predict_on_batch(images)), 1, args.steps)}


def bench_timm(args) -> Iterator[dict[str, Any]]:
  """timm's EfficientNet-B0 family in torch (CPU or CUDA), only when timm imports; rounds as
  `bench_keras`'s."""
  try:
    import timm
    import torch
  except Exception:  # noqa: BLE001  -- optional
    while True:  # no timm: empty rounds
      yield {}
  torch.set_num_threads(args.threads)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  name = args.model.replace("-", "_")
  if args.width is not None or args.depth is not None:
    while True:  # timm has no width/depth override for the named models: empty rounds
      yield {}
  model = timm.create_model(name, pretrained=False, num_classes=args.num_classes).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
  loss_fn = torch.nn.CrossEntropyLoss()
  images = torch.randn(args.batch_size, 3, args.resolution, args.resolution, device=device)
  labels = torch.randint(0, args.num_classes, (args.batch_size,), device=device)
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def train_once():
    opt.zero_grad(set_to_none=True)
    loss_fn(model(images), labels).backward()
    opt.step()
    sync()

  out = {"timm_version": timm.__version__, "timm_device": device}
  model.train()
  out.update(_summary("timm_train", _time_calls(train_once, args.warmup, args.steps),
                      args.batch_size))
  model.eval()

  def infer_once():
    with torch.no_grad():
      model(images)
    sync()

  out.update(_summary("timm_infer", _time_calls(infer_once, args.warmup, args.steps),
                      args.batch_size))
  yield out
  while True:
    model.train()
    train_times = _time_calls(train_once, 1, args.steps)
    model.eval()
    yield {"timm_train_step_times": train_times,
           "timm_infer_step_times": _time_calls(infer_once, 1, args.steps)}


WORKER_ROUND_WRITTEN = "nsjax-benchmark-worker: round written"


def _run_worker(args) -> None:
  """Serves rounds: writes one to --_worker_output, says so on stdout, then waits (idle) for a
  line on stdin: "again" times another round of the model it has built and compiled, anything
  else (or the parent's exit) ends the process."""
  for out in (bench_keras(args) if args._worker == "keras" else bench_timm(args)):
    with open(args._worker_output, "w") as f:
      json.dump(dict(out, **{f"{args._worker}_worker_pid": os.getpid()}), f)
    print(WORKER_ROUND_WRITTEN, flush=True)
    if sys.stdin.readline().strip() != "again":
      return


class _PeerWorker:
  """A Keras (or timm) process that stays up between rounds, idle while nsjax runs: later rounds
  reuse its compiled model, as nsjax's reuse its compiled steps, instead of paying a fresh
  process's imports and compilation again."""

  def __init__(self, args, which: str, argv: list[str]):
    self.which = which
    self._tmp = tempfile.TemporaryDirectory(prefix="nsjax-bench-")
    self._path = os.path.join(self._tmp.name, "out.json")
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    env[host_memory.ENV_SWITCH] = "1" if args.peers_retain_freed_memory else "0"
    self._cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--_worker={which}",
                 f"--_worker_output={self._path}"]
    self._proc = subprocess.Popen(self._cmd, env=env, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
    self._rounds = 0

  def next_round(self) -> dict[str, Any]:
    if self._rounds:
      try:
        self._proc.stdin.write("again\n")
        self._proc.stdin.flush()
      except BrokenPipeError:  # it has exited: its status is reported below
        pass
    for line in self._proc.stdout:  # the worker's own output passes through
      if line.strip() == WORKER_ROUND_WRITTEN:
        break
      sys.stdout.write(line)
    else:
      code = self._proc.wait()
      raise RuntimeError(f"the {self.which} worker failed (exit {code}): {' '.join(self._cmd)}")
    self._rounds += 1
    with open(self._path) as f:
      return json.load(f)

  def close(self) -> None:
    try:
      self._proc.stdin.close()
      self._proc.wait(timeout=120)
    except (OSError, subprocess.TimeoutExpired):
      self._proc.kill()
    self._tmp.cleanup()


# ------------------------------------------------------------------------------------------------

def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
  return str(value)


def print_table(results: dict[str, Any]) -> None:
  rows = [("", "img/s", "step s", "compile s", "FLOP/s", "peak RSS MB")]
  for name, prefix, rss in (("nsjax train", "nsjax_train", "nsjax_train_peak_rss_mb"),
                            ("nsjax infer", "nsjax_infer", "nsjax_infer_peak_rss_mb"),
                            ("nsjax infer (host batch)", "nsjax_infer_only", None),
                            ("label end to end", "label_e2e", "label_peak_rss_mb"),
                            ("keras train", "keras_train", "keras_peak_rss_mb"),
                            ("keras infer", "keras_infer", "keras_peak_rss_mb"),
                            ("timm train", "timm_train", None),
                            ("timm infer", "timm_infer", None)):
    if results.get(f"{prefix}_img_s") is None:
      continue
    rows.append((name, _fmt(results.get(f"{prefix}_img_s")), _fmt(results.get(f"{prefix}_step_s")),
                 _fmt(results.get(f"{prefix}_compile_s")), _fmt(results.get(f"{prefix}_flop_s")),
                 _fmt(results.get(rss) if rss else None)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  for r in rows:
    print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
  ratio = results.get("label_e2e_vs_infer_only")
  if ratio is not None:
    print(f"label end to end / infer on host batches: {ratio:.3f} (CPU ms per image: infer "
          f"{results['nsjax_infer_only_cpu_ms_per_img']:.2f}, label "
          f"{results['label_e2e_cpu_ms_per_img']:.2f}, its input alone "
          f"{results['label_input_only_cpu_ms_per_img']:.2f}; bound "
          f"{results['label_e2e_vs_infer_only_cpu_bound']:.3f})")
  print(f"{results['device']}; jax {results['jax_version']}; threads {results['threads']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  cpus = _pin_threads(args.threads)  # before JAX / TF start their thread pools
  if args._worker:  # the peers get nsjax's allocator settings only if their env switch says so
    _run_worker(args)
    return {}
  # As `python -m nsjax.main` decides for a config, before JAX starts its thread pools.
  if host_memory.worth_retaining(args.batch_size * args.resolution ** 2):
    host_memory.retain_freed_memory()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import jax
  from nsjax import cpu_features
  if args.compilation_cache_dir:
    from nsjax import parallel
    parallel.enable_compilation_cache(args.compilation_cache_dir)
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")  # the input pipeline only; JAX owns any accelerator
  except RuntimeError:  # TF already initialised (main() called from a process that used TF)
    pass

  devices = jax.devices()
  cpu = cpu_features.describe()
  results: dict[str, Any] = {
      "device": f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform})"
                + (f", CPU {cpu['model']}" if devices[0].platform == "cpu" else ""),
      "cpu": cpu["model"], "cpu_features": cpu, "threads": len(cpus),
      "jax_version": jax.__version__,
      "jax_backend": jax.default_backend(), "python": platform.python_version(),
      "flags": {k: v for k, v in vars(args).items() if not k.startswith("_")},
      "nsjax_retains_freed_memory": host_memory.applied(),
      "peers_retain_freed_memory": args.peers_retain_freed_memory,
  }
  start = time.perf_counter()
  phases = results["phase_s"] = {}
  nsjax_results, reuse = bench_nsjax(args)
  another_round = reuse.pop("another_round")
  results.update(nsjax_results)
  phases["nsjax"] = time.perf_counter() - start
  if not args.skip_label:
    t = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nsjax-bench-label-") as tmp:
      results.update(bench_label(args, **reuse, workdir=tmp))
    results["label_e2e_vs_infer_only"] = (results["label_e2e_img_s"]
                                          / results["nsjax_infer_only_img_s"])
    phases["label"] = time.perf_counter() - t
  del reuse
  rounds = [nsjax_results]
  if not args.skip_keras:
    peers = ["keras"] + (["timm"] if importlib.util.find_spec("timm") is not None else [])
    workers: dict[str, _PeerWorker] = {}
    try:
      for r in range(args.rounds):
        t = time.perf_counter()
        if r:
          rounds.append(another_round())
        for which in peers:  # one process per peer, started in round 1 (its compiles are timed)
          if which not in workers:  # (not setdefault: its default would start a process each round)
            workers[which] = _PeerWorker(args, which, argv)
          peer = workers[which].next_round()
          rounds.append(peer)
          pid = peer.pop(f"{which}_worker_pid")
          results.setdefault("peer_worker_pids", {}).setdefault(which, []).append(pid)
          if r == 0:  # later rounds hold only step times, pooled below
            results.update(peer)
        phases[f"round_{r + 1}"] = time.perf_counter() - t
    finally:
      for worker in workers.values():
        worker.close()
    _pool_rounds(results, rounds, args.batch_size)
  results["rounds"] = args.rounds if not args.skip_keras else 1
  for key in REQUIRED_KEYS:
    results.setdefault(key, None)
  results["total_s"] = time.perf_counter() - start
  print_table(results)
  if args.output:
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(results, f, indent=2, sort_keys=True)
    print(f"wrote {args.output}")
  return results


if __name__ == "__main__":
  main()
