"""The training loop end to end on a tiny EfficientNet over a 4-device mesh.

One module-scoped set of runs (the compiled step is shared between them): an uninterrupted run,
and the same run stopped halfway and restarted from its checkpoint.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from nsjax import exported_model, models, parallel
from nsjax.evaluate import accuracy
from nsjax.train import compile_cache, loop, reporter, settings

NUM_CLASSES = 10
SIZE = 16
BATCH = 8
NUM_STEPS = 16
MODEL = models.create_model("efficientnet-b0", NUM_CLASSES, width=0.25, depth=0.25,
                            block_stages=4, small_image=True, resolution=SIZE,
                            depthwise_impl="xla")  # the loop's plumbing: a small program
CONFIG = dict(batch_size=BATCH, steps_per_epoch=4, base_learning_rate=0.5, warmup_epochs=1,
              unlabeled_ratio=2.0, log_every_steps=4, checkpoint_every_steps=8,
              keep_checkpoints=2, eval_every_steps=8)
PROTOTYPES = np.random.default_rng(0).normal(size=(NUM_CLASSES, SIZE, SIZE, 3)).astype(np.float32)


def examples(rng, n):
  labels = rng.integers(0, NUM_CLASSES, n)
  images = PROTOTYPES[labels] + 0.5 * rng.normal(size=(n, SIZE, SIZE, 3)).astype(np.float32)
  return images.astype(np.float32), labels.astype(np.int32)


def batches(start_step, nan_at=None):
  """Batch of update s depends on s only, so a restarted run sees the same data."""
  step = start_step
  while True:
    rng = np.random.default_rng(1000 + step)
    image, label = examples(rng, BATCH)
    unlabeled, hidden = examples(rng, BATCH)
    probs = np.full((BATCH, NUM_CLASSES), 0.02, np.float32)
    probs[np.arange(BATCH), hidden] = 0.82  # a decent (offline) teacher
    if step == nan_at:
      image[0, 0, 0, 0] = np.nan
    yield {"labeled": {"image": image, "label": label},
           "unlabeled": {"image": unlabeled, "probs": probs}}
    step += 1


def eval_batches():
  rng = np.random.default_rng(7)
  image, label = examples(rng, 16)
  mask = np.ones(16, np.float32)
  mask[-3:] = 0  # padding
  return [{"image": image[:8], "label": label[:8], "mask": mask[:8]},
          {"image": image[8:], "label": label[8:], "mask": mask[8:]}]


def read_scalars(workdir):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  files = sorted(epath.Path(workdir).glob("events.out.tfevents.*"))
  assert files, f"no event file in {workdir}"
  scalars = {}
  for f in files:
    acc = event_accumulator.EventAccumulator(str(f), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for event in acc.Tensors(tag):
        value = tensor_util.make_ndarray(event.tensor_proto)
        if value.ndim == 0 and value.dtype.kind == "f":  # skip hparams/text summaries
          scalars.setdefault(tag, {})[event.step] = float(value)
    for tag in acc.Tags()["scalars"]:
      for event in acc.Scalars(tag):
        scalars.setdefault(tag, {})[event.step] = event.value
  return scalars


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  mesh = parallel.make_mesh()
  assert mesh.size == 4
  eval_fn = accuracy.make_eval_fn(MODEL, mesh, eval_batches)
  root = tmp_path_factory.mktemp("loop")
  full = loop.train(dict(CONFIG, num_train_steps=NUM_STEPS), MODEL, batches, root / "full",
                    eval_fn=eval_fn, mesh=mesh)
  half = loop.train(dict(CONFIG, num_train_steps=NUM_STEPS // 2), MODEL, batches,
                    root / "resumed", eval_fn=eval_fn, mesh=mesh)
  resumed = loop.train(dict(CONFIG, num_train_steps=NUM_STEPS), MODEL, batches,
                       root / "resumed", eval_fn=eval_fn, mesh=mesh)
  return dict(root=root, mesh=mesh, eval_fn=eval_fn, full=full, half=half, resumed=resumed)


def test_loss_falls_on_learnable_problem(runs):
  scalars = read_scalars(runs["root"] / "full")
  loss = scalars["train/loss"]
  assert sorted(loss) == [4, 8, 12, 16]
  assert loss[16] < 0.6 * loss[4], loss
  assert scalars["train/train_accuracy"][16] > scalars["train/train_accuracy"][4] + 0.3
  # Evaluation ran on the EMA variables and left the 3 padded examples out.
  assert runs["full"].metrics["eval_num_examples"] == 13
  assert 0.0 <= runs["full"].metrics["eval_top1"] <= runs["full"].metrics["eval_top5"] <= 1.0


def test_resume_after_restore_is_bitwise_identical(runs):
  full, half, resumed = runs["full"], runs["half"], runs["resumed"]
  assert (half.step, resumed.step, full.step) == (NUM_STEPS // 2, NUM_STEPS, NUM_STEPS)
  a = jax.tree_util.tree_flatten_with_path(jax.device_get(full.state))[0]
  b = jax.tree.leaves(jax.device_get(resumed.state))
  assert len(a) == len(b)
  for (path, x), y in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))
  assert exported_model.params_sha256(full.state.ema_params) == exported_model.params_sha256(
      resumed.state.ema_params)
  # The second call really resumed: it logged only the steps after the restored one.
  resumed_loss = read_scalars(runs["root"] / "resumed")["train/loss"]
  np.testing.assert_array_equal([resumed_loss[s] for s in (12, 16)],
                                [read_scalars(runs["root"] / "full")["train/loss"][s]
                                 for s in (12, 16)])


def test_checkpoints_are_periodic_and_pruned(runs):
  kept = sorted(int(p.name) for p in (runs["root"] / "full" / "checkpoints").iterdir()
                if p.name.isdigit())
  assert kept == [8, 16]


def test_event_file_holds_logged_scalars(runs):
  scalars = read_scalars(runs["root"] / "full")
  for tag in ("train/loss", "train/labeled_loss", "train/unlabeled_loss", "train/learning_rate",
              "train/grad_norm", "train/train_accuracy", "train/weight_decay_loss",
              "eval/top1", "eval/top5"):
    assert tag in scalars, (tag, sorted(scalars))
  peak = 0.5 * BATCH / 256
  # Window 1 averages steps 0..3 of a 4-step warmup: peak * (0 + 1 + 2 + 3) / 4 / 4.
  np.testing.assert_allclose(scalars["train/learning_rate"][4], peak * 6 / 16, rtol=1e-6)
  # Steps 12..15: floor(s / 9.6) = 1 -> peak * 0.97.
  np.testing.assert_allclose(scalars["train/learning_rate"][16], peak * 0.97, rtol=1e-6)
  for s in (4, 8):
    np.testing.assert_allclose(scalars["train/loss"][s], scalars["train/labeled_loss"][s] +
                               2.0 * scalars["train/unlabeled_loss"][s] +
                               scalars["train/weight_decay_loss"][s], rtol=1e-5)
  assert sorted(scalars["eval/top1"]) == [8, 16]
  np.testing.assert_allclose(scalars["eval/top1"][16], runs["full"].metrics["eval_top1"], rtol=1e-6)


def test_export_holds_ema_variables(runs):
  full = runs["full"]
  model, variables, metadata = exported_model.load_exported(full.export_dir)
  assert models.describe(model) == models.describe(MODEL)
  assert metadata["step"] == NUM_STEPS
  assert metadata["train_config"]["batch_size"] == BATCH
  ema = jax.device_get(full.state.ema_variables)
  for x, y in zip(jax.tree.leaves(variables), jax.tree.leaves(ema)):
    np.testing.assert_array_equal(np.asarray(x), y)
  teacher = loop.Teacher.load(full.export_dir)  # how the next stage picks it up
  assert teacher.model == MODEL
  np.testing.assert_array_equal(teacher.variables["params"]["head"]["dense"]["bias"],
                                ema["params"]["head"]["dense"]["bias"])
  live = jax.device_get(full.state.params)
  assert not np.array_equal(live["head"]["dense"]["kernel"],
                            ema["params"]["head"]["dense"]["kernel"])


def test_another_seed_reuses_the_compiled_step(runs, tmp_path):
  """A run that differs only in its seed (a teacher and its baseline, a study's seeds) compiles
  no new train step, yet draws other noise and another init."""
  config = dict(CONFIG, num_train_steps=4, eval_every_steps=0, export=False)
  fns = compile_cache.run_functions(MODEL, runs["mesh"], settings.step_settings(
      settings.resolve_config(config)), (SIZE, SIZE, 3), -1)
  step_fn = compile_cache.train_step(fns, None, None, False)
  compiled = step_fn._cache_size()
  assert compiled >= 1  # the module's runs compiled it
  other = loop.train(dict(config, seed=1), MODEL, batches, tmp_path / "seed1", mesh=runs["mesh"])
  again = loop.train(dict(config, seed=1), MODEL, batches, tmp_path / "again", mesh=runs["mesh"])
  same = loop.train(config, MODEL, batches, tmp_path / "seed0", mesh=runs["mesh"])
  assert step_fn._cache_size() == compiled
  params = lambda r: exported_model.params_sha256(r.state.params)
  assert params(other) == params(again)  # the seed as an argument is still deterministic
  assert params(other) != params(same)


def test_non_finite_batch_stops_before_saving(runs, tmp_path):
  config = dict(CONFIG, num_train_steps=NUM_STEPS, eval_every_steps=0, export=False)
  with pytest.raises(reporter.NonFiniteError) as err:
    loop.train(config, MODEL, lambda s: batches(s, nan_at=9), tmp_path, mesh=runs["mesh"])
  message = str(err.value)
  assert "Training step 10 (state.step 9 -> 10)" in message
  assert str(tmp_path / "checkpoints" / "8") in message
  kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == ["8"]


def test_config_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="Unknown training config key"):
    settings.resolve_config(dict(CONFIG, num_train_steps=4, learning_rate=0.1))
  with pytest.raises(ValueError, match="batch_size"):
    settings.resolve_config(dict(num_train_steps=4, steps_per_epoch=2))
  with pytest.raises(ValueError, match="steps_per_epoch or config.num_labeled_examples"):
    settings.resolve_config(dict(batch_size=8, num_train_steps=4))
  cfg = settings.resolve_config(dict(batch_size=128, num_labeled_examples=69_257, num_epochs=2))
  assert settings.steps_per_epoch(cfg) == 69_257 / 128
  assert settings.num_train_steps(cfg) == int(np.ceil(2 * 69_257 / 128))
  with pytest.raises(ValueError, match="GLOBAL batches"):
    loop.train(dict(CONFIG, num_train_steps=4, batch_size=16), MODEL, batches, tmp_path)


class SmallNet(nn.Module):
  """Stand-in for the online-teacher loop path (compiles in seconds, not minutes)."""
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), strides=(2, 2))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def test_online_teacher_through_the_loop(runs, tmp_path):
  student = SmallNet()
  teacher_model = SmallNet()
  teacher_vars = teacher_model.init(jax.random.key(42), jnp.zeros((1, 8, 8, 3)))

  def online_batches(start):
    for b in batches(start):
      unlabeled = b["unlabeled"]
      # The teacher sees its own (here: lower-resolution) view of the unlabeled images.
      yield {"labeled": b["labeled"],
             "unlabeled": {"image": unlabeled["image"],
                           "teacher_image": unlabeled["image"][:, ::2, ::2]}}

  config = dict(CONFIG, num_train_steps=4, eval_every_steps=0, export=False, log_every_steps=2,
                checkpoint_every_steps=4)
  result = loop.train(config, student, online_batches, tmp_path, mesh=runs["mesh"],
                      teacher=loop.Teacher(teacher_model, teacher_vars))
  assert result.step == 4 and result.metrics["unlabeled_loss"] > 0
  with pytest.raises(ValueError, match="teacher_image"):
    loop.train(dict(config, num_train_steps=8), student, batches, tmp_path / "x",
               mesh=runs["mesh"], teacher=loop.Teacher(teacher_model, teacher_vars))
