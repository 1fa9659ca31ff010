"""Accuracy and uncertainty of bSAM against SGD, Adam, SAM-SGD and SAM-Adam (paper Table 1/6 analogue).

MNIST-1D (generated offline, 3600 train / 400 validation / 1000 test; OOD: the
test sequences with their positions permuted), no data augmentation, an MLP
and a small 1-D CNN. For every method a grid of hyper-parameters (``GRIDS``)
is trained with several seeds. The configuration with the best mean
validation accuracy (ties: lower validation NLL; the paper's protocol) is
reported on the test set as mean ± std over the seeds: accuracy, NLL, ECE
(20 bins), AUROC (misclassification, by confidence), OOD AUROC (by predictive
entropy) and mean confidence minus accuracy; a second table selects by
validation NLL instead. bSAM is reported for its posterior mean ω and for the
model average over ``S`` posterior samples, and is selected by the model
average. bSAM's training-time temperature (N = ``n_data_scale`` x train size)
is one of its grid's axes, selected like the learning rate; its prediction-time
temperature T is chosen on the validation split by ``bo.select_temperature``'s
rule (one standard error), computed on device with the same samples.
``--dataset digits`` runs scikit-learn's 8x8 digits instead (``DIGITS_GRIDS``).

Every run of a method (grid point x seed) is one ``jax.vmap`` lane of a single
compiled function that trains all epochs (``lax.scan`` over epochs and
minibatches) and evaluates, so a whole grid costs one compilation. All
per-run numbers are kept in ``<out>_grid.json``; ``--from-grid`` re-renders
the tables from it without training.

Usage::

  python benchmarks/uncertainty.py --quick       # ~30 s: one config per method, 2 seeds, 5 epochs
  python benchmarks/uncertainty.py               # benchmarks/results/uncertainty.md (~1 h on 2 CPU cores)
  python benchmarks/uncertainty.py --methods bsam --bsam '{"n_data_scale": 4}' --out ...  # a bSAM variant
  python benchmarks/uncertainty.py --dataset digits --models mlp --out ...  # scikit-learn's digits
"""

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bsam_optax as bo
from bsam_optax import app
from bsam_optax import metrics as _metrics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# The search grid of every method and model (the Cartesian product of the
# lists): 3 learning rates x 2 weight decays (an L2 term; δ for bSAM), x 3 ρ
# for SAM and bSAM. Each grid is centered on the best point of a one-seed pilot
# scan of that method (see benchmarks/README.md). SAM and bSAM use m = 8 parts
# of a 128 batch, as in the paper (App. G).
GRIDS: dict[str, dict[str, dict[str, list[float]]]] = {
  "mlp": {
    "sgd": {"learning_rate": [0.1, 0.3, 1.0], "weight_decay": [1e-3, 3e-3]},
    "adam": {"learning_rate": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-3, 3e-3]},
    "sam_sgd": {"learning_rate": [0.1, 0.3, 1.0], "weight_decay": [1e-3, 3e-3], "rho": [0.1, 0.2, 0.3]},
    "sam_adam": {"learning_rate": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-3, 3e-3], "rho": [0.1, 0.2, 0.3]},
    # bSAM's training-time temperature is searched like lr and ρ (issue 12): N = n_data_scale x train size, the
    # grid centred on the earlier grids' selections (lr 2-4, ρ 0.1-0.2, δ 1e-3 at N, 4 N and 16 N).
    "bsam": {"learning_rate": [2.0, 4.0, 8.0], "weight_decay": [1e-3], "rho": [0.1, 0.2], "n_data_scale": [1, 4, 16]},
    # The variational family (issue 13), 2 x 2 grids (2 for the seed's VSAM) of the learning rate and the
    # method's main hyper-parameter: MFVI around its one-seed pilot's best (lr 3e-3) x the prior precision δ;
    # VSAM (Adam inside) at SAM-Adam's and Adam's selected lr x the bound on σ (VSAM is SAM with the Euclidean
    # radius ρ max_std = sqrt(P) max_std = 0.15, 0.46 here, around SAM-Adam's ρ); the seed's VSAM (σ unbounded)
    # over the same lr; Fisher-SAM-SGD over SAM-SGD's lr and ρ (η = 1, Kim et al.) at SAM-SGD's selected δ.
    "mfvi": {"learning_rate": [3e-3, 1e-2], "weight_decay": [1e-3, 3e-3]},
    "vsam": {"learning_rate": [1e-2, 3e-2], "weight_decay": [1e-3], "max_std": [1e-3, 3e-3]},
    "vsam_unbounded": {"learning_rate": [1e-2, 3e-2], "weight_decay": [1e-3]},
    "fisher_sam": {"learning_rate": [0.1, 0.3], "weight_decay": [1e-3], "rho": [0.1, 0.3]},
    # RandomSAM-SGD (the seed's Alg. 2, ε ~ N(0, σ² I)): σ = ρ/sqrt(P) at SAM-SGD's selected ρ (the seed's Σ = ρ²/P I),
    # and 5x that.
    "random_sam": {"learning_rate": [0.1, 0.3], "weight_decay": [1e-3], "sigma": [2e-3, 1e-2]},
  },
  "cnn": {
    "sgd": {"learning_rate": [0.1, 0.3, 0.5], "weight_decay": [1e-4, 1e-3]},
    "adam": {"learning_rate": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-3]},
    "sam_sgd": {"learning_rate": [0.1, 0.3, 0.5], "weight_decay": [1e-4, 1e-3], "rho": [0.02, 0.05, 0.1]},
    "sam_adam": {"learning_rate": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-4, 1e-3], "rho": [0.02, 0.05, 0.1]},
    "bsam": {"learning_rate": [1.0, 2.0], "weight_decay": [1e-3], "rho": [0.02, 0.05], "n_data_scale": [1, 4, 16]},
    # The CNN has P = 3,498 parameters: VSAM's Euclidean radius sqrt(P) max_std = 0.03, 0.09, around SAM-Adam's ρ.
    "mfvi": {"learning_rate": [3e-3, 1e-2], "weight_decay": [1e-4, 1e-3]},
    "vsam": {"learning_rate": [1e-2, 3e-2], "weight_decay": [1e-3], "max_std": [5e-4, 1.5e-3]},
    "vsam_unbounded": {"learning_rate": [1e-2, 3e-2], "weight_decay": [1e-3]},
    "fisher_sam": {"learning_rate": [0.1, 0.3], "weight_decay": [1e-3], "rho": [0.05, 0.1]},
    "random_sam": {"learning_rate": [0.1, 0.3], "weight_decay": [1e-3], "sigma": [1e-3, 5e-3]},
  },
}
# scikit-learn's digits (--dataset digits): a small task on which Adam is strong. Centred on each method's best
# point of a one-seed pilot (SGD lr 0.03-1, Adam 1e-3-3e-2, SAM-SGD lr 0.1-0.3 x ρ 0.05-0.2, SAM-Adam lr 1e-3-3e-3
# x ρ 0.05-0.2, bSAM lr 0.5-4 x N, 16 N at ρ 0.05; δ = 1e-3), widened where a first 3-seed run selected an edge:
# 2-3 learning rates, 2-3 ρ, n_data_scale x 3 for bSAM.
DIGITS_GRIDS: dict[str, dict[str, dict[str, list[float]]]] = {
  "mlp": {
    "sgd": {"learning_rate": [0.1, 0.3, 0.5], "weight_decay": [1e-3]},
    "adam": {"learning_rate": [1e-2, 3e-2, 1e-1], "weight_decay": [1e-3]},
    "sam_sgd": {"learning_rate": [0.1, 0.3, 0.5], "weight_decay": [1e-3], "rho": [0.1, 0.3]},
    "sam_adam": {"learning_rate": [3e-3, 1e-2, 3e-2], "weight_decay": [1e-3], "rho": [0.05, 0.2, 0.5]},
    "bsam": {"learning_rate": [1.0, 2.0], "weight_decay": [1e-3], "rho": [0.05, 0.1, 0.2], "n_data_scale": [1, 4, 16]},
  },
}
QUICK_GRIDS: dict[str, dict[str, list[float]]] = {
  "sgd": {"learning_rate": [0.1], "weight_decay": [1e-4]},
  "adam": {"learning_rate": [3e-3], "weight_decay": [1e-4]},
  "sam_sgd": {"learning_rate": [0.1], "weight_decay": [1e-4], "rho": [0.05]},
  "sam_adam": {"learning_rate": [3e-3], "weight_decay": [1e-4], "rho": [0.05]},
  "bsam": {"learning_rate": [0.1], "weight_decay": [1e-4], "rho": [0.01]},
  "mfvi": {"learning_rate": [3e-3], "weight_decay": [1e-3]},
  "vsam": {"learning_rate": [1e-2], "weight_decay": [1e-3], "max_std": [3e-3]},
  "vsam_unbounded": {"learning_rate": [1e-2], "weight_decay": [1e-3]},
  "fisher_sam": {"learning_rate": [0.1], "weight_decay": [1e-4], "rho": [0.05]},
  "random_sam": {"learning_rate": [0.1], "weight_decay": [1e-4], "sigma": [1e-3]},
}
# The methods of a run without --methods (and of the CI's --quick); the variational family's rows come from
# `--methods mfvi vsam vsam_unbounded fisher_sam random_sam` (results/uncertainty_variational.md).
DEFAULT_METHODS = ("sgd", "adam", "sam_sgd", "sam_adam", "bsam")
# Hyper-parameters that are not searched (overridable per run).
FIXED: dict[str, float] = {
  "momentum": 0.9,  # SGD, SAM-SGD
  "b1": 0.9,
  "b2": 0.999,
  "damping": 0.1,  # γ (bSAM)
  "init_scale": 1.0,  # s at step 0 (bSAM)
  "n_data_scale": 1.0,  # N = n_data_scale x train size (bSAM); > 1 tempers the posterior
  "sigma": 0.01,  # RandomSAM
  "eta": 0.01,  # ASAM
  "fisher_eta": 1.0,  # η of Fisher SAM's f = 1 + η g² (Kim et al.)
  "init_std": 1e-2,  # σ at step 0 (MFVI)
}
LABELS = {
  "sgd": "SGD",
  "adam": "Adam",
  "sam_sgd": "SAM-SGD",
  "sam_adam": "SAM-Adam",
  "bsam": "bSAM",
  "bsam_no_noise": "bSAM w/o noise",
  "random_sam": "RandomSAM-SGD",
  "asam": "ASAM-SGD",
  "mfvi": "MFVI",
  "vsam": "VSAM",
  "vsam_unbounded": "VSAM, σ unbounded (the seed's)",
  "fisher_sam": "Fisher-SAM-SGD",
}
BAYESIAN = ("bsam", "bsam_no_noise", "mfvi", "vsam", "vsam_unbounded")
METRICS = ("accuracy", "nll", "ece", "auroc", "ood_auroc", "confidence", "acc_at_90")
# Post-hoc calibration on the validation split. Logit temperature scaling (Guo et al., 2017) of a point estimate:
# softmax(logits / τ) with τ from this grid by validation NLL. The posterior temperature of bSAM's model average:
# θ_j = ω + √T σ z_j (the same z_j for every T) with T from bo.select_temperature's default grid (0 and
# 2^-10 ... 2^2) by its rule (TEMPERATURE_RULE); T = 0 is the posterior mean.
LOGIT_TEMPERATURES = tuple(float(t) for t in np.exp(np.linspace(np.log(0.1), np.log(10.0), 61)))
POSTERIOR_TEMPERATURES = (0.0,) + tuple(2.0**k for k in range(-10, 3))
# How the posterior temperature is chosen among POSTERIOR_TEMPERATURES: "one_se" (bo.select_temperature's default,
# the smallest T whose validation NLL is within one standard error of the lowest) or "min" (the lowest; the rule of
# the results files written before it, which record it as "temperature_rule" or, when absent, used "min").
TEMPERATURE_RULE = "one_se"
COVERAGE = 0.9  # selective prediction: accuracy on the 90% most confident test examples
DATASET_NAMES = {"mnist1d": "MNIST-1D", "digits": "scikit-learn digits"}
MODEL_NAMES = {
  "mnist1d": {"mlp": "40-128-128-10", "cnn": "3 x conv(16, k=5, stride 2)"},
  "digits": {"mlp": "64-128-128-10", "cnn": "3 x conv(16, 5 x 5, stride 2)"},
}


