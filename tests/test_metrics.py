"""Tests of the metrics against NumPy loops and scikit-learn.

The comparisons run the jitted metrics on one shape, (N, K) = (500, 10), so that
each compiles once; one test checks that the eager (op-by-op) results agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

import bsam_optax.metrics as metrics

N, K, NUM_BINS = 500, 10, 20

accuracy = jax.jit(metrics.accuracy)
nll = jax.jit(metrics.nll)
brier = jax.jit(metrics.brier)
ece = jax.jit(metrics.ece, static_argnames="num_bins")
reliability_bins = jax.jit(metrics.reliability_bins, static_argnames="num_bins")
auroc = jax.jit(metrics.auroc)
misclassification_auroc = jax.jit(metrics.misclassification_auroc)
ood_auroc = jax.jit(metrics.ood_auroc)
predictive_entropy = jax.jit(metrics.predictive_entropy)
classification_metrics = jax.jit(metrics.classification_metrics, static_argnames="num_bins")


def _data(seed, temperature=1.5):
  """Softmax probabilities (f32) with a mix of right and wrong, confident and unsure predictions."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, K, size=N)
  logits = temperature * rng.normal(size=(N, K))
  logits[np.arange(N), labels] += rng.uniform(0.0, 3.0, size=N)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  return probs, labels.astype(np.int32)


def _two_class(conf):
  """(N, K) probabilities whose confidences are ``conf`` (tiled to N rows), class 0 predicted."""
  conf = np.resize(np.asarray(conf, np.float32), N)
  probs = np.zeros((N, K), np.float32)
  probs[:, 0], probs[:, 1] = conf, 1 - conf
  return probs


def _reference_bins(probs, labels, num_bins):
  """Reliability bins written as the loop over bins with boolean masks that the module avoids."""
  conf = probs.max(-1)
  correct = (probs.argmax(-1) == labels).astype(np.float64)
  edges = (np.arange(num_bins + 1) / num_bins).astype(np.float32)
  counts, mean_conf, acc = np.zeros(num_bins, int), np.zeros(num_bins), np.zeros(num_bins)
  for b in range(num_bins):
    in_bin = (conf > edges[b]) & (conf <= edges[b + 1])
    if b == 0:
      in_bin |= conf <= edges[0]
    if b == num_bins - 1:
      in_bin |= conf > edges[-1]
    counts[b] = in_bin.sum()
    if counts[b]:
      mean_conf[b] = conf[in_bin].astype(np.float64).mean()
      acc[b] = correct[in_bin].mean()
  return edges, counts, mean_conf, acc


def _reference_ece(probs, labels, num_bins):
  _, counts, mean_conf, acc = _reference_bins(probs, labels, num_bins)
  return np.sum(counts / counts.sum() * np.abs(acc - mean_conf))


def _entropy(probs):
  p = probs.astype(np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)


# --------------------------------------------------------------------------- against references


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_nll_brier_match_references(seed):
  probs, labels = _data(seed)
  np.testing.assert_allclose(accuracy(probs, labels), skm.accuracy_score(labels, probs.argmax(-1)), rtol=1e-6)
  normalized = probs / probs.sum(-1, keepdims=True, dtype=np.float64)
  np.testing.assert_allclose(nll(probs, labels), skm.log_loss(labels, normalized, labels=range(K)), rtol=1e-5)
  one_hot = np.eye(K)[labels]
  np.testing.assert_allclose(brier(probs, labels), np.mean(np.sum((probs - one_hot) ** 2, -1)), rtol=1e-5)


def test_nll_clips_at_eps():
  probs, labels = _data(0)
  probs[:2] = np.eye(K, dtype=np.float32)[(labels[:2] + 1) % K]  # two confident mistakes
  log_p = np.log(probs[np.arange(2, N), labels[2:]].astype(np.float64))
  expected = -(2 * np.log(1e-6) + log_p.sum()) / N
  np.testing.assert_allclose(nll(probs, labels, 1e-6), expected, rtol=1e-5)
  assert np.isfinite(nll(probs, labels))


