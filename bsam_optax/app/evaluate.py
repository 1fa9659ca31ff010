"""Test metrics of a trained classifier: the posterior mean, and the model average over posterior samples.

For the test split and the OOD inputs of a :class:`~bsam_optax.app.data.Dataset`::

  posterior mean   p(y|x, ω)
  model average    1/S Σ_j p(y|x, θ_j), θ_j ~ N(ω, 1/(N s))     (bsam_optax.predictive)
  ... at T         θ_j ~ N(ω, T/(N s)), T by the validation NLL   (bsam_optax.select_temperature)
  metrics          accuracy, NLL, Brier, ECE, AUROC (misclassification), OOD AUROC   (bsam_optax.metrics)
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import bsam_optax as bo
from bsam_optax import metrics as _metrics
from bsam_optax.app import data as _data

__all__ = ["diagnostics_summary", "evaluate", "leaf_name", "posterior_std_summary"]


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
    opt_state: a state holding a posterior (used only with ``key``).
    data: the data set; its ``test`` split and ``ood`` inputs are used.
    key: the key of the posterior samples; ``None`` for the posterior mean only. With a key the
      posterior temperature T is selected on ``data.validation`` by the model average's NLL (the same
      samples for every T, T = 0 included; the smallest T within one standard error of the lowest NLL, see
      bo.select_temperature) and the model average is also evaluated at that T.
    num_samples: S, posterior samples of the model average.
    num_bins: bins of the ECE and the reliability diagram.

  Returns:
    ``(metrics, bins)``: ``metrics[name]`` has accuracy, nll, brier, ece,
    auroc (misclassification) and ood_auroc as floats; ``bins[name]`` the
    :class:`~bsam_optax.metrics.ReliabilityBins`, for ``name`` in
    ``"posterior_mean"`` and (with ``key``) ``"model_average"`` (T = 1) and
    ``"model_average_tempered"`` (at the selected T, also its entry
    ``"temperature"``); with a key ``metrics["temperature_selection"]`` maps
    each candidate T (as a string) to its validation NLL.
  """
  inputs = jnp.concatenate([data.test.x, data.ood])
  n_test = data.test.x.shape[0]
  predictions = {"posterior_mean": jax.jit(lambda p, x: jax.nn.softmax(apply_fn(p, x)))(params, inputs)}
  if key is not None:
    average = jax.jit(
      lambda p, s, x, k: bo.predictive(apply_fn, k, p, s, x, num_samples, chunk_size=math.gcd(num_samples, 8))
    )
    predictions["model_average"] = average(params, opt_state, inputs, key)
    temperature, table = bo.select_temperature(
      apply_fn,
      key,
      params,
      opt_state,
      data.validation.x,
      data.validation.y,
      num_samples=num_samples,
      chunk_size=math.gcd(num_samples, 8),
    )
    tempered = jax.jit(
      lambda p, s, x, k, t: bo.predictive(
        apply_fn, k, p, s, x, num_samples, chunk_size=math.gcd(num_samples, 8), temperature=t
      )
    )
    predictions["model_average_tempered"] = (
      predictions["posterior_mean"] if temperature == 0 else tempered(params, opt_state, inputs, key, temperature)
    )
  metrics, bins = {}, {}
  for name, probs in predictions.items():
    values, bins[name] = _all_metrics(probs[:n_test], data.test.y, probs[n_test:], num_bins)
    metrics[name] = {k: float(v) for k, v in values.items()}
  if key is not None:
    metrics["model_average_tempered"]["temperature"] = float(temperature)
    metrics["temperature_selection"] = {f"{t:g}": float(v) for t, v in table.items()}
  return metrics, bins


@functools.partial(jax.jit, static_argnames="num_bins")
def _all_metrics(probs_test, labels, probs_ood, num_bins):
  # One compilation for all metrics (eager, each jnp op would compile on its own).
  values = _metrics.classification_metrics(probs_test, labels, num_bins)
  values["ood_auroc"] = _metrics.ood_auroc(probs_test, probs_ood)
  return values, _metrics.reliability_bins(probs_test, labels, num_bins)


def leaf_name(path) -> str:
  """``"Conv_0/kernel"`` for a key path of a params tree."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def diagnostics_summary(params, opt_state) -> dict[str, dict[str, float]]:
  """:func:`bsam_optax.posterior_diagnostics` as floats: ``"overall"`` and one entry per leaf (``"Conv_0/kernel"``)."""
  overall, per_leaf = jax.jit(bo.posterior_diagnostics)(params, opt_state)
  out = {"overall": {k: float(v) for k, v in overall._asdict().items()}}
  for path, summary in per_leaf.items():
    name = "/".join(part.strip("[]'\"") for part in path.split("]") if part)
    out[name] = {k: float(v) for k, v in summary._asdict().items()}
  return out


def posterior_std_summary(std) -> dict[str, dict[str, float]]:
  """Per parameter leaf (``"Conv_0/kernel"`` ...): size, mean, median, min and max of the std.

  Example:
    >>> import jax.numpy as jnp
    >>> from bsam_optax.app.evaluate import posterior_std_summary
    >>> posterior_std_summary({"w": jnp.array([1.0, 3.0])})["w"]
    {'size': 2, 'mean': 2.0, 'median': 2.0, 'min': 1.0, 'max': 3.0}
  """
  summary = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(std)[0]:
    values = np.asarray(leaf, np.float64).ravel()
    summary[leaf_name(path)] = {
      "size": int(values.size),
      "mean": float(values.mean()),
      "median": float(np.median(values)),
      "min": float(values.min()),
      "max": float(values.max()),
    }
  return summary