@dataclasses.dataclass(frozen=True)
class Setup:
  """What every run of a benchmark shares."""

  model: str = "mlp"
  dataset: str = "mnist1d"
  epochs: int = 60
  batch_size: int = 128
  m: int = 8
  eval_samples: int = 32  # S, posterior samples of bSAM's model average
  num_bins: int = 20
  curvature: str = "abs_grad"  # bSAM's scale update (bo.bsam's curvature=); static, so not in the grids


# --------------------------------------------------------------------------- methods


def _model(name: str, num_classes: int):
  if name == "mlp":  # 40-128-128-10, 23k parameters
    return app.make_model("mlp", num_classes, features=(128, 128))
  # Three strided 1-D convolutions (kernel 5) with 16 channels and a linear read-out, 4k parameters:
  # the MNIST-1D reference CNN at 16 instead of 32 channels, 4x cheaper on CPU (4 vs 19 ms a step).
  return app.make_model("cnn", num_classes, channels=(16, 16, 16))


def build_method(
  method: str,
  hp: dict[str, Any],
  loss_fn: Callable,
  total_steps: int,
  n_train: int,
  m: int,
  curvature: str = "abs_grad",
):
  """Returns ``(tx, step)`` for ``method`` with (possibly traced) hyper-parameters ``hp``."""
  schedule = optax.cosine_decay_schedule(hp["learning_rate"], total_steps)  # annealed to 0 (App. G)
  wd = optax.add_decayed_weights(hp["weight_decay"])
  sgd = lambda: optax.chain(wd, optax.sgd(schedule, momentum=hp["momentum"]))
  adam = lambda: optax.chain(wd, optax.adam(schedule, b1=hp["b1"], b2=hp["b2"]))
  if method == "sgd":
    tx = sgd()
    return tx, bo.make_perturbation_step(loss_fn, tx, bo.PerturbationRule())
  if method == "adam":
    tx = adam()
    return tx, bo.make_perturbation_step(loss_fn, tx, bo.PerturbationRule())
  if method == "sam_sgd":
    tx = sgd()
    return tx, bo.sam_step(loss_fn, tx, rho=hp["rho"], m=m)
  if method == "sam_adam":
    tx = adam()
    return tx, bo.sam_step(loss_fn, tx, rho=hp["rho"], m=m)
  if method == "asam":
    tx = sgd()
    return tx, bo.asam_step(loss_fn, tx, rho=hp["rho"], eta=hp["eta"], m=m)
  if method == "random_sam":
    tx = sgd()
    return tx, bo.random_sam_step(loss_fn, tx, sigma=hp["sigma"], m=m)
  if method == "fisher_sam":
    tx = sgd()
    return tx, bo.fisher_sam_step(loss_fn, tx, rho=hp["rho"], eta=hp["fisher_eta"], m=m)
  if method == "mfvi":
    tx = bo.mfvi(
      schedule, n_data=n_train, weight_decay=hp["weight_decay"], init_std=hp["init_std"], b1=hp["b1"], b2=hp["b2"]
    )
    return tx, bo.mfvi_step(loss_fn, tx, m=m)  # m Monte-Carlo samples per step, one per part
  if method in ("vsam", "vsam_unbounded"):
    max_std = hp["max_std"] if method == "vsam" else None  # None: σ grows freely (the seed's Alg. 3)
    tx = bo.vsam(schedule, n_data=n_train, weight_decay=hp["weight_decay"], max_std=max_std, b1=hp["b1"], b2=hp["b2"])
    return tx, bo.vsam_step(loss_fn, tx, m=m)
  if method in BAYESIAN:
    tx = bo.bsam(
      schedule,
      n_data=hp["n_data_scale"] * n_train,
      rho=hp["rho"],
      b1=hp["b1"],
      b2=hp["b2"],
      weight_decay=hp["weight_decay"],
      damping=hp["damping"],
      init_scale=hp["init_scale"],
      **({} if curvature == "abs_grad" else {"curvature": curvature}),
    )
    make = bo.bsam_step if method == "bsam" else bo.bsam_no_noise_step
    return tx, make(loss_fn, tx, m=m)
  raise ValueError(f"unknown method {method!r}; choose one of {tuple(LABELS)}")


