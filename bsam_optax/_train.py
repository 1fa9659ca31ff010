"""The main job's logic: train a small Flax classifier and evaluate its uncertainty.

:func:`train` runs, for a :class:`TrainConfig`::

  data     = load_dataset(config.dataset)                 # offline, no download
  tx       = OPTIMIZERS[config.optimizer].make_tx(...)    # cosine-decayed learning rate
  step     = OPTIMIZERS[config.optimizer].make_step(...)  # e.g. bo.bsam_step(loss, tx, m)
  for epoch: lax.scan(step, epoch_batches(fold_in(k_data, epoch), data.train, B))
  evaluate on data.test (and data.ood):
    posterior mean   p(y|x, ω)         ("point_estimate" for non-Bayesian optimizers)
    model average    1/S Σ_j p(y|x, θ_j), θ_j ~ N(ω, 1/(N s))    (bayesian optimizers only)
  metrics: accuracy, NLL, Brier, ECE (20 bins), AUROC (misclassification), OOD AUROC

and writes ``reliability.png``, ``posterior_std.png`` and ``metrics.json`` to
``config.out_dir``. Keys: ``k = key(config.seed)``, and ``fold_in(k, i)`` for
initialization (0), data order (1), the steps (2, then ``fold_in(·, step)``)
and the posterior samples of the evaluation (3).

Optimizers live in the :data:`OPTIMIZERS` registry; adding one is one entry.
Weight decay is an L2 term added to the gradient for every optimizer (for
bSAM it is δ, the prior precision per example), so all methods share a prior.
"""

import dataclasses
import functools
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsam_optax import _bsam
from bsam_optax import _data
from bsam_optax import _models
from bsam_optax import _posterior
from bsam_optax import _sam
from bsam_optax import _step
from bsam_optax import distributed as _distributed
from bsam_optax import metrics as _metrics

# The mesh axis of data-parallel training.
_AXIS = "data"

__all__ = [
  "OPTIMIZERS",
  "Optimizer",
  "TrainConfig",
  "TrainResult",
  "check_config",
  "evaluate",
  "posterior_std_figure",
  "posterior_std_summary",
  "reliability_figure",
  "train",
]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What :func:`train` trains, and how. ``None`` means the optimizer's default."""

  dataset: str = "mnist1d"
  model: str = "cnn"
  optimizer: str = "bsam"
  epochs: int = 40
  batch_size: int = 128
  m: int = 8  # m-sharpness parts per batch (bSAM, SAM); ignored by adam / sgd
  learning_rate: float | None = None
  weight_decay: float | None = None  # δ for bSAM; an L2 term for the others
  rho: float | None = None
  damping: float = 0.1  # γ (bSAM)
  init_scale: float = 1.0  # initial s (bSAM)
  b1: float | None = None  # β1: momentum (bSAM, Adam, SGD)
  b2: float | None = None  # β2: scale decay (bSAM), second-moment decay (Adam)
  n_data_scale: float = 1.0  # N = n_data_scale * train size; > 1 tempers the posterior (App. G)
  batch_norm: bool = False
  width: int = 32  # channels of the CNN / 4 x width units per hidden MLP layer
  num_samples: int | None = None  # MNIST-1D: sequences to generate (default 5000)
  train_subset: int | None = None  # use only the first examples of the train split
  eval_samples: int = 32  # S, posterior samples of the model average
  num_bins: int = 20
  seed: int = 0
  out_dir: str | None = None
  progress: bool = True
  # Spread every batch over all devices of all processes (jax.devices()): each device takes m / D of the m parts
  # (m must be divisible by the device count D), so the result is that of m parts on one device. On by itself in a
  # multi-process run (bsam-optax train --coordinator ...).
  data_parallel: bool = False
  # Save params, optimizer state and history here after every epoch (orbax; the last two kept) and resume from
  # the latest epoch found there: a resumed run gives the numbers of an uninterrupted one.
  checkpoint_dir: str | None = None


