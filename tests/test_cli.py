"""Tests for the ``bsam-optax`` command: a tiny run end to end, and clear errors for bad flags and paths."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from bsam_optax.app import cli as _cli

TINY = [
  "train",
  "--dataset",
  "mnist1d",
  "--model",
  "cnn",
  "--width",
  "4",
  "--num-samples",
  "500",
  "--train-subset",
  "128",
  "--batch-size",
  "32",
  "--m",
  "2",
  "--epochs",
  "1",
  "--eval-samples",
  "2",
  "--no-progress",
]


def test_tiny_run_prints_metrics_and_writes_files(tmp_path, capsys):
  out = tmp_path / "run"
  assert _cli.main(TINY + ["--out", str(out)]) == 0
  printed = capsys.readouterr().out
  for text in ("accuracy", "NLL", "ECE", "AUROC", "OOD AUROC", "posterior mean", "model average (S=2)"):
    assert text in printed
  assert "posterior std 1/sqrt(N s) (N = 128)" in printed
  assert "Conv_0/kernel" in printed and "wall time" in printed
  for name in ("reliability.png", "posterior_std.png", "metrics.json"):
    assert (out / name).stat().st_size > 0


def test_baseline_prints_no_model_average(tmp_path, capsys):
  assert _cli.main(TINY + ["--optimizer", "adam", "--model", "mlp", "--out", str(tmp_path)]) == 0
  printed = capsys.readouterr().out
  assert "point estimate" in printed and "posterior mean" not in printed and "model average" not in printed
  assert "posterior std" not in printed
  assert not (tmp_path / "posterior_std.png").exists()


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--m", "3"], "m=3 must divide batch_size=32"),
    (["--m", "0"], "argument --m: m must be a positive int, got 0"),
    (["--epochs", "-2"], "argument --epochs: epochs must be a positive int, got -2"),
    (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
    (["--lr", "-1"], r"argument --lr: learning_rate must be >= 0, got -1.0"),
    (["--rho", "nan"], "argument --rho: rho must be a finite number, got nan"),
    (["--init-scale", "0"], "argument --init-scale: init_scale must be > 0, got 0.0"),
    (["--b2", "1.5"], r"argument --b2: b2 must be a number in \[0, 1\), got 1.5"),
    (["--dataset", "cifar10"], "invalid choice: 'cifar10'"),
    (["--optimizer", "lbfgs"], "invalid choice: 'lbfgs'"),
    (["--batch-size", "4096"], "exceeds the 128 training examples"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    # conftest.py gives this process 8 CPU devices
    (["--data-parallel", "--m", "4"], r"m=4 must be divisible by the number of devices \(8"),
    (["--num-processes", "0"], "num_processes must be >= 1"),
    (["--coordinator", "no-port"], "coordinator_address must be 'host:port'"),
  ],
)
def test_bad_flags_exit_2_with_a_message(flags, message, tmp_path, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _cli.main(TINY + ["--out", str(tmp_path)] + flags)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "usage: bsam-optax" in err
  assert re.search(message, err), err


def test_no_command_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    _cli.main([])
  assert exit_info.value.code == 2
  assert "required: COMMAND" in capsys.readouterr().err


def test_unwritable_out_fails_before_training(tmp_path, capsys):
  a_file = tmp_path / "file"
  a_file.write_text("")
  for out, message in ((a_file, "not a directory"), (a_file / "sub", "cannot write to output directory")):
    with pytest.raises(SystemExit) as exit_info:
      _cli.main(TINY + ["--out", str(out)])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "test metrics" not in captured.out  # nothing was trained


@pytest.mark.parametrize(
  "command",
  [[sys.executable, "-m", "bsam_optax"], [shutil.which("bsam-optax") or "bsam-optax"]],
  ids=["python -m", "console script"],
)
def test_entry_points(command, tmp_path):
  if command[0] == "bsam-optax":
    pytest.skip("the bsam-optax console script is not installed (pip install -e .)")
  help_text = subprocess.run(command + ["train", "--help"], capture_output=True, text=True, check=True).stdout
  assert "--optimizer" in help_text and "bsam" in help_text
  bad = subprocess.run(command + ["train", "--m", "0", "--out", str(tmp_path)], capture_output=True, text=True)
  assert bad.returncode == 2 and "m must be a positive int" in bad.stderr
  assert os.listdir(tmp_path) == []