# --------------------------------------------------------------------------- one run


def accuracy_at_coverage(probs, labels, coverage=COVERAGE):
  """Selective prediction: the accuracy on the ``coverage`` fraction of examples with the highest confidence."""
  keep = max(1, math.ceil(coverage * probs.shape[0]))
  order = jnp.argsort(-jnp.max(probs, axis=-1))[:keep]
  return jnp.mean(jnp.argmax(probs[order], axis=-1) == labels[order])


def _metrics_of(probs, labels, probs_ood, num_bins):
  out = _metrics.classification_metrics(probs, labels, num_bins)
  out["ood_auroc"] = _metrics.ood_auroc(probs, probs_ood)
  out["confidence"] = jnp.mean(jnp.max(probs, axis=-1))  # > accuracy: overconfident
  out["acc_at_90"] = accuracy_at_coverage(probs, labels)
  return {k: out[k] for k in METRICS}


def _nll_of_log_probs(log_probs, labels):
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def make_runner(method: str, setup: Setup, data: app.Dataset, eval_samples_list=None):
  """A compiled ``runs(hps, seeds) -> metrics``, vmapped over runs.

  ``hps`` maps every hyper-parameter name to an array with one entry per run,
  ``seeds`` is an int array of the same length. ``metrics[pred][split][name]``
  has one entry per run, for ``pred`` in ``"mean"`` (and ``"average"`` for
  bSAM, and ``"average_S"`` for every S of ``eval_samples_list``) and
  ``split`` in ``"validation"`` and ``"test"``; ``metrics["train_loss"]`` is
  the mean loss of the last epoch. Post-hoc calibration on the validation
  split: ``"mean_ts"`` (logit temperature scaling of the point estimate, its
  ``"tau"``) and, for bSAM, ``"average_cal"`` (the model average at the
  posterior temperature ``"temperature"`` chosen on validation by ``TEMPERATURE_RULE``).
  """
  model = _model(setup.model, data.num_classes)
  n_train = data.train.y.shape[0]
  steps_per_epoch = app.num_batches(data.train, setup.batch_size)
  total_steps = steps_per_epoch * setup.epochs
  bayesian = method in BAYESIAN
  samples = sorted(set(eval_samples_list or ()) | ({setup.eval_samples} if bayesian else set()))

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch.x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

  apply_fn = lambda p, x: model.apply({"params": p}, x)
  inputs = jnp.concatenate([data.validation.x, data.test.x, data.ood])
  n_val, n_test = data.validation.x.shape[0], data.test.x.shape[0]

  def evaluate(probs):
    val, test, ood = probs[:n_val], probs[n_val : n_val + n_test], probs[n_val + n_test :]
    return {
      "validation": _metrics_of(val, data.validation.y, ood, setup.num_bins),
      "test": _metrics_of(test, data.test.y, ood, setup.num_bins),
    }

  def one_run(hp, seed):
    key = jax.random.key(seed)
    tx, step = build_method(method, hp, loss_fn, total_steps, n_train, setup.m, setup.curvature)
    params = model.init(jax.random.fold_in(key, 0), data.train.x[:1])["params"]
    opt_state = tx.init(params)
    data_key, step_key = jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)

    def epoch(carry, e):
      batches = app.epoch_batches(jax.random.fold_in(data_key, e), data.train, setup.batch_size)

      def body(carry, xs):
        params, opt_state = carry
        i, batch = xs
        params, opt_state, out = step(params, opt_state, batch, jax.random.fold_in(step_key, i))
        return (params, opt_state), out["loss"]

      indices = e * steps_per_epoch + jnp.arange(steps_per_epoch)
      carry, losses = jax.lax.scan(body, carry, (indices, batches))
      return carry, jnp.mean(losses)

    (params, opt_state), losses = jax.lax.scan(epoch, (params, opt_state), jnp.arange(setup.epochs))
    logits = apply_fn(params, inputs)
    out = {"train_loss": losses[-1], "mean": evaluate(jax.nn.softmax(logits))}
    # Logit temperature scaling: τ by validation NLL on a log grid.
    taus = jnp.asarray(LOGIT_TEMPERATURES, jnp.float32)
    val_nll = jax.vmap(lambda tau: _nll_of_log_probs(jax.nn.log_softmax(logits[:n_val] / tau), data.validation.y))
    out["tau"] = taus[jnp.argmin(val_nll(taus))]
    out["mean_ts"] = evaluate(jax.nn.softmax(logits / out["tau"]))
    eval_key = jax.random.fold_in(key, 3)
    for s in samples:
      chunk = math.gcd(s, 8)
      probs = bo.predictive(apply_fn, eval_key, params, opt_state, inputs, s, chunk_size=chunk)
      out[f"average_{s}"] = evaluate(probs)
    if bayesian:
      out["average"] = out[f"average_{setup.eval_samples}"]
      # The posterior temperature: bo.select_temperature's computation on device (bo.tempered_nlls and
      # bo.choose_temperature: select_temperature itself syncs with the host, so it cannot run inside this vmap),
      # the same samples (eval_key) for every T and for the test predictions below.
      s, chunk = setup.eval_samples, math.gcd(setup.eval_samples, 8)
      candidates, nlls = bo.tempered_nlls(
        apply_fn, eval_key, params, opt_state, data.validation.x, data.validation.y,
        temperatures=POSTERIOR_TEMPERATURES, num_samples=s, chunk_size=chunk,
      )  # fmt: skip
      out["temperature"] = bo.choose_temperature(candidates, nlls, rule=TEMPERATURE_RULE)
      probs = bo.predictive(
        apply_fn, eval_key, params, opt_state, inputs, s, chunk_size=chunk, temperature=out["temperature"]
      )
      out["average_cal"] = evaluate(probs)
    return out

  return jax.jit(jax.vmap(one_run))


