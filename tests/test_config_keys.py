"""Every key of a config is read by nsjax or refused before any compute, with its full path and the
nearest accepted key; the accepted keys are nsjax.config_lib's defaults (config_lib.schema)."""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

from nsjax import config_lib, models, objectives, validate
from nsjax.stages import finetune
from nsjax.validate import ConfigError
from test_configs import load_config
from test_validate import ROOT, smoke_config


def full_config():
  """The smoke config plus every optional section (baseline, fine-tuning, model overrides)."""
  c = smoke_config()
  c.baseline = config_lib.model_stage("efficientnet-b0", 28, model_overrides=dict(width=0.1),
                                      train=dict(c.teacher.train))
  c.students[0].finetune = finetune.finetune_config(32, train=dict(log_every_steps=4))
  c.data.folder_cache_dir = ""
  return c


def sections(node, schema, path=""):
  """(path, node, schema) for every dict-like section of the config that the schema describes."""
  if isinstance(schema, list):
    for i, item in enumerate(node):
      yield from sections(item, schema[0], f"{path}[{i}]")
    return
  if schema is None or not hasattr(node, "keys"):
    return
  yield path, node, schema
  for key in node.keys():
    yield from sections(node[key], schema[key], f"{path}.{key}" if path else key)


SCHEMA = config_lib.schema(models.OVERRIDABLE + ("resolution",), objectives.accepted_keys())
SECTIONS = [path for path, _, _ in sections(full_config(), SCHEMA)]


def test_the_issue_config_with_three_typos_is_refused(tmp_path):
  for mutate, fragments in [
      (lambda c: setattr(c.eval, "corruption", ["contrast"]),
       ("eval.corruption", "did you mean eval.corruptions?")),
      (lambda c: setattr(c.students[0].noise, "randaugment_magnitud", 9),
       ("students[0].noise.randaugment_magnitud", "did you mean "
        "students[0].noise.randaugment_magnitude?")),
      (lambda c: setattr(c.label, "shard_batch", 4),
       ("label.shard_batch", "did you mean label.shard_bytes?"))]:
    config = smoke_config()
    mutate(config)
    with pytest.raises(ConfigError) as error:
      validate.validate_config(config, str(tmp_path))
    for fragment in fragments:
      assert fragment in str(error.value)


def test_every_section_is_covered_by_these_tests():
  expected = {"", "data", "data.labeled", "data.unlabeled", "data.test", "label", "balance", "eval",
              "teacher", "teacher.train", "teacher.noise", "teacher.model_overrides",
              "students[0]", "students[0].train", "students[0].noise",
              "students[0].model_overrides", "students[0].finetune", "students[0].finetune.train",
              "baseline", "baseline.train", "baseline.noise", "baseline.model_overrides"}
  assert expected <= set(SECTIONS), expected - set(SECTIONS)


def typo(key: str) -> str:
  """A misspelling one edit away: the last letter doubled."""
  return key + key[-1]


@pytest.mark.parametrize("path", SECTIONS)
def test_a_typo_in_any_section_is_refused_with_the_nearest_key(path, tmp_path):
  config = full_config()
  node, schema = next((n, s) for p, n, s in sections(config, SCHEMA) if p == path)
  key = sorted(schema)[0]
  node[typo(key)] = 1
  prefix = f"{path}." if path else ""
  with pytest.raises(ConfigError) as error:
    validate.check_keys(config)
  message = str(error.value)
  assert f"Unknown config key {prefix}{typo(key)}" in message
  assert f"did you mean {prefix}{key}?" in message
  assert "Rename or remove it" in message


def test_a_key_with_no_close_match_lists_the_valid_keys():
  config = smoke_config()
  config.eval.zzz = 1
  with pytest.raises(ConfigError, match=r"Unknown config key eval.zzz: nsjax does not read it\. "
                     r"The keys eval takes: batch_size, corruptions, max_corruption_examples, "
                     r"severities"):
    validate.check_keys(config)


