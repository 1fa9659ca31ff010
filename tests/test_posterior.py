"""Tests of sample_posterior and predictive against posterior() and noisy_params."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bsam_optax as bo

N_DATA = 20.0
# Jitted once: run eagerly, every sampling primitive would be compiled on its own.
sample_posterior = jax.jit(bo.sample_posterior, static_argnums=3)
predictive = jax.jit(bo.predictive, static_argnums=(0, 5), static_argnames=("num_samples", "chunk_size", "link"))


def _params_and_state(tx=None):
  params = {"w": jnp.array([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]), "b": jnp.array([0.2, -0.2])}
  tx = bo.bsam(0.1, n_data=N_DATA) if tx is None else tx
  state = tx.init(params)
  bsam_state = bo.find_bsam_state(state)
  # Different precisions per entry: s in [0.5, 8], so std = 1 / sqrt(N s) spans a factor of 4.
  scale = jax.tree.map(lambda s: jnp.linspace(0.5, 8.0, s.size).reshape(s.shape), bsam_state.scale)
  state = jax.tree.map(
    lambda x: bsam_state._replace(scale=scale) if x is bsam_state else x,
    state,
    is_leaf=lambda x: isinstance(x, bo.BSAMState),
  )
  return params, state


def test_samples_match_the_posterior_mean_and_std():
  params, state = _params_and_state()
  num_samples = 20_000
  samples = sample_posterior(jax.random.key(0), params, state, num_samples)
  mean, std = bo.posterior(params, state)
  for k in params:
    assert samples[k].shape == (num_samples,) + params[k].shape
    expected_std = 1 / np.sqrt(N_DATA * np.asarray(bo.find_bsam_state(state).scale[k]))
    np.testing.assert_allclose(std[k], expected_std, rtol=1e-6)
    # 5 standard errors: of the mean σ / √S, of the std about σ / √(2S).
    np.testing.assert_array_less(np.abs(samples[k].mean(0) - mean[k]), 5 * std[k] / np.sqrt(num_samples))
    np.testing.assert_array_less(np.abs(samples[k].std(0) - std[k]), 5 * std[k] / np.sqrt(2 * num_samples))


def test_sample_j_is_noisy_params_with_fold_in_key_j():
  params, state = _params_and_state()
  key = jax.random.key(1)
  samples = sample_posterior(key, params, state, 5)
  noisy_params = jax.jit(bo.noisy_params)
  for j in range(5):
    theta = noisy_params(jax.random.fold_in(key, j), params, state)
    for k in params:
      np.testing.assert_allclose(samples[k][j], theta[k], rtol=1e-6, atol=1e-7)
  # Samples are distinct, and a prefix of a longer run.
  assert not np.allclose(samples["w"][0], samples["w"][1])
  longer = sample_posterior(key, params, state, 8)
  np.testing.assert_allclose(longer["w"][:5], samples["w"], rtol=1e-6, atol=1e-7)


def test_through_optax_chain_with_masked_leaves():
  tx = optax.chain(optax.clip(1.0), optax.masked(bo.bsam(0.1, n_data=N_DATA), {"w": True, "b": False}))
  params, state = _params_and_state(tx)
  samples = sample_posterior(jax.random.key(2), params, state, 64)
  # Masked-out leaves are point estimates: every sample is the mean, and the posterior std is 0.
  np.testing.assert_array_equal(samples["b"], jnp.broadcast_to(params["b"], (64, 2)))
  assert float(jnp.max(bo.posterior(params, state)[1]["b"])) == 0.0
  assert float(jnp.min(jnp.std(samples["w"], axis=0))) > 0


def test_dtypes_are_preserved():
  params = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.float32)}
  state = bo.bsam(0.1, n_data=N_DATA).init(params)
  samples = sample_posterior(jax.random.key(3), params, state, 4)
  assert samples["w"].dtype == jnp.bfloat16
  assert samples["b"].dtype == jnp.float32


def _apply(params, x):
  return x @ params["w"] + params["b"]


def _inputs():
  return jax.random.normal(jax.random.key(4), (5, 2))


def _predict_params():
  params = {"w": jnp.array([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]), "b": jnp.array([0.2, -0.2, 0.1])}
  return params, bo.bsam(0.1, n_data=N_DATA).init(params)


@pytest.mark.parametrize("link", [jax.nn.softmax, None])
def test_predictive_is_the_average_over_samples(link):
  params, state = _predict_params()
  key, x = jax.random.key(5), _inputs()
  got = predictive(_apply, key, params, state, x, num_samples=8, link=link)
  samples = sample_posterior(key, params, state, 8)
  outputs = jnp.stack([_apply(jax.tree.map(lambda s, j=j: s[j], samples), x) for j in range(8)])
  expected = jnp.mean(jax.nn.softmax(outputs) if link else outputs, axis=0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  assert got.shape == (5, 3)
  if link is not None:
    np.testing.assert_allclose(jnp.sum(got, -1), 1.0, rtol=1e-5)


def test_predictive_does_not_depend_on_chunk_size():
  params, state = _predict_params()
  key, x = jax.random.key(6), _inputs()
  predict = jax.jit(
    lambda chunk_size: bo.predictive(_apply, key, params, state, x, num_samples=12, chunk_size=chunk_size),
    static_argnums=0,
  )
  reference = predict(None)
  for chunk_size in (1, 4, 12):
    np.testing.assert_allclose(predict(chunk_size), reference, rtol=1e-6, atol=1e-7)
  # The model average differs from the prediction of the mean (the posterior has width).
  assert not np.allclose(reference, jax.nn.softmax(_apply(params, x)), atol=1e-4)


def test_predictive_jits():
  params, state = _predict_params()
  fn = jax.jit(lambda k, p, s, x: bo.predictive(_apply, k, p, s, x, num_samples=4, chunk_size=2))
  got = fn(jax.random.key(7), params, state, _inputs())
  np.testing.assert_allclose(got, predictive(_apply, jax.random.key(7), params, state, _inputs(), 4), rtol=1e-6)


@pytest.mark.parametrize("num_samples,error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_num_samples(num_samples, error):
  params, state = _predict_params()
  with pytest.raises(error, match="num_samples"):
    bo.sample_posterior(jax.random.key(0), params, state, num_samples)
  with pytest.raises(error, match="num_samples"):
    bo.predictive(_apply, jax.random.key(0), params, state, _inputs(), num_samples)


@pytest.mark.parametrize(
  "chunk_size,match", [(0, "positive"), (-2, "positive"), (2.0, "positive"), (True, "positive"), (3, "divide")]
)
def test_bad_chunk_size(chunk_size, match):
  params, state = _predict_params()
  with pytest.raises(ValueError, match=match):
    bo.predictive(_apply, jax.random.key(0), params, state, _inputs(), 8, chunk_size=chunk_size)


# Temperature: θ_j = ω + √T σ z_j with the same z_j for every T.


def test_temperature_scales_the_deviation_from_the_mean_with_the_same_noise():
  params, state = _params_and_state()
  key = jax.random.key(8)
  at_one = sample_posterior(key, params, state, 6)
  for temperature in (0.25, 2.0, 1e-4):
    tempered = jax.jit(bo.sample_posterior, static_argnums=3)(key, params, state, 6, temperature=temperature)
    for k in params:
      np.testing.assert_allclose(
        tempered[k] - params[k], np.sqrt(temperature) * (at_one[k] - params[k]), rtol=1e-5, atol=1e-6
      )


def test_temperature_zero_is_the_posterior_mean_exactly():
  params, state = _params_and_state()
  samples = bo.sample_posterior(jax.random.key(9), params, state, 3, temperature=0)
  for k in params:
    np.testing.assert_array_equal(samples[k], np.broadcast_to(params[k], (3,) + params[k].shape))
  params, state = _predict_params()
  x = _inputs()
  for link in (jax.nn.softmax, None):
    got = bo.predictive(_apply, jax.random.key(9), params, state, x, 8, temperature=0.0, link=link)
    expected = _apply(params, x) if link is None else jax.nn.softmax(_apply(params, x))
    np.testing.assert_array_equal(got, expected)


def test_tempered_predictive_is_the_average_over_tempered_samples():
  params, state = _predict_params()
  key, x = jax.random.key(10), _inputs()
  got = bo.predictive(_apply, key, params, state, x, 8, chunk_size=4, temperature=0.3)
  samples = bo.sample_posterior(key, params, state, 8, temperature=0.3)
  expected = np.mean([jax.nn.softmax(_apply(jax.tree.map(lambda s, j=j: s[j], samples), x)) for j in range(8)], 0)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # A traced temperature (e.g. under jit) gives the same.
  traced = jax.jit(lambda t: bo.predictive(_apply, key, params, state, x, 8, chunk_size=4, temperature=t))(0.3)
  np.testing.assert_allclose(traced, got, rtol=1e-5, atol=1e-6)


def _classification_problem(temperature_star, num_examples=20_000):
  """Labels drawn from the model average at T*: the NLL (a proper score) is smallest at T = T*."""
  params = {"w": jnp.array([[2.0, -1.0, 0.0], [0.5, 1.0, -2.0]]), "b": jnp.array([0.1, 0.0, -0.1])}
  state = bo.bsam(0.1, n_data=2.0).init(params)  # σ = 1/√2: the samples move the logits a lot
  x = jax.random.normal(jax.random.key(11), (num_examples, 2))
  key = jax.random.key(12)
  probs = bo.predictive(_apply, key, params, state, x, 16, temperature=temperature_star)
  labels = jax.random.categorical(jax.random.key(13), jnp.log(probs))
  return key, params, state, x, labels


@pytest.mark.parametrize("rule", ["one_se", "min"])
@pytest.mark.parametrize("temperature_star", [0.0, 0.25, 1.0])
def test_select_temperature_picks_the_temperature_that_generated_the_labels(temperature_star, rule):
  key, params, state, x, labels = _classification_problem(temperature_star)
  temperatures = [0.0, 1 / 16, 0.25, 1.0, 4.0]
  best, table = bo.select_temperature(
    _apply, key, params, state, x, labels, temperatures=temperatures, num_samples=16, rule=rule
  )
  assert best == temperature_star, table
  assert sorted(table) == temperatures


def test_select_temperature_table_is_the_nll_of_the_tempered_model_average():
  key, params, state, x, labels = _classification_problem(0.25, num_examples=500)
  best, table = bo.select_temperature(
    _apply, key, params, state, x, labels, temperatures=[0.5, 2.0], num_samples=8, rule="min"
  )
  assert sorted(table) == [0.0, 0.5, 2.0]  # 0 is always a candidate
  assert best == min(table, key=table.get)
  labels = np.asarray(labels)

  def nll(probs):
    return -np.mean(np.log(np.asarray(probs, np.float64)[np.arange(len(labels)), labels]))

  np.testing.assert_allclose(table[0.0], nll(jax.nn.softmax(_apply(params, x))), rtol=1e-5)
  for t in (0.5, 2.0):
    np.testing.assert_allclose(table[t], nll(bo.predictive(_apply, key, params, state, x, 8, temperature=t)), rtol=1e-4)
  # The same with the samples in chunks; and the default grid holds 0, 1 and powers of two.
  chunked = bo.select_temperature(
    _apply, key, params, state, x, labels, temperatures=[0.5, 2.0], num_samples=8, chunk_size=2
  )[1]
  np.testing.assert_allclose([chunked[t] for t in table], [table[t] for t in table], rtol=1e-5)
  default = bo.select_temperature(_apply, key, params, state, x, labels, num_samples=2)[1]
  assert 0.0 in default and 1.0 in default and len(default) >= 10


def test_select_temperature_one_se_is_the_smallest_t_within_one_standard_error_of_the_best():
  """Breiman's rule restated in NumPy on per-example NLLs: small sets keep T near 0 unless the gain is real."""
  temperatures = [0.0, 1 / 64, 1 / 16, 0.25, 1.0]
  picks = []
  for n, t_star in [(60, 0.25), (2000, 0.25)]:
    key, params, state, x, labels = _classification_problem(t_star, num_examples=n)
    labels = np.asarray(labels)
    per_example = {}
    for t in temperatures:
      probs = (
        jax.nn.softmax(_apply(params, x)) if t == 0 else bo.predictive(_apply, key, params, state, x, 8, temperature=t)
      )
      per_example[t] = -np.log(np.asarray(probs, np.float64)[np.arange(n), labels])
    best = min(temperatures, key=lambda t: per_example[t].mean())
    d = {t: per_example[t] - per_example[best] for t in temperatures}
    expected = next(t for t in temperatures if d[t].mean() <= d[t].std() / np.sqrt(n))
    got, table = bo.select_temperature(_apply, key, params, state, x, labels, temperatures=temperatures, num_samples=8)
    assert got == expected, (n, t_star, table)
    assert (
      got
      <= bo.select_temperature(
        _apply, key, params, state, x, labels, temperatures=temperatures, num_samples=8, rule="min"
      )[0]
    )
    picks.append(got)
  assert len(set(picks)) > 1, picks  # the rule is not a constant
  with pytest.raises(ValueError, match="rule"):
    bo.select_temperature(_apply, key, params, state, x, labels, rule="best")