def run_grid(method, setup, data, grid, seeds, fixed=None, eval_samples_list=None):
  """Trains every point of ``grid`` (a dict of lists) with every seed.

  Returns:
    ``(configs, metrics)``: the list of configurations (dicts) and the
    metrics tree of :func:`make_runner` with arrays of shape
    ``(len(configs), len(seeds))``.
  """
  fixed = {**FIXED, **(fixed or {})}
  names = sorted(grid)
  configs = [dict(zip(names, values, strict=True)) for values in _product([grid[n] for n in names])]
  runs = [(c, s) for c in configs for s in seeds]
  hps = {k: jnp.asarray([{**fixed, **c}[k] for c, _ in runs], jnp.float32) for k in {*fixed, *names}}
  seeds_arr = jnp.asarray([s for _, s in runs], jnp.int32)
  runner = make_runner(method, setup, data, eval_samples_list)
  metrics = runner(hps, seeds_arr)
  metrics = jax.tree.map(lambda x: np.asarray(x).reshape(len(configs), len(seeds)), metrics)
  return configs, metrics


def _product(lists):
  if not lists:
    return [()]
  return [(x,) + rest for x in lists[0] for rest in _product(lists[1:])]


SELECTIONS = {
  "accuracy": "the best mean validation accuracy (ties: lower validation NLL), as in the paper (App. G.1)",
  "nll": "the lowest mean validation NLL",
}


