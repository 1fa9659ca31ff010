"""What the main job trains, and how: :class:`TrainConfig`, its one validation, and its command-line flags.

Every field of :class:`TrainConfig` carries its command-line description in
its metadata (:func:`option`): the help text, the argparse group, the check
its value must pass and, where it differs from ``--field-name``, the flag.
:mod:`bsam_optax.app.cli` builds its flags from these fields, and
:func:`check_config` checks them, so a new field is one line here.
"""

import dataclasses
import math
import os
import tempfile
from typing import Any

import jax

import bsam_optax as bo
from bsam_optax.app import data as _data
from bsam_optax.app import models as _models
from bsam_optax.app.optimizers import OPTIMIZERS

__all__ = ["ConfigError", "TrainConfig", "check_config", "option"]


class ConfigError(ValueError):
  """A bad :class:`TrainConfig` value; ``field`` names the field (``None`` for a whole-run problem)."""

  def __init__(self, message: str, field: str | None = None):
    super().__init__(message)
    self.field = field


# The checks a field's value must pass (None passes where the field's default is None).
_CHECKS = {
  "positive_int": "a positive int",
  "nonnegative_int": "an int >= 0",
  "nonnegative": "a finite number >= 0",
  "positive": "a finite number > 0",
  "unit": "a number in [0, 1)",
  "bool": "a bool",
  "path": "a path",
  "choice": "one of the choices",
}


def option(default: Any, help: str, *, group: str, check: str | None = None, **cli) -> Any:
  """A :class:`TrainConfig` field with its command-line description.

  Args:
    default: the field's default.
    help: the flag's help text.
    group: the argparse group of the flag.
    check: a key of ``_CHECKS``, the value's check in :func:`check_config`.
    **cli: ``flag=`` (default ``--field-name``), ``choices=``, ``cli_default=``
      (the command's default, where it differs from the field's).
  """
  if check is not None and check not in _CHECKS:
    raise ValueError(f"check must be one of {tuple(_CHECKS)}, got {check!r}")
  return dataclasses.field(default=default, metadata={"help": help, "group": group, "check": check, **cli})


_DATA, _OPT, _RUN = "data and model", "optimization", "evaluation and output"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What :func:`bsam_optax.app.train` trains, and how. ``None`` means the optimizer's default."""

  dataset: str = option(
    "mnist1d", "MNIST-1D (generated) or sklearn digits", group=_DATA, check="choice", choices=_data.DATASETS
  )
  model: str = option("cnn", "1-D/2-D CNN or ReLU MLP", group=_DATA, check="choice", choices=_models.MODELS)
  width: int = option(32, "CNN channels; the MLP has 4x width units", group=_DATA, check="positive_int")
  batch_norm: bool = option(False, "BatchNorm after every hidden layer", group=_DATA, check="bool")
  num_samples: int | None = option(
    None, "MNIST-1D: sequences to generate (default: 5000)", group=_DATA, check="positive_int"
  )
  train_subset: int | None = option(
    None, "train on the first N training examples only (default: all)", group=_DATA, check="positive_int"
  )
  optimizer: str = option("bsam", "the optimizer", group=_OPT, check="choice", choices=tuple(OPTIMIZERS))
  epochs: int = option(40, "epochs", group=_OPT, check="positive_int")
  batch_size: int = option(128, "examples per batch", group=_OPT, check="positive_int")
  m: int = option(8, "m-sharpness: parts per batch, must divide it (bSAM, SAM)", group=_OPT, check="positive_int")
  learning_rate: float | None = option(
    None, "peak learning rate α, cosine-decayed to 0 (default: per optimizer)", group=_OPT, check="nonnegative",
    flag="--lr",
  )  # fmt: skip
  weight_decay: float | None = option(
    None, "δ for bSAM (prior precision / N), L2 otherwise (default: per optimizer)", group=_OPT, check="nonnegative"
  )
  rho: float | None = option(
    None, "ρ, the perturbation radius (default: per optimizer)", group=_OPT, check="nonnegative"
  )
  damping: float = option(0.1, "γ (bSAM)", group=_OPT, check="nonnegative")
  init_scale: float = option(1.0, "initial s (bSAM)", group=_OPT, check="positive")
  curvature: str = option(
    "reparam_cv",
    "bSAM's scale update: abs_grad (Alg. 1's √s|g|), or reparam / reparam_cv (Hessian estimates; reparam_cv with "
    "the second gradient as control variate, see benchmarks/results/posterior_scale.md)",
    group=_OPT,
    check="choice",
    choices=bo.CURVATURES,
  )
  b1: float | None = option(None, "β1, momentum (default: per optimizer)", group=_OPT, check="unit")
  b2: float | None = option(
    None, "β2, bSAM scale / Adam second-moment decay (default: per optimizer)", group=_OPT, check="unit"
  )
  n_data_scale: float = option(1.0, "N = this x train size; > 1 tempers (App. G)", group=_OPT, check="positive")
  eval_samples: int = option(32, "S, posterior samples averaged", group=_RUN, check="positive_int")
  num_bins: int = option(20, "bins of the ECE and the reliability diagram", group=_RUN, check="positive_int")
  seed: int = option(0, "the one seed of init, data order and noise", group=_RUN, check="nonnegative_int")
  out_dir: str | None = option(
    None, "output folder (created); PNGs and metrics.json go here", group=_RUN, check="path", flag="--out",
    cli_default="bsam_optax_out",
  )  # fmt: skip
  progress: bool = option(True, "progress bar", group=_RUN, check="bool")
  # Spread every batch over all devices of all processes (jax.devices()): each device takes m / D of the m parts
  # (m must be divisible by the device count D), so the result is that of m parts on one device. On by itself in a
  # multi-process run (bsam-optax train --coordinator ...).
  data_parallel: bool = option(
    False,
    "spread each batch and its m parts over all devices (GPUs; on by itself with several processes)",
    group=_RUN,
    check="bool",
  )
  # Save params, optimizer state and history here after every epoch (the last two kept) and resume from the latest
  # epoch found there: a resumed run gives the numbers of an uninterrupted one. SIGTERM / SIGINT save and stop.
  checkpoint_dir: str | None = option(
    None,
    "save the training state here after every epoch and resume from the latest epoch found; SIGTERM or Ctrl-C "
    "then stops after the current epoch, saved",
    group=_RUN,
    check="path",
  )


