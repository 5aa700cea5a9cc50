"""nsjax.tools.device_memory: per-device training-state bytes, replicated vs FSDP, from shapes only.

(That FSDP-sharded and replicated training agree numerically is tested in
tests/test_train_steps.py; here only the accounting.)
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from nsjax import config_lib
from nsjax.tools import device_memory as memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
L2_PARAMS_1000 = 480_309_308  # REFERENCE.md's table


def load_config(name):
  path = os.path.join(ROOT, "configs", f"{name}.py")
  if not os.path.exists(path):
    pytest.skip(f"configs/{name}.py is not in this checkout")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def l2_config():
  """A hand-built schedule: a B0 teacher (imported from a checkpoint: inference only) -> L2."""
  c = config_lib.base_config()
  c.data.num_classes = 1000
  train = dict(batch_size=2048, num_epochs=350, optimizer="rmsprop", fsdp=True)
  c.teacher = config_lib.model_stage("efficientnet-b0", 224, train=train,
                                     checkpoint="/nonexistent/teacher")
  c.students = [config_lib.model_stage("efficientnet-l2", 475, train=train, test_resolution=800)]
  return c


def test_l2_bytes_match_the_parameter_count_and_fsdp_divides_them():
  teacher, student = memory.schedule_memory(l2_config(), num_devices=8)
  assert (student.stage, student.model, student.optimizer) == ("student-1", "efficientnet-l2",
                                                               "rmsprop")
  assert student.num_params == L2_PARAMS_1000 and student.fsdp_configured
  rep, fsdp = student.replicated, student.fsdp
  assert rep["params"] == 4 * L2_PARAMS_1000  # float32, all of it on every device
  # EMA: a copy of params and of the BN statistics; TF1 RMSProp: two slots per parameter + a count.
  assert rep["ema"] == rep["params"] + rep["batch_stats"]
  assert rep["opt_slots"] == 2 * rep["params"] + 4
  assert rep["total"] == sum(rep[p] for p in memory.PARTS)
  # Nearly every byte of L2 sits in large arrays with an axis divisible by 8.
  for part in ("params", "ema", "opt_slots"):
    assert rep[part] / 8 <= fsdp[part] < rep[part] / 7, part
  # The imported teacher only runs inference: no EMA, no optimizer slots.
  assert teacher.optimizer == "" and teacher.replicated["ema"] == teacher.replicated["opt_slots"] == 0
  assert teacher.replicated["params"] == 4 * 5_288_548


def test_fsdp_bytes_shrink_with_the_device_count():
  config = l2_config()
  on = {n: memory.schedule_memory(config, num_devices=n)[1].fsdp["total"] for n in (1, 2, 8)}
  assert on[1] > on[2] > on[8]
  assert on[1] == memory.schedule_memory(config, num_devices=1)[1].replicated["total"]
  np.testing.assert_allclose(on[1] / on[2], 2, rtol=0.01)
  # fsdp_spec shards an axis only when the device count divides it; L2's widths are multiples of 8
  # but rarely of 64, so on 64 devices much of it stays replicated (a limit worth knowing).
  assert memory.schedule_memory(config, num_devices=64)[1].fsdp["total"] > on[8]


def test_every_model_of_the_demo_schedule_is_reported():
  config = load_config("demo")
  rows = memory.schedule_memory(config, num_devices=4)
  from nsjax import pipeline
  assert [r.stage for r in rows] == pipeline.model_stage_names(config)
  for r in rows:
    assert r.replicated["params"] == 4 * r.num_params > 0
    assert r.fsdp["total"] <= r.replicated["total"]
  table = memory.format_report(rows, 4)
  assert table.count("replicated") == len(rows) and rows[-1].model in table


def test_command_line_prints_the_table():
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  out = subprocess.run([sys.executable, "-m", "nsjax.tools.device_memory",
                        f"--config={os.path.join(ROOT, 'configs', 'smoke.py')}", "--num_devices=16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "on 16 device(s)" in out.stdout
  assert out.stdout.count("efficientnet-b0") == 4  # teacher + student, replicated + fsdp rows
