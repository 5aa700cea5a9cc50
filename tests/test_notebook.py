"""launch/colab.ipynb executes top to bottom on CPU (nbclient + ipykernel) with configs/smoke.py.

The fast test hands the notebook a workdir whose schedule is already recorded as finished (state
file with the smoke config's fingerprint, summary.json and the plots, made here with nsjax.report),
so the run cell only validates, builds mnist5k and skips every stage; then the table, the three
plots and the (non-blocking) TensorBoard cell must come out. The slow test runs the real schedule.
Needs nbclient and ipykernel (pinned in the lead's report: nbclient 0.11.0, ipykernel 7.4.0,
nbformat 5.11.1).
"""
import importlib.util
import json
import os

import numpy as np
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from nsjax import pipeline, report  # noqa: E402
from nsjax.files import atomic_write_json  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def smoke_config():
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def finished_workdir(workdir):
  """A workdir in which the smoke schedule is complete: state, summary and plots."""
  config = smoke_config()
  for stage in ("teacher", "label-1", "student-1"):  # a stage whose folder is gone runs again
    os.makedirs(os.path.join(workdir, stage))
  atomic_write_json(os.path.join(workdir, "state.json"), {
      "config_fingerprint": pipeline.fingerprint(config), "started_at": 0.0,
      "completed": {s.name: {} for s in pipeline.schedule(config)}})
  rows = [{"iteration": i, "role": role, "model": "efficientnet-b0", "params": 34_038,
           "test_top1": top1, "test_top5": 0.5 + top1, "params_sha256": sha * 64,
           "corruption_top1": top1 / 2, "corruptions": {"contrast": top1 / 3,
                                                        "gaussian_noise": top1 / 4}}
          for i, role, top1, sha in ((0, "teacher", 0.1234, "a"), (1, "student", 0.2345, "b"))]
  report.write_summary(workdir, rows, 42.0)
  report.plot_accuracy(rows, os.path.join(workdir, "summary.png"))
  report.plot_corruptions(rows, os.path.join(workdir, "corruptions.png"))
  hist = np.ones((10, 100), int)
  report.plot_balance({"histogram": hist.tolist(), "expected_after": [40] * 10,
                       "min_threshold": 0.0}, os.path.join(workdir, "label-1", "balance.png"))
  return rows


def execute(workdir, monkeypatch, timeout):
  monkeypatch.setenv("NSJAX_NOTEBOOK_TEST", "1")
  monkeypatch.setenv("NSJAX_NOTEBOOK_CONFIG", "smoke")
  monkeypatch.setenv("NSJAX_NOTEBOOK_WORKDIR", workdir)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                   resources={"metadata": {"path": str(workdir)}})
  client.execute()
  return nb


def outputs(cell, kind):
  found = []
  for out in cell.get("outputs", []):
    if kind == "text" and out.get("output_type") == "stream" and out.get("name") == "stdout":
      found.append(out["text"])
    if kind == "png" and "image/png" in out.get("data", {}):
      found.append(out["data"]["image/png"])
  return found


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_runs_and_shows_the_summary_plots_and_tensorboard(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  rows = finished_workdir(workdir)
  nb = execute(workdir, monkeypatch, timeout=300)
  cells = code_cells(nb)
  assert "already importable: nothing to install" in "".join(outputs(cells[0], "text"))
  run_text = "".join(outputs(cells[3], "text"))
  completed = run_text.split("completed stages: ")[1].split("\n")[0].split(", ")
  assert sorted(completed) == sorted(s.name for s in pipeline.schedule(smoke_config()))
  table = "".join(outputs(cells[4], "text"))
  assert report.format_table(rows) in table and "12.34" in table and "23.45" in table
  assert len(outputs(cells[5], "png")) == 3  # summary, corruptions, balance
  assert "not starting TensorBoard" in "".join(outputs(cells[6], "text"))


@pytest.mark.slow
def test_notebook_runs_the_smoke_schedule(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  nb = execute(workdir, monkeypatch, timeout=1800)
  cells = code_cells(nb)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert [r["role"] for r in summary["iterations"]] == ["teacher", "student"]
  assert report.format_table(summary["iterations"]) in "".join(outputs(cells[4], "text"))
  assert len(outputs(cells[5], "png")) == 3
