"""A training objective is one class registered by name: an objective defined in this file (no file
in nsjax/ changes) is accepted in a config, validated, documented, keys the compiled step, and
trains the smoke schedule."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from nsjax import config_lib, models, objectives, pipeline, validate
from nsjax.train import settings
from test_configs import load_config

TRACED = []  # the settings of every traced call of the toy's loss


@dataclasses.dataclass(frozen=True)
class ConfidenceWeighted:
  """Cross-entropy on the labels plus unlabeled_ratio x the teacher-probability cross-entropy of
  the unlabeled images, each weighted by the teacher's top probability ^ confidence_power."""
  unlabeled_ratio: float
  confidence_power: float = objectives.setting(
      1.0, "an unlabeled image's weight: the teacher's top probability to this power")

  def __post_init__(self):
    if self.confidence_power < 0:
      raise ValueError(f"confidence_power = {self.confidence_power} must be >= 0.")

  def loss(self, logits, labels, teacher_probs):
    TRACED.append((self, teacher_probs is not None))
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    num_labeled = labels.shape[0]
    labeled = -jnp.mean(jnp.take_along_axis(log_p[:num_labeled], labels[:, None], axis=1))
    weighted = jnp.zeros([], jnp.float32)
    if teacher_probs is not None:
      weights = jnp.max(teacher_probs, axis=-1) ** self.confidence_power
      cross_entropy = -jnp.sum(teacher_probs * log_p[num_labeled:], axis=-1)
      weighted = jnp.sum(weights * cross_entropy) / jnp.sum(weights)
    return (labeled + self.unlabeled_ratio * weighted,
            {"labeled_loss": labeled, "confidence_weighted_loss": weighted})


@pytest.fixture
def toy():
  objectives.register("confidence_weighted")(ConfidenceWeighted)
  yield "confidence_weighted"
  objectives.unregister("confidence_weighted")


def toy_config(**student_train):
  """The smoke schedule, 4 steps a model, both models trained with the toy objective."""
  config = load_config("smoke")[1]
  for stage in (config.teacher, config.students[0]):
    stage.train.update(objective="confidence_weighted", num_train_steps=4,
                       checkpoint_every_steps=4)
  config.students[0].train.update(student_train)
  return config


def test_a_toy_objective_trains_the_smoke_schedule(toy, tmp_path):
  TRACED.clear()
  config = toy_config(confidence_power=2.0)
  validate.validate_config(config, str(tmp_path))
  state = pipeline.run(config, str(tmp_path))
  student = state["completed"]["student-1"]
  assert student["step"] == 4
  assert student["final_metrics"]["confidence_weighted_loss"] > 0  # the toy's own part, logged
  assert "unlabeled_loss" not in student["final_metrics"]  # noisy_student's is not there
  assert (ConfidenceWeighted(1.0, 2.0), True) in TRACED  # the student's, with pseudo labels
  assert (ConfidenceWeighted(1.0, 1.0), False) in TRACED  # the teacher's: labels only
  with open(os.path.join(student["export_dir"], "model.json")) as f:
    train_config = json.load(f)["metadata"]["train_config"]
  assert train_config["objective"] == "confidence_weighted"
  assert train_config["confidence_power"] == 2.0
  summary = os.path.join(tmp_path, "summary.json")
  assert os.path.exists(summary)


def test_the_toy_objective_is_validated_and_keys_the_compiled_step(toy):
  base = dict(batch_size=8, steps_per_epoch=2, num_train_steps=4, objective=toy)
  first = settings.step_settings(settings.resolve_config(base))
  assert first.objective == ConfidenceWeighted(unlabeled_ratio=1.0, confidence_power=1.0)
  assert settings.step_settings(settings.resolve_config(base)) == first
  assert hash(settings.step_settings(settings.resolve_config(base))) == hash(first)
  other = settings.step_settings(settings.resolve_config(dict(base, confidence_power=0.5)))
  assert other != first and other.objective.confidence_power == 0.5
  with pytest.raises(ValueError, match="confidence_power = -1"):
    settings.resolve_config(dict(base, confidence_power=-1))
  # A setting of another objective is refused, naming whose it is.
  with pytest.raises(ValueError, match="temperature is a setting of the objective "
                                       "'noisy_student', but objective = 'confidence_weighted'"):
    settings.resolve_config(dict(base, temperature=2.0))
  with pytest.raises(ValueError, match="confidence_power is a setting of the objective "
                                       "'confidence_weighted', but objective = 'noisy_student'"):
    settings.resolve_config(dict(base, objective="noisy_student", confidence_power=2.0))


def test_a_config_names_the_objective_and_its_settings_or_is_refused(toy, tmp_path):
  validate.check_keys(toy_config(confidence_power=2.0))
  config = toy_config(confidence_powr=2.0)
  with pytest.raises(validate.ConfigError, match="did you mean "
                                                 "students\\[0\\].train.confidence_power"):
    validate.check_keys(config)
  config = load_config("smoke")[1]
  config.students[0].train.objective = "confidence_weightd"
  with pytest.raises(validate.ConfigError, match="objective = 'confidence_weightd' is not a "
                                                 "registered objective; use one of "
                                                 "confidence_weighted, noisy_student"):
    validate.validate_config(config, str(tmp_path))


def test_the_reference_page_documents_a_registered_objective(toy):
  page = config_lib.markdown(models.OVERRIDABLE, objectives.reference())
  assert "## stage.train with `objective = 'confidence_weighted'`" in page
  assert ("| `confidence_power` | `1.0` | an unlabeled image's weight: the teacher's top "
          "probability to this power |") in page
  assert "| `temperature` | `1.0` | T of the soft pseudo labels |" in page


def test_register_refuses_what_cannot_be_an_objective():
  class Plain:
    def loss(self, logits, labels, teacher_probs):
      return logits.sum(), {}

  with pytest.raises(TypeError, match="must be a frozen dataclass"):
    objectives.register("plain")(Plain)

  @dataclasses.dataclass(frozen=True)
  class NoMeaning:
    weight: float = 1.0

    def loss(self, logits, labels, teacher_probs):
      return logits.sum(), {}

  with pytest.raises(TypeError, match="setting 'weight' needs a meaning"):
    objectives.register("no_meaning")(NoMeaning)
  with pytest.raises(ValueError, match="'noisy_student' is already registered"):
    objectives.register("noisy_student")(ConfidenceWeighted)
  assert objectives.names() == ["noisy_student"]


def test_each_objectives_general_settings_are_general_training_settings():
  """A field without a default reads the general setting of its name, which must exist (and an
  objective's own key must not shadow one)."""
  general = set(config_lib.train_defaults())
  for name in objectives.names():
    cls = objectives.get(name)
    assert set(objectives.general_settings(cls)) <= general, name
    assert not set(objectives.defaults(name)) & general, name