class Optimizer(NamedTuple):
  """An entry of :data:`OPTIMIZERS`.

  Attributes:
    make_tx: ``(config, learning_rate_schedule, n_data) -> tx``.
    make_step: ``(loss_fn, tx, config, has_aux, thread_aux, mesh) -> step`` with
      ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state, out)``
      (the signature of :func:`bsam_optax.bsam_step`; ``out["loss"]`` is the
      mean loss at the first gradient's point). With a ``mesh`` (axis
      ``"data"``) the step takes the global batch sharded over the devices.
    bayesian: whether ``opt_state`` holds a bSAM posterior (then the model
      average and the posterior std are reported).
    defaults: values for the :class:`TrainConfig` fields left ``None``
      (``learning_rate``, ``weight_decay``, ``rho``, ``b1``, ``b2``).
    m_sharpness: whether the step splits the batch into ``config.m`` parts
      (else ``m`` is ignored and each device takes one part).
  """

  make_tx: Callable[[TrainConfig, optax.Schedule, float], optax.GradientTransformation]
  make_step: Callable[..., Callable]
  bayesian: bool
  defaults: Mapping[str, float]
  m_sharpness: bool = True


def _bsam_tx(config, schedule, n_data):
  return _bsam.bsam(
    schedule,
    n_data,
    rho=config.rho,
    b1=config.b1,
    b2=config.b2,
    weight_decay=config.weight_decay,
    damping=config.damping,
    init_scale=config.init_scale,
  )


# split="unroll": the m parts as m copies of the graph; ~0.55x vmap's step time for the CNN on CPU.
def _step_kwargs(config, mesh, m_sharpness=True):
  """m per device, and the mesh arguments: the m parts are spread over the mesh's devices."""
  devices = 1 if mesh is None else mesh.shape[_AXIS]
  kwargs = {"axis_name": None if mesh is None else _AXIS, "mesh": mesh}
  if m_sharpness:
    kwargs["m"] = config.m // devices
  return kwargs


# split="unroll": the m parts as m copies of the graph; ~0.55x vmap's step time for the CNN on CPU.
def _bsam_make_step(loss_fn, tx, config, has_aux, thread_aux, mesh=None):
  return _bsam.bsam_step(
    loss_fn, tx, has_aux=has_aux, thread_aux=thread_aux, split="unroll", **_step_kwargs(config, mesh)
  )


def _sam_make_step(loss_fn, tx, config, has_aux, thread_aux, mesh=None):
  return _sam.sam_step(
    loss_fn, tx, rho=config.rho, has_aux=has_aux, thread_aux=thread_aux, split="unroll", **_step_kwargs(config, mesh)
  )


def _gradient_make_step(loss_fn, tx, config, has_aux, thread_aux, mesh=None):
  del thread_aux  # one gradient, one pass: m-sharpness does not apply (each device: one part of the batch)
  kwargs = _step_kwargs(config, mesh, m_sharpness=False)
  return _step.make_perturbation_step(loss_fn, tx, _step.PerturbationRule(), has_aux=has_aux, **kwargs)


def _with_l2(config, tx):
  return optax.chain(optax.add_decayed_weights(config.weight_decay), tx)


