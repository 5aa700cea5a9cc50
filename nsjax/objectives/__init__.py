"""Training objectives: what a train step minimises, one class each, chosen by name in the config.

  stage.train.objective = "noisy_student"   # the default; its settings are train keys as well

A new objective is a module here, imported below (or a module of your own that your config file
imports: a config is Python, run in every process that trains):

  @objectives.register("my_loss")
  @dataclasses.dataclass(frozen=True)
  class MyLoss:
    '''Its first paragraph is its summary in docs/configuration.md.'''
    unlabeled_ratio: float                        # no default: a general training setting
    weight: float = objectives.setting(1.0, "what it means")   # its own key, default, meaning

    def loss(self, logits, labels, teacher_probs):
      ...
      return total, {"labeled_loss": ..., "unlabeled_loss": ...}

The settings are validated (`__post_init__`), accepted in config files and documented with no
further edit; the compiled train step is cached per settings object (nsjax.train.compile_cache).

The step's contract (nsjax.train.steps calls `loss` inside the gradient, jitted, pure):
  logits         float32 [B + U, C]: the student's logits over [labeled; unlabeled] images, one
                 forward pass (BatchNorm statistics cover both); U = 0 for supervised training
  labels         int32 [B]: the labeled images' classes
  teacher_probs  float [U, C]: the teacher's probabilities for the unlabeled images (offline
                 pseudo labels, or the online teacher's in-step predictions), or None (supervised)
  returns        (scalar loss, {name: scalar}): the parts are logged as metrics; the step adds
                 weight_decay * sum(w^2) / 2 (and logs it as weight_decay_loss)
"""
from nsjax.objectives import noisy_student
from nsjax.objectives.noisy_student import NoisyStudent
from nsjax.objectives.registry import (DEFAULT, accepted_keys, defaults, from_settings,
                                       general_settings, get, names, own_settings, owners,
                                       reference, register, setting, unregister)

__all__ = ["DEFAULT", "NoisyStudent", "accepted_keys", "defaults", "from_settings",
           "general_settings", "get", "names", "noisy_student", "own_settings", "owners",
           "reference", "register", "setting", "unregister"]
