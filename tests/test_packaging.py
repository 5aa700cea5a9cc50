"""nsjax as an installed package: the wheel, the `nsjax` command, bundled configs and data files.

The wheel tests build the wheel from a copy of the checkout (setuptools writes build/ and
*.egg-info/ next to the sources), install it with pip into a fresh venv OFFLINE (--no-deps
--no-index: nothing is downloaded; the venv sees exactly the packages of the interpreter that
runs the tests, be it a system Python, a virtualenv or a conda environment, but not the checkout)
and, from a directory outside the checkout with no PYTHONPATH, run `nsjax --help`, the smoke
schedule as `nsjax run`'s example says and the export example on the student it trained; with
`-m slow` (about a minute more on 2 cores), also every subcommand's --help and the Colab notebook
(fast mode, on that finished run) with the venv's kernel.
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
import tomllib

import pytest
from packaging.requirements import Requirement

from nsjax import cli, config_flag
from nsjax.evaluate import metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_lists_every_package_and_the_command():
  """`packages` is an explicit list (configs/ is mapped in): a new subpackage must be added."""
  listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
  on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "nsjax").rglob("__init__.py")}
  assert listed == on_disk | {"nsjax.configs"}
  assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"nsjax.configs": "configs"}
  assert PYPROJECT["project"]["scripts"] == {"nsjax": "nsjax.cli:main"}


def test_metadata_ranges_admit_the_pins():
  """Every package requirements.txt pins satisfies the package metadata's range for it."""
  ranges = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]
            + PYPROJECT["project"]["optional-dependencies"]["test"]}
  pins = [line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
          if "==" in line and not line.startswith("#")]
  assert {name for name, _ in pins} <= set(ranges)  # every pin has a range
  for name, version in pins:
    assert ranges[name].specifier.contains(version), (name, version, str(ranges[name]))


def shared_data_dir() -> pathlib.Path | None:
  for parent in ROOT.parents:
    if (parent / "shared" / "data").is_dir():
      return parent / "shared" / "data"
  return None


def test_packaged_class_indices_equal_the_shared_ones(monkeypatch):
  monkeypatch.delenv(metrics.SHARED_DIR_ENV, raising=False)
  for filename in metrics.SUBSET_FILES.values():
    assert metrics.shared_data_path(filename) == metrics.PACKAGED_DIR / filename
  shared = shared_data_dir()
  if shared is None:
    pytest.skip("no shared/data directory beside this checkout to compare with")
  for filename in metrics.SUBSET_FILES.values():
    assert filecmp.cmp(shared / filename, metrics.PACKAGED_DIR / filename, shallow=False), filename


def test_config_names_resolve_to_files(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # outside the checkout: configs/smoke.py is not a relative path here
  smoke = str(ROOT / "configs" / "smoke.py")
  for value in ("smoke", "smoke.py", "configs/smoke.py"):
    assert config_flag.resolve_config(value) == smoke
  assert config_flag.resolve_config("folder_example:/data/x,tiny") == (
      str(ROOT / "configs" / "folder_example.py") + ":/data/x,tiny")
  (tmp_path / "mine.py").write_text("")
  assert config_flag.resolve_config("mine.py") == "mine.py"  # a real file wins
  assert config_flag.resolve_config_flags(["--config", "demo", "--config.seed=1"]) == [
      "--config", str(ROOT / "configs" / "demo.py"), "--config.seed=1"]
  with pytest.raises(config_flag.ConfigNotFound, match="smoke, svhn_b0"):
    config_flag.resolve_config("nope")


def test_unknown_subcommand_and_bare_command(capsys):
  assert cli.main(["train"]) == 2
  assert "unknown subcommand 'train'" in capsys.readouterr().err
  assert cli.main([]) == 2
  assert "model-table" in capsys.readouterr().out


def run(args, cwd, env, timeout=600):
  done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert done.returncode == 0, f"{args} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
  return done.stdout


def build_wheel(tmp: pathlib.Path) -> pathlib.Path:
  """The wheel, built offline from a copy of the sources (so build/ and *.egg-info/ land there)."""
  source = tmp / "source"
  ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
  for name in ("nsjax", "configs"):
    shutil.copytree(ROOT / name, source / name, ignore=ignore)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, source / name)
  run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
       "-q", "-w", str(tmp / "dist"), str(source)], cwd=tmp, env=os.environ.copy())
  (wheel,) = (tmp / "dist").glob("nsjax-*.whl")
  return wheel


