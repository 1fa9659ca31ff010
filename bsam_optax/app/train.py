"""The main job's training loop: train a small Flax classifier and evaluate its uncertainty.

:func:`train` runs, for a :class:`~bsam_optax.app.TrainConfig`::

  data     = load_dataset(config.dataset)                 # offline, no download
  tx       = OPTIMIZERS[config.optimizer].make_tx(...)    # cosine-decayed learning rate
  state    = bsam_optax.flax.TrainState.create(apply_fn=model.apply, params=..., tx=tx, batch_stats=...)
  step     = bsam_optax.flax.make_train_step(cross_entropy, rule=OPTIMIZERS[config.optimizer].rule(config), m=...)
  for epoch: lax.scan(step, epoch_batches(fold_in(k_data, epoch), data.train, B))
             stop if a loss or a parameter is not finite (TrainingDiverged)
             save a checkpoint (checkpoint_dir); stop if SIGTERM / SIGINT came (TrainingInterrupted)
  evaluate on data.test (and data.ood): the posterior mean, the model average (bayesian optimizers)

and writes ``reliability.png``, ``posterior_std.png`` and ``metrics.json`` to
``config.out_dir``. Keys: ``k = key(config.seed)``, and ``fold_in(k, i)`` for
initialization (0), data order (1), the steps (2, then ``fold_in(·, step)``)
and the posterior samples of the evaluation (3).
"""

import dataclasses
import operator
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bsam_optax as bo
from bsam_optax import distributed as _distributed
from bsam_optax import flax as _flax
from bsam_optax.app import data as _data
from bsam_optax.app import models as _models
from bsam_optax.app import report as _report
from bsam_optax.app.checkpoint import EpochCheckpoints
from bsam_optax.app.config import TrainConfig
from bsam_optax.app.config import check_config
from bsam_optax.app.config import load_data
from bsam_optax.app.evaluate import diagnostics_summary
from bsam_optax.app.evaluate import evaluate
from bsam_optax.app.evaluate import posterior_std_summary
from bsam_optax.app.optimizers import AXIS
from bsam_optax.app.optimizers import OPTIMIZERS
from bsam_optax.app.optimizers import parts_per_device

__all__ = ["TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]


@dataclasses.dataclass
class TrainResult:
  """What :func:`train` returns."""

  config: TrainConfig  # with the optimizer's defaults filled in
  data: _data.Dataset  # the data trained on (train split cut to train_subset)
  model: Any  # the flax module
  params: Any  # ω, the posterior mean (the weights, for non-Bayesian optimizers)
  opt_state: Any
  batch_stats: Any  # None without BatchNorm
  metrics: dict[str, dict[str, float]]  # "posterior_mean" and "model_average", or "point_estimate"
  posterior_std: dict[str, dict[str, float]] | None  # per layer: size, mean, median, min, max
  history: list[dict[str, float]]  # per epoch: loss, validation accuracy
  wall_time_s: float
  files: dict[str, str]  # name -> path of what was written
  # bo.posterior_diagnostics as floats ("overall" and per layer): damping-dominated fraction, log-std spread
  posterior_diagnostics: dict[str, dict[str, float]] | None = None


class TrainingDiverged(RuntimeError):
  """The loss or the parameters stopped being finite; ``epoch`` and ``step`` (1-based) say where."""

  def __init__(self, message: str, epoch: int, step: int):
    super().__init__(message)
    self.epoch, self.step = epoch, step


class TrainingInterrupted(RuntimeError):
  """SIGTERM or SIGINT stopped training after ``epoch`` epochs, saved in ``checkpoint_dir``."""

  def __init__(self, message: str, signum: int, epoch: int, checkpoint_dir: str):
    super().__init__(message)
    self.signum, self.epoch, self.checkpoint_dir = signum, epoch, checkpoint_dir


def _make_run_epoch(step):
  @jax.jit
  def run_epoch(state, batches, key, first_step):
    def body(state, xs):
      index, batch = xs
      state, info = step(state, batch, jax.random.fold_in(key, first_step + index))
      return state, info.loss  # the mean loss at the first point (at θ for bSAM)

    n = jax.tree.leaves(batches)[0].shape[0]
    state, losses = jax.lax.scan(body, state, (jnp.arange(n), batches))
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves((state.params, state.batch_stats))]))
    return state, jnp.mean(losses), losses, finite

  return run_epoch


