"""Calibration and uncertainty metrics for classification, as reported in the bSAM paper.

Every function takes class probabilities ``probs`` of shape ``(n, k)`` (e.g. the
model-averaged output of :func:`bsam_optax.predictive`) and, where needed,
integer ``labels`` of shape ``(n,)``. All are pure ``jax.numpy``: no Python
loops over bins or examples and no boolean-mask indexing, so they ``jit``,
``vmap`` and run on accelerators. Shapes are checked statically (at trace time);
values (labels in ``[0, k)``, probabilities in ``[0, 1]``) are not checked.
Inputs in a low precision (bf16, f16) are upcast to f32 first.

The metrics, with ``ŷ_i = argmax_c p_ic`` the prediction and
``conf_i = max_c p_ic`` the confidence of example ``i``:

* ``accuracy = 1/n Σ_i [ŷ_i = y_i]``.
* ``nll = -1/n Σ_i log max(p_{i,y_i}, eps)``, the mean negative log-likelihood
  (``eps`` keeps it finite when a true class gets probability 0).
* ``brier = 1/n Σ_i Σ_c (p_ic - [c = y_i])²``, in ``[0, 2]``.
* ``ece = Σ_b (|B_b| / n) |acc(B_b) - conf(B_b)|``, the expected calibration
  error over ``num_bins`` equal-width confidence bins; bin ``b`` holds the
  examples with ``conf_i ∈ (b/B, (b+1)/B]`` (a confidence of exactly 0 goes to
  bin 0), and ``acc`` / ``conf`` are the mean correctness / confidence in it.
  The authors' code uses B = 20. :func:`reliability_bins` returns the per-bin
  numbers (for a reliability diagram) and :func:`ece` is computed from them.
* ``auroc``: the area under the ROC curve of a score separating positives from
  negatives, i.e. the Mann–Whitney probability
  ``P(s_pos > s_neg) + ½ P(s_pos = s_neg)``, ties counted half as with average
  ranks; it equals ``sklearn.metrics.roc_auc_score``.
* ``misclassification_auroc``: what the bSAM paper reports as "AUROC" — how
  well the confidence ``conf_i`` separates correctly classified examples
  (positives) from misclassified ones (negatives); equals
  ``roc_auc_score(ŷ == y, conf)``.
* ``ood_auroc``: how well the predictive entropy ``H_i = -Σ_c p_ic log p_ic``
  separates out-of-distribution inputs (positives, expected to have higher
  entropy) from in-distribution ones (negatives).

Example:

  >>> import jax.numpy as jnp
  >>> import bsam_optax.metrics as metrics
  >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
  >>> labels = jnp.array([0, 1, 1, 1])
  >>> m = metrics.classification_metrics(probs, labels)
  >>> print({k: round(float(v), 4) for k, v in m.items()})
  {'accuracy': 0.75, 'nll': 0.4004, 'brier': 0.25, 'ece': 0.3, 'auroc': 1.0}
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "ReliabilityBins",
  "accuracy",
  "auroc",
  "brier",
  "classification_metrics",
  "ece",
  "misclassification_auroc",
  "nll",
  "ood_auroc",
  "predictive_entropy",
  "reliability_bins",
]


class ReliabilityBins(NamedTuple):
  """Per-bin data of a reliability diagram, from :func:`reliability_bins`.

  Empty bins have ``counts == 0`` and ``mean_confidence == accuracy == 0``.
  """

  bin_edges: jax.Array  # (B + 1,), b / B for b = 0..B; bin b is (edges[b], edges[b + 1]]
  counts: jax.Array  # (B,), int32, number of examples in each bin
  mean_confidence: jax.Array  # (B,), mean max-probability of the examples in each bin
  accuracy: jax.Array  # (B,), fraction of the examples in each bin that are correctly classified


# --------------------------------------------------------------------------- checks


def _float_dtype(dtype):
  # bf16 / f16 sums over many examples lose too much; f64 is kept when enabled.
  return jnp.promote_types(dtype, jnp.float32) if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _check_probs(probs, name: str = "probs") -> jax.Array:
  probs = jnp.asarray(probs)
  if probs.ndim != 2:
    raise ValueError(f"{name} must be 2-D (n, num_classes), got shape {probs.shape}")
  return probs.astype(_float_dtype(probs.dtype))


def _check_probs_labels(probs, labels) -> tuple[jax.Array, jax.Array]:
  probs = _check_probs(probs)
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D (n,), got shape {labels.shape}")
  if labels.shape[0] != probs.shape[0]:
    raise ValueError(
      f"labels must have one entry per row of probs, got labels shape {labels.shape} and probs shape {probs.shape}"
    )
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
  return probs, labels


def _check_num_bins(num_bins) -> int:
  if isinstance(num_bins, bool) or not isinstance(num_bins, numbers.Integral) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
  return int(num_bins)


def _correct(probs, labels) -> jax.Array:
  # argmax breaks ties towards the lower class index, like numpy.
  return jnp.argmax(probs, axis=-1) == labels


# --------------------------------------------------------------------------- metrics


def accuracy(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Fraction of examples whose most probable class is the label.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.

  Returns:
    A scalar in ``[0, 1]``.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> float(metrics.accuracy(jnp.array([[0.9, 0.1], [0.6, 0.4]]), jnp.array([0, 1])))
    0.5
  """
  probs, labels = _check_probs_labels(probs, labels)
  return jnp.mean(_correct(probs, labels).astype(probs.dtype))