@pytest.mark.parametrize("seed,num_bins", [(0, NUM_BINS), (1, NUM_BINS), (2, 7), (3, 1)])
def test_reliability_bins_and_ece_match_numpy_loop(seed, num_bins):
  probs, labels = _data(seed)
  edges, counts, mean_conf, acc = _reference_bins(probs, labels, num_bins)
  bins = reliability_bins(probs, labels, num_bins=num_bins)
  assert isinstance(bins, metrics.ReliabilityBins)
  assert bins.bin_edges.shape == (num_bins + 1,) and bins.counts.shape == (num_bins,)
  np.testing.assert_array_equal(bins.bin_edges, edges)
  np.testing.assert_array_equal(bins.counts, counts)
  np.testing.assert_allclose(bins.mean_confidence, mean_conf, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bins.accuracy, acc, rtol=1e-5, atol=1e-6)
  expected = _reference_ece(probs, labels, num_bins)
  np.testing.assert_allclose(ece(probs, labels, num_bins=num_bins), expected, atol=1e-6)


def test_default_is_twenty_bins():
  probs, labels = _data(4)
  assert reliability_bins(probs, labels).counts.shape == (20,)
  np.testing.assert_allclose(ece(probs, labels), _reference_ece(probs, labels, 20), atol=1e-6)


def test_bins_are_left_open_right_closed():
  edges = (np.arange(NUM_BINS + 1) / NUM_BINS).astype(np.float32)
  # confidences exactly on the edges 11/20, 15/20 and 1 belong to the bins they close: 10, 14 and 19.
  conf = [edges[11], edges[15], 1.0, np.nextafter(edges[11], np.float32(1)), 0.5]
  bins = reliability_bins(_two_class(conf), np.zeros(N, np.int32), num_bins=NUM_BINS)
  expected = np.zeros(NUM_BINS, int)
  expected[[10, 14, 19, 11, 9]] = N // 5
  np.testing.assert_array_equal(bins.counts, expected)


def test_empty_bins_are_zero_not_nan():
  probs = _two_class([0.97, 0.96, 0.62, 0.61])
  labels = np.resize([0, 1, 0, 0], N).astype(np.int32)
  bins = reliability_bins(probs, labels, num_bins=NUM_BINS)
  for field in bins:
    assert np.all(np.isfinite(field))
  nonempty = np.asarray(bins.counts) > 0
  np.testing.assert_array_equal(np.flatnonzero(nonempty), [12, 19])
  np.testing.assert_array_equal(np.asarray(bins.mean_confidence)[~nonempty], 0.0)
  np.testing.assert_array_equal(np.asarray(bins.accuracy)[~nonempty], 0.0)
  np.testing.assert_allclose([bins.accuracy[12], bins.accuracy[19]], [1.0, 0.5])
  np.testing.assert_allclose(ece(probs, labels, num_bins=NUM_BINS), _reference_ece(probs, labels, NUM_BINS), rtol=1e-5)


def _scores_targets(seed, num_values=None):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=N)
  if num_values is not None:  # only num_values distinct scores: many ties
    scores = rng.integers(0, num_values, size=N).astype(np.float64)
  targets = (rng.uniform(size=N) < 0.3 + 0.4 * (scores > np.median(scores))).astype(np.int32)
  return scores.astype(np.float32), targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn(seed):
  scores, targets = _scores_targets(seed)
  np.testing.assert_allclose(auroc(scores, targets), skm.roc_auc_score(targets, scores), rtol=1e-6)


def test_auroc_accepts_bool_targets():
  scores, targets = _scores_targets(0)
  np.testing.assert_allclose(auroc(scores, targets.astype(bool)), skm.roc_auc_score(targets, scores), rtol=1e-6)


@pytest.mark.parametrize("num_values", [1, 2, 5])
def test_auroc_ties_use_average_ranks(num_values):
  scores, targets = _scores_targets(num_values, num_values)
  np.testing.assert_allclose(auroc(scores, targets), skm.roc_auc_score(targets, scores), rtol=1e-6)
  if num_values == 1:
    np.testing.assert_allclose(auroc(scores, targets), 0.5)


