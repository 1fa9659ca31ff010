"""The main job under faults: a diverging run, a preempted run (SIGTERM) resumed, bad checkpoint directories.

Tiny runs (digits, an MLP of width 4 x 4, SGD where the optimizer does not matter) so that all of it takes
seconds; the kill-and-resume test runs the real command in a subprocess and kills it with SIGTERM.
"""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsam_optax import app
from bsam_optax.app import cli
from bsam_optax.app.checkpoint import EpochCheckpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = app.TrainConfig(
  dataset="digits",
  model="mlp",
  optimizer="sgd",
  epochs=3,
  batch_size=64,
  m=2,
  width=4,
  train_subset=256,
  eval_samples=2,
  progress=False,
)
TINY_FLAGS = ["--dataset", "digits", "--model", "mlp", "--width", "4", "--batch-size", "64", "--m", "2"]
TINY_FLAGS += ["--train-subset", "256", "--eval-samples", "2", "--no-progress"]


def test_diverging_run_stops_with_a_clear_message(tmp_path, capsys):
  # The command (bsam, lr 1e9), small: it stops in epoch 1, exit status 1, no figures of NaNs.
  out = tmp_path / "out"
  status = cli.main(["train", *TINY_FLAGS, "--epochs", "2", "--lr", "1e9", "--out", str(out)])
  err = capsys.readouterr().err
  assert status == 1, err
  assert re.search(r"training diverged: the loss is (nan|inf) at step", err) and "in epoch 1 of 2" in err, err
  assert "Try a lower learning rate (--lr, now 1e+09), a larger damping" in err, err
  assert "Traceback" not in err and not (out / "metrics.json").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  # Epoch 2's data holds a NaN: the run stops there, naming the step; epoch 1's checkpoint is kept as the latest.
  config = dataclasses.replace(TINY, checkpoint_dir=str(tmp_path / "ckpt"))
  epoch_batches = app.data.epoch_batches
  calls = []

  def poisoned(key, split, batch_size):
    batches = epoch_batches(key, split, batch_size)
    calls.append(1)
    return batches._replace(x=batches.x.at[1, 0, 0, 0].set(jnp.nan)) if len(calls) == 2 else batches

  monkeypatch.setattr(app.data, "epoch_batches", poisoned)
  with pytest.raises(app.TrainingDiverged, match=r"step 2 of 4 in epoch 2 of 3\); epoch 2 not saved") as info:
    app.train(config)
  assert (info.value.epoch, info.value.step) == (2, 6)
  assert f"{config.checkpoint_dir} keeps the last good epoch, 1" in str(info.value)
  assert sorted(os.listdir(config.checkpoint_dir)) == ["1", "run.json"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference: TINY (SGD) with 16 steps per epoch, 6 epochs, not interrupted."""
  config = dataclasses.replace(TINY, epochs=6, batch_size=16)
  return app.train(dataclasses.replace(config, out_dir=str(tmp_path_factory.mktemp("reference"))))


def test_sigterm_saves_and_the_same_command_resumes(uninterrupted, tmp_path):
  # A preempted job: SIGTERM while epoch 2 runs (right after epoch 1's checkpoint appears). The command saves the
  # epoch it is in and exits 128 + 15; run again, it resumes and ends with the uninterrupted run's numbers. (SGD
  # to keep it cheap; that bSAM's resumption, noise keys included, is bitwise is test_train.py's resume test.)
  ckpt, out = tmp_path / "ckpt", tmp_path / "out"
  command = [sys.executable, "-m", "bsam_optax", "train", *TINY_FLAGS, "--optimizer", "sgd", "--batch-size", "16"]
  command += ["--epochs", "6", "--checkpoint-dir", str(ckpt), "--out", str(out)]
  first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 120
  while not (ckpt / "1").exists() and first.poll() is None and time.monotonic() < deadline:
    time.sleep(0.01)
  first.send_signal(signal.SIGTERM)
  text = first.communicate(timeout=120)[0]
  assert first.returncode == 128 + signal.SIGTERM, text
  stopped = sorted(int(name) for name in os.listdir(ckpt) if name.isdigit())[-1]
  print(f"stopped after epoch {stopped} of 6")
  assert 1 <= stopped < 6 and f"stopped by SIGTERM after epoch {stopped} of 6" in text, text
  assert "Traceback" not in text and not (out / "metrics.json").exists()

  second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert second.returncode == 0, second.stdout + second.stderr
  written = json.loads((out / "metrics.json").read_text())
  assert written["history"] == uninterrupted.history
  assert written["metrics"] == uninterrupted.metrics


def _save_one_epoch(config):
  params = {"w": jnp.arange(6.0).reshape(2, 3)}
  opt_state = (jnp.ones(3), {"count": jnp.zeros((), jnp.int32)})
  checkpoints = EpochCheckpoints(config)
  checkpoints.save((params, opt_state, None), [{"epoch": 1, "loss": 0.5, "validation_accuracy": 0.25}])
  return checkpoints, (params, opt_state, None)


def test_resumes_what_it_saved(tmp_path):
  checkpoints, state = _save_one_epoch(dataclasses.replace(TINY, checkpoint_dir=str(tmp_path)))
  restored, history = checkpoints.restore(jax.tree.map(jnp.zeros_like, state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert history == [{"epoch": 1, "loss": 0.5, "validation_accuracy": 0.25}]


@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_a_corrupt_checkpoint_is_an_error_naming_it(damage, tmp_path):
  config = dataclasses.replace(TINY, checkpoint_dir=str(tmp_path))
  checkpoints, state = _save_one_epoch(config)
  # the file of the arrays (orbax's ocdbt data) and the metadata of the tree
  targets = [os.path.join(tmp_path, "1", "_METADATA")]
  targets += [os.path.join(tmp_path, "1", "d", name) for name in os.listdir(tmp_path / "1" / "d")]
  for path in targets:
    with open(path, "rb") as f:
      data = f.read()
    if damage == "delete":
      os.remove(path)
    else:
      with open(path, "wb") as f:
        f.write(data[: len(data) // 2] if damage == "truncate" else bytes(b ^ 0x5A for b in data))
  message = rf"the checkpoint of epoch 1 in {tmp_path}/1 cannot be read: .*Delete {tmp_path}/1 to resume from the start"
  with pytest.raises(app.CheckpointError, match=message):
    EpochCheckpoints(config).restore(state)


def test_a_foreign_directory_is_an_error_before_training(tmp_path, capsys):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  (tmp_path / "1").mkdir()
  config = dataclasses.replace(TINY, checkpoint_dir=str(tmp_path))
  with pytest.raises(app.CheckpointError, match=rf"checkpoint_dir {tmp_path} holds files that are not checkpoints"):
    app.train(config)
  # the command: exit 1 with the message, no traceback; a garbled run.json too
  assert cli.main(["train", *TINY_FLAGS, "--checkpoint-dir", str(tmp_path), "--out", str(tmp_path.parent / "o")]) == 1
  assert "found 1, notes.txt, no run.json); give an empty or new directory" in capsys.readouterr().err
  (tmp_path / "run.json").write_text("{garbled")
  with pytest.raises(app.CheckpointError, match=rf"checkpoint_dir {tmp_path}: cannot read run.json \(JSONDecodeError"):
    app.train(config)