def test_tempered_nlls_and_choose_temperature_are_select_temperature_under_jit_and_vmap():
  """The traceable pair, vmapped over three posteriors (runs of a grid) inside one jit, gives select_temperature's T."""
  key, params, state, x, labels = _classification_problem(0.25, num_examples=300)
  temperatures = [0.0, 1 / 16, 0.25, 1.0, 4.0]
  scales = jnp.array([0.5, 1.0, 2.0])  # underconfident, as generated, overconfident: different choices

  def runs(scales, labels, rule):
    def one(c):
      p = jax.tree.map(lambda w: c * w, params)
      candidates, nlls = bo.tempered_nlls(
        _apply, key, p, state, x, labels, temperatures=temperatures, num_samples=8, chunk_size=4
      )
      assert candidates == tuple(temperatures)
      return bo.choose_temperature(candidates, nlls, rule=rule), jnp.mean(nlls, axis=1)

    return jax.vmap(one)(scales)

  jitted = jax.jit(runs, static_argnums=2)
  chosen = {}
  for rule in ("one_se", "min"):
    got, means = jitted(scales, labels, rule)  # labels traced: no host sync anywhere
    for k, c in enumerate(scales):
      p = jax.tree.map(lambda w, c=c: c * w, params)
      t, table = bo.select_temperature(
        _apply, key, p, state, x, labels, temperatures=temperatures, num_samples=8, rule=rule
      )
      assert float(got[k]) == t, (rule, float(c), table)
      np.testing.assert_allclose(means[k], [table[t] for t in temperatures], rtol=1e-5)
      chosen[rule, k] = t
  assert len({chosen["one_se", k] for k in range(3)}) > 1, chosen


