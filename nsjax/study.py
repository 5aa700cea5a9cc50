"""Ablation studies: named variants of one schedule, for several seeds, sharing identical stages.

  python -m nsjax.study --config=configs/demo.py --study=paper --seeds=0,1,2 --workdir=DIR
  python -m nsjax.study ... --variants=no_noise,hard_labels   # some variants (e.g. one job each)
  python -m nsjax.study ... --dry_run      # the stages each variant computes or shares; no compute
  python -m nsjax.study ... --report_only  # study.json / study.md / study.png from what is done

A study file (`configs/studies/<name>.py`, or any file passed as --study=path/to/file.py) defines
`get_study(config) -> Study`: the variants, each a set of overrides of the --config schedule
(docs/study.md shows one). Overrides name config keys by path, `students[*]` meaning every student:

  Variant("no RandAugment on the students", {"students[*].noise.randaugment_magnitude": 0})

Sharing: every stage of every (variant, seed) gets an identity, the hash of what the stage reads --
its own resolved config section, the config sections it reads (data, label, balance, eval, seed)
and the identities of the stages whose artifacts it consumes (`stage_identities`). A stage lives
once, in DIR/stages/<kind>-<identity>/, and each (variant, seed) run is a workdir of the pipeline,
DIR/runs/<variant>/seed-<seed>/, whose stage folders are links to those shared folders. So a
variant that only changes the students reuses the seed's teacher, and its pseudo labels when the
labeling is the same; a change to the teacher changes every identity downstream of it.

Each stage runs through `pipeline.run(config, run_dir, stage=name)`, so the pipeline's resume logic
applies unchanged: a killed study, rerun, skips every finished stage and resumes the interrupted one
from its checkpoints or shards (they are in the shared folder). A finished stage is recorded in its
shared folder (stage.json, written atomically) and copied into each run's state.json. Separate jobs
may run different variants at once: a shared stage is computed by one of them while the others
wait for it (DIR/locks/). A variant whose overrides name a key nsjax does not read stops the whole
study before any compute, naming the variant, the override and the key.

Outputs (DIR/): study.json {"variants": {name: {"top1": {seed: %}, "mean", "std"}}, "teacher",
"baseline", "study"}; study.md (a Markdown table); study.png (per variant mean +- std of the final
model's test top-1 and one dot per seed; teacher and supervised baseline as reference lines). The
teacher and baseline come from the study's first variant, the reference (the full recipe). std is
the sample standard deviation over seeds (0 for one seed).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import time
from typing import Any, Callable, Mapping, Sequence

if __name__ == "__main__":  # the program: malloc's huge pages before the heavy imports below
  from nsjax import command as _command
  _command.start_again_with_huge_pages()

import ml_collections
import numpy as np
from absl import logging

from nsjax import claims as claims_lib
from nsjax import cli, command, pipeline, report, validate, workdir_lock
from nsjax.files import atomic_write_json, atomic_write_text, read_json
from nsjax.run_state import RunState
from nsjax.stages import summary as summary_stage

RECORD_FILE = "stage.json"  # in a shared stage folder: the stage's result, once it is complete
RESULTS_JSON, RESULTS_TABLE, RESULTS_PLOT = "study.json", "study.md", "study.png"
WAIT_SECONDS = 5.0  # how often a job waiting for a shared stage looks again


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of a study: what it tests, and its overrides of the schedule ({path: value})."""
  about: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # Only these of the study's seeds (None: all), e.g. for a side question that needs fewer.
  seeds: Sequence[int] | None = None


def variant_seeds(study: "Study", name: str, seeds: Sequence[int]) -> list[int]:
  """The study's `seeds` that variant `name` runs for."""
  only = study.variants[name].seeds
  return [int(s) for s in seeds if only is None or int(s) in {int(o) for o in only}]


@dataclasses.dataclass(frozen=True)
class Study:
  """`variants` in table order, the first being the reference (the full recipe); `common`
  overrides apply to every variant before its own (e.g. shorter students, for the whole study)."""
  variants: Mapping[str, Variant]
  common: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  about: str = ""
  # What the study tests: each claim says one row should beat another, or not fall more than a
  # margin below it (nsjax.claims); the report says what the seeds show.
  claims: Sequence[claims_lib.Claim] = ()
  # Points of top-1: an undecided superiority claim whose interval lies inside +-this is reported
  # as "no effect larger than this".
  smallest_effect: float = claims_lib.SMALLEST_EFFECT


