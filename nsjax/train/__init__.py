"""Training: the train state, the official optimizer and schedule, the step, the loop (what a
step minimises is an objective of nsjax.objectives).

    from nsjax import models, train
    model = models.create_model("efficientnet-b0", 10, small_image=True)
    result = train.train(dict(batch_size=128, num_labeled_examples=69_257, num_epochs=700),
                         model, make_batches, "/tmp/run", eval_fn=...)

  steps          the jitted train step (the batch layout; gradients, weight decay, optimizer, EMA,
                 non-finite guard around the objective)
  loop           `train`: resume, the step loop, checkpoints, evaluation, export
  settings       the training settings (defaults in nsjax.config_lib and the objective's class)
                 and what they build
  optimizer      TF1 RMSProp, the learning-rate schedules, weight decay, EMA, frozen blocks
  state          the train state and its shardings
  run_checkpoints, preemption, reporter, input_position, compile_cache: the loop's parts
"""
from nsjax.train.loop import Teacher, TrainResult, train
from nsjax.train.optimizer import (ema_decay, learning_rate_schedule, make_optimizer,
                                   tf1_rmsprop, weight_decay_mask)
from nsjax.train.preemption import Preempted, PreemptionWatch
from nsjax.train.reporter import NonFiniteError
from nsjax.train.run_checkpoints import TrainCheckpoints
from nsjax.train.settings import StepSettings, default_config, resolve_config, step_settings
from nsjax.train.state import TrainState, abstract_train_state, create_train_state
from nsjax.train.steps import make_train_step, train_step

__all__ = ["NonFiniteError", "Preempted", "PreemptionWatch", "StepSettings", "Teacher",
           "TrainCheckpoints", "TrainResult",
           "TrainState", "abstract_train_state", "create_train_state", "default_config",
           "ema_decay", "learning_rate_schedule", "make_optimizer", "make_train_step",
           "resolve_config", "step_settings", "tf1_rmsprop", "train", "train_step",
           "weight_decay_mask"]