@dataclasses.dataclass
class Installed:
  venv: pathlib.Path
  outside: pathlib.Path  # a working directory outside the checkout
  env: dict
  seconds: float         # wheel build + venv + install

  @property
  def nsjax(self) -> str:
    return str(self.venv / "bin" / "nsjax")


# The sys.path entries through which the checkout's own code is importable (`python -m pytest`
# puts the working directory first, pytest the tests' folder). Only these: the interpreter's
# site-packages may lie inside the checkout too (`python3 -m venv venv`, as the README says).
CHECKOUT_ENTRIES = (ROOT, ROOT / "tests")


def package_dirs() -> list[str]:
  """Where the running interpreter finds its packages, in its order, the checkout left out.

  `venv --system-site-packages` is not this: it exposes the base interpreter's site-packages,
  so when the tests themselves run in a virtualenv the venv would see none of their packages.
  """
  return [entry for entry in sys.path
          if entry and pathlib.Path(entry).resolve() not in CHECKOUT_ENTRIES]


def venv_env(venv: pathlib.Path) -> dict:
  """The environment of a user who activated `venv`: no PYTHONPATH, its bin/ first on PATH."""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}", JAX_PLATFORMS="cpu")
  return env


def make_venv(venv: pathlib.Path) -> dict:
  """A fresh venv that sees the running interpreter's packages; returns its environment.

  A .pth file in the venv's own site-packages adds them with site.addsitedir, which also runs
  their .pth files (namespace packages, editable installs), after the venv's own site-packages:
  what gets installed into the venv wins. pip comes from the running interpreter, as it does
  for the wheel's build, so the venv needs no pip of its own.
  """
  run([sys.executable, "-m", "venv", "--without-pip", str(venv)], venv.parent, os.environ.copy())
  env = venv_env(venv)
  purelib = run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                 "print(sysconfig.get_path('purelib'))"], venv.parent, env).strip()
  adds = "; ".join(f"site.addsitedir({entry!r})" for entry in package_dirs())
  (pathlib.Path(purelib) / "nsjax_test_host_packages.pth").write_text(f"import site; {adds}\n")
  return env


def distributions_seen(python: str, path: list[str] | None, cwd: pathlib.Path, env: dict) -> list:
  """`python`'s installed distributions (name==version) on `path`, or on its sys.path."""
  listing = ("import importlib.metadata as m, json, sys; "
             "path = json.loads(sys.argv[1]) or sys.path; "
             "names = sorted(f'{d.name}=={d.version}' for d in m.distributions(path=path)); "
             "print(json.dumps(names))")
  return json.loads(run([python, "-c", listing, json.dumps(path)], cwd, env))


def test_wheel_venv_sees_exactly_the_running_interpreters_packages(tmp_path):
  env = make_venv(tmp_path / "venv")
  seen = distributions_seen(str(tmp_path / "venv" / "bin" / "python"), None, tmp_path, env)
  ours = distributions_seen(sys.executable, package_dirs(), tmp_path, os.environ.copy())
  assert seen == ours
  assert any(name.startswith("absl-py==") for name in seen)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """The wheel installed offline into a fresh venv; an environment without the checkout."""
  start = time.time()
  tmp = tmp_path_factory.mktemp("wheel")
  wheel = build_wheel(tmp)
  venv = tmp / "venv"
  env = make_venv(venv)
  run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
       "--no-build-isolation", str(wheel)], tmp, env)
  outside = tmp / "elsewhere"
  outside.mkdir()
  return Installed(venv, outside, env, time.time() - start)


@pytest.fixture(scope="module")
def smoke_run(installed):
  """`nsjax run`'s example (the smoke schedule), from outside the checkout: the workdir."""
  start = time.time()
  workdir = installed.outside / "smoke-run"
  run(cli.BY_NAME["run"].example.replace("/tmp/nsjax-smoke", str(workdir)).split(),
      installed.outside, installed.env)
  print(f"smoke schedule from the installed package: {time.time() - start:.0f} s")
  return workdir