# ------------------------------------------------------------------------------------------------
# Study files and overrides.

def study_dirs() -> tuple[pathlib.Path, ...]:
  """Where `--study=NAME` is looked up: the studies/ folder beside the bundled configs."""
  return tuple(d / "studies" for d in cli.CONFIG_DIRS)


def load_study(spec: str, config) -> tuple[str, Study]:
  """(name, Study) from a study file's path or a bundled study's name ("paper")."""
  path = pathlib.Path(spec).expanduser()
  if not path.is_file():
    bundled = {p.stem: p for d in reversed(study_dirs()) if d.is_dir() for p in d.glob("*.py")
               if not p.name.startswith("_")}
    if pathlib.Path(spec).stem not in bundled:
      raise validate.ConfigError(
          f"--study={spec}: no file {spec!r} and no bundled study of that name. Pass a study "
          f"file's path or one of: {', '.join(sorted(bundled)) or '(none)'}.")
    path = bundled[pathlib.Path(spec).stem]
  module_spec = importlib.util.spec_from_file_location(f"nsjax_study_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_study"):
    raise validate.ConfigError(f"The study file {path} defines no get_study(config) -> Study.")
  study = module.get_study(_copy(config))
  if not isinstance(study, Study) or not study.variants:
    raise validate.ConfigError(f"get_study() in {path} must return a Study with at least one "
                               "variant (nsjax.study.Study).")
  rows = set(study.variants) | set(claims_lib.REFERENCE_ROWS)
  for claim in study.claims:
    unknown = [n for n in (claim.better, claim.worse) if n not in rows]
    if unknown:
      raise validate.ConfigError(
          f"{path}: the claim {claim.text!r} names {', '.join(map(repr, unknown))}, which is not "
          f"a row of the study; use a variant ({', '.join(study.variants)}) or teacher / baseline.")
  for name in study.variants:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
      raise validate.ConfigError(f"Variant name {name!r} in {path}: use letters, digits, '_', '.' "
                                 "and '-' (it names a folder).")
  return path.stem, study


def _copy(config) -> ml_collections.ConfigDict:
  """An unlocked deep copy that shares no section between two places (configs often pass one noise
  section to several stages: an override of students[*].noise must not reach the teacher's)."""
  return _tree(config)


def _tree(value):
  """`value` rebuilt: every dict a new ConfigDict (in lists too, where ConfigDict leaves dicts)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return ml_collections.ConfigDict({k: _tree(v) for k, v in value.items()}, type_safe=False)
  if isinstance(value, (list, tuple)):
    return type(value)(_tree(v) for v in value)
  return value


_PART = re.compile(r"([A-Za-z_]\w*)((?:\[(?:\*|-?\d+)\])*)")


def parse_path(path: str) -> list[str | int]:
  """"students[*].noise.dropout_rate" -> ["students", "*", "noise", "dropout_rate"]."""
  tokens: list[str | int] = []
  for part in path.split("."):
    match = _PART.fullmatch(part)
    if not match:
      raise validate.ConfigError(f"Override path {path!r}: {part!r} is not a key (name, name[i] or "
                                 "name[*]).")
    tokens.append(match.group(1))
    tokens += [i if i == "*" else int(i) for i in re.findall(r"\[(\*|-?\d+)\]", match.group(2))]
  return tokens


def _set(node, tokens: Sequence[str | int], value, path: str, where: str) -> None:
  head, rest = tokens[0], tokens[1:]
  if isinstance(head, str) and head != "*":
    if not hasattr(node, "keys"):
      raise validate.ConfigError(f"Override {path!r}: {where or 'the config'} is a value, not a "
                                 f"section, so it has no key {head!r}.")
    if not rest:
      node[head] = _tree(value)
      return
    if head not in node:  # let check_keys name it (with the nearest accepted key)
      node[head] = ml_collections.ConfigDict(type_safe=False)
    _set(node[head], rest, value, path, f"{where}.{head}" if where else head)
    return
  if not isinstance(node, (list, tuple)):
    raise validate.ConfigError(f"Override {path!r}: {where} is not a list, so [{head}] names "
                               "nothing.")
  indices = range(len(node)) if head == "*" else [head]
  for i in indices:
    if not -len(node) <= i < len(node):
      raise validate.ConfigError(f"Override {path!r}: {where} has {len(node)} entries, so "
                                 f"{where}[{i}] does not exist.")
    if rest:
      _set(node[i], rest, value, path, f"{where}[{i}]")
    else:
      node[i] = _tree(value)


def apply_overrides(config, overrides: Mapping[str, Any], what: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` applied, one by one, each checked by validate.check_keys
  (a key nsjax does not read stops here, naming `what`, the override and the key)."""
  out = _copy(config)
  for path, value in overrides.items():
    try:
      _set(out, parse_path(path), value, path, "")
      validate.check_keys(out)
    except validate.ConfigError as error:
      raise validate.ConfigError(f"{what}, override {path!r}: {error}") from None
  return out


