"""Smoke study: three variants of configs/smoke.py, for the tests and a quick look (a few minutes).

`full` is the smoke schedule; `student_lr` changes only the student (it shares the teacher and the
pseudo labels); `teacher_steps` changes the teacher (so everything after it runs again).

  python -m nsjax.study --config=configs/smoke.py --study=smoke --seeds=0 --workdir=/tmp/nsjax-st
"""
from nsjax.claims import Claim
from nsjax.study import Study, Variant


def get_study(config):
  del config  # the overrides below are plain values
  return Study(
      about="Sharing check on the smoke schedule.",
      claims=(Claim("the smoke student beats its teacher", "-", "full", "teacher"),),
      # No corruption suite: the study reads test top-1 only.
      common={"eval.corruptions": []},
      variants={
          "full": Variant("the smoke schedule"),
          "student_lr": Variant("students only: another learning rate",
                                {"students[*].train.base_learning_rate": 0.01}),
          "teacher_steps": Variant("teacher only: one more step",
                                   {"teacher.train.num_train_steps": 13}),
      })