def select(metrics, pred, by="accuracy"):
  """Index of the configuration with the best mean validation accuracy (ties: lower NLL) or NLL."""
  val = metrics[pred]["validation"]
  acc = np.asarray(val["accuracy"]).mean(axis=1)
  nll = np.asarray(val["nll"]).mean(axis=1)
  acc = np.where(np.isfinite(acc), acc, -np.inf)
  nll = np.where(np.isfinite(nll), nll, np.inf)
  if by == "nll":
    return int(np.argmin(nll))
  best = np.flatnonzero(acc >= acc.max() - 1e-9)
  return int(best[np.argmin(nll[best])])


# --------------------------------------------------------------------------- tables


def fmt(values, digits=3, scale=1.0):
  values = np.asarray(values, np.float64) * scale
  if not np.all(np.isfinite(values)):
    return "nan"
  return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def metric_cells(test: dict[str, np.ndarray]) -> list[str]:
  return [
    fmt(test["accuracy"], 1, 100),
    fmt(test["nll"], 3),
    fmt(test["ece"], 3),
    fmt(test["auroc"], 3),
    fmt(test["ood_auroc"], 3),
    fmt(np.asarray(test["confidence"]) - np.asarray(test["accuracy"]), 1, 100),
  ]


HEADER = "| method | selected config | accuracy (%) ↑ | NLL ↓ | ECE ↓ | AUROC ↑ | OOD AUROC ↑ | conf. − acc. (%) |"
RULE = "|---|---|---|---|---|---|---|---|"


def config_str(config: dict[str, float]) -> str:
  short = {"learning_rate": "lr", "weight_decay": "wd", "rho": "ρ", "n_data_scale": "N×", "damping": "γ"}
  return ", ".join(f"{short.get(k, k)}={v:g}" for k, v in sorted(config.items()))


def rows_for(method, configs, metrics, by="accuracy"):
  """Markdown rows of the selected configuration (two for bSAM: posterior mean and model average)."""
  preds = [("average", " (model avg)"), ("mean", " (post. mean)")] if method in BAYESIAN else [("mean", "")]
  best = select(metrics, preds[0][0], by)
  rows, summary = [], {}
  for pred, suffix in preds:
    test = {k: v[best] for k, v in metrics[pred]["test"].items()}
    rows.append(f"| {LABELS[method]}{suffix} | {config_str(configs[best])} | " + " | ".join(metric_cells(test)) + " |")
    summary[LABELS[method] + suffix] = {
      "config": configs[best],
      **{k: [float(x) for x in v] for k, v in test.items()},
      "validation_accuracy": [float(x) for x in np.asarray(metrics[pred]["validation"]["accuracy"])[best]],
    }
  return rows, summary


CAL_HEADER = (
  "| method | post-hoc calibration (on validation) | accuracy (%) ↑ | NLL ↓ | ECE ↓ | "
  f"acc. @ {COVERAGE:.0%} coverage (%) ↑ | OOD AUROC ↑ | conf. − acc. (%) |"
)
CAL_RULE = "|---|---|---|---|---|---|---|---|"


def calibration_cells(test: dict[str, np.ndarray]) -> list[str]:
  return [
    fmt(test["accuracy"], 1, 100),
    fmt(test["nll"], 3),
    fmt(test["ece"], 3),
    fmt(test["acc_at_90"], 1, 100),
    fmt(test["ood_auroc"], 3),
    fmt(np.asarray(test["confidence"]) - np.asarray(test["accuracy"]), 1, 100),
  ]


