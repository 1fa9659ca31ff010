"""The benchmarks' --quick modes run, train every method and report sane numbers.

These are the CI modes of issue 4, shrunk further (1 seed, 2 epochs; cost.py at
m = 1 only): about 2 minutes together on two CPU cores, almost all of it
compilation. The numbers are checked for range, not for quality (2 epochs).
"""

import importlib.util
import math
import os
import re

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
needs_mnist1d = pytest.mark.skipif(importlib.util.find_spec("mnist1d") is None, reason="needs mnist1d")

UNCERTAINTY_ROWS = ("SGD", "Adam", "SAM-SGD", "SAM-Adam", "bSAM (model avg)", "bSAM (post. mean)")
CELL = re.compile(r"^(-?\d+(?:\.\d+)?) ± (\d+(?:\.\d+)?)$")


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _table_rows(text, first):
  """{label: [mean of each metric cell]} of the markdown rows whose label starts with ``first``."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and cells[0].startswith(first) and "accuracy (%)" not in line:
      means = []
      for cell in cells[-6:]:  # accuracy (%), NLL, ECE, AUROC, OOD AUROC, conf. - acc. (%)
        match = CELL.match(cell)
        assert match, f"not 'mean ± std': {cell!r} in {line!r}"
        means.append(float(match.group(1)))
      rows[cells[0]] = means
  return rows


def _check_metrics(label, accuracy, nll, ece, auroc, ood_auroc, gap):
  values = (accuracy, nll, ece, auroc, ood_auroc, gap)
  assert all(math.isfinite(v) for v in values), (label, values)
  assert 0 <= accuracy <= 100 and nll > 0 and 0 <= ece <= 1, (label, values)
  assert 0 <= auroc <= 1 and 0 <= ood_auroc <= 1 and -100 <= gap <= 100, (label, values)


@pytest.fixture(scope="module")
def uncertainty_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("benchmarks") / "uncertainty.md"
  summary = _load("uncertainty").main(["--quick", "--seeds", "1", "--epochs", "2", "--out", str(out)])
  return out, summary


@needs_mnist1d
def test_uncertainty_quick(uncertainty_run):
  out, summary = uncertainty_run
  text = out.read_text()
  assert "## Selected by validation accuracy" in text and "## Selected by validation NLL" in text
  text, calibration = text.split("## Post-hoc calibration")
  rows = _table_rows(text, tuple(UNCERTAINTY_ROWS))
  assert set(rows) == set(UNCERTAINTY_ROWS)
  for label, means in rows.items():
    _check_metrics(label, *means)
  for label in UNCERTAINTY_ROWS:
    row = summary["mlp"][label]
    assert row["config"] and len(row["accuracy"]) == 1
    assert 0 <= row["accuracy"][0] <= 1 and row["nll"][0] > 0 and 0 <= row["ece"][0] <= 1
  assert out.with_name("uncertainty_grid.json").stat().st_size > 0
  # Post-hoc calibration: each method uncalibrated and calibrated on validation (bSAM: both predictions).
  lines = [line for line in calibration.splitlines() if line.startswith("| ") and "accuracy (%)" not in line]
  assert len(lines) == 2 * len(UNCERTAINTY_ROWS), lines
  for line in lines:
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    accuracy, nll, ece, acc_at_90, ood_auroc, gap = (float(CELL.match(c).group(1)) for c in cells[-6:])
    _check_metrics(cells[0], accuracy, nll, ece, 0.5, ood_auroc, gap)
    assert 0 <= acc_at_90 <= 100, line
  temperature = summary["_calibration"]["mlp"]["bSAM (model avg) [average_cal]"]["temperature"][0]
  assert temperature == 0 or 2**-10 <= temperature <= 4
  assert 0.1 <= summary["_calibration"]["mlp"]["SGD [mean_ts]"]["tau"][0] <= 10


@needs_mnist1d
def test_sensitivity_quick(uncertainty_run, tmp_path):
  configs = str(uncertainty_run[0].with_suffix(".json"))
  out = tmp_path / "sensitivity.md"
  _load("sensitivity").main(["--quick", "--epochs", "2", "--configs", configs, "--out", str(out)])
  text = out.read_text()
  for heading in ("Sensitivity to ρ", "MC samples", "Noise ablation", "m-sharpness"):
    assert heading in text
  rows = _table_rows(text, ("bSAM", "posterior mean", "model average"))
  expected = {
    "bSAM (model avg), ρ=0.01",
    "bSAM (model avg), ρ=0.1",
    "posterior mean ω",
    "model average, S=1",
    "model average, S=8",
    "bSAM w/o noise, model avg",
    "bSAM (Alg. 1), model avg",
    "bSAM w/o noise, post. mean",
    "bSAM (Alg. 1), post. mean",
    "bSAM (model avg), m=1",
    "bSAM (model avg), m=8",
  }
  assert set(rows) == expected
  for label, means in rows.items():
    _check_metrics(label, *means)
  assert (tmp_path / "rho_sensitivity.png").stat().st_size > 0


@needs_mnist1d
def test_uncertainty_variational_rows_beside_the_saved_grid(tmp_path):
  # The seed's VSAM and RandomSAM (the variational rows' new paths), rendered beside the committed full-run grid.
  out = tmp_path / "variational.md"
  args = ["--quick", "--methods", "vsam_unbounded", "random_sam", "--seeds", "1", "--epochs", "1", "--out", str(out)]
  uncertainty = _load("uncertainty")
  uncertainty.main(args)
  saved = os.path.join(BENCHMARKS, "results", "uncertainty_grid.json")
  grid = str(out.with_name("variational_grid.json"))
  uncertainty.main(["--from-grid", grid, "--beside", saved, "--out", str(out)])
  text = out.read_text()
  table = text.split("## Selected by validation accuracy")[1].split("## Selected by validation NLL")[0]
  rows = {
    k: v
    for prefix in ("SGD", "Adam", "SAM", "bSAM", "RandomSAM", "VSAM")
    for k, v in _table_rows(table, prefix).items()
  }
  vsam = ("VSAM, σ unbounded (the seed's) (model avg)", "VSAM, σ unbounded (the seed's) (post. mean)")
  assert set(rows) == {*UNCERTAINTY_ROWS, "RandomSAM-SGD", *vsam}
  assert table.index("| bSAM (post. mean) |") < table.index("| RandomSAM-SGD |")  # the existing rows first
  for label, means in rows.items():
    _check_metrics(label, *means)
  assert "uncertainty_grid.json" in text


def test_methods_cost_quick(capsys):
  _load("methods_cost").main(["--quick", "--steps", "1"])
  text = capsys.readouterr().out
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("| ") and cells[0] != "method":
      rows[cells[0]] = [float(c) for c in cells[1:]]
  names = {"Adam", "SAM-Adam", "ASAM-Adam", "Fisher-SAM-Adam", "RandomSAM-Adam", "bSAM", "MFVI", "VSAM"}
  assert set(rows) == names, text
  assert rows["Adam"][1] == 1.0
  for name, (ms, ratio) in rows.items():
    assert math.isfinite(ms) and ms > 0 and math.isfinite(ratio) and ratio > 0, (name, ms, ratio)


def test_cost_quick(capsys):
  _load("cost").main(["--quick", "--m", "1"])
  text = capsys.readouterr().out
  step_times = text.split("## Step time")[1].split("## Memory")[0]
  rows = [line for line in step_times.splitlines() if line.startswith("| mlp | 1 | ")]
  assert len(rows) == 1, step_times
  cells = [c.strip() for c in rows[0].strip().strip("|").split("|")[2:]]
  assert len(cells) == 14  # ms of adam, sam_adam, contrib_sam, authors, bsam, bsam_hash; then 8 ratios
  for cell in cells:
    assert math.isfinite(float(cell)) and float(cell) > 0, rows[0]


def test_sharding_memory_quick_halves_per_device_bytes_with_each_doubling_of_model_shards(monkeypatch):
  # The script sets XLA_FLAGS itself; under the suite the 8 simulated devices already exist (conftest.py).
  monkeypatch.setattr("sys.argv", ["sharding_memory.py", "--quick"])
  rows = _load("sharding_memory").main()
  assert [r["model shards"] for r in rows] == [1, 2, 4, 8]
  held = [r["params / device (MB)"] + r["state / device (MB)"] for r in rows]
  for before, after in zip(held, held[1:], strict=False):
    assert after == pytest.approx(before / 2, rel=0.1)


@pytest.mark.parametrize("name", ["uncertainty", "sensitivity"])
def test_benchmark_imports_public_names_only(name):
  # What a user can run against the installed package: the library's and the application's public modules.
  with open(os.path.join(BENCHMARKS, f"{name}.py"), encoding="utf-8") as f:
    source = f.read()
  assert not re.findall(r"bsam_optax\._\w+|from bsam_optax(?:\.\w+)* import _\w+", source)


def test_transformer_quick(tmp_path):
  out = tmp_path / "transformer.md"
  result = _load("transformer").main(["--quick", "--out", str(out)])
  rows = result["rows"]
  assert set(rows) == {"AdamW", "SAM-AdamW", "bSAM (post. mean)", "bSAM (model avg, S=4)"}
  for label, row in rows.items():
    for split in ("val", "test"):
      m = row[split]
      values = (m["nll"], m["ppl"], m["bpb"], m["acc"], m["ece"])
      assert all(math.isfinite(v) for v in values), (label, split, m)
      # 30 steps: worse than a good model, but better than the uniform 256-way guess (NLL log 256 = 5.55).
      assert 0 < m["nll"] < math.log(256) and 0 <= m["acc"] <= 1 and 0 <= m["ece"] <= 1, (label, split, m)
      assert math.isclose(m["ppl"], math.exp(m["nll"]), rel_tol=1e-9)
  for t in result["timing"].values():
    assert math.isfinite(t["ms"]) and t["ms"] > 0 and t["ratio"] > 0
  mixed = result["mixed_precision"]["rows"]
  assert len(mixed) == 4 and all(math.isfinite(r["val_nll"]) and r["ms"] > 0 for r in mixed.values())
  assert mixed["bfloat16 params and compute, float32 state"]["state_dtype"] == ["float32"]
  assert mixed["bfloat16 params and compute, float32 state"]["param_dtype"] == ["bfloat16"]
  text = out.read_text()
  assert "## Test set" in text and "## Mixed precision" in text and out.with_suffix(".json").stat().st_size > 0


def test_uncertainty_confidence_rows_split_runs_by_the_means_calibration(tmp_path):
  # Four runs (2 configs x 2 seeds): the means of runs 0 and 3 are overconfident on validation; the model
  # average beats the mean on validation NLL in runs 0 and 1, on test NLL in run 0 only.
  unc = _load("uncertainty")
  split = lambda v: [v[:2], v[2:]]  # noqa: E731  (configs x seeds)
  mean = {
    "validation": {"confidence": split([0.9, 0.6, 0.7, 0.95]), "accuracy": split([0.8] * 4), "nll": split([1.0] * 4)},
    "test": {"nll": split([1.0] * 4)},
  }
  avg = {"validation": {"nll": split([0.9, 0.95, 1.1, 1.2])}, "test": {"nll": split([0.8, 1.1, 1.2, 1.3])}}
  cal = {"test": {"nll": split([0.8, 1.0, 1.0, 1.0])}}
  saved = {
    "results": {
      "mlp": {
        "bsam": {
          "configs": [{}, {}],
          "metrics": {
            "mean": mean,
            "average_32": avg,
            "average": avg,
            "average_cal": cal,
            "temperature": split([1, 0, 0, 0]),
          },
        },
        "sgd": {"configs": [{}], "metrics": {"mean": mean}},  # not Bayesian: no row
      }
    }
  }
  path = tmp_path / "grid.json"
  path.write_text(__import__("json").dumps(saved))
  rows = [r for r in unc.confidence_rows(str(path)) if r.startswith("| mlp")]
  cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
  assert [c[2:] for c in cells] == [
    ["overconfident", "2", "50%", "50%", "-0.0500", "+0.1000", "50%"],  # runs 0, 3: gains +0.2, -0.3; at T: +0.2, 0
    ["underconfident", "2", "50%", "0%", "-0.1500", "+0.0000", "0%"],  # runs 1, 2: gains -0.1, -0.2; at T: 0, 0
  ]
