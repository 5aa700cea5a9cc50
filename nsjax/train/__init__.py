"""Training: the train state, the official optimizer and schedule, jitted steps, the loop.

    from nsjax import models, train
    model = models.create_model("efficientnet-b0", 10, small_image=True)
    result = train.train(dict(batch_size=128, num_labeled_examples=69_257, num_epochs=700),
                         model, make_batches, "/tmp/run", eval_fn=...)

See `nsjax.train.loop` for the hyperparameters and `nsjax.train.steps` for the batch layout.
"""
from nsjax.train.run_checkpoints import TrainCheckpoints
from nsjax.train.loop import (NonFiniteError, Preempted, PreemptionWatch, Teacher, TrainResult,
                              default_config, resolve_config, train)
from nsjax.train.optimizer import (ema_decay, learning_rate_schedule, make_optimizer,
                                   tf1_rmsprop, weight_decay_mask)
from nsjax.train.state import TrainState, abstract_train_state, create_train_state
from nsjax.train.objective import LossConfig
from nsjax.train.steps import (evaluate, make_eval_fn, make_eval_step,
                               make_predict_step, make_train_step, train_step)

__all__ = ["LossConfig", "NonFiniteError", "Preempted", "PreemptionWatch", "Teacher",
           "TrainCheckpoints", "TrainResult",
           "TrainState", "abstract_train_state", "create_train_state", "default_config",
           "ema_decay", "evaluate", "learning_rate_schedule", "make_eval_fn", "make_eval_step",
           "make_optimizer", "make_predict_step", "make_train_step", "resolve_config",
           "tf1_rmsprop", "train", "train_step", "weight_decay_mask"]