def variant_config(config, study: Study, name: str, seed: int) -> ml_collections.ConfigDict:
  """The schedule of one (variant, seed): --config, then the study's common overrides, then the
  variant's, then config.seed."""
  out = apply_overrides(config, study.common, "The study's common overrides")
  out = apply_overrides(out, study.variants[name].overrides, f"Variant {name!r}")
  out.seed = int(seed)
  return out


# ------------------------------------------------------------------------------------------------
# Stage identities.

def _plain(value):
  """Plain dicts and lists all the way down (what identities hash)."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def _digest(parts: dict[str, Any]) -> str:
  text = json.dumps(_plain(parts), sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_identities(config) -> dict[str, str]:
  """{stage name: "<kind>-<hash>"} for every stage of the schedule but the summary (each run writes
  its own). The hash covers what the stage reads: a model stage its own config section (a student's
  without `finetune`, which is its fine-tuning stage's), the labeled and test data (`data` without
  `unlabeled`), eval.batch_size (its in-training evaluation) and the seed; a student also the
  identity of its teacher's final export and of its pseudo labels (an online student the unlabeled
  data instead); a label stage its teacher, the unlabeled data, `label`, `balance` and the seed; an
  eval stage its model's final export, the test data, `eval` and the seed."""
  seed = int(config.seed)
  data = {k: v for k, v in config.data.items() if k != "unlabeled"}
  unlabeled = dict(config.data.unlabeled, small_image=config.data.small_image,
                   num_classes=config.data.num_classes)
  ids: dict[str, str] = {}
  final: dict[str, str] = {}  # model stage -> identity of its final export
  for s in pipeline.schedule(config):
    previous = "teacher" if s.iteration == 1 else f"student-{s.iteration - 1}"
    parts: dict[str, Any] = {"kind": s.kind, "seed": seed}
    if s.kind in ("teacher", "student", "baseline"):
      section = {k: v for k, v in pipeline.stage_config(s, config).items() if k != "finetune"}
      parts.update(stage=section, data=data, eval_batch_size=config.eval.batch_size)
      if s.kind == "student":
        parts.update(teacher=final[previous], labels=ids.get(f"label-{s.iteration}"))
        if section.get("online_teacher"):
          parts["unlabeled"] = unlabeled
    elif s.kind == "label":
      parts.update(teacher=final[previous], unlabeled=unlabeled, label=config.label,
                   balance=config.balance)
    elif s.kind == "finetune":
      parts.update(student=ids[f"student-{s.iteration}"], data=data,
                   finetune=pipeline.stage_config(s, config).finetune)
    elif s.kind == "eval":
      parts.update(model=final[s.name[len("eval-"):]], data=data, eval=config.eval)
    else:
      continue
    ids[s.name] = f"{s.kind}-{_digest(parts)}"
    if s.kind in ("teacher", "student", "baseline"):
      final[s.name] = ids[s.name]
    elif s.kind == "finetune":
      final[f"student-{s.iteration}"] = ids[s.name]
  return ids


# ------------------------------------------------------------------------------------------------
# Planning.

@dataclasses.dataclass
class Run:
  """One (variant, seed): its schedule, its run folder and its stages' identities."""
  variant: str
  seed: int
  config: ml_collections.ConfigDict
  run_dir: str
  identities: dict[str, str]


