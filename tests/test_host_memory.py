"""nsjax.host_memory: on the CPU, a step's freed buffers are reused instead of refaulted."""
import json
import os
import statistics
import subprocess
import sys

import pytest

from nsjax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose 96 MiB output is freed after every call (the shape of one activation
# buffer of B0's train step); the process reports the minor page faults of each call after warm-up.
_FAULTS_PER_CALL = r"""
import json, os, resource, sys
import nsjax
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.broadcast_to(x, (6144, 4096)) * 2.0)
x = jnp.ones((4096,), jnp.float32)
for _ in range(10):  # the heap grows to its working size (a few buffers are in flight at once)
  step(x).block_until_ready()
faults = []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": faults, "applied": nsjax.host_memory.applied(),
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""), "argv": sys.argv[1:]}))
"""
_PAGES = 6144 * 4096 * 4 // 4096


def _faults_per_call(switch: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env[host_memory.ENV_SWITCH] = switch
  out = subprocess.run([sys.executable, "-c", _FAULTS_PER_CALL], env=env, check=True,
                       capture_output=True, text=True).stdout
  report = json.loads(out.strip().splitlines()[-1])
  report["median"] = statistics.median(report["faults"])
  return report


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_buffers_are_reused_not_refaulted():
  kept = _faults_per_call("1")
  default = _faults_per_call("0")
  assert kept["applied"] and not default["applied"]
  # glibc's default maps and unmaps the buffer each call: every page of it faults again.
  assert default["median"] > 0.9 * _PAGES, default
  # Kept: the typical call reuses freed pages. The heap can still grow by a buffer now and then
  # (fragmentation, or a free that lags behind the next call on a loaded machine), so the test
  # asks about the median call, not the mean.
  assert kept["median"] < 0.25 * _PAGES, kept


@pytest.mark.parametrize("environ, expected", [
    ({"JAX_PLATFORMS": "cpu"}, True),
    ({"JAX_PLATFORMS": "CPU"}, True),
    ({"JAX_PLATFORMS": "tpu"}, False),
    ({"JAX_PLATFORMS": "cuda,cpu"}, False),
])
def test_jax_platforms_decides_whether_jax_runs_on_cpu(environ, expected):
  assert host_memory.jax_expects_cpu(environ) is expected


def test_only_large_steps_are_worth_it():
  assert host_memory.worth_retaining(32 * 224 * 224)  # B0's benchmark step
  assert not host_memory.worth_retaining(96 * 32 * 32)  # the demo's student step


def test_switch_off_leaves_the_allocator_alone(monkeypatch):
  monkeypatch.setattr(host_memory, "_applied", False)
  assert host_memory.retain_freed_memory({host_memory.ENV_SWITCH: "0",
                                          "JAX_PLATFORMS": "cpu"}) is False
  assert host_memory.retain_freed_memory({"JAX_PLATFORMS": "tpu"}) is False


# --- Transparent huge pages for malloc ----------------------------------------------------------

@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"), ("", "")])
def test_thp_mode_reads_the_bracketed_choice(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert host_memory.thp_mode(str(path)) == mode
  assert host_memory.thp_mode(str(tmp_path / "missing")) == ""


CPU = {"JAX_PLATFORMS": "cpu", "PATH": "/bin"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc Linux only")
def test_huge_pages_are_asked_for_only_where_the_kernel_waits_to_be_asked():
  env = host_memory.huge_pages_environ(CPU, mode="madvise")
  assert env == {**CPU, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  mine = host_memory.huge_pages_environ({**CPU, "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"},
                                        mode="madvise")
  assert mine["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert host_memory.huge_pages_environ(env, mode="madvise") is None  # started again: no loop
  for mode in ("always", "never", ""):  # the kernel gives them anyway, or never
    assert host_memory.huge_pages_environ(CPU, mode=mode) is None
  assert host_memory.huge_pages_environ({**CPU, "NSJAX_HUGE_PAGES": "0"}, mode="madvise") is None
  assert host_memory.huge_pages_environ({"JAX_PLATFORMS": "tpu"}, mode="madvise") is None


# The run commands' start: this process starts again with huge pages, then reports the faults of
# each call (the script above).
_STARTED_AGAIN = ("from nsjax import command\ncommand.start_again_with_huge_pages()\n"
                  + _FAULTS_PER_CALL)


@pytest.mark.skipif(host_memory.thp_mode() != "madvise",
                    reason="the kernel's transparent huge pages are not in madvise mode here, so "
                           "nsjax does not start again with them")
def test_the_command_starts_again_with_huge_pages_and_faults_far_less(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(_STARTED_AGAIN)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, NSJAX_RETAIN_FREED_MEMORY="0")
  env.pop("GLIBC_TUNABLES", None)
  runs = {}
  for switch in ("1", "0"):
    out = subprocess.run([sys.executable, str(script), "--flag=kept"], check=True, text=True,
                         capture_output=True, env=dict(env, NSJAX_HUGE_PAGES=switch)).stdout
    runs[switch] = json.loads(out.strip().splitlines()[-1])
  huge, small = runs["1"], runs["0"]
  assert huge["tunables"] == "glibc.malloc.hugetlb=1" and small["tunables"] == ""
  assert huge["argv"] == small["argv"] == ["--flag=kept"]  # the same command line
  # 4 KiB pages: each call faults its whole output in again; 2 MiB pages: ~512x fewer faults.
  assert statistics.median(small["faults"]) > 0.9 * _PAGES, small
  assert statistics.median(huge["faults"]) < 0.05 * _PAGES, huge


_MADVISE_ONLY = pytest.mark.skipif(
    host_memory.thp_mode() != "madvise",
    reason="the kernel's transparent huge pages are not in madvise mode here, so nsjax does not "
           "start again with them")

# A config file that reports the environment of the process that loads it, then stops the run.
_CONFIG_REPORTING_TUNABLES = """
import os
def get_config():
  print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""), flush=True)
  raise SystemExit(0)
"""


@_MADVISE_ONLY
@pytest.mark.parametrize("program", [["-m", "nsjax.main"], ["-m", "nsjax.cli", "run"],
                                     ["-m", "nsjax.study", "--study=smoke"]])
def test_each_run_program_starts_again_with_huge_pages(tmp_path, program):
  config = tmp_path / "reporting.py"
  config.write_text(_CONFIG_REPORTING_TUNABLES)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("NSJAX_HUGE_PAGES", None)
  out = subprocess.run([sys.executable, *program, f"--config={config}", f"--workdir={tmp_path}"],
                       check=True, text=True, capture_output=True, env=env, cwd=ROOT).stdout
  assert out.splitlines()[-1] == "GLIBC_TUNABLES=glibc.malloc.hugetlb=1"


def test_a_main_called_in_process_never_restarts_its_caller(monkeypatch):
  # pytest, a notebook's kernel: starting sys.orig_argv again would rerun *them* (it once reran
  # the whole test suite from inside a test). Only the programs' entry points may.
  from nsjax import cli, command
  wanted = dict(os.environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
  monkeypatch.setattr(host_memory, "huge_pages_environ", lambda *a, **k: wanted)
  def execve(*args):
    raise AssertionError(f"the process was started again: {args}")
  monkeypatch.setattr(os, "execve", execve)
  command.before_jax(0)
  assert cli.main(["run", "--help"]) == 0
  with pytest.raises(AssertionError, match="started again"):  # the entry point itself does
    command.start_again_with_huge_pages()


def _run_command_in_process(monkeypatch, command_main, argv):
  """Runs a command's main() here with its set-up stubbed out; returns gc.get_freeze_count() at
  the moment it hands over to the run, and what it handed over."""
  import gc

  from nsjax import command
  seen = {}
  monkeypatch.setattr(command, "before_jax", lambda pixels: None)  # this process's settings stay
  monkeypatch.setattr(command, "after_jax", lambda: None)
  monkeypatch.setattr(command, "run_with_exit_codes", lambda fn: fn())
  try:
    command_main(argv, seen)
    return seen
  finally:
    gc.unfreeze()  # the test process goes on as before


def test_the_commands_take_startup_objects_out_of_the_collectors_view(monkeypatch, tmp_path):
  # ~540k objects from the imports live as long as the process; each full collection walked them
  # (~0.3 s). The commands freeze them before the first stage; the study also compiles ahead.
  import gc
  import types

  from absl import flags

  from nsjax import main, pipeline, study
  config = os.path.join(ROOT, "configs", "smoke.py")

  def run_main(argv, seen):
    for name, value in (("_CONFIG", config), ("_WORKDIR", str(tmp_path)), ("_STAGE", None),
                        ("_COORDINATOR", None), ("_DISTRIBUTED", False)):
      monkeypatch.setattr(main, name, types.SimpleNamespace(value=value))
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: seen.update(
        frozen=gc.get_freeze_count(), kwargs=k))
    main.main(argv)

  seen = _run_command_in_process(monkeypatch, run_main, ["main"])
  assert seen["frozen"] > 100_000 and seen["kwargs"]["compile_ahead"] is True

  def run_study(argv, seen):
    monkeypatch.setattr(flags, "FLAGS", types.SimpleNamespace(
        config=config, workdir=str(tmp_path), study="smoke", seeds="0", dry_run=False,
        report_only=False, variants=None))
    monkeypatch.setattr(study, "run_study", lambda *a, **k: seen.update(
        frozen=gc.get_freeze_count(), run_fn=k["run_fn"]) or {})
    monkeypatch.setattr(study, "format_table", lambda results: "")
    study.main(argv)

  seen = _run_command_in_process(monkeypatch, run_study, ["study"])
  assert seen["frozen"] > 100_000
  assert seen["run_fn"].func is pipeline.run and seen["run_fn"].keywords == {"compile_ahead": True}
