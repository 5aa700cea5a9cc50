"""nsjax.study: overrides, stage identities (what is shared), and the smoke study end to end
(a shared stage runs once, a student change keeps the teacher, a teacher change does not, resume
after a kill, report files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from nsjax import cpu_features, pipeline, study, validate, workdir_lock
from nsjax.evaluate import metrics
from nsjax.study import Study, Variant
from test_pipeline import ROOT, load_config

PAPER_VARIANTS = ["full", "iterations_1", "hard_labels", "no_noise", "no_balance", "ood_soft",
                  "ood_hard", "larger_student", "hard_1", "soft_t0.5_1", "soft_t2_1",
                  "soft_no_filter_1", "soft_long_1", "hard_long_1"]


def locked(name):
  config = load_config(name)
  config.lock()  # as the command line passes it
  return config


@pytest.fixture(scope="module")
def paper():
  config = locked("demo")
  name, paper_study = study.load_study("paper", config)
  assert name == "paper"
  ids = {v: study.stage_identities(study.variant_config(config, paper_study, v, 0))
         for v in paper_study.variants}
  return config, paper_study, ids


# --- Overrides ----------------------------------------------------------------------------------

def test_parse_path():
  assert study.parse_path("students[*].noise.dropout_rate") == ["students", "*", "noise",
                                                               "dropout_rate"]
  assert study.parse_path("students[1].train") == ["students", 1, "train"]
  with pytest.raises(validate.ConfigError, match="is not a key"):
    study.parse_path("students.[0]")


def test_an_override_of_the_students_noise_leaves_the_teacher_alone():
  """demo.py hands one noise section to every stage; an override must not reach the others."""
  config = locked("demo")
  out = study.apply_overrides(config, {"students[*].noise.randaugment_magnitude": 0}, "v")
  assert [s.noise.randaugment_magnitude for s in out.students] == [0, 0]
  assert out.teacher.noise.randaugment_magnitude == out.baseline.noise.randaugment_magnitude == 5
  assert config.students[0].noise.randaugment_magnitude == 5  # the input is untouched
  assert pipeline.fingerprint(study.apply_overrides(config, {}, "v")) == \
      pipeline.fingerprint(config)


@pytest.mark.parametrize("path, message", [
    ("students[*].noise.randaugment_magnitud",
     "Variant 'typo', override 'students\\[\\*\\].noise.randaugment_magnitud': Unknown config key "
     "students\\[0\\].noise.randaugment_magnitud.*did you mean "
     "students\\[0\\].noise.randaugment_magnitude\\?"),
    ("teacher.trian.num_train_steps", "Unknown config key teacher.trian.*did you mean "
     "teacher.train\\?"),
    ("students[3].train.num_train_steps", "students has 1 entries, so students\\[3\\] does not"),
    ("seed.value", "seed is a value, not a section"),
])
def test_an_unknown_key_stops_the_study_before_any_compute(tmp_path, path, message):
  config = locked("smoke")
  bad = Study({"full": Variant("ok"), "typo": Variant("a typo", {path: 1})})

  def must_not_run(*args, **kwargs):
    raise AssertionError("computed before the overrides were checked")

  with pytest.raises(validate.ConfigError, match=message):
    study.run_study(config, bad, [0], str(tmp_path), run_fn=must_not_run)
  assert not os.path.exists(tmp_path / "stages") and not os.path.exists(tmp_path / "runs")


def test_a_claim_naming_no_row_is_refused(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("from nsjax.claims import Claim\nfrom nsjax.study import Study, Variant\n"
                  "def get_study(config):\n  return Study(variants={'full': Variant('x')}, "
                  "claims=(Claim('it helps', '-', 'full', 'fulll'),))\n")
  with pytest.raises(validate.ConfigError, match="names 'fulll', which is not a row of the study"):
    study.load_study(str(path), locked("smoke"))


def test_the_paper_claims_name_the_paper_rows(paper):
  _, paper_study, _ = paper
  assert len(paper_study.claims) == 9
  named = {n for c in paper_study.claims for n in (c.better, c.worse)}
  main = {v for v, variant in paper_study.variants.items() if variant.seeds is None}
  assert named == main | {"teacher", "baseline"}  # every variant run on all seeds is tested
  assert {c.worse for c in paper_study.claims if c.test == "non_inferiority"} == {
      "hard_labels", "iterations_1", "full", "baseline"}
  assert all(c.margin == 1.0 for c in paper_study.claims if c.test == "non_inferiority")


def test_the_investigation_runs_on_its_seeds_only(paper):
  config, paper_study, _ = paper
  runs = study.plan(config, paper_study, range(8), "/nonexistent")
  per_variant = {}
  for run in runs:
    per_variant.setdefault(run.variant, []).append(run.seed)
  assert per_variant["full"] == list(range(8))
  assert per_variant["soft_t2_1"] == [0, 1, 2, 3]
  assert len(runs) == 8 * 8 + 6 * 4


def test_unknown_studies_and_variants_are_named(tmp_path):
  config = locked("smoke")
  with pytest.raises(validate.ConfigError, match="no bundled study of that name.*paper, smoke"):
    study.load_study("papr", config)
  _, smoke = study.load_study("smoke", config)
  with pytest.raises(validate.ConfigError, match="unknown nope; this study has: full, student_lr"):
    study.plan(config, smoke, [0], str(tmp_path), variants=["nope"])


# --- Identities: what the paper study shares -----------------------------------------------------

def test_every_paper_variant_shares_the_seeds_teacher_and_baseline(paper):
  config, paper_study, ids = paper
  assert list(paper_study.variants) == PAPER_VARIANTS
  for name in ("teacher", "baseline", "eval-teacher", "eval-baseline"):
    assert len({ids[v][name] for v in ids}) == 1, name
  other_seed = study.stage_identities(study.variant_config(config, paper_study, "full", 1))
  assert not set(other_seed.values()) & set(ids["full"].values())


def test_student_settings_keep_the_pseudo_labels_labeling_settings_do_not(paper):
  _, _, ids = paper
  full = ids["full"]
  for v in ("no_noise", "hard_labels", "larger_student", "soft_t0.5_1", "soft_long_1"):
    assert ids[v]["label-1"] == full["label-1"], v
    assert ids[v]["student-1"] != full["student-1"], v
  for v in ("no_noise", "hard_labels", "larger_student"):
    assert ids[v]["label-2"] != full["label-2"], v  # labeled by another student-1
  for v in ("no_balance", "ood_soft", "soft_no_filter_1"):
    assert ids[v]["label-1"] != full["label-1"], v
  assert ids["ood_hard"]["label-1"] == ids["ood_soft"]["label-1"]
  assert ids["ood_hard"]["student-1"] != ids["ood_soft"]["student-1"]


def test_one_iteration_variants_reuse_the_first_students(paper):
  _, _, ids = paper
  assert ids["iterations_1"].items() <= ids["full"].items()
  assert ids["hard_1"].items() <= ids["hard_labels"].items()


def test_the_full_variant_is_the_demo_itself(paper):
  """Its rows are the demo's own runs: the same models, with the corruption suite left out."""
  config, paper_study, ids = paper
  demo = dict(study.stage_identities(study.variant_config(config, Study({"d": Variant("")}),
                                                          "d", 0)))
  for stage in ("teacher", "label-1", "student-1", "label-2", "student-2", "baseline"):
    assert ids["full"][stage] == demo[stage], stage
  assert [s.train.num_train_steps for s in config.students] == [600, 600]