@pytest.mark.parametrize("section, key, fix", [("data", "host_input", "its rows of the one global"),
                                               ("label", "shard_batches", "use label.shard_bytes")])
def test_a_removed_key_names_what_replaced_it(section, key, fix):
  config = smoke_config()
  config[section][key] = "global" if key == "host_input" else 4
  with pytest.raises(ConfigError, match=f"config.{section}.{key} is gone: .*{fix}"):
    validate.check_keys(config)


def test_every_config_and_the_full_config_pass():
  validate.check_keys(full_config())
  for path in glob.glob(os.path.join(ROOT, "configs", "*.py")):
    name = os.path.basename(path)[:-3]
    validate.check_keys(load_config(name)[1])


def test_a_key_added_to_the_defaults_is_accepted_without_touching_validation(monkeypatch):
  config = smoke_config()
  config.eval.new_knob = 3
  with pytest.raises(ConfigError, match="eval.new_knob"):
    validate.check_keys(config)
  base = config_lib.base_config

  def with_new_knob():
    c = base()
    c.eval.new_knob = 0
    return c
  monkeypatch.setattr(config_lib, "base_config", with_new_knob)
  validate.check_keys(config)


def _leaves(schema, path=""):
  if isinstance(schema, list):
    yield from _leaves(schema[0], path)
    return
  for key, sub in schema.items():
    if sub is None:
      yield key
    else:
      yield from _leaves(sub, key)


def test_every_accepted_key_is_read_somewhere_in_nsjax():
  """The converse: no default that nothing reads (its name appears as an attribute, a string or
  a keyword argument in nsjax's code outside config_lib)."""
  sources = ""
  for path in glob.glob(os.path.join(ROOT, "nsjax", "**", "*.py"), recursive=True):
    if not path.endswith("config_lib.py"):
      sources += open(path).read()
  unread = sorted(k for k in set(_leaves(SCHEMA))
                  if not re.search(rf"(\.{k}\b|[\"']{k}[\"']|\b{k}=)", sources))
  assert not unread, f"config keys nothing reads: {unread}"