# Defaults picked by validation accuracy on MNIST-1D / CNN / 40 epochs / seed 0 from a few one-at-a-time runs, not
# a full grid (bSAM: α 0.2, 0.5, 1; β2 0.99, 0.999; γ 0.01, 0.1; ρ 0.02, 0.05; N x 1, 2, 4, 8 — α = 1 and γ = 0.01
# diverged; Adam: α 1e-3 to 3e-2, L2 1e-4 to 1e-2; SGD: α 0.1, 0.5). β2 = 0.99 lets bSAM's scale s adapt within
# the ~1k steps of the run. Seeds 1 and 2 of the bSAM default reach the same validation accuracy (0.96).
OPTIMIZERS: dict[str, Optimizer] = {
  "bsam": Optimizer(
    _bsam_tx,
    _bsam_make_step,
    bayesian=True,
    defaults={"learning_rate": 0.5, "weight_decay": 1e-3, "rho": 0.02, "b1": 0.9, "b2": 0.99},
  ),
  "adam": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.adam(lr, b1=c.b1, b2=c.b2)),
    _gradient_make_step,
    bayesian=False,
    defaults={"learning_rate": 3e-2, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.999},
    m_sharpness=False,
  ),
  "sgd": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.sgd(lr, momentum=c.b1)),
    _gradient_make_step,
    bayesian=False,
    defaults={"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.0},
    m_sharpness=False,
  ),
  # SAM-SGD / SAM-Adam: the baselines' settings with SAM's ρ (not tuned further).
  "sam_sgd": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.sgd(lr, momentum=c.b1)),
    _sam_make_step,
    bayesian=False,
    defaults={"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.05, "b1": 0.9, "b2": 0.0},
  ),
  "sam_adam": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.adam(lr, b1=c.b1, b2=c.b2)),
    _sam_make_step,
    bayesian=False,
    defaults={"learning_rate": 3e-2, "weight_decay": 1e-3, "rho": 0.05, "b1": 0.9, "b2": 0.999},
  ),
}


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns."""

  config: TrainConfig  # with the optimizer's defaults filled in
  model: Any  # the flax module
  params: Any  # ω, the posterior mean (the weights, for non-Bayesian optimizers)
  opt_state: Any
  batch_stats: Any  # None without BatchNorm
  metrics: dict[str, dict[str, float]]  # "posterior_mean" and "model_average", or "point_estimate"
  posterior_std: dict[str, dict[str, float]] | None  # per layer: size, mean, median, min, max
  history: list[dict[str, float]]  # per epoch: loss, validation accuracy
  wall_time_s: float
  files: dict[str, str]  # name -> path of what was written


# --------------------------------------------------------------------------- config


def _positive_int(config, name, allow_none=False):
  value = getattr(config, name)
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


def _nonnegative(config, name, strict=False):
  value = getattr(config, name)
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  if value < 0 or (strict and value == 0):
    raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {value!r}")


def _train_size(config) -> int:
  data = _load(config)
  return len(data.train.y)


def _load(config) -> _data.Dataset:
  data = _data.load_dataset(config.dataset, num_samples=config.num_samples)
  if config.train_subset is not None:
    train = jax.tree.map(lambda a: a[: config.train_subset], data.train)
    data = dataclasses.replace(data, train=train)
  return data


def _check_out_dir(out_dir) -> None:
  if out_dir is None:
    return
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f"output path {out_dir} exists and is not a directory")
  try:
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=out_dir):
      pass
  except OSError as err:
    raise ValueError(f"cannot write to output directory {out_dir}: {err.strerror or err}") from err


def check_config(config: TrainConfig) -> TrainConfig:
  """Validates ``config`` and fills in the optimizer's defaults.

  Loads the data set (to check sizes), makes ``config.out_dir`` (checking
  that it is writable) and checks that a run found in ``config.checkpoint_dir``
  has the same training settings, so that errors come before training starts.

  Raises:
    ValueError: with a message naming the bad field.
  """
  if config.dataset not in _data.DATASETS:
    raise ValueError(f"unknown dataset {config.dataset!r}; choose one of {_data.DATASETS}")
  if config.model not in _models.MODELS:
    raise ValueError(f"unknown model {config.model!r}; choose one of {_models.MODELS}")
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose one of {tuple(OPTIMIZERS)}")
  for name in ("epochs", "batch_size", "m", "width", "eval_samples", "num_bins"):
    _positive_int(config, name)
  _positive_int(config, "train_subset", allow_none=True)
  if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
    raise ValueError(f"seed must be an int >= 0, got {config.seed!r}")
  for name in ("learning_rate", "weight_decay", "rho", "damping", "b1", "b2"):
    _nonnegative(config, name)
  for name in ("init_scale", "n_data_scale"):
    _nonnegative(config, name, strict=True)
  for name in ("b1", "b2"):
    if getattr(config, name) is not None and getattr(config, name) >= 1:
      raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)!r}")
  if config.batch_size % config.m:
    raise ValueError(
      f"m={config.m} must divide batch_size={config.batch_size}: m-sharpness splits each batch into m equal parts"
    )
  if not isinstance(config.data_parallel, bool):
    raise ValueError(f"data_parallel must be a bool, got {config.data_parallel!r}")
  if config.data_parallel:
    devices = jax.device_count()
    where = f"{devices} devices over {jax.process_count()} process(es)"
    if OPTIMIZERS[config.optimizer].m_sharpness and config.m % devices:
      raise ValueError(
        f"data_parallel: m={config.m} must be divisible by the number of devices ({where}): each device takes "
        f"m / {devices} of the m-sharpness parts"
      )
    if config.batch_size % devices:
      raise ValueError(
        f"data_parallel: batch_size={config.batch_size} must be divisible by the number of devices ({where})"
      )
  if config.dataset != "mnist1d" and config.num_samples is not None:
    raise ValueError("num_samples applies to the mnist1d dataset only")
  if config.num_samples is not None and (
    isinstance(config.num_samples, bool) or not isinstance(config.num_samples, int) or config.num_samples < 100
  ):
    raise ValueError(f"num_samples must be an int >= 100, got {config.num_samples!r}")
  n_train = _train_size(config)
  if config.batch_size > n_train:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {n_train} training examples")
  _check_out_dir(config.out_dir)
  if config.checkpoint_dir is not None:
    if not isinstance(config.checkpoint_dir, (str, os.PathLike)):
      raise ValueError(f"checkpoint_dir must be a path, got {config.checkpoint_dir!r}")
    if os.path.exists(config.checkpoint_dir) and not os.path.isdir(config.checkpoint_dir):
      raise ValueError(f"checkpoint_dir {config.checkpoint_dir} exists and is not a directory")
  defaults = OPTIMIZERS[config.optimizer].defaults
  config = dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
  if config.checkpoint_dir is not None:
    resume = _Resume(config)
    try:
      resume.check()
    finally:
      resume.close()
  return config


# --------------------------------------------------------------------------- training


def _make_model(config, num_classes):
  if config.model == "mlp":
    kwargs = {"features": (4 * config.width, 4 * config.width)}
  else:
    kwargs = {"channels": (config.width,) * 3}
  return _models.make_model(config.model, num_classes, batch_norm=config.batch_norm, **kwargs)


def _apply_fn(model, batch_stats):
  """``apply(params, x) -> logits`` in evaluation mode."""

  def apply(params, x):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
    return model.apply(variables, x)

  return apply


def _loss_fn(model, batch_norm):
  def loss(params, batch, *batch_stats):
    if batch_norm:
      variables = {"params": params, "batch_stats": batch_stats[0]}
      logits, updates = model.apply(variables, batch.x, train=True, mutable=["batch_stats"])
    else:
      logits = model.apply({"params": params}, batch.x, train=True)
    value = optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()
    return (value, updates["batch_stats"]) if batch_norm else value

  return loss


def _make_run_epoch(step, batch_norm):
  @jax.jit
  def run_epoch(params, opt_state, batch_stats, batches, key, first_step):
    def body(carry, xs):
      params, opt_state, batch_stats = carry
      index, batch = xs
      step_key = jax.random.fold_in(key, first_step + index)
      loss_args = (batch_stats,) if batch_norm else ()
      params, opt_state, out = step(params, opt_state, batch, step_key, *loss_args)
      if batch_norm:
        batch_stats = out.aux
      # out["loss"]: the mean loss at the first point (at θ for bSAM).
      return (params, opt_state, batch_stats), out["loss"]

    n = jax.tree.leaves(batches)[0].shape[0]
    (params, opt_state, batch_stats), losses = jax.lax.scan(
      body, (params, opt_state, batch_stats), (jnp.arange(n), batches)
    )
    return params, opt_state, batch_stats, jnp.mean(losses)

  return run_epoch


def evaluate(
  apply_fn: Callable,
  params,
  opt_state,
  data: _data.Dataset,
  key: jax.Array | None = None,
  *,
  num_samples: int = 32,
  num_bins: int = 20,
) -> tuple[dict[str, dict[str, float]], dict[str, _metrics.ReliabilityBins]]:
  """Test metrics of the posterior mean and, with a ``key``, of the model average.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` in evaluation mode.
    params: ω.
    opt_state: a state holding a bSAM posterior (used only with ``key``).
    data: the data set; its ``test`` split and ``ood`` inputs are used.
    key: the key of the posterior samples; ``None`` for the posterior mean only.
    num_samples: S, posterior samples of the model average.
    num_bins: bins of the ECE and the reliability diagram.

  Returns:
    ``(metrics, bins)``: ``metrics[name]`` has accuracy, nll, brier, ece,
    auroc (misclassification) and ood_auroc as floats; ``bins[name]`` the
    :class:`~bsam_optax.metrics.ReliabilityBins`, for ``name`` in
    ``"posterior_mean"`` and (with ``key``) ``"model_average"``.
  """
  inputs = jnp.concatenate([data.test.x, data.ood])
  n_test = data.test.x.shape[0]
  predictions = {"posterior_mean": jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x)))(params, inputs)}
  if key is not None:
    average = jax.jit(
      lambda p, s, x, k: _posterior.predictive(apply_fn, k, p, s, x, num_samples, chunk_size=math.gcd(num_samples, 8))
    )
    predictions["model_average"] = average(params, opt_state, inputs, key)
  metrics, bins = {}, {}
  for name, probs in predictions.items():
    values, bins[name] = _all_metrics(probs[:n_test], data.test.y, probs[n_test:], num_bins)
    metrics[name] = {k: float(v) for k, v in values.items()}
  return metrics, bins


@functools.partial(jax.jit, static_argnames="num_bins")
def _all_metrics(probs_test, labels, probs_ood, num_bins):
  # One compilation for all metrics (eager, each jnp op would compile on its own).
  values = _metrics.classification_metrics(probs_test, labels, num_bins)
  values["ood_auroc"] = _metrics.ood_auroc(probs_test, probs_ood)
  return values, _metrics.reliability_bins(probs_test, labels, num_bins)


def _leaf_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def posterior_std_summary(std) -> dict[str, dict[str, float]]:
  """Per parameter leaf (``"Conv_0/kernel"`` ...): size, mean, median, min and max of the std."""
  summary = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(std)[0]:
    values = np.asarray(leaf, np.float64).ravel()
    summary[_leaf_name(path)] = {
      "size": int(values.size),
      "mean": float(values.mean()),
      "median": float(np.median(values)),
      "min": float(values.min()),
      "max": float(values.max()),
    }
  return summary


# Fields that may differ between a run and its resumption (the rest must match: the schedule depends on epochs).
# data_parallel may change: a run on several devices or processes goes on on one, and back.
_RESUMABLE_CHANGES = ("out_dir", "progress", "checkpoint_dir", "eval_samples", "num_bins", "data_parallel")


class _Resume:
  """Per-epoch checkpoints of the training state and history, with orbax's CheckpointManager.

  Every process calls every method (orbax writes each array once and syncs
  the processes). The checkpoint of epoch ``e`` holds the state after ``e``
  epochs, the history so far and the config; the data order and the step
  keys derive from the seed and the epoch, so training on from it repeats
  the uninterrupted run exactly.
  """

  def __init__(self, config: TrainConfig):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.config = config
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(config.checkpoint_dir), options=options)

  def _config_json(self):
    return {k: v for k, v in dataclasses.asdict(self.config).items() if k not in _RESUMABLE_CHANGES}

  def check(self) -> None:
    """Raises ValueError if the latest checkpoint is of a run with other training settings."""
    ocp = self._ocp
    epoch = self.manager.latest_step()
    if epoch is None:
      return
    saved = self.manager.restore(epoch, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    ours = self._config_json()
    changed = sorted(k for k in ours.keys() | saved.keys() if ours.get(k) != saved.get(k))
    if changed:
      diffs = ", ".join(f"{k}={saved.get(k)!r} there, {ours.get(k)!r} here" for k in changed)
      raise ValueError(
        f"checkpoint_dir {self.config.checkpoint_dir} holds a run with another config ({diffs}); resume with "
        "the same settings or use a new checkpoint_dir"
      )

  def restore(self, state, history):
    """``(state, history)`` from the latest checkpoint, or the arguments if there is none."""
    ocp = self._ocp
    epoch = self.manager.latest_step()
    if epoch is None:
      return state, history
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = self.manager.restore(
      epoch,
      args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore()),
    )
    return jax.tree.structure(state).unflatten(jax.tree.leaves(restored["state"])), restored["history"]["epochs"]

  def save(self, state, history) -> None:
    ocp = self._ocp
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      history=ocp.args.JsonSave({"epochs": history}),
      config=ocp.args.JsonSave(self._config_json()),
    )
    self.manager.save(len(history), args=args)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train(config: TrainConfig) -> TrainResult:
  """Trains ``config.model`` on ``config.dataset`` with ``config.optimizer``.

  Args:
    config: a :class:`TrainConfig`.

  Returns:
    A :class:`TrainResult` with the trained parameters and state, the test
    metrics, the posterior std summary and the paths of the written files.

  Raises:
    ValueError: for a bad config or an unwritable ``out_dir``, before training.

  Example:
    >>> from bsam_optax._train import TrainConfig, train
    >>> result = train(TrainConfig(dataset="digits", model="mlp", epochs=1, progress=False))
    >>> sorted(result.metrics)
    ['model_average', 'posterior_mean']
  """
  start = time.perf_counter()
  config = check_config(config)
  spec = OPTIMIZERS[config.optimizer]
  data = _load(config)
  n_train = len(data.train.y)
  n_data = config.n_data_scale * n_train
  steps_per_epoch = _data.num_batches(data.train, config.batch_size)
  total_steps = steps_per_epoch * config.epochs
  schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  tx = spec.make_tx(config, schedule, n_data)

  key = jax.random.key(config.seed)
  model = _make_model(config, data.num_classes)
  variables = jax.jit(model.init)(jax.random.fold_in(key, 0), data.train.x[:1])
  params, batch_stats = variables["params"], variables.get("batch_stats")
  opt_state = tx.init(params)
  loss = _loss_fn(model, config.batch_norm)
  data_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  # Data parallel: one mesh over the devices of every process; the state is replicated, and every process computes
  # the same epoch of batches (same key) and places only its devices' rows (shard_global_batch).
  mesh = _distributed.data_mesh(_AXIS) if config.data_parallel else None
  if mesh is not None:
    params, opt_state, batch_stats, step_key = _distributed.replicate((params, opt_state, batch_stats, step_key), mesh)
    parts = _step_kwargs(config, mesh, spec.m_sharpness).get("m", 1)  # per device, for the divisibility check
  step = spec.make_step(loss, tx, config, has_aux=config.batch_norm, thread_aux=config.batch_norm, mesh=mesh)
  run_epoch = _make_run_epoch(step, config.batch_norm)
  validation_accuracy = jax.jit(lambda p, bs, x, y: jnp.mean(jnp.argmax(_apply_fn(model, bs)(p, x), -1) == y))

  history = []
  resume = _Resume(config) if config.checkpoint_dir is not None else None
  if resume is not None:
    (params, opt_state, batch_stats), history = resume.restore((params, opt_state, batch_stats), history)
  epochs = range(len(history), config.epochs)
  bar = None
  primary = jax.process_index() == 0  # only process 0 shows progress and writes files
  if config.progress and primary:
    from tqdm.auto import tqdm

    bar = tqdm(
      epochs,
      desc=f"{config.optimizer} {config.model} {config.dataset}",
      unit="epoch",
      dynamic_ncols=True,
      initial=len(history),
      total=config.epochs,
    )
    epochs = bar
  for epoch in epochs:
    batches = _data.epoch_batches(jax.random.fold_in(data_key, epoch), data.train, config.batch_size)
    if mesh is not None:
      batches = jax.tree.map(np.asarray, batches)
      batches = _distributed.shard_global_batch(batches, mesh, _AXIS, m=parts, batch_axis=1)
    params, opt_state, batch_stats, epoch_loss = run_epoch(
      params, opt_state, batch_stats, batches, step_key, epoch * steps_per_epoch
    )
    val_acc = float(validation_accuracy(params, batch_stats, data.validation.x, data.validation.y))
    history.append({"epoch": epoch + 1, "loss": float(epoch_loss), "validation_accuracy": val_acc})
    if resume is not None:
      resume.save((params, opt_state, batch_stats), history)
    if bar is not None:
      bar.set_postfix(loss=f"{float(epoch_loss):.3f}", val_acc=f"{val_acc:.3f}")
  if bar is not None:
    bar.close()
  if resume is not None:
    resume.close()
  if mesh is not None:  # evaluation runs on every process alike, on its own first device
    params, opt_state, batch_stats = jax.device_put(_distributed.to_host((params, opt_state, batch_stats)))

  eval_key = jax.random.fold_in(key, 3) if spec.bayesian else None
  apply_fn = _apply_fn(model, batch_stats)
  metrics, bins = evaluate(
    apply_fn, params, opt_state, data, eval_key, num_samples=config.eval_samples, num_bins=config.num_bins
  )
  if not spec.bayesian:  # no posterior: the weights are a point estimate
    metrics = {"point_estimate": metrics["posterior_mean"]}
    bins = {"point_estimate": bins["posterior_mean"]}
  std_summary, std = None, None
  if spec.bayesian:
    _, std = _posterior.posterior(params, opt_state)
    std_summary = posterior_std_summary(std)
  wall_time = time.perf_counter() - start

  files = {}
  if config.out_dir is not None and primary:
    files = _write_outputs(config, metrics, bins, std, std_summary, history, wall_time)
  return TrainResult(
    config=config,
    model=model,
    params=params,
    opt_state=opt_state,
    batch_stats=batch_stats,
    metrics=metrics,
    posterior_std=std_summary,
    history=history,
    wall_time_s=wall_time,
    files=files,
  )


# --------------------------------------------------------------------------- figures


def reliability_figure(bins: dict[str, _metrics.ReliabilityBins], title: str = ""):
  """A reliability diagram (accuracy vs confidence per bin), one panel per entry of ``bins``."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(bins), figsize=(4 * len(bins), 4), squeeze=False)
  for ax, (name, b) in zip(axes[0], bins.items(), strict=True):
    edges = np.asarray(b.bin_edges)
    counts = np.asarray(b.counts)
    width = np.diff(edges)
    acc = np.where(counts > 0, np.asarray(b.accuracy), np.nan)
    conf = np.where(counts > 0, np.asarray(b.mean_confidence), np.nan)
    ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar(edges[:-1], conf - acc, bottom=acc, width=width, align="edge", color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ece = np.sum(counts * np.abs(np.nan_to_num(acc) - np.nan_to_num(conf))) / max(counts.sum(), 1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def posterior_std_figure(std, title: str = "posterior std per layer"):
  """Histograms of log10 of the posterior std, one panel per parameter leaf."""
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  leaves = jax.tree_util.tree_flatten_with_path(std)[0]
  cols = min(4, len(leaves))
  rows = -(-len(leaves) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, (path, leaf) in zip(axes.ravel(), leaves, strict=False):
    values = np.log10(np.asarray(leaf, np.float64).ravel())
    ax.hist(values, bins=40, color="tab:blue")
    ax.set_title(f"{_leaf_name(path)} ({values.size})", fontsize=9)
    ax.set_xlabel("log10 std", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(leaves) :]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def _write_outputs(config, metrics, bins, std, std_summary, history, wall_time):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = os.path.abspath(config.out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = {}
  title = f"{config.optimizer} / {config.model} / {config.dataset}"
  fig = reliability_figure(bins, title)
  files["reliability"] = os.path.join(out_dir, "reliability.png")
  fig.savefig(files["reliability"], dpi=100)
  plt.close(fig)
  if std is not None:
    fig = posterior_std_figure(std, f"bSAM posterior std, 1/sqrt(N s) ({title})")
    files["posterior_std"] = os.path.join(out_dir, "posterior_std.png")
    fig.savefig(files["posterior_std"], dpi=100)
    plt.close(fig)
  files["metrics"] = os.path.join(out_dir, "metrics.json")
  with open(files["metrics"], "w") as f:
    json.dump(
      {
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        "posterior_std": std_summary,
        "history": history,
        "wall_time_s": wall_time,
      },
      f,
      indent=2,
    )
  return files