def test_the_paper_study_trains_19_students_at_seeds_0_to_3(paper):
  """The cost estimate in docs/study.md counts on this (seeds 4-7: the first 14)."""
  _, _, ids = paper
  kinds = {}
  for identity in {i for v in ids.values() for i in v.values()}:
    kind = identity.split("-")[0]
    kinds[kind] = kinds.get(kind, 0) + 1
  assert kinds == {"teacher": 1, "baseline": 1, "student": 19, "label": 11, "eval": 21}
  larger = {ids["larger_student"]["student-1"], ids["larger_student"]["student-2"]}
  assert len(larger) == 2


def test_a_teacher_change_changes_every_identity_after_it():
  config = locked("smoke")
  base = study.stage_identities(config)
  changed = study.stage_identities(study.apply_overrides(
      config, {"teacher.train.num_train_steps": 13}, "v"))
  assert set(base) == set(changed) and not set(base.values()) & set(changed.values())
  eval_only = study.stage_identities(study.apply_overrides(config, {"eval.severities": [1]}, "v"))
  assert {k for k in base if base[k] != eval_only[k]} == {"eval-teacher", "eval-student-1"}


def test_a_job_waits_for_a_shared_stage_another_job_holds(tmp_path, monkeypatch):
  monkeypatch.setattr(study, "WAIT_SECONDS", 0.05)
  folder = str(tmp_path / "lock")
  os.makedirs(folder)
  order = []
  with workdir_lock.hold(folder, "the other job"):
    def second_job():
      with study._lock(folder, "shared stage x", wait=True):
        order.append("second job computes")
    thread = threading.Thread(target=second_job)
    thread.start()
    time.sleep(0.3)
    order.append("first job done")
  thread.join(10)
  assert order == ["first job done", "second job computes"]
  with workdir_lock.hold(folder, "the other job"):
    with pytest.raises(workdir_lock.WorkdirBusy):
      with study._lock(folder, "a run", wait=False):
        pass