def nll(probs: jax.Array, labels: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Mean negative log-likelihood ``-1/n Σ_i log p_{i, y_i}``.

  The probability of the true class is clipped to ``[eps, 1]`` before the log,
  so a confident mistake costs at most ``-log(eps)`` instead of ``inf``.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.
    eps: the smallest probability the log sees.

  Returns:
    A non-negative scalar.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> print(f"{metrics.nll(jnp.array([[0.5, 0.5], [0.25, 0.75]]), jnp.array([0, 1])):.4f}")
    0.4904
  """
  probs, labels = _check_probs_labels(probs, labels)
  p_true = jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
  return -jnp.mean(jnp.log(jnp.clip(p_true, eps, 1.0)))


def brier(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Brier score ``1/n Σ_i Σ_c (p_ic - [c = y_i])²``.

  This is the multi-class form (summed over classes, in ``[0, 2]``), as in the
  bSAM paper's tables, not sklearn's binary ``brier_score_loss``.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.

  Returns:
    A scalar in ``[0, 2]``.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> print(f"{metrics.brier(jnp.array([[0.5, 0.5], [1.0, 0.0]]), jnp.array([0, 1])):.2f}")
    1.25
  """
  probs, labels = _check_probs_labels(probs, labels)
  one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  return jnp.mean(jnp.sum(jnp.square(probs - one_hot), axis=-1))


def reliability_bins(probs: jax.Array, labels: jax.Array, num_bins: int = 20) -> ReliabilityBins:
  """Per-bin counts, mean confidence and accuracy for a reliability diagram.

  The confidence ``conf_i = max_c p_ic`` falls into bin ``b`` when
  ``conf_i ∈ (b/B, (b+1)/B]`` (``B = num_bins``; a confidence of 0 goes to bin
  0). Bins are filled with ``jax.ops.segment_sum``, so this jits.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.
    num_bins: B, the number of equal-width bins on ``[0, 1]`` (a static int).

  Returns:
    A :class:`ReliabilityBins`; empty bins have count 0 and confidence and
    accuracy 0 (never NaN).

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    >>> bins = metrics.reliability_bins(probs, jnp.array([0, 1, 1, 1]), num_bins=4)
    >>> bins.counts.tolist(), bins.accuracy.tolist()
    ([0, 0, 2, 2], [0.0, 0.0, 0.5, 1.0])
  """
  probs, labels = _check_probs_labels(probs, labels)
  num_bins = _check_num_bins(num_bins)
  dtype = probs.dtype
  # A static constant, built in NumPy because XLA may turn the division b / B into a
  # multiplication by 1 / B, one ulp off the correctly rounded edge.
  edges = jnp.asarray(np.arange(num_bins + 1) / num_bins, dtype=dtype)
  confidence = jnp.max(probs, axis=-1)
  # The number of inner edges below conf is b for conf in (edges[b], edges[b + 1]]; conf = 0 lands in
  # bin 0 and conf > 1 (rounding) in bin B - 1. An (n, B - 1) comparison beats a search for B ~ 20.
  bin_index = jnp.sum(confidence[:, None] > edges[None, 1:-1], axis=-1, dtype=jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones_like(bin_index), bin_index, num_segments=num_bins)
  sum_confidence = jax.ops.segment_sum(confidence, bin_index, num_segments=num_bins)
  sum_correct = jax.ops.segment_sum(_correct(probs, labels).astype(dtype), bin_index, num_segments=num_bins)
  denominator = jnp.maximum(counts, 1).astype(dtype)
  return ReliabilityBins(
    bin_edges=edges,
    counts=counts.astype(jnp.int32),
    mean_confidence=sum_confidence / denominator,
    accuracy=sum_correct / denominator,
  )


def ece(probs: jax.Array, labels: jax.Array, num_bins: int = 20) -> jax.Array:
  """Expected calibration error ``Σ_b (|B_b| / n) |acc(B_b) - conf(B_b)|``.

  Computed from :func:`reliability_bins` (same bins: ``(b/B, (b+1)/B]``); the
  bSAM authors' code uses 20 bins.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.
    num_bins: B, the number of equal-width confidence bins (a static int).

  Returns:
    A scalar in ``[0, 1]``.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    >>> labels = jnp.array([0, 1, 1, 1])
    >>> print(f"{metrics.ece(probs, labels):.3f}", f"{metrics.ece(probs, labels, num_bins=4):.3f}")
    0.300 0.150
  """
  bins = reliability_bins(probs, labels, num_bins)
  weights = bins.counts.astype(bins.accuracy.dtype)
  return jnp.sum(weights * jnp.abs(bins.accuracy - bins.mean_confidence)) / jnp.sum(weights)


def auroc(scores: jax.Array, targets: jax.Array) -> jax.Array:
  """Area under the ROC curve of ``scores`` for binary ``targets`` (Mann–Whitney U).

  ``AUROC = U / (n_pos n_neg)`` with ``U = Σ_{i pos} (#neg with s < s_i + ½ #neg
  with s = s_i)``, which is the rank-sum statistic
  ``Σ_{i pos} rank_i - n_pos (n_pos + 1) / 2`` with tied scores given their
  average rank. The counts come from one sort and cumulative sums / maxima, so
  this jits; counting per positive keeps every term in ``[0, 1]`` and avoids the
  cancellation of the rank-sum form in float32. Equals
  ``sklearn.metrics.roc_auc_score(targets, scores)``.

  Args:
    scores: real scores, higher meaning "more likely positive", shape ``(n,)``.
    targets: binary targets, shape ``(n,)``: 1 (or ``True``) marks a positive,
      0 (or ``False``) a negative.

  Returns:
    A scalar in ``[0, 1]``; NaN if there are no positives or no negatives
    (this cannot raise under ``jit``). NaN scores give an undefined result.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> float(metrics.auroc(jnp.array([0.1, 0.4, 0.4, 0.8]), jnp.array([0, 0, 1, 1])))
    0.875
  """
  scores = jnp.asarray(scores)
  targets = jnp.asarray(targets)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D (n,), got shape {scores.shape}")
  if targets.ndim != 1 or targets.shape[0] != scores.shape[0]:
    raise ValueError(f"targets must be 1-D with the length of scores {scores.shape}, got shape {targets.shape}")
  if scores.shape[0] == 0:
    raise ValueError("scores must not be empty")
  dtype = _float_dtype(scores.dtype)
  scores = scores.astype(dtype)
  positive = targets.astype(bool)

  # In ascending order, the negatives below sorted position j are negatives_upto[first[j]] and those
  # below or tied negatives_upto[end[j]], with [first[j], end[j]) the tie group of position j.
  sorted_scores, sorted_positive = jax.lax.sort((scores, positive), num_keys=1)
  negatives_upto = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(~sorted_positive, dtype=jnp.int32)])
  index = jnp.arange(scores.shape[0])
  new_value = sorted_scores[1:] != sorted_scores[:-1]
  first = jax.lax.cummax(jnp.where(jnp.concatenate([jnp.ones(1, bool), new_value]), index, 0))
  end = jax.lax.cummin(
    jnp.where(jnp.concatenate([new_value, jnp.ones(1, bool)]), index + 1, scores.shape[0]), reverse=True
  )
  num_pos = jnp.sum(positive).astype(dtype)
  num_neg = negatives_upto[-1].astype(dtype)
  wins = (negatives_upto[first] + negatives_upto[end]).astype(dtype) / (2 * num_neg)  # in [0, 1] per positive
  return jnp.sum(jnp.where(sorted_positive, wins, 0.0)) / num_pos