def _check_field(name: str, check: str, value, choices=()) -> None:
  if value is None and check != "bool":
    return
  number = not isinstance(value, bool) and isinstance(value, (int, float))
  if check in ("positive_int", "nonnegative_int"):
    low = 1 if check == "positive_int" else 0
    ok = number and isinstance(value, int) and value >= low
  elif check in ("nonnegative", "positive", "unit"):
    if not number or not math.isfinite(value):
      raise ConfigError(f"{name} must be a finite number, got {value!r}", name)
    if value < 0 or (check == "positive" and value == 0):
      raise ConfigError(f"{name} must be {'> 0' if check == 'positive' else '>= 0'}, got {value!r}", name)
    ok = check != "unit" or value < 1
  elif check == "bool":
    ok = isinstance(value, bool)
  elif check == "path":
    ok = isinstance(value, (str, os.PathLike))
  else:
    ok = value in choices
  if not ok:
    what = f"one of {tuple(choices)}" if check == "choice" else _CHECKS[check]
    raise ConfigError(f"{name} must be {what}, got {value!r}", name)


def _check_out_dir(out_dir) -> None:
  if out_dir is None:
    return
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ConfigError(f"output path {out_dir} exists and is not a directory", "out_dir")
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as err:
    raise ConfigError(f"cannot write to output directory {out_dir}: {err.strerror or err}", "out_dir") from err


def check_config(config: TrainConfig) -> TrainConfig:
  """Validates ``config`` and fills in the optimizer's defaults (``None`` fields).

  Checks every field (its ``check``), then what ties fields together: m
  divides the batch, the data set's size (loaded, cached) holds a batch, the
  device count divides m and the batch (``data_parallel``); makes
  ``out_dir`` (checking that it is writable). :func:`bsam_optax.app.train`
  calls it once, before training.

  Raises:
    ConfigError: a ``ValueError`` whose message (and ``field``) names the bad field.

  Example:
    >>> from bsam_optax.app import TrainConfig, check_config
    >>> check_config(TrainConfig(dataset="digits", optimizer="adam")).learning_rate
    0.03
    >>> check_config(TrainConfig(dataset="digits", m=3))
    Traceback (most recent call last):
    ...
    bsam_optax.app.config.ConfigError: m=3 must divide batch_size=128: m-sharpness splits each batch into m equal parts
  """
  for field in dataclasses.fields(TrainConfig):
    meta = field.metadata
    if meta.get("check") is not None:
      _check_field(field.name, meta["check"], getattr(config, field.name), meta.get("choices", ()))
  if config.batch_size % config.m:
    raise ConfigError(
      f"m={config.m} must divide batch_size={config.batch_size}: m-sharpness splits each batch into m equal parts", "m"
    )
  if config.data_parallel:
    devices = jax.device_count()
    where = f"{devices} devices over {jax.process_count()} process(es)"
    if OPTIMIZERS[config.optimizer].m_sharpness and config.m % devices:
      raise ConfigError(
        f"data_parallel: m={config.m} must be divisible by the number of devices ({where}): each device takes "
        f"m / {devices} of the m-sharpness parts",
        "m",
      )
    if config.batch_size % devices:
      raise ConfigError(
        f"data_parallel: batch_size={config.batch_size} must be divisible by the number of devices ({where})",
        "batch_size",
      )
  if config.dataset != "mnist1d" and config.num_samples is not None:
    raise ConfigError("num_samples applies to the mnist1d dataset only", "num_samples")
  if config.num_samples is not None and config.num_samples < 100:
    raise ConfigError(f"num_samples must be an int >= 100, got {config.num_samples!r}", "num_samples")
  n_train = len(load_data(config).train.y)
  if config.batch_size > n_train:
    raise ConfigError(f"batch_size={config.batch_size} exceeds the {n_train} training examples", "batch_size")
  _check_out_dir(config.out_dir)
  if config.checkpoint_dir is not None and os.path.isfile(config.checkpoint_dir):
    raise ConfigError(f"checkpoint_dir {config.checkpoint_dir} exists and is not a directory", "checkpoint_dir")
  defaults: dict[str, Any] = {k: v for k, v in OPTIMIZERS[config.optimizer].defaults.items()}
  return dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def load_data(config: TrainConfig) -> _data.Dataset:
  """``config.dataset``, its train split cut to ``config.train_subset`` examples (loading is cached)."""
  data = _data.load_dataset(config.dataset, num_samples=config.num_samples)
  if config.train_subset is not None:
    data = dataclasses.replace(data, train=jax.tree.map(lambda a: a[: config.train_subset], data.train))
  return data