def calibration_rows(method, configs, metrics, by="accuracy"):
  """Markdown rows of the selected configuration, uncalibrated and after its post-hoc calibration."""
  bayesian = method in BAYESIAN
  best = select(metrics, "average" if bayesian else "mean", by)
  label = LABELS[method]
  tau = np.asarray(metrics["tau"])[best]
  entries = []
  if bayesian:
    temperature = np.asarray(metrics["temperature"])[best]
    t_str = ", ".join(f"{t:g}" for t in temperature)
    entries += [
      (f"{label} (model avg)", "none (T = 1)", "average"),
      (f"{label} (model avg)", f"posterior temperature, T = {t_str}", "average_cal"),
      (f"{label} (post. mean)", "none", "mean"),
      (f"{label} (post. mean)", f"logit TS, τ = {fmt(tau, 2)}", "mean_ts"),
    ]
  else:
    entries += [(label, "none", "mean"), (label, f"logit TS, τ = {fmt(tau, 2)}", "mean_ts")]
  rows, summary = [], {}
  for name, calibration, pred in entries:
    test = {k: v[best] for k, v in metrics[pred]["test"].items()}
    rows.append(f"| {name} | {calibration} | " + " | ".join(calibration_cells(test)) + " |")
    summary[f"{name} [{pred}]"] = {k: [float(x) for x in v] for k, v in test.items()}
  if bayesian:
    summary[f"{label} (model avg) [average_cal]"]["temperature"] = [float(t) for t in temperature]
  summary[f"{label}{' (post. mean)' if bayesian else ''} [mean_ts]"]["tau"] = [float(t) for t in tau]
  return rows, summary


def grid_str(grids) -> str:
  lines = []
  for method, grid in grids.items():
    parts = "; ".join(f"{k} ∈ {{{', '.join(f'{v:g}' for v in vals)}}}" for k, vals in sorted(grid.items()))
    lines.append(f"- {LABELS[method]}: {parts}")
  return "\n".join(lines)


def environment() -> str:
  return (
    f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform.upper()} "
    f"({os.cpu_count()} cores visible), Python {platform.python_version()}"
  )


# --------------------------------------------------------------------------- main


def confidence_rows(path: str) -> list[str]:
  """When do the posterior samples help? Every run of a saved ``*_grid.json``, split by its posterior mean's sign.

  For each Bayesian method and model: the runs whose posterior mean is overconfident on the validation split
  (mean max-probability above accuracy) against the rest; in each group, how often the model average at T = 1
  (S = 32) has a lower validation / test NLL than the mean, the mean test-NLL gain (mean − average; > 0: the
  samples help) at T = 1 and at the selected posterior temperature, and how often the selected T is above 0.
  """
  with open(path) as f:
    saved = json.load(f)
  lines = [
    "| model | method | posterior mean on validation | runs | avg at T = 1 better: validation NLL | test NLL | "
    "test NLL gain at T = 1 | at the selected T | T > 0 selected |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for model, per in saved["results"].items():
    for method, r in per.items():
      m = r["metrics"]
      if method not in BAYESIAN or "average_32" not in m:
        continue
      mean, avg = m["mean"], m["average_32"]
      over = (np.asarray(mean["validation"]["confidence"]) - np.asarray(mean["validation"]["accuracy"])).ravel()
      gain_val = (np.asarray(mean["validation"]["nll"]) - np.asarray(avg["validation"]["nll"])).ravel()
      gain_test = (np.asarray(mean["test"]["nll"]) - np.asarray(avg["test"]["nll"])).ravel()
      selected = m.get("average_cal", m["average"])
      gain_sel = (np.asarray(mean["test"]["nll"]) - np.asarray(selected["test"]["nll"])).ravel()
      temps = np.asarray(m["temperature"]).ravel() if "temperature" in m else None
      for name, mask in (("overconfident", over > 0), ("underconfident", over <= 0)):
        if not mask.any():
          continue
        share_t = f"{np.mean(temps[mask] > 0):.0%}" if temps is not None else "—"
        lines.append(
          f"| {model} | {LABELS[method]} | {name} | {int(mask.sum())} | {np.mean(gain_val[mask] > 0):.0%} | "
          f"{np.mean(gain_test[mask] > 0):.0%} | {gain_test[mask].mean():+.4f} | {gain_sel[mask].mean():+.4f} | "
          f"{share_t} |"
        )
  return lines


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny grid, 2 seeds, 5 epochs, MLP only (CI)")
  parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "cnn"])
  parser.add_argument(
    "--dataset",
    default="mnist1d",
    choices=list(DATASET_NAMES),
    help="mnist1d (default; the GRIDS) or digits (scikit-learn's 8x8 digits, 1259 train / 179 validation / 359 test; "
    "the DIGITS_GRIDS); both generated or shipped locally, nothing is downloaded",
  )
  parser.add_argument("--methods", nargs="+", default=None, choices=list(QUICK_GRIDS))
  parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; quick 2)")
  parser.add_argument("--epochs", type=int, default=None, help="default 60; quick 5")
  parser.add_argument("--eval-samples", type=int, default=32)
  parser.add_argument(
    "--bsam",
    default=None,
    help="JSON of fixed bSAM settings, e.g. '{\"n_data_scale\": 10}' (a recipe; default: FIXED)",
  )
  parser.add_argument("--grid", default=None, help="JSON of grids {model: {method: {name: [values]}}} to use instead")
  parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/uncertainty[_quick].md)")
  parser.add_argument("--from-grid", default=None, help="re-render the tables from a saved *_grid.json, no training")
  parser.add_argument(
    "--confidence",
    default=None,
    help="print, for a saved *_grid.json, when the posterior samples help: runs split by whether the posterior "
    "mean is overconfident on validation (no training)",
  )
  parser.add_argument(
    "--beside",
    default=None,
    help="a saved *_grid.json (e.g. benchmarks/results/uncertainty_grid.json) whose methods are rendered first in "
    "every table, selected by the same rule: the new rows beside the existing ones",
  )
  parser.add_argument(
    "--selected",
    nargs="?",
    const=os.path.join(RESULTS, "uncertainty.json"),
    default=None,
    help="rerun only the configurations selected in this summary (default benchmarks/results/uncertainty.json), "
    "one per method and model, instead of the grids (~1/6 of the time)",
  )
  return parser.parse_args(argv)


