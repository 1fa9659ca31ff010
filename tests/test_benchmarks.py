"""The benchmarks' --quick modes run and write their tables.

About a minute each on two CPU cores (mostly compilation), so opt-in:
``RUN_BENCHMARKS=1 pytest tests/test_benchmarks.py``.
"""

import importlib.util
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.skipif(not os.environ.get("RUN_BENCHMARKS"), reason="opt-in: set RUN_BENCHMARKS=1")
@pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="needs mnist1d")
def test_uncertainty_and_sensitivity_quick(tmp_path):
  uncertainty = _load("uncertainty")
  out = tmp_path / "uncertainty.md"
  summary = uncertainty.main(["--quick", "--epochs", "2", "--out", str(out)])
  text = out.read_text()
  for label in ("| SGD |", "| Adam |", "| SAM-SGD |", "| SAM-Adam |", "| bSAM (model avg) |", "| bSAM (post. mean) |"):
    assert label in text
  assert set(summary["mlp"]["bSAM (model avg)"]) >= {"config", "accuracy", "nll", "ece", "auroc", "ood_auroc"}

  sensitivity = _load("sensitivity")
  sens_out = tmp_path / "sensitivity.md"
  configs = str(tmp_path / "uncertainty.json")
  sensitivity.main(["--quick", "--epochs", "2", "--configs", configs, "--out", str(sens_out)])
  text = sens_out.read_text()
  for heading in ("Sensitivity to ρ", "MC samples", "Noise ablation", "m-sharpness"):
    assert heading in text
  assert (tmp_path / "rho_sensitivity.png").stat().st_size > 0
