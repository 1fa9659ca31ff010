"""Per-epoch checkpoints of the main job, on the library's :func:`bsam_optax.save_checkpoint`.

A checkpoint directory of ``bsam-optax train --checkpoint-dir DIR`` holds::

  DIR/run.json    the training settings of the run (written before the first epoch)
  DIR/<e>/        the state after epoch e: params, optimizer state, BatchNorm statistics and the
                  per-epoch history, one bsam_optax.save_checkpoint directory (the last two kept)

The data order and the step keys derive from the seed and the epoch, so
training on from epoch ``e`` repeats the uninterrupted run exactly. A
directory is written whole or not at all (orbax writes to a temporary name and
renames it when complete), so a run killed while saving leaves the previous
epoch as the latest. Every process calls every method: orbax writes each array
once; only process 0 writes ``run.json`` and deletes old epochs.

Errors name the directory: :class:`~bsam_optax.app.config.ConfigError` for a
run with other training settings, :class:`CheckpointError` for a directory
holding other files, or a checkpoint that cannot be read.
"""

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import numpy as np

import bsam_optax as bo
from bsam_optax.app.config import ConfigError

__all__ = ["CheckpointError", "EpochCheckpoints"]

# Fields that may differ between a run and its resumption (the rest must match: the schedule depends on epochs).
# data_parallel may change: a run on several devices or processes goes on on one, and back.
RESUMABLE_CHANGES = ("out_dir", "progress", "checkpoint_dir", "eval_samples", "num_bins", "data_parallel")
_RUN_FILE = "run.json"
_FORMAT = "bsam-optax train checkpoints, version 1"
# An epoch's directory, or orbax's temporary one for it (left by a run killed while saving).
_EPOCH = re.compile(r"^(\d+)(\.orbax-checkpoint-tmp.*)?$")
_KEEP = 2


class CheckpointError(ValueError):
  """A checkpoint directory that holds something else, or a checkpoint that cannot be read."""


class EpochCheckpoints:
  """The checkpoints of one run in ``config.checkpoint_dir``.

  Checks the directory when made: it must be empty, new, or hold a run of
  the same training settings (:data:`RESUMABLE_CHANGES` may differ).

  Raises:
    ConfigError: the directory holds a run with other training settings.
    CheckpointError: it holds other files, or an unreadable ``run.json``.
  """

  def __init__(self, config):
    self.directory = os.path.abspath(os.fspath(config.checkpoint_dir))
    self.settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}
    self.primary = jax.process_index() == 0
    self._check()
    if self.primary:
      os.makedirs(self.directory, exist_ok=True)
      for name in os.listdir(self.directory):  # left by a run killed while saving; never the latest
        if _EPOCH.match(name) and _EPOCH.match(name).group(2):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      self._write_run_file()

  def epochs(self) -> list[int]:
    """The epochs saved, in order."""
    if not os.path.isdir(self.directory):
      return []
    matches = [_EPOCH.match(name) for name in os.listdir(self.directory)]
    return sorted(int(m.group(1)) for m in matches if m and not m.group(2))

  def _check(self) -> None:
    if not os.path.isdir(self.directory) or not os.listdir(self.directory):
      return
    run_file = os.path.join(self.directory, _RUN_FILE)
    if not os.path.exists(run_file):
      names = sorted(os.listdir(self.directory))
      shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
      raise CheckpointError(
        f"checkpoint_dir {self.directory} holds files that are not checkpoints of bsam-optax train (found {shown}, "
        f"no {_RUN_FILE}); give an empty or new directory"
      )
    try:
      with open(run_file) as f:
        saved = json.load(f)
      if saved.get("format") != _FORMAT:
        raise ValueError(f"format {saved.get('format')!r}, expected {_FORMAT!r}")
      saved = saved["config"]
    except (OSError, ValueError, KeyError, AttributeError) as err:
      raise CheckpointError(
        f"checkpoint_dir {self.directory}: cannot read {_RUN_FILE} ({type(err).__name__}: {err}); it is corrupt or "
        "was written by another program; give a new directory, or delete this one to start over"
      ) from err
    if not self.epochs():
      return  # a run that saved no epoch: nothing to resume, its settings do not bind
    ours = json.loads(json.dumps(self.settings))  # tuples -> lists, as saved
    changed = sorted(k for k in ours.keys() | saved.keys() if ours.get(k) != saved.get(k))
    if changed:
      diffs = ", ".join(f"{k}={saved.get(k)!r} there, {ours.get(k)!r} here" for k in changed)
      raise ConfigError(
        f"checkpoint_dir {self.directory} holds a run with another config ({diffs}); resume with "
        "the same settings or use a new checkpoint_dir",
        "checkpoint_dir",
      )

  def _write_run_file(self) -> None:
    path = os.path.join(self.directory, _RUN_FILE)
    with open(path + ".tmp", "w") as f:
      json.dump({"format": _FORMAT, "config": self.settings}, f, indent=2)
    os.replace(path + ".tmp", path)

  def restore(self, state: tuple[Any, Any, Any]) -> tuple[tuple[Any, Any, Any], list[dict[str, float]]]:
    """``((params, opt_state, batch_stats), history)`` of the latest epoch, or ``(state, [])`` if none.

    ``state`` gives the structure, shapes, dtypes and shardings.

    Raises:
      CheckpointError: naming the epoch's directory, if it cannot be read.
    """
    epochs = self.epochs()
    if not epochs:
      return state, []
    epoch = epochs[-1]
    path = os.path.join(self.directory, str(epoch))
    params, opt_state, batch_stats = state
    # On this process's first device: every process reads the whole history (a multi-process restore needs shardings).
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    history_target = {
      k: jax.ShapeDtypeStruct((epoch,), np.float32, sharding=here) for k in ("loss", "validation_accuracy")
    }
    extra = {"history": history_target, **({} if batch_stats is None else {"batch_stats": batch_stats})}
    try:
      restored = bo.restore_checkpoint(path, params, opt_state, extra=extra)
      if restored.step != epoch:
        raise ValueError(f"it says it holds epoch {restored.step}")
    except (ValueError, FileNotFoundError) as err:
      previous = f"epoch {epochs[-2]}" if len(epochs) > 1 else "the start"
      raise CheckpointError(
        f"the checkpoint of epoch {epoch} in {path} cannot be read: {err}. Delete {path} to resume from {previous}, "
        "or give a new checkpoint_dir"
      ) from err
    history = restored.extra["history"]
    history = [
      {"epoch": e + 1, "loss": float(loss), "validation_accuracy": float(accuracy)}
      for e, (loss, accuracy) in enumerate(
        zip(np.asarray(history["loss"]), np.asarray(history["validation_accuracy"]), strict=True)
      )
    ]
    return (restored.params, restored.opt_state, restored.extra.get("batch_stats")), history

  def save(self, state: tuple[Any, Any, Any], history: list[dict[str, float]]) -> None:
    """Saves the state after epoch ``len(history)`` and deletes all but the last two epochs."""
    params, opt_state, batch_stats = state
    epoch = len(history)
    extra = {
      "history": {k: np.asarray([h[k] for h in history], np.float32) for k in ("loss", "validation_accuracy")},
      **({} if batch_stats is None else {"batch_stats": batch_stats}),
    }
    path = os.path.join(self.directory, str(epoch))
    bo.save_checkpoint(path, params, opt_state, step=epoch, extra=extra, overwrite=True)
    if self.primary:
      for old in self.epochs()[:-_KEEP]:
        shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)