def _divergence(config, checkpoints, epoch, steps_per_epoch, losses, finite_params) -> TrainingDiverged:
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    index = int(bad[0])
    what = f"the loss is {losses[index]} at step {epoch * steps_per_epoch + index + 1}"
  else:  # the last update made the parameters non-finite: the next loss would be
    index = steps_per_epoch - 1
    what = f"the parameters are not finite after step {(epoch + 1) * steps_per_epoch}"
  where = f"{what} (step {index + 1} of {steps_per_epoch} in epoch {epoch + 1} of {config.epochs})"
  kept = "nothing was saved"
  if checkpoints is not None:
    kept = f"epoch {epoch + 1} not saved; {checkpoints.directory} keeps " + (
      f"the last good epoch, {epoch}" if epoch else "no epoch"
    )
  tries = [f"a lower learning rate (--lr, now {config.learning_rate:g})"]
  if config.optimizer == "bsam":
    tries.append(f"a larger damping γ (--damping, now {config.damping:g})")
  if config.rho:
    tries.append(f"a smaller rho (--rho, now {config.rho:g})")
  advice = ", ".join(tries[:-1]) + (" or " if len(tries) > 1 else "") + tries[-1]
  return TrainingDiverged(
    f"training diverged: {where}; {kept}. Try {advice}.", epoch + 1, epoch * steps_per_epoch + index + 1
  )