def predictive_entropy(probs: jax.Array) -> jax.Array:
  """Entropy ``H_i = -Σ_c p_ic log p_ic`` of each example's predictive, with ``0 log 0 = 0``.

  Args:
    probs: class probabilities, shape ``(n, k)``.

  Returns:
    Entropies in nats, shape ``(n,)``, each in ``[0, log k]``.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> print(metrics.predictive_entropy(jnp.array([[1.0, 0.0], [0.5, 0.5]])).round(4))
    [0.     0.6931]
  """
  probs = _check_probs(probs)
  return jnp.sum(jax.scipy.special.entr(probs), axis=-1)


def misclassification_auroc(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """AUROC of telling correct from wrong predictions by confidence (the paper's "AUROC").

  Convention: the score is the confidence ``max_c p_ic`` and the positives are
  the correctly classified examples, so 1 means every correct prediction is
  more confident than every mistake and 0.5 means confidence carries no
  information. Equals ``sklearn.metrics.roc_auc_score(correct, confidence)``.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.

  Returns:
    A scalar in ``[0, 1]``; NaN if all examples are correct or all are wrong.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    >>> float(metrics.misclassification_auroc(probs, jnp.array([0, 1, 1, 1])))
    1.0
  """
  probs, labels = _check_probs_labels(probs, labels)
  return auroc(jnp.max(probs, axis=-1), _correct(probs, labels))


def ood_auroc(probs_in: jax.Array, probs_out: jax.Array) -> jax.Array:
  """AUROC of detecting out-of-distribution inputs by predictive entropy.

  Convention: the score is :func:`predictive_entropy`, the positives are the
  out-of-distribution examples (``probs_out``) and the negatives the
  in-distribution ones (``probs_in``), so 1 means every OOD input has a higher
  entropy than every in-distribution input.

  Args:
    probs_in: predictive probabilities on in-distribution inputs, shape ``(n_in, k)``.
    probs_out: predictive probabilities on out-of-distribution inputs, shape ``(n_out, k)``.

  Returns:
    A scalar in ``[0, 1]``.

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> probs_in = jnp.array([[0.95, 0.05], [0.1, 0.9]])
    >>> probs_out = jnp.array([[0.5, 0.5], [0.6, 0.4]])
    >>> float(metrics.ood_auroc(probs_in, probs_out))
    1.0
  """
  probs_in = _check_probs(probs_in, "probs_in")
  probs_out = _check_probs(probs_out, "probs_out")
  if probs_in.shape[1] != probs_out.shape[1]:
    raise ValueError(
      f"probs_in and probs_out must have the same number of classes, got shapes {probs_in.shape} and {probs_out.shape}"
    )
  dtype = jnp.promote_types(probs_in.dtype, probs_out.dtype)
  scores = jnp.concatenate([predictive_entropy(probs_in), predictive_entropy(probs_out)]).astype(dtype)
  targets = jnp.concatenate([jnp.zeros(probs_in.shape[0], bool), jnp.ones(probs_out.shape[0], bool)])
  return auroc(scores, targets)


def classification_metrics(probs: jax.Array, labels: jax.Array, num_bins: int = 20) -> dict[str, jax.Array]:
  """The bSAM paper's test metrics in one call.

  Args:
    probs: class probabilities, shape ``(n, k)``.
    labels: integer labels in ``[0, k)``, shape ``(n,)``.
    num_bins: B, the number of confidence bins of the ECE (a static int).

  Returns:
    A dict of scalars: ``accuracy``, ``nll``, ``brier``, ``ece`` and ``auroc``
    (:func:`misclassification_auroc`).

  Example:

    >>> import jax.numpy as jnp
    >>> import bsam_optax.metrics as metrics
    >>> probs = jnp.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
    >>> print(f"{metrics.classification_metrics(probs, jnp.array([0, 1, 1, 1]))['accuracy']:.2f}")
    0.75
  """
  probs, labels = _check_probs_labels(probs, labels)
  num_bins = _check_num_bins(num_bins)
  return {
    "accuracy": accuracy(probs, labels),
    "nll": nll(probs, labels),
    "brier": brier(probs, labels),
    "ece": ece(probs, labels, num_bins),
    "auroc": misclassification_auroc(probs, labels),
  }