def plan(config, study: Study, seeds: Sequence[int], workdir: str,
         variants: Sequence[str] | None = None) -> list[Run]:
  """Every (variant, seed) of the study, each checked (keys, then the whole schedule) before any
  compute. `variants`: a subset by name (default: all)."""
  chosen = list(variants or study.variants)
  unknown = [v for v in chosen if v not in study.variants]
  if unknown:
    raise validate.ConfigError(f"--variants: unknown {', '.join(unknown)}; this study has: "
                               f"{', '.join(study.variants)}.")
  validate.check_keys(config)
  runs = []
  for name in chosen:
    for seed in variant_seeds(study, name, seeds):
      cfg = variant_config(config, study, name, seed)
      identities = stage_identities(cfg)  # before data_dir: where the data is cached is no identity
      if not cfg.data.get("data_dir"):  # one copy of mnist5k & co for the whole study
        cfg.data.data_dir = os.path.join(workdir, "tensorflow_datasets")
      runs.append(Run(name, int(seed), cfg, os.path.join(workdir, "runs", name, f"seed-{seed}"),
                      identities))
  checked = set()
  for run in runs:  # once per variant: seeds change nothing validation looks at
    if run.variant not in checked and run.config.data.num_classes:  # (0: the pipeline checks
      checked.add(run.variant)                                      # once the data tells)
      try:
        validate.validate_config(run.config, run.run_dir)
      except validate.ConfigError as error:
        raise validate.ConfigError(f"Variant {run.variant!r}: {error}") from None
  return runs


def shared_dir(workdir: str, identity: str) -> str:
  return os.path.join(workdir, "stages", identity)


