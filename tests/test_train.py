"""Tests for bsam_optax.app.train and app.config: the loop, its outputs, the optimizer registry, config checks."""

import dataclasses
import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

from bsam_optax import app
from bsam_optax.app import report

# Tiny: 256 digits, MLP of width 4 x 8, 2 epochs of 4 batches. Compilation dominates the cost, so
# the tests train as few times as they can.
TINY = app.TrainConfig(
  dataset="digits",
  model="mlp",
  epochs=2,
  batch_size=64,
  m=4,
  width=8,
  train_subset=256,
  eval_samples=4,
  progress=False,
)


# All of digits' 1259 training images, 8 epochs: enough to learn.
LEARN = dataclasses.replace(TINY, epochs=8, train_subset=None)


@pytest.fixture(scope="module")
def bsam_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bsam")
  return app.train(dataclasses.replace(LEARN, out_dir=str(out)))


def test_bsam_result_and_files(bsam_result):
  r = bsam_result
  assert set(r.metrics) == {"posterior_mean", "model_average", "model_average_tempered", "temperature_selection"}
  metrics = {name: dict(values) for name, values in r.metrics.items()}  # a copy: the fixture is shared
  selection = metrics.pop("temperature_selection")
  assert "0" in selection and all(math.isfinite(v) for v in selection.values())
  assert metrics["model_average_tempered"].pop("temperature") >= 0
  assert r.posterior_diagnostics["overall"]["damping_fraction"] >= 0
  for values in metrics.values():
    assert set(values) == {"accuracy", "nll", "brier", "ece", "auroc", "ood_auroc"}
    assert all(math.isfinite(v) for v in values.values())
    assert 0.0 <= values["accuracy"] <= 1.0
  assert r.config.learning_rate == app.OPTIMIZERS["bsam"].defaults["learning_rate"]
  assert len(r.history) == 8 and all(math.isfinite(h["loss"]) for h in r.history)
  # One std summary per parameter leaf, std = 1 / sqrt(N s) > 0.
  assert set(r.posterior_std) == {
    "Dense_0/bias",
    "Dense_0/kernel",
    "Dense_1/bias",
    "Dense_1/kernel",
    "Dense_2/bias",
    "Dense_2/kernel",
  }
  assert all(0 < v["min"] <= v["median"] <= v["max"] for v in r.posterior_std.values())
  assert set(r.files) == {"reliability", "posterior_std", "metrics"}
  for path in r.files.values():
    assert os.path.getsize(path) > 0
  with open(r.files["reliability"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(r.files["metrics"]) as f:
    saved = json.load(f)
  assert saved["metrics"] == r.metrics and saved["config"]["optimizer"] == "bsam"


def test_learns_digits(bsam_result):
  for name in ("posterior_mean", "model_average", "model_average_tempered"):
    values = bsam_result.metrics[name]
    assert values["accuracy"] > 0.85
    assert values["ood_auroc"] > 0.5  # inverted digits look less certain than digits
  assert bsam_result.history[-1]["validation_accuracy"] > 0.85


def test_same_seed_same_parameters(bsam_result):
  again = app.train(dataclasses.replace(LEARN, out_dir=None))
  jax.tree.map(np.testing.assert_array_equal, again.params, bsam_result.params)
  jax.tree.map(np.testing.assert_array_equal, again.opt_state, bsam_result.opt_state)
  assert again.metrics == bsam_result.metrics


# One of each kind of step: one gradient (adam; sgd differs only in tx) and SAM (sam_adam; sam_sgd too).
@pytest.mark.parametrize("optimizer", ["adam", "sam_adam", "fisher_sam_sgd"])
def test_every_registered_optimizer_trains(optimizer, tmp_path):
  r = app.train(dataclasses.replace(TINY, optimizer=optimizer, out_dir=str(tmp_path)))
  assert set(r.metrics) == {"point_estimate"}  # no posterior: no model average
  assert r.posterior_std is None and "posterior_std" not in r.files
  assert all(math.isfinite(v) for v in r.metrics["point_estimate"].values())


def test_batch_norm():
  config = dataclasses.replace(TINY, batch_norm=True, m=2)
  r = app.train(config)
  assert r.batch_stats is not None
  # The running statistics moved from their initial values (mean 0, var 1).
  means = jax.tree.leaves(jax.tree.map(lambda x: float(np.abs(x).max()), r.batch_stats))
  assert max(means) > 0
  assert all(math.isfinite(v) for v in r.metrics["model_average"].values())


@pytest.mark.parametrize(
  "change, message",
  [
    ({"dataset": "cifar10"}, r"dataset must be one of \('mnist1d', 'digits'\), got 'cifar10'"),
    ({"model": "resnet"}, "model must be one of"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"m": 3}, "m=3 must divide batch_size=64"),
    ({"m": 0}, "m must be a positive int"),
    ({"epochs": -1}, "epochs must be a positive int"),
    ({"batch_size": 1000}, "exceeds the 256 training examples"),
    ({"train_subset": 0}, "train_subset must be a positive int"),
    ({"learning_rate": -0.1}, "learning_rate must be >= 0"),
    ({"rho": float("nan")}, "rho must be a finite number"),
    ({"init_scale": 0.0}, "init_scale must be > 0"),
    ({"b2": 1.0}, r"b2 must be a number in \[0, 1\), got 1.0"),
    ({"seed": -3}, "seed must be an int >= 0"),
    ({"num_samples": 1000}, "mnist1d dataset only"),
    ({"data_parallel": 1}, "data_parallel must be a bool"),
    ({"checkpoint_dir": 3}, "checkpoint_dir must be a path"),
    ({"checkpoint_dir": __file__}, "exists and is not a directory"),
    # conftest.py gives this process 8 CPU devices
    ({"data_parallel": True, "m": 4}, r"m=4 must be divisible by the number of devices \(8 devices over 1 process"),
    (
      {"data_parallel": True, "optimizer": "adam", "m": 2, "batch_size": 12},
      r"batch_size=12 must be divisible by the number of devices \(8",
    ),
  ],
)
def test_check_config_errors(change, message):
  with pytest.raises(ValueError, match=message):
    app.check_config(dataclasses.replace(TINY, **change))


def test_unwritable_out_dir_fails_before_training(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("")
  with pytest.raises(ValueError, match="not a directory"):
    app.check_config(dataclasses.replace(TINY, out_dir=str(a_file)))
  with pytest.raises(ValueError, match="cannot write"):
    app.check_config(dataclasses.replace(TINY, out_dir=str(a_file / "sub")))
  if os.geteuid() != 0:  # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="cannot write"):
      app.check_config(dataclasses.replace(TINY, out_dir=str(locked)))


def test_check_config_fills_optimizer_defaults():
  for name, spec in app.OPTIMIZERS.items():
    config = app.check_config(dataclasses.replace(TINY, optimizer=name))
    for field, value in spec.defaults.items():
      assert getattr(config, field) == value
  assert app.check_config(dataclasses.replace(TINY, learning_rate=0.01)).learning_rate == 0.01


@pytest.mark.parametrize(
  "change",
  [
    {"optimizer": "bsam"},
    {"optimizer": "adam"},
    # BatchNorm statistics threaded from the noisy to the perturbed pass, averaged over parts / devices
    {"optimizer": "bsam", "batch_norm": True, "epochs": 1},
  ],
  ids=["bsam", "adam", "bsam-batchnorm"],
)
def test_data_parallel_equals_one_device(change):
  # The 8 devices of conftest.py, one m-sharpness part each (adam: one eighth of the batch each), against
  # m=8 on one device: the same keys per part, so the same run up to the order of the sums over parts.
  one = app.train(dataclasses.replace(TINY, m=8, **change))
  spread = app.train(dataclasses.replace(TINY, m=8, data_parallel=True, **change))
  trees = [(one.params, spread.params), (one.opt_state, spread.opt_state), (one.batch_stats, spread.batch_stats)]
  for a, b in zip(*[jax.tree.leaves(t) for t in zip(*trees, strict=True)], strict=True):
    assert isinstance(b, jax.Array) and len(b.devices()) == 1
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  for name, metrics in one.metrics.items():
    for key, value in metrics.items():
      assert spread.metrics[name][key] == pytest.approx(value, abs=1e-4), (name, key)
  assert [h["loss"] for h in spread.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)


def test_resume_from_checkpoint_dir_repeats_the_run(tmp_path):
  config = dataclasses.replace(TINY, checkpoint_dir=str(tmp_path / "checkpoints"))
  straight = app.train(config)
  # one per epoch, the last two kept, and the run's settings
  assert sorted(os.listdir(config.checkpoint_dir)) == ["1", "2", "run.json"]
  shutil.rmtree(tmp_path / "checkpoints" / "2")  # as if stopped after the first epoch
  resumed = app.train(config)
  trees = [(r.params, r.opt_state, r.batch_stats) for r in (straight, resumed)]
  for a, b in zip(*[jax.tree.leaves(t) for t in trees], strict=True):
    np.testing.assert_array_equal(b, a)
  assert resumed.history == straight.history and resumed.metrics == straight.metrics
  with pytest.raises(ValueError, match=r"holds a run with another config \(seed=0 there, 1 here\)"):
    app.train(dataclasses.replace(config, seed=1))


def test_report_counts_the_examples_trained_on(bsam_result, capsys):
  # N of the posterior std is the size of the train split trained on, not the train_subset asked for
  # (a train_subset larger than the split trains on the whole split).
  config = dataclasses.replace(bsam_result.config, train_subset=5000)
  report.print_report(dataclasses.replace(bsam_result, config=config))
  assert f"(N = {len(bsam_result.data.train.y)})" in capsys.readouterr().out
  assert len(bsam_result.data.train.y) == 1259


@pytest.mark.parametrize("optimizer", ["mfvi", "vsam"])
def test_the_variational_family_trains_with_a_posterior(optimizer):
  r = app.train(dataclasses.replace(TINY, optimizer=optimizer, eval_samples=2))
  assert {"posterior_mean", "model_average"} <= set(r.metrics)
  assert all(math.isfinite(v) for v in r.metrics["model_average"].values())
  assert r.posterior_std is not None
