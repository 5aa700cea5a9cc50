"""The paper's claims in miniature: variants of configs/demo.py, each against the demo's own recipe.

  python -m nsjax.study --config=configs/demo.py --study=paper --seeds=0,1,2,3,4,5,6,7 --workdir=DIR

Every variant keeps the demo's teacher (1,600 steps, shared by all variants of a seed), its
supervised baseline and its labeled and test data; `full` IS the demo (two noisy students of 600
steps), so its rows are the demo's own runs. The others change one thing:

  no_noise         students without noise: RandAugment, dropout and stochastic depth off
  hard_labels      hard (argmax) pseudo labels instead of soft ones
  no_balance       no filtering and balancing: every pseudo-labeled image once
  iterations_1     one iteration: the full recipe's first student (no extra compute)
  larger_student   students of width/depth LARGER (the teacher's: 0.25)
  ood_soft         out-of-domain unlabeled images (natural_patches: 28x28 grey patches of
                   scikit-learn's sample photographs), soft labels
  ood_hard         the same with hard labels

Why soft labels lose to hard ones here: one-iteration variants (their first students against
`iterations_1`, the full recipe's, and `hard_1`, hard_labels', both computed anyway), for seeds
INVESTIGATION_SEEDS only:

  hard_1               hard labels, one iteration (no extra compute)
  soft_t0.5_1, soft_t2_1   soft labels sharpened (T = 0.5) or flattened (T = 2)
  soft_no_filter_1     soft labels, balancing kept but no confidence threshold
  soft_long_1, hard_long_1 the first student trained twice as long (1,200 steps), soft and hard

The claims and their tests are stated here, before the study runs: superiority for "A beats B";
non-inferiority with a margin of MARGIN points for the paper's ">=" statements (equal-or-larger
students, soft ~ hard in domain, a second iteration, soft labels staying robust out of domain).

Cost on a 2-core CPU (`--dry_run` lists what each run computes; docs/study.md has the numbers):
two jobs, each pinned to one core (both keep XLA's thread count at the machine's 2 cores, so
their numbers are those of `python -m nsjax.main --config=configs/demo.py --config.seed=S`):

  taskset -c 0 python -m nsjax.study ... --seeds=0,2,4,6
  taskset -c 1 python -m nsjax.study ... --seeds=1,3,5,7
  python -m nsjax.study ... --seeds=0,1,2,3,4,5,6,7 --report_only
"""
import copy

from nsjax import config_lib
from nsjax.claims import Claim
from nsjax.study import Study, Variant

LARGER = 0.35  # width and depth multiplier of the larger students (the demo's models: 0.25)
MARGIN = 1.0  # points of top-1: how far below "worse" a non-inferiority claim may fall
INVESTIGATION_SEEDS = (0, 1, 2, 3)

# The paper's claims. Numbers from the paper (Table 6: B5 teacher, 130M unlabeled images; section
# 5; the final L2 runs); the others are its statements.
CLAIMS = (
    Claim("Noisy Student beats the supervised baseline", "85.1 vs 84.0 (Table 6, 130M)",
          "full", "baseline"),
    Claim("the student beats its teacher", "SVHN B0: 98.6 vs 97.9", "full", "teacher"),
    Claim("noise matters: a student without noise is worse", "85.1 -> 84.3 (Table 6, 130M)",
          "full", "no_noise"),
    Claim("filtering and balancing help", "they help, most for small models", "full",
          "no_balance"),
    Claim("soft pseudo labels are as good as hard ones in domain", "both help with in-domain "
          "images (section 5)", "full", "hard_labels", "non_inferiority", MARGIN),
    Claim("a second iteration is at least as good as one", "87.6 -> 88.1 (L2, final runs)",
          "full", "iterations_1", "non_inferiority", MARGIN),
    Claim("a student larger than its teacher is at least as good as an equal one",
          "equal-or-larger students (B7 -> L0 -> L1 -> L2)", "larger_student", "full",
          "non_inferiority", MARGIN),
    Claim("out-of-domain data: soft labels beat hard ones",
          "hard labels hurt with out-of-domain images, soft stay robust (section 5)", "ood_soft",
          "ood_hard"),
    Claim("out-of-domain data with soft labels is as good as the baseline",
          "soft labels stay robust (section 5)", "ood_soft", "baseline", "non_inferiority",
          MARGIN),
)


def _longer(student):
  """The student trained twice as long, its cosine decay over all its steps (as the demo's
  `train(steps)`: lr_decay_epochs = steps * batch / 100 labeled images)."""
  student = copy.deepcopy(student)
  student.train.num_train_steps *= 2
  student.train.lr_decay_epochs = student.train.num_train_steps * student.train.batch_size / 100
  return student


def get_study(config):
  hard = {"students[*].train.pseudo_labels": "hard"}
  ood = {"data.unlabeled": config_lib.data_source("natural_patches", "unlabeled")}
  larger = {"students[*].model_overrides.width": LARGER,
            "students[*].model_overrides.depth": LARGER}
  no_noise = {"students[*].noise.randaugment_magnitude": 0, "students[*].noise.dropout_rate": 0.0,
              "students[*].noise.stochastic_depth_rate": 0.0}
  first = {"students": list(config.students)[:1]}
  longer = {"students": [_longer(config.students[0])]}

  def side(about, overrides):  # a one-iteration variant of the soft-vs-hard investigation
    return Variant(about, overrides, seeds=INVESTIGATION_SEEDS)

  return Study(
      about="Noisy Student's claims (paper Table 6, section 5) on the demo's own recipe.",
      claims=CLAIMS,
      smallest_effect=MARGIN,
      common={"eval.corruptions": []},  # the study reads test top-1 only
      variants={  # table order, and the order a job computes them in
          "full": Variant("the demo: noise, soft labels, balancing, 2 iterations"),
          "iterations_1": Variant("1 iteration (the full recipe's first student)", first),
          "hard_labels": Variant("hard pseudo labels", hard),
          "no_noise": Variant("students without noise (RandAugment, dropout, stoch. depth off)",
                              no_noise),
          "no_balance": Variant("no filtering and balancing (every pseudo label once)",
                                {"balance.num_image_per_class": -1}),
          "ood_soft": Variant("out-of-domain unlabeled images, soft labels", ood),
          "ood_hard": Variant("out-of-domain unlabeled images, hard labels", {**ood, **hard}),
          "larger_student": Variant(f"students of width/depth {LARGER} (teacher 0.25)", larger),
          "hard_1": side("hard labels, 1 iteration", {**first, **hard}),
          "soft_t0.5_1": side("soft labels at T = 0.5 (sharper), 1 iteration",
                              {**first, "students[*].train.temperature": 0.5}),
          "soft_t2_1": side("soft labels at T = 2 (flatter), 1 iteration",
                            {**first, "students[*].train.temperature": 2.0}),
          "soft_no_filter_1": side("soft labels, no confidence threshold, 1 iteration",
                                   {**first, "balance.min_threshold": 0.0}),
          "soft_long_1": side("soft labels, first student 2x longer (1,200 steps)", longer),
          "hard_long_1": side("hard labels, first student 2x longer (1,200 steps)",
                              {**longer, **hard}),
      })