def test_auroc_large_n_with_ties_keeps_f32_precision():
  rng = np.random.default_rng(7)
  scores = np.round(rng.normal(size=50_000), 2).astype(np.float32)
  targets = (rng.uniform(size=50_000) < 1 / (1 + np.exp(-scores))).astype(np.int32)
  np.testing.assert_allclose(auroc(scores, targets), skm.roc_auc_score(targets, scores), atol=2e-6)


def test_auroc_perfect_worst_and_degenerate():
  scores = np.linspace(0, 1, N, dtype=np.float32)
  upper = (scores > 0.5).astype(np.int32)
  np.testing.assert_allclose(auroc(scores, upper), 1.0)
  np.testing.assert_allclose(auroc(scores, 1 - upper), 0.0)
  assert np.isnan(auroc(scores, np.zeros(N, np.int32)))
  assert np.isnan(auroc(scores, np.ones(N, np.int32)))


@pytest.mark.parametrize("seed", [0, 1])
def test_misclassification_auroc_matches_sklearn(seed):
  probs, labels = _data(seed)
  correct = probs.argmax(-1) == labels
  assert 0 < correct.sum() < N
  expected = skm.roc_auc_score(correct, probs.max(-1))
  np.testing.assert_allclose(misclassification_auroc(probs, labels), expected, rtol=1e-6)


def test_misclassification_auroc_convention():
  # the confident predictions are right and the unsure ones wrong: 1; the other way round: 0.
  probs = _two_class([0.9, 0.8, 0.6, 0.55])
  np.testing.assert_allclose(misclassification_auroc(probs, np.resize([0, 0, 1, 1], N).astype(np.int32)), 1.0)
  np.testing.assert_allclose(misclassification_auroc(probs, np.resize([1, 1, 0, 0], N).astype(np.int32)), 0.0)