def test_choose_temperature_edge_cases_and_errors():
  candidates = (0.0, 0.5, 1.0)
  nlls = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.5, 0.6, 0.5, 0.6], [jnp.nan, 0.1, 0.1, 0.1]])
  assert float(bo.choose_temperature(candidates, nlls, rule="min")) == 0.5  # a non-finite mean is never chosen
  assert float(bo.choose_temperature(candidates, jnp.full((3, 4), jnp.inf))) == 0.0  # none finite: the mean
  assert float(bo.choose_temperature(candidates, nlls[:1].repeat(3, axis=0))) == 0.0  # a tie: the smallest T
  with pytest.raises(ValueError, match="rule"):
    bo.choose_temperature(candidates, nlls, rule="best")
  with pytest.raises(ValueError, match="nlls must have shape"):
    bo.choose_temperature(candidates, nlls[:2])
  with pytest.raises(ValueError, match="increasing"):
    bo.choose_temperature((0.0, 1.0, 0.5), nlls)


@pytest.mark.parametrize(
  "temperature,error",
  [
    (-1.0, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    ("1", TypeError),
    (None, TypeError),
    (True, TypeError),
    (jnp.ones(2), ValueError),
  ],
)
def test_bad_temperature(temperature, error):
  params, state = _predict_params()
  key, x = jax.random.key(0), _inputs()
  with pytest.raises(error, match="temperature"):
    bo.sample_posterior(key, params, state, 2, temperature=temperature)
  with pytest.raises(error, match="temperature"):
    bo.predictive(_apply, key, params, state, x, 2, temperature=temperature)
  with pytest.raises(error, match="temperatures"):
    bo.select_temperature(_apply, key, params, state, x, jnp.zeros(5, jnp.int32), temperatures=[0.5, temperature])


@pytest.mark.parametrize(
  "inputs,labels,error,match",
  [
    (jnp.zeros((0, 2)), jnp.zeros(0, jnp.int32), ValueError, "empty"),
    (jnp.zeros((5, 2)), jnp.zeros(4, jnp.int32), ValueError, "same number"),
    (jnp.zeros((5, 2)), jnp.array([0, 1, 2, 3, 0]), ValueError, r"\[0, 3\)"),
    (jnp.zeros((5, 2)), jnp.array([0, -1, 2, 1, 0]), ValueError, r"\[0, 3\)"),
    (jnp.zeros((5, 2)), jnp.zeros(5), TypeError, "integer"),
    (jnp.zeros((5, 2)), jnp.zeros((5, 1), jnp.int32), ValueError, "1-D"),
    ({}, jnp.zeros(5, jnp.int32), ValueError, "inputs"),
  ],
)
def test_select_temperature_bad_inputs_or_labels(inputs, labels, error, match):
  params, state = _predict_params()
  with pytest.raises(error, match=match):
    bo.select_temperature(_apply, jax.random.key(0), params, state, inputs, labels, num_samples=2)


def test_select_temperature_bad_grid():
  params, state = _predict_params()
  x, y = _inputs(), jnp.zeros(5, jnp.int32)
  with pytest.raises(TypeError, match="temperatures"):
    bo.select_temperature(_apply, jax.random.key(0), params, state, x, y, temperatures=0.5)