def selected_grids(path: str, models, methods) -> dict[str, dict[str, dict[str, list[float]]]]:
  """``{model: {method: {name: [value]}}}``: the one configuration per method that ``path`` selected."""
  with open(path) as f:
    summary = json.load(f)
  grids = {}
  for model in models:
    grids[model] = {}
    for method in methods:
      label = LABELS[method] + (" (model avg)" if method in BAYESIAN else "")
      if label not in summary.get(model, {}):
        raise ValueError(f"{path} has no selected configuration for {model}/{label}")
      grids[model][method] = {k: [v] for k, v in summary[model][label]["config"].items()}
  return grids


def _to_lists(tree):
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def render(results, info, argv_str):
  """The markdown report of ``results[model][method] = (configs, metrics)``."""
  dataset = DATASET_NAMES[info.get("dataset", "mnist1d")]
  grids_n = [g.get("bsam", {}).get("n_data_scale") for g in info["grids"].values()]
  if any(grids_n):
    n_data = "N = n_data_scale x train size, n_data_scale searched in the grid (> 1 tempers the posterior)"
  else:
    n_data = "N = train size"
  rule = info.get("temperature_rule", "min")
  rule_text = {
    "min": "the lowest validation NLL",
    "one_se": "`bo.select_temperature`'s default one-standard-error rule (the smallest T whose validation NLL is "
    "within one standard error of the lowest, the error of the mean paired per-example difference), computed "
    "on device with the same samples",
  }[rule]
  rule_short = {
    "min": "the lowest validation NLL",
    "one_se": "`bo.select_temperature`'s one-standard-error rule on the validation split, as the library and the "
    "main job choose it",
  }[rule]
  lines = [
    f"# Accuracy and uncertainty on {dataset} (paper Table 1 / 6 analogue)",
    "",
    "Command: `" + f"python benchmarks/uncertainty.py {argv_str}".strip() + "`",
    "",
    f"{dataset} ({info['sizes']}), no augmentation; OOD = {info['ood']}. {info['epochs']} epochs, batch 128, "
    "cosine learning rate to 0; SAM-SGD, SAM-Adam and bSAM with m = 8. "
    f"{info['seeds']} seeds (mean ± std over seeds). Every grid point is trained with every seed; "
    "the selected configuration (below) is reported on the test set (bSAM: selected by its model average). "
    f"bSAM's model average uses S = {info['eval_samples']} posterior samples. ECE with 20 bins; "
    "AUROC = misclassification detection by confidence; OOD AUROC = OOD detection by predictive entropy; "
    "conf. − acc. = mean max-probability minus accuracy on the test set (> 0: overconfident).",
    "",
    "Fixed settings: SGD momentum 0.9; Adam β = (0.9, 0.999); bSAM β = (0.9, 0.999), "
    f"γ = {FIXED['damping']}, s₀ = {FIXED['init_scale']}, {n_data}"
    + (f"; bSAM overrides {info['bsam_fixed']}" if info["bsam_fixed"] else "")
    + f". bSAM's posterior temperature T at prediction time (the calibrated rows): {rule_short}. Grids:",
    "",
  ]
  if info.get("selected_from"):
    lines[-2] = lines[-2].replace(". Grids:", ".")
    lines[-4] = lines[-4].replace(
      "Every grid point is trained with every seed; the selected configuration (below) is reported",
      "Every configuration is trained with every seed and reported",
    )
    lines += [
      f"**Only the configurations selected in `{info['selected_from']}` were rerun** (one per method and model, "
      "with the same seeds, instead of the full grids: about 1/6 of the full run's time), so the selection "
      "columns below re-select among one configuration each. Configurations:",
      "",
    ]
  for model, grids in info["grids"].items():
    lines += [f"{model.upper()} ({MODEL_NAMES[info.get('dataset', 'mnist1d')][model]}):", ""]
    lines += [grid_str(grids), ""]
  if info.get("beside"):
    beside = info["beside"]
    lines += [
      f"Beside them, {', '.join(LABELS[k] for k in beside['methods'])}: their rows are re-selected by the same rule "
      f"from the saved grid `{beside['path']}` (`{beside['command']}`: {beside['epochs']} epochs, {beside['seeds']} "
      "seeds, the same data, protocol and metrics; its grids are listed in its own report). Tables rendered with "
      f"`python benchmarks/uncertainty.py {info['render_argv']}`.",
      "",
    ]
  summary = {"_bsam_fixed": info["bsam_fixed"]}
  for by, description in SELECTIONS.items():
    title = f"## Selected by validation {by.replace('nll', 'NLL')}"
    lines += [title, "", f"Each method's configuration with {description}.", ""]
    for model, per_method in results.items():
      lines += [f"### {model.upper()}", "", HEADER, RULE]
      for method, (configs, metrics) in per_method.items():
        rows, row_summary = rows_for(method, configs, metrics, by)
        lines += rows
        if by == "accuracy":
          summary.setdefault(model, {}).update(row_summary)
      lines.append("")
  lines += [
    "## Post-hoc calibration",
    "",
    "The configurations selected by validation accuracy (the first table), each beside the post-hoc calibration its "
    "users would apply, fitted on the same validation split: logit temperature scaling (Guo et al., 2017; τ from a "
    f"log grid over 0.1-10 by validation NLL) for point estimates, the posterior temperature (bSAM's model average at "
    f"N(ω, T / (N s)), the same {info['eval_samples']} samples for every T; T ∈ {{0, 2^-10, ..., 4}} by {rule_text}) "
    "for bSAM's model average. Selective prediction: accuracy on the "
    f"{COVERAGE:.0%} most confident test examples.",
    "",
  ]
  cal_summary = {}
  for model, per_method in results.items():
    lines += [f"### {model.upper()}", "", CAL_HEADER, CAL_RULE]
    for method, (configs, metrics) in per_method.items():
      if "tau" not in metrics:  # a grid saved before calibration was measured
        continue
      rows, row_summary = calibration_rows(method, configs, metrics)
      lines += rows
      cal_summary.setdefault(model, {}).update(row_summary)
    lines.append("")
  summary["_calibration"] = cal_summary
  lines += [
    "Wall time per method (all grid points and seeds, compilation included): "
    + ", ".join(f"{k} {v:.0f} s" for k, v in info["times"].items())
    + f". {info['environment']}.",
    "",
  ]
  return "\n".join(lines), summary


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  out = args.out or os.path.join(RESULTS, "uncertainty_quick.md" if args.quick else "uncertainty.md")
  stem = os.path.splitext(out)[0]
  if args.confidence:
    print("\n".join(confidence_rows(args.confidence)))
    return
  if args.from_grid:
    with open(args.from_grid) as f:
      saved = json.load(f)
    results = {
      model: {method: (r["configs"], jax.tree.map(np.asarray, r["metrics"])) for method, r in per.items()}
      for model, per in saved["results"].items()
    }
    info, argv_str = saved["info"], saved["argv"]
  else:
    quick = args.quick
    models = args.models or (["mlp"] if quick else ["mlp", "cnn"])
    methods = args.methods or list(DEFAULT_METHODS)
    default_grids = GRIDS if args.dataset == "mnist1d" else DIGITS_GRIDS
    all_grids = json.loads(args.grid) if args.grid else (None if quick else default_grids)
    if args.selected:
      grids = selected_grids(args.selected, models, methods)
    else:
      grids = {m: {k: (all_grids[m] if all_grids else QUICK_GRIDS)[k] for k in methods} for m in models}
    seeds = list(range(args.seeds or (2 if quick else 3)))
    epochs = args.epochs or (5 if quick else 60)
    bsam_fixed = json.loads(args.bsam) if args.bsam else {}
    curvature = bsam_fixed.get("curvature", "abs_grad")
    data = app.load_dataset(args.dataset)
    results, times = {}, {}
    for model in models:
      setup = Setup(
        model=model, dataset=args.dataset, epochs=epochs, eval_samples=args.eval_samples, curvature=curvature
      )
      results[model] = {}
      for method in methods:
        start = time.perf_counter()
        fixed = {k: v for k, v in bsam_fixed.items() if k != "curvature"} if method in BAYESIAN else None
        results[model][method] = run_grid(method, setup, data, grids[model][method], seeds, fixed)
        times[f"{model}/{method}"] = time.perf_counter() - start
        print(
          f"{model} {method}: {len(results[model][method][0])} configs x {len(seeds)} seeds "
          f"in {times[f'{model}/{method}']:.0f} s",
          flush=True,
        )
        for row in rows_for(method, *results[model][method])[0]:
          print("  " + row, flush=True)
    info = {
      "dataset": args.dataset,
      "temperature_rule": TEMPERATURE_RULE,
      "sizes": f"{data.train.y.shape[0]} train / {data.validation.y.shape[0]} validation / {data.test.y.shape[0]} test",
      "ood": data.ood_description,
      "epochs": epochs,
      "seeds": len(seeds),
      "eval_samples": args.eval_samples,
      "bsam_fixed": bsam_fixed,
      "grids": grids,
      "selected_from": os.path.relpath(args.selected, os.path.dirname(RESULTS)) if args.selected else None,
      "times": times,
      "environment": environment(),
    }
    argv_str = shlex.join(argv)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(stem + "_grid.json", "w") as f:
      saved = {m: {k: {"configs": c, "metrics": _to_lists(v)} for k, (c, v) in r.items()} for m, r in results.items()}
      json.dump({"argv": argv_str, "info": info, "results": saved}, f)
  if args.beside:
    with open(args.beside) as f:
      other = json.load(f)
    if other["info"].get("dataset", "mnist1d") != info.get("dataset", "mnist1d"):
      raise ValueError(f"--beside {args.beside} is on another data set than these rows")
    methods = []
    for model in results:
      per = {
        method: (r["configs"], jax.tree.map(np.asarray, r["metrics"]))
        for method, r in other["results"].get(model, {}).items()
        if method not in results[model]
      }
      methods += [m for m in per if m not in methods]
      results[model] = {**per, **results[model]}
    command = "python benchmarks/uncertainty.py " + other["argv"]
    info = {
      **info,
      "beside": {
        "path": os.path.relpath(args.beside),
        "command": command.strip(),
        "methods": methods,
        "epochs": other["info"]["epochs"],
        "seeds": other["info"]["seeds"],
      },
      "render_argv": shlex.join(argv),
    }
  text, summary = render(results, info, argv_str)
  with open(out, "w") as f:
    f.write(text)
  with open(stem + ".json", "w") as f:
    json.dump(summary, f, indent=1)
  print(f"wrote {out}")
  return summary


if __name__ == "__main__":
  main()
