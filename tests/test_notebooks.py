"""Runs every notebook in notebooks/ top to bottom, in its small CI setting (BSAM_NOTEBOOK_SMALL=1).

Uses nbclient (as nbmake does) so that the environment of the kernel is set here; about 1.5 min on 2 CPU
cores for the three notebooks. Run them alone with ``pytest tests/test_notebooks.py``; in full size with
``jupyter execute notebooks/<name>.ipynb``.
"""

import os
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs_and_uses_the_library(path):
  notebook = nbformat.read(path, as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in code)
  assert any("import bsam_optax as bo" in cell.source for cell in code)
  # the public API only, as a user would write it
  assert not [line for cell in code for line in cell.source.splitlines() if "bsam_optax._" in line]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, tmp_path):
  monkeypatch.setenv("BSAM_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  # one CPU device, as a user would have (the compile flags of conftest.py stay)
  flags = [f for f in os.environ["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
  monkeypatch.setenv("XLA_FLAGS", " ".join(flags))
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
