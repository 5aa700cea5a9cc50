"""The paper's ablations in miniature: variants of configs/demo.py, each against the full recipe.

  python -m nsjax.study --config=configs/demo.py --study=paper --seeds=0,1,2 --workdir=DIR

Every variant keeps the demo's teacher (1,600 steps, shared by all variants of a seed), its
supervised baseline (the reference line) and its labeled and test data, and changes one thing:

  full             the full recipe: the demo's two noisy students (soft pseudo labels, filtering +
                   balancing, RandAugment + dropout + stochastic depth), STUDENT_STEPS steps each
  no_noise         students without noise: RandAugment, dropout and stochastic depth off
                   (paper Table 6: 85.1 -> 84.3 top-1 with 130M unlabeled images)
  no_randaugment   students without RandAugment (dropout and stochastic depth kept)
  no_dropout_sd    students without dropout and stochastic depth (RandAugment kept)
  hard_labels      hard (argmax) pseudo labels instead of soft
  no_balance       no filtering and balancing: every pseudo-labeled image once
  iterations_1     one iteration (the full recipe's first student: no extra compute)
  iterations_2     two iterations (= the full recipe: no extra compute)
  iterations_3     three iterations (a third student of the same recipe)
  larger_student   students of width/depth LARGER (the teacher's 0.25): larger than the teacher
  ood_soft         out-of-domain unlabeled images (natural_patches: 28x28 grey patches of
                   scikit-learn's sample photographs), soft labels
  ood_hard         the same with hard labels (paper section 5: hard labels hurt with
                   out-of-domain images, soft labels stay robust)

Steps: the study's students train STUDENT_STEPS steps instead of the demo's 600 (32 labeled + 64
pseudo-labeled images a step, the cosine decay over the whole run), in every variant, the full
recipe included, so each row compares like with like. No corruption suite (the study reads test
top-1 only).

Cost, 3 seeds on a 2-core CPU (`--dry_run` lists what each run computes; docs/study.md has the
stage times): per seed 1 teacher and 1 baseline of 1,600 steps, 17 students of the demo's size and
2 larger ones (`no_noise` .. `ood_hard` each train two, `iterations_3` one, `iterations_1` and
`iterations_2` none), 13 labeling stages, 21 evaluations and 12 run summaries. Measured: 2 h 1 min
on a 2-core AMD EPYC, the last 80 min as two jobs pinned to one core each, which nearly doubles
the throughput of these tiny steps:

  taskset -c 0 python -m nsjax.study ... --variants=full,no_noise,no_randaugment,no_dropout_sd,hard_labels,iterations_1,iterations_2,iterations_3
  taskset -c 1 python -m nsjax.study ... --variants=no_balance,larger_student,ood_soft,ood_hard
  python -m nsjax.study ... --report_only
"""
import copy

from nsjax import config_lib
from nsjax.claims import Claim
from nsjax.study import Study, Variant

STUDENT_STEPS = 400
LARGER = 0.35  # width and depth multiplier of the larger students (the demo's models: 0.25)


def _steps(student, steps):
  """The student with `steps` training steps and its cosine decay over all of them (as the demo's
  `train(steps)`: lr_decay_epochs = steps * batch / 100 labeled images)."""
  student = copy.deepcopy(student)
  student.train.num_train_steps = steps
  student.train.lr_decay_epochs = steps * student.train.batch_size / 100
  return student


# The paper's claims, each as "this row beats that one". Numbers from ../shared/REFERENCE.md
# (Table 6: B5 teacher, 1.3M / 130M unlabeled images); the others are the paper's statements.
CLAIMS = (
    Claim("Noisy Student beats the supervised baseline", "85.1 vs 84.0 (Table 6, 130M)",
          "full", "baseline"),
    Claim("the student beats its teacher", "SVHN B0: 98.6 vs 97.9", "full", "teacher"),
    Claim("noise matters: a student without noise is worse", "85.1 -> 84.3 (Table 6, 130M)",
          "full", "no_noise"),
    Claim("RandAugment matters", "85.1 -> 84.6 without augmentation (Table 6, 130M)", "full",
          "no_randaugment"),
    Claim("dropout and stochastic depth matter", "84.6 -> 84.3 when removed after augmentation "
          "(Table 6; not removed alone)", "full", "no_dropout_sd"),
    Claim("soft pseudo labels beat hard ones in domain", "not claimed: both help with in-domain "
          "images (section 5)", "full", "hard_labels"),
    Claim("filtering and balancing help", "they help, most for small models", "full",
          "no_balance"),
    Claim("a second iteration helps", "87.6 -> 88.1 (L2, final runs)", "iterations_2",
          "iterations_1"),
    Claim("a third iteration helps", "88.1 -> 88.4 (L2, final runs)", "iterations_3",
          "iterations_2"),
    Claim("a student larger than its teacher is better", "the method's premise: equal-or-larger "
          "students (B7 -> L0 -> L1 -> L2)", "larger_student", "full"),
    Claim("out-of-domain data: soft labels beat hard ones",
          "hard labels hurt with out-of-domain images, soft stay robust (section 5)", "ood_soft",
          "ood_hard"),
    Claim("out-of-domain data with soft labels still beats the baseline",
          "soft labels stay robust (section 5)", "ood_soft", "baseline"),
)


def get_study(config):
  steps = {"students[*].train.num_train_steps": STUDENT_STEPS,
           "students[*].train.lr_decay_epochs": STUDENT_STEPS * 32 / 100}
  students = [_steps(s, STUDENT_STEPS) for s in config.students]
  third = copy.deepcopy(students[-1])
  third.seed_offset = 4  # 1, 2: the demo's students; 3: its baseline
  no_ra = {"students[*].noise.randaugment_magnitude": 0}
  no_dsd = {"students[*].noise.dropout_rate": 0.0, "students[*].noise.stochastic_depth_rate": 0.0}
  hard = {"students[*].train.pseudo_labels": "hard"}
  ood = {"data.unlabeled": config_lib.data_source("natural_patches", "unlabeled")}
  return Study(
      about="Noisy Student's ablations (paper Table 6, section 5) on the demo.",
      claims=CLAIMS,
      common={**steps, "eval.corruptions": []},
      variants={
          "full": Variant("full recipe (noise, soft labels, balancing, 2 iterations)"),
          "no_noise": Variant("students without noise (RandAugment, dropout, stoch. depth off)",
                              {**no_ra, **no_dsd}),
          "no_randaugment": Variant("students without RandAugment", no_ra),
          "no_dropout_sd": Variant("students without dropout and stochastic depth", no_dsd),
          "hard_labels": Variant("hard pseudo labels", hard),
          "no_balance": Variant("no filtering and balancing (every pseudo label once)",
                                {"balance.num_image_per_class": -1}),
          "iterations_1": Variant("1 iteration", {"students": students[:1]}),
          "iterations_2": Variant("2 iterations (= full recipe)", {"students": students}),
          "iterations_3": Variant("3 iterations", {"students": students + [third]}),
          "larger_student": Variant(
              f"students larger than the teacher (width/depth {LARGER} vs 0.25)",
              {"students[*].model_overrides": dict(width=LARGER, depth=LARGER)}),
          "ood_soft": Variant("out-of-domain unlabeled images, soft labels", ood),
          "ood_hard": Variant("out-of-domain unlabeled images, hard labels", {**ood, **hard}),
      })