@pytest.mark.parametrize("where", ["config_file", "override_flag"])
def test_the_command_line_refuses_a_typo_with_exit_2_before_any_compute(where, tmp_path):
  """A mistyped key in the config file, or in a `--config.a.b=` override on the command line."""
  config = tmp_path / "typo.py"
  config.write_text("import importlib.util, os\n"
                    f"spec = importlib.util.spec_from_file_location('s', {ROOT!r} + "
                    "'/configs/smoke.py')\n"
                    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                    "def get_config():\n"
                    "  c = m.get_config()\n"
                    + ("  c.label.shard_batch = 4\n" if where == "config_file" else "")
                    + "  return c\n")
  workdir = tmp_path / "work"
  flag = ["--config.label.shard_batch=4"] if where == "override_flag" else []
  done = subprocess.run([sys.executable, "-m", "nsjax.main", f"--config={config}", *flag,
                         f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  assert "Unknown config key label.shard_batch" in done.stderr
  assert "did you mean label.shard_bytes?" in done.stderr
  assert "Traceback" not in done.stderr
  assert not (workdir / "tensorflow_datasets").exists()  # nothing was built


def _parse_config_flags(argv):
  """FLAGS.config after parsing `argv` with nsjax's --config flag (a private flag registry)."""
  from absl import flags
  from nsjax import config_flag
  argv = ["prog", *config_flag.resolve_config_flags(argv)]
  registry = flags.FlagValues()
  config_flag.define_config_flag("test", flag_values=registry, sys_argv=argv)  # not pytest's sys.argv
  registry(argv)
  return registry.config


def test_an_override_may_set_a_key_the_config_file_leaves_to_its_default():
  smoke = os.path.join(ROOT, "configs", "smoke.py")
  assert "rmsprop_decay" not in load_config("smoke")[1].teacher.train  # a default of config_lib's
  config = _parse_config_flags([f"--config={smoke}", "--config.teacher.train.rmsprop_decay=0.8",
                                "--config.teacher.train.num_train_steps=5",
                                "--config.students[0].train.pseudo_labels=hard"])
  assert config.teacher.train.rmsprop_decay == 0.8
  assert config.teacher.train.num_train_steps == 5  # a key the file sets keeps its type (int)
  assert config.students[0].train.pseudo_labels == "hard"
  validate.check_keys(config)
  assert config_lib.with_defaults(config).teacher.train.rmsprop_decay == 0.8


@pytest.mark.parametrize("override, words", [
    ("teachr.train.num_train_steps=3", "config has no 'teachr'"),
    ("baseline.seed_offset=3", "config.baseline is None in this config"),
    ("students[3].seed_offset=3", "config.students has no entry [3] (1 entries)"),
])
def test_an_override_under_a_section_the_config_lacks_names_it_before_parsing(override, words):
  """The flag parser could only fail with a traceback there; config_flag refuses first (exit 2 in the
  commands, which catch ConfigNotFound)."""
  from nsjax import config_flag
  smoke = os.path.join(ROOT, "configs", "smoke.py")
  with pytest.raises(config_flag.UnknownOverride, match=re.escape(words)) as caught:
    config_flag.resolve_config_flags(["prog", f"--config={smoke}", f"--config.{override}"])
  assert isinstance(caught.value, config_flag.ConfigNotFound)
  if override.startswith("teachr"):
    assert "Did you mean config.teacher?" in str(caught.value)


def _meaning_names(schema) -> set[str]:
  """The schema's keys as config_lib.MEANINGS names them ("stage.", "source.", ... prefixes)."""
  stage = schema["teacher"]
  sections = ("data", "label", "balance", "eval")  # each a table of the page, not a row
  names = {k for k in schema if k not in sections}
  names |= {f"{section}.{k}" for section in sections for k in schema[section]}
  names |= {f"source.{k}" for k in schema["data"]["labeled"]}
  names |= {f"stage.{k}" for k in stage}
  for section in ("noise", "train", "finetune", "model_overrides"):
    names |= {f"{section}.{k}" for k in stage[section]}
  return names


def test_every_accepted_key_has_a_meaning():
  """In config_lib.MEANINGS, or (an objective's own setting) beside its default in its class."""
  own = {f"train.{key}" for _, _, rows in objectives.reference() for key, _, meaning in rows
         if meaning}
  assert own == {f"train.{key}" for key in objectives.accepted_keys()}
  assert not own & set(config_lib.MEANINGS)  # one table each
  assert set(config_lib.MEANINGS) | own == _meaning_names(SCHEMA)


def test_the_configuration_reference_is_generated_from_config_lib():
  """docs/configuration.md is `python -m nsjax.config_lib --markdown`: regenerate it with that
  command after changing a default or a meaning."""
  with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
    committed = f.read()
  assert committed == config_lib.markdown(models.OVERRIDABLE, objectives.reference())
  out = subprocess.run([sys.executable, "-m", "nsjax.config_lib", "--markdown"], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  assert out.stdout == committed


def test_with_defaults_fills_every_left_out_key_and_keeps_the_rest():
  sparse = smoke_config()
  del sparse.eval["severities"]
  del sparse.students[0].noise["cutout"]
  sparse.lock()
  written = sparse.to_json(sort_keys=True)
  full = config_lib.with_defaults(sparse)
  assert sparse.to_json(sort_keys=True) == written  # the original (and its fingerprint) untouched
  assert list(full.eval.severities) == [1, 2, 3, 4, 5] and full.students[0].noise.cutout == 0
  assert full.students[0].train.batch_size == sparse.students[0].train.batch_size  # kept
  assert full.teacher.train.ema_decay == 0.9 and full.teacher.train.momentum == 0.9
  full.students[0].seed_offset = 7  # a copy: the original's stages are not shared
  assert sparse.students[0].seed_offset == 1