def test_predictive_entropy_matches_numpy():
  probs, _ = _data(0)
  probs[0] = np.eye(K, dtype=np.float32)[3]  # 0 log 0 = 0
  probs[1] = 1 / K
  entropy = predictive_entropy(probs)
  assert entropy.shape == (N,)
  np.testing.assert_allclose(entropy, _entropy(probs), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(entropy[:2], [0.0, np.log(K)], rtol=1e-6)


def test_ood_auroc_matches_sklearn_with_ood_positive():
  probs_in, _ = _data(0, temperature=3.0)
  probs_out, _ = _data(1, temperature=0.5)
  scores = np.concatenate([_entropy(probs_in), _entropy(probs_out)])
  targets = np.concatenate([np.zeros(N), np.ones(N)])
  expected = skm.roc_auc_score(targets, scores)
  assert expected > 0.5  # the flatter out-of-distribution predictives have the higher entropy
  np.testing.assert_allclose(ood_auroc(probs_in, probs_out), expected, rtol=1e-5)
  np.testing.assert_allclose(ood_auroc(probs_out, probs_in), 1 - expected, rtol=1e-5)


def test_ood_auroc_perfect_separation():
  confident = _two_class([0.99, 0.95])
  uniform = np.full((N, K), 1 / K, np.float32)
  np.testing.assert_allclose(ood_auroc(confident, uniform), 1.0)
  np.testing.assert_allclose(ood_auroc(uniform, confident), 0.0)


def test_perfect_and_worst_classifiers():
  _, labels = _data(0)
  perfect = np.eye(K, dtype=np.float32)[labels]
  worst = np.eye(K, dtype=np.float32)[(labels + 1) % K]
  m = classification_metrics(perfect, labels, num_bins=NUM_BINS)
  np.testing.assert_allclose([m["accuracy"], m["nll"], m["brier"], m["ece"]], [1.0, 0.0, 0.0, 0.0], atol=1e-7)
  assert np.isnan(m["auroc"])  # no misclassified examples to detect
  m = classification_metrics(worst, labels, num_bins=NUM_BINS)
  expected = [0.0, -np.log(1e-12), 2.0, 1.0]
  np.testing.assert_allclose([m["accuracy"], m["nll"], m["brier"], m["ece"]], expected, rtol=1e-5)


def test_classification_metrics_is_the_individual_metrics():
  probs, labels = _data(5)
  m = classification_metrics(probs, labels, num_bins=NUM_BINS)
  assert set(m) == {"accuracy", "nll", "brier", "ece", "auroc"}
  np.testing.assert_allclose(m["accuracy"], accuracy(probs, labels))
  np.testing.assert_allclose(m["nll"], nll(probs, labels))
  np.testing.assert_allclose(m["brier"], brier(probs, labels))
  np.testing.assert_allclose(m["ece"], ece(probs, labels, num_bins=NUM_BINS))
  np.testing.assert_allclose(m["auroc"], misclassification_auroc(probs, labels))


def test_low_precision_inputs_are_upcast():
  probs, labels = _data(6)
  rounded = jnp.asarray(probs, jnp.bfloat16)
  for low, high in [
    (ece(rounded, labels), ece(rounded.astype(jnp.float32), labels)),
    (predictive_entropy(rounded), predictive_entropy(rounded.astype(jnp.float32))),
  ]:
    assert low.dtype == high.dtype == jnp.float32
    np.testing.assert_allclose(low, high, rtol=1e-6)


# --------------------------------------------------------------------------- jit and vmap


def test_eager_and_jitted_metrics_agree():
  probs, labels = _data(8)
  jitted = classification_metrics(probs, labels, num_bins=NUM_BINS)
  eager = metrics.classification_metrics(probs, labels)
  for key in eager:
    np.testing.assert_allclose(jitted[key], eager[key], rtol=1e-6, err_msg=key)


def test_metrics_vmap_over_a_batch_of_predictives():
  probs, labels = _data(10)
  stacked = np.stack([probs, probs[:, ::-1]])
  batched = jax.jit(jax.vmap(metrics.classification_metrics, in_axes=(0, None)))(stacked, labels)
  for i in range(2):
    single = classification_metrics(stacked[i], labels, num_bins=NUM_BINS)
    for key in single:
      np.testing.assert_allclose(batched[key][i], single[key], rtol=1e-6, err_msg=key)


# --------------------------------------------------------------------------- bad inputs

_P = np.full((4, 3), 1 / 3, np.float32)
_Y = np.zeros(4, np.int32)


@pytest.mark.parametrize(
  "fn,args,match",
  [
    (metrics.accuracy, (_P[0], _Y), "probs"),
    (metrics.nll, (_P[None], _Y), "probs"),
    (metrics.brier, (_P, _Y[:, None]), "labels"),
    (metrics.ece, (_P, _Y[:3]), "labels"),
    (metrics.ece, (_P, _Y.astype(np.float32)), "labels"),
    (metrics.reliability_bins, (_P, _Y, 0), "num_bins"),
    (metrics.reliability_bins, (_P, _Y, 2.5), "num_bins"),
    (metrics.ece, (_P, _Y, True), "num_bins"),
    (metrics.classification_metrics, (_P, _Y, -3), "num_bins"),
    (metrics.classification_metrics, (_P[0], _Y), "probs"),
    (metrics.misclassification_auroc, (_P, _Y[:2]), "labels"),
    (metrics.predictive_entropy, (_P[0],), "probs"),
    (metrics.auroc, (_P, _Y), "scores"),
    (metrics.auroc, (_Y.astype(np.float32), _Y[:3]), "targets"),
    (metrics.auroc, (_Y[:0].astype(np.float32), _Y[:0]), "scores"),
    (metrics.ood_auroc, (_P[0], _P), "probs_in"),
    (metrics.ood_auroc, (_P, _P[0]), "probs_out"),
    (metrics.ood_auroc, (_P, _P[:, :2]), "probs_in and probs_out"),
  ],
)
def test_bad_inputs_raise_naming_the_argument(fn, args, match):
  with pytest.raises(ValueError, match=match):
    fn(*args)


def test_shape_errors_are_raised_under_jit():
  with pytest.raises(ValueError, match="labels"):
    ece(_P, _Y[:3], num_bins=NUM_BINS)
  with pytest.raises(ValueError, match="probs"):
    accuracy(_P[0], _Y)
  with pytest.raises(ValueError, match="num_bins"):
    ece(_P, _Y, num_bins=0)


def test_numpy_integer_num_bins_is_accepted():
  probs, labels = _data(0)
  np.testing.assert_array_equal(
    reliability_bins(probs, labels, num_bins=np.int64(7)).counts, _reference_bins(probs, labels, 7)[1]
  )