def test_jobs_build_the_datasets_one_at_a_time_and_once(tmp_path, monkeypatch):
  """Two jobs started together used to build mnist5k into one folder at once (the second failed
  to move its copy into place): the builds hold a study-wide lock."""
  monkeypatch.setattr(study, "WAIT_SECONDS", 0.05)
  built = []
  monkeypatch.setattr(pipeline, "prepare_data",
                      lambda config, workdir: built.append(config.data.unlabeled.name))
  config = locked("smoke")
  _, smoke = study.load_study("smoke", config)
  runs = study.plan(config, smoke, [0, 1], str(tmp_path))
  folder = str(tmp_path / "locks" / "datasets")
  os.makedirs(folder)
  with workdir_lock.hold(folder, "the other job"):
    thread = threading.Thread(target=study.prepare_datasets, args=(runs, str(tmp_path)))
    thread.start()
    time.sleep(0.3)
    assert built == []  # waits for the other job's builds
  thread.join(10)
  assert len(runs) == 6 and built == ["mnist5k/labels_10"]  # one data config: built once


# --- The smoke study, end to end ------------------------------------------------------------------

class Calls:
  """pipeline.run, counting (variant, stage) calls; `fail_at` raises KeyboardInterrupt (a kill)
  instead of running that stage."""

  def __init__(self, fail_at=None):
    self.calls, self.fail_at = [], fail_at

  def __call__(self, config, run_dir, stage):
    key = (run_dir.split(os.sep)[-2], stage)
    if key == self.fail_at:
      raise KeyboardInterrupt("simulated kill")
    self.calls.append(key)
    return pipeline.run(config, run_dir, stage=stage)


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
  """The smoke study, killed once (at student_lr's student), then rerun to the end."""
  workdir = str(tmp_path_factory.mktemp("study"))
  config = locked("smoke")
  _, smoke = study.load_study("smoke", config)
  killed = Calls(fail_at=("student_lr", "student-1"))
  with pytest.raises(KeyboardInterrupt):
    study.run_study(config, smoke, [0], workdir, name="smoke", run_fn=killed)
  resumed = Calls()
  results = study.run_study(config, smoke, [0], workdir, name="smoke", run_fn=resumed)
  return config, smoke, workdir, killed.calls, resumed.calls, results


def test_shared_stages_run_once(smoke_study):
  _, _, workdir, killed, resumed, _ = smoke_study
  calls = killed + resumed
  assert len(calls) == len(set(calls))
  ran = lambda stage: sorted(v for v, s in calls if s == stage)
  # The student change reuses the teacher and its pseudo labels; the teacher change redoes all.
  assert ran("teacher") == ran("label-1") == ran("eval-teacher") == ["full", "teacher_steps"]
  assert ran("student-1") == ran("eval-student-1") == ["full", "student_lr", "teacher_steps"]
  assert ran("summary") == ["full", "student_lr", "teacher_steps"]
  runs = os.path.join(workdir, "runs")
  target = lambda v, s: os.path.realpath(os.path.join(runs, v, "seed-0", s))
  assert target("student_lr", "teacher") == target("full", "teacher")
  assert target("student_lr", "label-1") == target("full", "label-1")
  assert target("teacher_steps", "teacher") != target("full", "teacher")
  assert target("student_lr", "student-1") != target("full", "student-1")
  assert len(os.listdir(os.path.join(workdir, "stages"))) == 5 + 2 + 5  # models, labels, evals
  state = json.load(open(os.path.join(runs, "student_lr", "seed-0", "state.json")))
  assert sorted(state["completed"]) == sorted(s.name for s in pipeline.schedule(
      study.variant_config(smoke_study[0], smoke_study[1], "student_lr", 0)))


def test_the_kill_lost_nothing_finished(smoke_study):
  _, _, _, killed, resumed, _ = smoke_study
  assert ("student_lr", "student-1") not in killed and ("student_lr", "student-1") in resumed
  assert not {("full", s) for s in ("teacher", "label-1", "student-1")} & set(resumed)