class _StopSignals:
  """While active, SIGTERM and SIGINT ask training to stop after the current epoch (a second one stops at once)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled and threading.current_thread() is threading.main_thread()
    self.received: int | None = None
    self._previous: dict[int, Any] = {}

  def _handler(self, signum, frame):
    if self.received is not None:  # a second signal: the default behaviour, now
      self._restore()
      signal.raise_signal(signum)
      return
    self.received = signum
    sys.stderr.write(
      f"\n{signal.Signals(signum).name}: stopping after this epoch, saving a checkpoint (send it again to stop "
      "at once, unsaved)\n"
    )
    sys.stderr.flush()

  def __enter__(self):
    if self.enabled:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def _restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()

  def requested(self) -> int | None:
    """The signal received, on any process (a collective in a multi-process run)."""
    signum = self.received or 0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
    return signum or None


def train(config: TrainConfig, *, log: Callable[[str], Any] | None = None) -> TrainResult:
  """Trains ``config.model`` on ``config.dataset`` with ``config.optimizer``.

  Checks ``config`` (once) and, with ``config.checkpoint_dir``, the
  checkpoints there before anything is trained, resuming from the latest
  epoch found. With a ``checkpoint_dir``, SIGTERM and SIGINT stop training
  after the current epoch, which is saved: the same call then goes on to the
  numbers of an uninterrupted run.

  Args:
    config: a :class:`~bsam_optax.app.TrainConfig`.
    log: called with the run's header (sizes, devices, hyper-parameters)
      before training, on process 0; ``None`` prints nothing.

  Returns:
    A :class:`TrainResult` with the trained parameters and state, the test
    metrics, the posterior std summary and the paths of the written files.

  Raises:
    ConfigError: for a bad config, an unwritable ``out_dir`` or a
      ``checkpoint_dir`` of a run with other settings, before training.
    CheckpointError: for a ``checkpoint_dir`` holding other files, or a
      checkpoint that cannot be read, before training.
    TrainingDiverged: a loss or a parameter became NaN or infinite; the
      epoch is not saved.
    TrainingInterrupted: SIGTERM or SIGINT, after saving the epoch.

  Example:
    >>> from bsam_optax.app import TrainConfig, train
    >>> config = TrainConfig(dataset="digits", model="mlp", width=4, epochs=1, m=1, eval_samples=2, progress=False)
    >>> result = train(config)
    >>> sorted(result.metrics)
    ['model_average', 'model_average_tempered', 'posterior_mean', 'temperature_selection']
  """
  start = time.perf_counter()
  config = check_config(config)
  spec = OPTIMIZERS[config.optimizer]
  data = load_data(config)
  primary = jax.process_index() == 0  # only process 0 prints, shows progress and writes files
  if log is not None and primary:
    log(_report.header(config, data))
  checkpoints = EpochCheckpoints(config) if config.checkpoint_dir is not None else None
  n_data = config.n_data_scale * len(data.train.y)
  steps_per_epoch = _data.num_batches(data.train, config.batch_size)
  schedule = optax.cosine_decay_schedule(config.learning_rate, steps_per_epoch * config.epochs)
  tx = spec.make_tx(config, schedule, n_data)

  key = jax.random.key(config.seed)
  model = _models.model_for(config, data.num_classes)
  variables = jax.jit(model.init)(jax.random.fold_in(key, 0), data.train.x[:1])
  params, batch_stats = variables["params"], variables.get("batch_stats")
  state = _flax.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)
  data_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)
  # Data parallel: one mesh over the devices of every process; the state is replicated, and every process computes
  # the same epoch of batches (same key) and places only its devices' rows (shard_global_batch).
  mesh = _distributed.data_mesh(AXIS) if config.data_parallel else None
  m = parts_per_device(config, spec, 1 if mesh is None else mesh.shape[AXIS])
  if mesh is not None:
    state, step_key = _distributed.replicate((state, step_key), mesh)
  # split="unroll": the m parts as m copies of the graph; ~0.55x vmap's step time for the CNN on CPU.
  step = _flax.make_train_step(
    _models.cross_entropy,
    operator.attrgetter("x"),
    m=m,
    axis_name=None if mesh is None else AXIS,
    mesh=mesh,
    apply_kwargs={"train": True},
    split="unroll",
    rule=spec.rule(config),
  )
  run_epoch = _make_run_epoch(step)
  validation_accuracy = jax.jit(lambda p, bs, x, y: jnp.mean(jnp.argmax(_models.apply_fn(model, bs)(p, x), -1) == y))

  history: list[dict[str, float]] = []
  if checkpoints is not None:
    (params, opt_state, batch_stats), history = checkpoints.restore((state.params, state.opt_state, state.batch_stats))
    state = state.replace(
      step=len(history) * steps_per_epoch, params=params, opt_state=opt_state, batch_stats=batch_stats
    )
  epochs = range(len(history), config.epochs)
  bar = None
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
  try:
    with _StopSignals(enabled=checkpoints is not None) as stop:
      for epoch in epochs:
        batches = _data.epoch_batches(jax.random.fold_in(data_key, epoch), data.train, config.batch_size)
        if mesh is not None:
          batches = jax.tree.map(np.asarray, batches)
          batches = _distributed.shard_global_batch(batches, mesh, AXIS, m=m, batch_axis=1)
        state, epoch_loss, losses, finite = run_epoch(state, batches, step_key, epoch * steps_per_epoch)
        losses = np.asarray(_distributed.to_host(losses))
        if not (np.all(np.isfinite(losses)) and bool(_distributed.to_host(finite))):
          raise _divergence(config, checkpoints, epoch, steps_per_epoch, losses, finite)
        val_acc = float(validation_accuracy(state.params, state.batch_stats, data.validation.x, data.validation.y))
        history.append({"epoch": epoch + 1, "loss": float(epoch_loss), "validation_accuracy": val_acc})
        if checkpoints is not None:
          checkpoints.save((state.params, state.opt_state, state.batch_stats), history)
        if bar is not None:
          bar.set_postfix(loss=f"{float(epoch_loss):.3f}", val_acc=f"{val_acc:.3f}")
        signum = stop.requested() if stop.enabled else None
        if signum is not None and checkpoints is not None:
          raise TrainingInterrupted(
            f"stopped by {signal.Signals(signum).name} after epoch {epoch + 1} of {config.epochs}, saved in "
            f"{checkpoints.directory}; run the same command again to resume",
            signum,
            epoch + 1,
            checkpoints.directory,
          )
  finally:
    if bar is not None:
      bar.close()
  params, opt_state, batch_stats = state.params, state.opt_state, state.batch_stats
  if mesh is not None:  # evaluation runs on every process alike, on its own first device
    params, opt_state, batch_stats = jax.device_put(_distributed.to_host((params, opt_state, batch_stats)))

  eval_key = jax.random.fold_in(key, 3) if spec.bayesian else None
  apply_fn = _models.apply_fn(model, batch_stats)
  metrics, bins = evaluate(
    apply_fn, params, opt_state, data, eval_key, num_samples=config.eval_samples, num_bins=config.num_bins
  )
  if not spec.bayesian:  # no posterior: the weights are a point estimate
    metrics = {"point_estimate": metrics["posterior_mean"]}
    bins = {"point_estimate": bins["posterior_mean"]}
  std_summary, std, diagnostics = None, None, None
  if spec.bayesian:
    _, std = bo.posterior(params, opt_state)
    std_summary = posterior_std_summary(std)
    if hasattr(bo.find_posterior_state(opt_state), "damping_dominated"):
      diagnostics = diagnostics_summary(params, opt_state)
  wall_time = time.perf_counter() - start

  files = {}
  if config.out_dir is not None and primary:
    files = _report.write_outputs(config, metrics, bins, std, std_summary, history, wall_time)
  return TrainResult(
    config=config,
    data=data,
    model=model,
    params=params,
    opt_state=opt_state,
    batch_stats=batch_stats,
    metrics=metrics,
    posterior_std=std_summary,
    posterior_diagnostics=diagnostics,
    history=history,
    wall_time_s=wall_time,
    files=files,
  )