def describe_plan(runs: Sequence[Run], workdir: str) -> str:
  """Per run, the stages it computes first and those it shares with an earlier run or finds done."""
  seen: set[str] = set()
  lines, counts = [], {}
  for run in runs:
    new, shared = [], []
    for name, identity in run.identities.items():
      done = _read_record(shared_dir(workdir, identity)) is not None
      (shared if identity in seen or done else new).append(name)
      if identity not in seen and not done:
        kind = identity.split("-")[0]
        counts[kind] = counts.get(kind, 0) + 1
      seen.add(identity)
    lines.append(f"{run.variant} seed {run.seed}: computes {', '.join(new) or 'nothing'}; "
                 f"shares {', '.join(shared) or 'nothing'}")
  lines.append("stages to compute: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                                        or "none"))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Running.

def run_study(config, study: Study, seeds: Sequence[int], workdir: str,
              variants: Sequence[str] | None = None, name: str = "study",
              run_fn: Callable[..., Any] = pipeline.run, wait: bool = True) -> dict[str, Any]:
  """Runs every (variant, seed) not yet done, one after another, then writes the report; returns
  study.json's content. `run_fn` is pipeline.run (tests spy on it)."""
  if "://" in workdir:
    raise validate.ConfigError(f"--workdir={workdir}: a study links its runs' stage folders to "
                               "shared ones, which needs a local or mounted filesystem.")
  validate.check_workdir(workdir)
  runs = plan(config, study, seeds, workdir, variants)
  prepare_datasets(runs, workdir)
  for run in runs:
    logging.info("Study %s: variant %s, seed %d.", name, run.variant, run.seed)
    run_one(run, workdir, run_fn, wait)
  return write_report(config, study, seeds, workdir, name)


def prepare_datasets(runs: Sequence[Run], workdir: str) -> None:
  """Builds the embedded datasets every run reads, once each, holding a study-wide lock: jobs
  started together would otherwise build one dataset into the same folder at once, and all but
  the first would fail to move their copy into place."""
  with _lock(os.path.join(workdir, "locks", "datasets"), "the study's datasets", wait=True):
    seen = set()
    for run in runs:
      sources = _digest({"data": run.config.data})
      if sources not in seen:
        seen.add(sources)
        pipeline.prepare_data(run.config, workdir)


def run_one(run: Run, workdir: str, run_fn: Callable[..., Any] = pipeline.run,
            wait: bool = True) -> None:
  """One (variant, seed), stage by stage: a shared stage already complete is copied into the run's
  state; any other runs in the run folder (its folder a link to the shared one), holding the
  shared stage's lock, and is then recorded as complete."""
  os.makedirs(run.run_dir, exist_ok=True)
  lock_dir = os.path.join(workdir, "locks", "runs", run.variant, f"seed-{run.seed}")
  with _lock(lock_dir, f"study run {run.variant} seed {run.seed}", wait=False):
    state = _run_state(run)
    for s in pipeline.schedule(run.config):
      if s.kind == "summary":
        continue
      if _adopt(run, s, workdir, state):
        continue
      identity = run.identities[s.name]
      with _lock(os.path.join(workdir, "locks", identity), f"shared stage {identity}", wait):
        state = _run_state(run)  # another job may have finished it while we waited
        if _adopt(run, s, workdir, state):
          continue
        _prepare_stage(run, s, workdir, state)
        run_fn(run.config, run.run_dir, stage=s.name)
        state = _run_state(run)
        _write_record(run, s, workdir, state.result(s.name))
    if not state.done("summary"):
      run_fn(run.config, run.run_dir, stage="summary")


def _run_state(run: Run) -> RunState:
  """The run folder's state; a folder left by an earlier version of the variant (another config)
  starts over: its stages live in the shared folders, so nothing is lost."""
  fingerprint = pipeline.fingerprint(run.config)
  try:
    return RunState(run.run_dir, fingerprint)
  except ValueError:
    logging.info("Variant %s seed %d changed since its last run: its run folder %s is rebuilt "
                 "from the shared stages.", run.variant, run.seed, run.run_dir)
    os.remove(os.path.join(run.run_dir, "state.json"))
    return RunState(run.run_dir, fingerprint)


def _read_record(folder: str) -> dict[str, Any] | None:
  path = os.path.join(folder, RECORD_FILE)
  return read_json(path) if os.path.exists(path) else None


def _write_record(run: Run, s, workdir: str, result: dict[str, Any]) -> None:
  folder = shared_dir(workdir, run.identities[s.name])
  os.makedirs(folder, exist_ok=True)
  atomic_write_json(os.path.join(folder, RECORD_FILE), {
      "stage": s.name, "kind": s.kind, "identity": run.identities[s.name], "result": result,
      "first_run": {"variant": run.variant, "seed": run.seed},
      "environment": summary_stage.environment(run.config)})


def _adopt(run: Run, s, workdir: str, state: RunState) -> bool:
  """Whether stage `s` is complete for this run: recorded in its shared folder (then copied into
  the run's state, and an eval's result into the run's eval/ folder), or recorded in the run's
  state with its shared folder present (a study killed between the two records: recorded now)."""
  folder = shared_dir(workdir, run.identities[s.name])
  record = _read_record(folder)
  if record is not None:
    if not state.done(s.name):
      state.mark_done(s.name, record["result"])
    if s.kind == "eval":
      path = os.path.join(run.run_dir, "eval", s.name[len("eval-"):] + ".json")
      if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write_json(path, {k: v for k, v in record["result"].items() if k != "seconds"})
    _link(run, s, workdir)
    return True
  if state.done(s.name) and (s.kind == "eval" or os.path.isdir(folder)):
    _write_record(run, s, workdir, state.result(s.name))
    _link(run, s, workdir)
    return True
  return False


def _prepare_stage(run: Run, s, workdir: str, state: RunState) -> None:
  """Before a stage runs: its shared folder exists and the run's folder links to it; a stage the
  run's state calls done whose shared folder was deleted (the way to redo a stage) is forgotten."""
  if state.done(s.name):
    del state.data["completed"][s.name]
    atomic_write_json(state.path, state.data)
  _link(run, s, workdir)


def _link(run: Run, s, workdir: str) -> None:
  """run_dir/<stage> -> ../../../stages/<identity> (relative: the study folder can move)."""
  if s.kind == "eval":
    return
  target = shared_dir(workdir, run.identities[s.name])
  os.makedirs(target, exist_ok=True)
  link = os.path.join(run.run_dir, s.name)
  relative = os.path.relpath(target, run.run_dir)
  if os.path.islink(link) and os.readlink(link) == relative:
    return
  if os.path.exists(link) and not os.path.islink(link):
    raise validate.ConfigError(
        f"{link} is a folder, not a link to the study's shared stage {target}: a study's run "
        "folders hold only links (was a pipeline run started there?). Move it away and rerun.")
  tmp = f"{link}.tmp-{os.getpid()}"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(relative, tmp)
  os.replace(tmp, link)


@contextlib.contextmanager
def _lock(folder: str, what: str, wait: bool):
  """workdir_lock.hold on `folder`; when another job holds it and `wait`, waits for it."""
  os.makedirs(folder, exist_ok=True)
  announced = False
  with contextlib.ExitStack() as stack:
    while True:
      try:
        stack.enter_context(workdir_lock.hold(folder, what))
        break
      except workdir_lock.WorkdirBusy as error:
        if not wait:
          raise
        if not announced:
          logging.info("Waiting for another job that computes the %s: %s", what, error)
          announced = True
        time.sleep(WAIT_SECONDS)
    yield


# ------------------------------------------------------------------------------------------------
# Report.

ROW_DETAILS = ("top1_per_image", "num_examples", "params_sha256")


def _stats(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """A row of study.json: top1 {seed: %}, mean, std, and per seed what its model is (the seed
  that reached its initialisation, data order and noise; its parameters' hash) and which test
  images it got right."""
  top1 = {s: e["top1"] for s, e in per_seed.items()}
  values = np.array(list(top1.values()), dtype=float)
  out = {"top1": top1,
         "mean": float(values.mean()) if len(values) else None,
         "std": float(values.std(ddof=1)) if len(values) > 1 else (0.0 if len(values) else None),
         "train_seed": {s: e["train_seed"] for s, e in per_seed.items()}}
  for key in ROW_DETAILS:
    out[key] = {s: e[key] for s, e in per_seed.items() if e.get(key) is not None}
  return out


def _train_seed(cfg, stage: str) -> int:
  """The seed a model stage's initialisation, data order and noise are drawn from
  (stages.train.train_config)."""
  section = cfg.teacher if stage == "teacher" else cfg.baseline if stage == "baseline" else \
      cfg.students[int(stage.split("-")[1]) - 1]
  return int(cfg.seed) * 1000 + int(section.seed_offset)


def _environment_key(record: dict[str, Any]) -> str:
  """The machine a stage ran on, as text ("unknown" for records written before environments
  were recorded): two stages of one seed must agree on it for their difference to be paired."""
  return json.dumps(record.get("environment", "unknown"), sort_keys=True)


def _shared_value(environments: Sequence[dict[str, Any]], key: str) -> Any:
  """What every environment has for `key`, else the list of the different values."""
  values = [e[key] for e in environments if isinstance(e, dict)]
  unique = [v for i, v in enumerate(values) if v not in values[:i]]
  return unique[0] if len(unique) == 1 else unique


def collect(config, study: Study, seeds: Sequence[int], workdir: str,
            name: str = "study") -> dict[str, Any]:
  """study.json's content from the shared records: each variant's final model (its last student),
  the reference variant's teacher and baseline; test top-1 in percent, per seed, mean and std;
  the claims. Seeds not complete yet are left out (and listed under study.missing); a seed whose
  stages ran on different machines (CPU, threads or product dtype) is left out of the claims."""
  rows: dict[str, dict[str, dict]] = {v: {} for v in [*study.variants, "teacher", "baseline"]}
  environments: dict[str, set[str]] = {str(s): set() for s in seeds}
  missing, student_steps = [], {}
  reference = next(iter(study.variants))
  for variant in study.variants:
    for seed in variant_seeds(study, variant, seeds):
      cfg = variant_config(config, study, variant, seed)
      student_steps[variant] = [int(s.train.num_train_steps) for s in cfg.students]
      ids = stage_identities(cfg)
      final = f"student-{len(cfg.students)}"
      wanted = {variant: final}
      if variant == reference:
        wanted.update(teacher="teacher", baseline="baseline")
      for stage, identity in ids.items():
        record = _read_record(shared_dir(workdir, identity))
        if record is not None:
          environments[str(seed)].add(_environment_key(record))
      for key, model in wanted.items():
        if f"eval-{model}" not in ids:
          continue  # (a schedule without a baseline has no row)
        record = _read_record(shared_dir(workdir, ids[f"eval-{model}"]))
        if record is None:
          missing.append(f"{variant} seed {seed} eval-{model}")
          continue
        result = record["result"]
        rows[key][str(seed)] = {"top1": 100.0 * float(result["top1"]),
                                "train_seed": _train_seed(cfg, model),
                                **{k: result.get(k) for k in ROW_DETAILS}}
  mixed = {s: [json.loads(e) for e in sorted(envs)] for s, envs in environments.items()
           if len(envs) > 1}
  results = {"variants": {v: _stats(rows[v]) for v in study.variants},
             "teacher": _stats(rows["teacher"]), "baseline": _stats(rows["baseline"])}
  checked = claims_lib.check_all(results, study.claims, study.smallest_effect, excluded=mixed)
  used = [json.loads(e) for e in sorted(set().union(*environments.values()))]
  return {**results, "claims": checked,
          "study": {"name": name, "description": study.about,
                    "seeds": [int(s) for s in seeds], "reference": reference,
                    "about": {v: study.variants[v].about for v in study.variants},
                    "top1_unit": "percent", "std": "sample standard deviation over seeds",
                    "smallest_effect": study.smallest_effect,
                    "cpu": _shared_value(used, "cpu"),
                    "cpu_threads": _shared_value(used, "cpu_threads"),
                    "product_dtype": _shared_value(used, "product_dtype"),
                    "environment_per_seed": {s: [json.loads(e) for e in sorted(envs)]
                                             for s, envs in environments.items()},
                    "seeds_from_mixed_machines": mixed,
                    "student_steps": student_steps, "missing": missing}}


def _fmt(entry: dict[str, Any]) -> str:
  if entry["mean"] is None:
    return "not run yet"
  return f"{entry['mean']:.1f} +- {entry['std']:.1f}"


def _missing_by_variant(missing: Sequence[str]) -> str:
  """["full seed 0 eval-teacher", "full seed 1 eval-teacher", ...] -> "full (seeds 0, 1)"."""
  seeds: dict[str, list[str]] = {}
  for entry in missing:
    variant, _, seed, _ = entry.split(" ", 3)
    if seed not in seeds.setdefault(variant, []):
      seeds[variant].append(seed)
  return "; ".join(f"{v} (seeds {', '.join(s)})" for v, s in seeds.items())


def format_table(results: dict[str, Any]) -> str:
  """Markdown: one row per variant, then the reference lines (teacher, supervised baseline), then
  the claims."""
  meta = results["study"]
  reference = results["variants"][meta["reference"]]["mean"]
  lines = [f"Study `{meta['name']}`: test top-1 (%) of each variant's final student, mean +- std "
           f"over seeds {', '.join(map(str, meta['seeds']))}.", "",
           "| variant | what it tests | top-1 mean +- std | per seed | vs reference |",
           "|---|---|---|---|---|"]
  rows = [(v, meta["about"][v], e) for v, e in results["variants"].items()]
  for key, about in (("teacher", "the reference's teacher"),
                     ("baseline", "supervised baseline (labels only)")):
    if results[key]["top1"] or any(m.endswith(f"eval-{key}") for m in meta["missing"]):
      rows.append((key, about, results[key]))
  for name, about, entry in rows:
    seeds = " / ".join(f"{entry['top1'][k]:.1f}" for k in sorted(entry["top1"], key=int)) or "-"
    delta = ("-" if entry["mean"] is None or reference is None or name == meta["reference"]
             else f"{entry['mean'] - reference:+.1f}")
    lines.append(f"| {name} | {about} | {_fmt(entry)} | {seeds} | {delta} |")
  if meta["missing"]:
    lines += ["", f"Not complete yet: {_missing_by_variant(meta['missing'])}."]
  if meta.get("seeds_from_mixed_machines"):
    lines += ["", "Left out of the claims (their stages ran on different machines): seeds "
              f"{', '.join(meta['seeds_from_mixed_machines'])}."]
  if results.get("claims"):
    lines += ["", "Claims: the paired per-seed difference (points) with its two-sided 95% "
              "Student-t interval (seeds' spread and the test set's sampling error); p against "
              f"the claim's boundary, Holm-corrected over the {len(results['claims'])} claims "
              "(nsjax.claims):", "",
              claims_lib.format_table(results, results["claims"]).rstrip("\n")]
  return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: str) -> None:
  """Left: per variant mean +- std and one dot per seed, teacher and baseline means as lines.
  Right: each claim's mean paired difference with its 95% interval and boundary."""
  plt = report._pyplot()  # pylint: disable=protected-access
  names = list(results["variants"])
  checked = [c for c in results.get("claims", []) if c.get("ci95")]
  fig, axes = plt.subplots(1, 2 if checked else 1, squeeze=False,
                           figsize=(max(5.0, 0.7 * len(names) + 2) + (6.0 if checked else 0), 4.5))
  _plot_rows(axes[0][0], results, names)
  if checked:
    _plot_claims(axes[0][1], checked)
  fig.tight_layout()
  report._save_figure(fig, path)  # pylint: disable=protected-access
  plt.close(fig)


def _plot_rows(ax, results: dict[str, Any], names: Sequence[str]) -> None:
  for x, name in enumerate(names):
    entry = results["variants"][name]
    ax.scatter([x] * len(entry["top1"]), list(entry["top1"].values()), s=14, color="tab:blue",
               alpha=0.6, zorder=3)
    if entry["mean"] is not None:
      ax.errorbar([x], [entry["mean"]], yerr=[entry["std"]], fmt="D", color="black", capsize=4,
                  zorder=4)
  for key, style in (("teacher", ":"), ("baseline", "--")):
    if results[key]["mean"] is not None:
      ax.axhline(results[key]["mean"], ls=style, color="gray", label=f"{key} (mean)")
  ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
  ax.set_xlim(-0.6, len(names) - 0.4)
  ax.set_ylabel("test top-1 (%)")
  ax.set_title(f"study {results['study']['name']}: final student, mean +- std, dots = seeds",
               fontsize=9)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def _plot_claims(ax, checked: Sequence[dict[str, Any]]) -> None:
  colors = {"holds": "tab:green", "reversed": "tab:red"}
  for y, c in enumerate(checked):
    low, high = c["ci95"]
    ax.errorbar([c["diff_mean"]], [y], xerr=[[c["diff_mean"] - low], [high - c["diff_mean"]]],
                fmt="o", capsize=3, color=colors.get(c["verdict_corrected"], "tab:gray"))
    if c["test"] == "non_inferiority":
      ax.plot([-c["margin"]] * 2, [y - 0.4, y + 0.4], color="tab:orange", lw=2)
  ax.axvline(0, color="black", lw=0.8)
  ax.set_yticks(range(len(checked)), [f"{c['better']} - {c['worse']}" for c in checked],
                fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel("paired difference, points of top-1 (95% CI; orange: non-inferiority margin)")
  ax.set_title("claims: green holds, red reversed, gray undecided (after Holm)", fontsize=9)


def write_report(config, study: Study, seeds: Sequence[int], workdir: str,
                 name: str = "study") -> dict[str, Any]:
  """study.json, study.md and study.png in `workdir` from what is complete; returns the JSON."""
  results = collect(config, study, seeds, workdir, name)
  atomic_write_json(os.path.join(workdir, RESULTS_JSON), results)
  atomic_write_text(os.path.join(workdir, RESULTS_TABLE), format_table(results))
  plot(results, os.path.join(workdir, RESULTS_PLOT))
  return results


# ------------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  """Flags are defined on demand (absl flags are process-global; nsjax.main defines --config)."""
  from absl import flags
  cli.define_config_flag("The schedule the variants modify: a config file or a bundled config's "
                         "name (demo, smoke, ...); --config.a.b=value overrides any key.")
  flags.DEFINE_string("study", None, "A study file (path/to/study.py defining get_study) or a "
                      "bundled study's name (configs/studies/: paper, smoke).")
  flags.DEFINE_string("seeds", "0", "Comma-separated seeds, e.g. 0,1,2.")
  flags.DEFINE_string("workdir", None, "The study's folder (shared stages, runs, study.json).")
  flags.DEFINE_list("variants", [], "Only these variants (default: all), e.g. to run variants as "
                    "separate jobs; shared stages are computed once, the other jobs wait.")
  flags.DEFINE_bool("dry_run", False, "Print what each run computes or shares; compute nothing.")
  flags.DEFINE_bool("report_only", False, "Write study.json / .md / .png from what is done.")


def main(argv) -> None:
  from absl import app, flags
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  values = flags.FLAGS
  if values.config is None or not values.workdir or not values.study:
    raise app.UsageError("--config, --study and --workdir are required, e.g. python -m "
                         "nsjax.study --config=configs/demo.py --study=paper --seeds=0,1,2 "
                         "--workdir=/tmp/nsjax-study")
  command.before_jax(command.pixels_per_step(values.config))
  command.after_jax()
  command.freeze_startup_objects()

  def go():
    try:
      seeds = [int(s) for s in values.seeds.split(",") if s.strip()]
    except ValueError:
      raise validate.ConfigError(f"--seeds={values.seeds}: use comma-separated integers, e.g. "
                                 "0,1,2.") from None
    name, study = load_study(values.study, values.config)
    if values.dry_run:
      print(describe_plan(plan(values.config, study, seeds, values.workdir, values.variants),
                          values.workdir), flush=True)
      return
    if values.report_only:
      results = write_report(values.config, study, seeds, values.workdir, name)
    else:
      # As `python -m nsjax.main` runs: each stage's train step compiles while it sets up.
      results = run_study(values.config, study, seeds, values.workdir, values.variants, name,
                          run_fn=functools.partial(pipeline.run, compile_ahead=True))
    print(format_table(results), flush=True)
    print(f"{RESULTS_JSON}, {RESULTS_TABLE}, {RESULTS_PLOT} in {values.workdir}", flush=True)

  command.run_with_exit_codes(go)


def run_command(argv) -> None:
  """`python -m nsjax.study ...`: flags, --config resolution, then main."""
  from absl import app
  define_flags()
  app.run(main, argv=cli.resolve_config_flags_or_exit(argv))


if __name__ == "__main__":
  # Through the imported module, so that study files' `nsjax.study.Study` is this module's class
  # (as __main__, this file's own classes would be other objects).
  import sys
  from nsjax import study as _module
  _module.run_command(sys.argv)