def test_the_report(smoke_study):
  _, _, workdir, _, _, results = smoke_study
  on_disk = json.load(open(os.path.join(workdir, "study.json")))
  assert on_disk == json.loads(json.dumps(results))
  assert set(results["variants"]) == {"full", "student_lr", "teacher_steps"}
  for entry in [*results["variants"].values(), results["teacher"], results["baseline"]]:
    assert set(entry) == {"top1", "mean", "std", "train_seed", "top1_per_image", "num_examples",
                          "params_sha256"}
  for entry in [*results["variants"].values(), results["teacher"]]:
    assert list(entry["top1"]) == ["0"] and 0 <= entry["mean"] <= 100 and entry["std"] == 0.0
    hits = metrics.unpack_hits(entry["top1_per_image"]["0"], entry["num_examples"]["0"])
    assert 100 * hits.mean() == pytest.approx(entry["top1"]["0"])  # which images, not only how many
  assert results["baseline"]["top1"] == {} and results["baseline"]["mean"] is None  # no baseline
  # The seeds that reached each model, and its parameters: the teacher and a student differ.
  assert results["teacher"]["train_seed"] == {"0": 0}
  assert results["variants"]["full"]["train_seed"] == {"0": 1}
  teacher_hash = results["teacher"]["params_sha256"]["0"]
  assert len(teacher_hash) == 64 and teacher_hash != results["variants"]["full"]["params_sha256"]["0"]
  meta = results["study"]
  assert meta["cpu"] == cpu_features.describe() and meta["cpu_threads"] == cpu_features.threads()
  assert meta["product_dtype"] in ("float32", "bfloat16")
  assert meta["seeds_from_mixed_machines"] == {}
  assert meta["student_steps"] == {"full": [12], "student_lr": [12], "teacher_steps": [12]}
  summary = json.load(open(os.path.join(workdir, "runs", "full", "seed-0", "summary.json")))
  assert results["variants"]["full"]["mean"] == pytest.approx(
      100 * summary["iterations"][-1]["test_top1"])
  table = open(os.path.join(workdir, "study.md")).read()
  assert "| student_lr | students only: another learning rate |" in table
  assert "| teacher | the reference's teacher |" in table
  assert "| baseline |" not in table  # the smoke schedule has none
  assert os.path.getsize(os.path.join(workdir, "study.png")) > 1000
  (claim,) = results["claims"]  # configs/studies/smoke.py's one claim, one seed: not judged
  assert (claim["better"], claim["worse"], claim["verdict"]) == ("full", "teacher", "one seed")
  assert claim["test"] == "superiority" and claim["ci95"] is None
  assert claim["verdict_corrected"] == "one seed"
  assert claim["diff_mean"] == pytest.approx(results["variants"]["full"]["mean"]
                                             - results["teacher"]["mean"])
  assert "| the smoke student beats its teacher | - | full " in table


def test_a_rerun_computes_nothing(smoke_study):
  config, smoke, workdir, _, _, results = smoke_study
  rerun = Calls()
  again = study.run_study(config, smoke, [0], workdir, name="smoke", run_fn=rerun)
  assert rerun.calls == [] and again == results


def test_a_run_killed_before_its_record_is_adopted_without_compute(smoke_study, tmp_path):
  """Killed after the pipeline recorded the stage in the run's state but before the shared record
  was written: the rerun writes the record from the run's state instead of training again."""
  config, smoke, workdir, _, _, _ = smoke_study
  run = study.plan(config, smoke, [0], workdir, variants=["full"])[0]
  record = os.path.join(study.shared_dir(workdir, run.identities["student-1"]), study.RECORD_FILE)
  before = json.load(open(record))
  os.remove(record)
  rerun = Calls()
  study.run_one(run, workdir, rerun)
  assert rerun.calls == [] and json.load(open(record)) == before


def test_the_dry_run_plan(smoke_study):
  config, smoke, workdir, _, _, _ = smoke_study
  elsewhere = workdir + "-fresh"
  fresh = study.describe_plan(study.plan(config, smoke, [0], elsewhere), elsewhere).splitlines()
  assert fresh[0].startswith("full seed 0: computes teacher, label-1, student-1")
  assert fresh[1].startswith("student_lr seed 0: computes student-1, eval-student-1; shares "
                             "teacher, label-1, eval-teacher")
  assert fresh[-1] == "stages to compute: 5 eval, 2 label, 3 student, 2 teacher"
  done = study.describe_plan(study.plan(config, smoke, [0], workdir), workdir).splitlines()
  assert all(" computes nothing; " in line for line in done[:-1])
  assert done[-1] == "stages to compute: none"


def test_the_command_line_refuses_a_typo_with_exit_2_before_any_compute(tmp_path):
  typo = tmp_path / "typo.py"
  typo.write_text("from nsjax.study import Study, Variant\n"
                  "def get_study(config):\n"
                  "  return Study({'full': Variant('ok'),\n"
                  "                'bad': Variant('typo', {'balance.num_image_per_clas': 1})})\n")
  workdir = tmp_path / "study"
  done = subprocess.run([sys.executable, "-m", "nsjax.study", "--config=smoke", f"--study={typo}",
                         "--seeds=0,1", f"--workdir={workdir}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=900)  # ~10 s of CPU; minutes on a crowded machine
  assert done.returncode == 2, done.stderr[-2000:]
  assert ("Config error: Variant 'bad', override 'balance.num_image_per_clas': Unknown config key "
          "balance.num_image_per_clas") in done.stderr
  assert "did you mean balance.num_image_per_class?" in done.stderr
  assert "Traceback" not in done.stderr
  assert not (workdir / "stages").exists() and not (workdir / "tensorflow_datasets").exists()