def test_wheel_installs_offline_and_runs_the_smoke_schedule_outside_the_checkout(installed,
                                                                                  smoke_run):
  start = time.time()
  where = run([str(installed.venv / "bin" / "python"), "-c",
               "import nsjax, nsjax.evaluate.metrics as m; print(nsjax.__file__); "
               "print(m.shared_data_path('imagenet_a_indices_in_1k.txt'))"],
              installed.outside, installed.env).split()
  assert all(p.startswith(str(installed.venv)) for p in where), where  # not the checkout's
  overview = run([installed.nsjax, "--help"], installed.outside, installed.env)
  assert all(s.example in overview for s in cli.SUBCOMMANDS) and "smoke" in overview
  summary = json.loads((smoke_run / "summary.json").read_text())
  assert [r["role"] for r in summary["iterations"]] == ["teacher", "student"]
  serving = installed.outside / "serving"
  run(cli.BY_NAME["export"].example.replace("/tmp/nsjax-smoke", str(smoke_run))
      .replace("/tmp/nsjax-serving", str(serving)).split(), installed.outside, installed.env)
  record = json.loads((serving / "assets.extra" / "nsjax_serving.json").read_text())
  assert record["preprocessing"]["view"] == "small_image" and record["part"] == "classifier"
  print(f"wheel build + offline install: {installed.seconds:.0f} s; --help, paths and export "
        f"example: {time.time() - start:.0f} s")


@pytest.mark.slow
def test_installed_subcommands_show_their_examples(installed):
  """Every `nsjax SUB --help` of the installed command: usage, the example, then its flags."""
  helps = {s.name: subprocess.Popen([installed.nsjax, s.name, "--help"], cwd=installed.outside,
                                    env=installed.env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
           for s in cli.SUBCOMMANDS}
  for name, process in helps.items():
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, (name, err[-2000:])
    assert out.startswith(f"usage: nsjax {name}")
    assert f"Example:\n  {cli.BY_NAME[name].example}" in out and "--" in out.split("Example:")[1]
  # The examples that need no download run as printed (run, export, evaluate: with the smoke run).
  table = run(cli.BY_NAME["model-table"].example.split(), installed.outside, installed.env)
  assert "| efficientnet-b1 | 7,794,184 |" in table
  memory = run(cli.BY_NAME["memory"].example.split(), installed.outside, installed.env)
  assert "on 8 device(s)" in memory and "student-1" in memory


@pytest.mark.slow
def test_installed_evaluate_example_scores_the_smoke_student(installed, smoke_run):
  output = installed.outside / "eval"
  example = cli.BY_NAME["evaluate"].example.replace("/tmp/nsjax-smoke", str(smoke_run))
  example = example.replace("/tmp/nsjax-eval", str(output)).replace("'", "")
  run(example.split(), installed.outside, installed.env)
  result = json.loads((output / "clean.json").read_text())
  assert 0.0 <= result["top1"] <= 1.0


NOTEBOOK_RUNNER = """
import sys, nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


@pytest.mark.slow
def test_notebook_runs_on_the_installed_package(installed, smoke_run):
  """launch/colab.ipynb with the venv's kernel, outside the checkout, on the finished smoke run:
  nsjax comes from the wheel (nothing to install), the config from the package, the stages are
  all done."""
  env = dict(installed.env, NSJAX_NOTEBOOK_TEST="1", NSJAX_NOTEBOOK_CONFIG="smoke",
             NSJAX_NOTEBOOK_WORKDIR=str(smoke_run))
  executed = installed.outside / "executed.ipynb"
  run([str(installed.venv / "bin" / "python"), "-c", NOTEBOOK_RUNNER,
       str(ROOT / "launch" / "colab.ipynb"), str(executed), str(installed.outside)],
      installed.outside, env)
  cells = [c for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"]
  text = ["".join("".join(o.get("text", "")) for o in c["outputs"] if o.get("name") == "stdout")
          for c in cells]
  assert "already importable: nothing to install" in text[0]
  config_line = text[1].split("config: ")[1].split("\n")[0]
  assert config_line.startswith(str(installed.venv))
  assert config_line.endswith("nsjax/configs/smoke.py")
  assert "completed stages: " in text[3] and "summary" in text[3]
