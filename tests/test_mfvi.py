"""Tests of MFVI (_mfvi.py): the update against NumPy, the sample, the mean-field optimum, the optax contract.

The NumPy references restate Adam on (μ, log σ) with the KL gradients of the
seed's Eq. 52-53 in float64; they share no code with the library.
"""

import _optax_contract as contract
import _step_checks as checks
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bsam_optax as bo
from bsam_optax import _noise

KWARGS = dict(learning_rate=1e-2, n_data=1000, weight_decay=1e-3, init_std=0.1)


def _extra(grads):
  return {"log_std_grads": jax.tree.map(lambda g: 0.5 * g, grads)}


def _np_adam(m, v, g, count, b1, b2, eps):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g**2
  return m, v, (m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps)


def _np_mfvi(mu, grads, log_std_grads, *, lr, lr_std, n, delta, init_std, b1=0.9, b2=0.999, eps=1e-8):
  """Runs the seed's Alg. 1 with Adam on (μ, λ = log σ), in float64; returns (μ, σ) after each step."""
  mu = np.asarray(mu, np.float64)
  lam = np.full_like(mu, np.log(init_std))
  mm, mv, lm, lv = (np.zeros_like(mu) for _ in range(4))
  out = []
  for t, (g, gs) in enumerate(zip(grads, log_std_grads, strict=True), start=1):
    g_mu = g + delta * mu  # ∂/∂μ of KL / N with prior precision N δ
    g_lam = gs + delta * np.exp(2 * lam) - 1.0 / n  # ∂/∂λ of KL / N
    mm, mv, d_mu = _np_adam(mm, mv, g_mu, t, b1, b2, eps)
    lm, lv, d_lam = _np_adam(lm, lv, g_lam, t, b1, b2, eps)
    mu = mu - lr * d_mu
    lam = lam - lr_std * d_lam
    out.append((mu.copy(), np.exp(lam)))
  return out


@pytest.mark.parametrize("std_learning_rate", [None, 3e-2])
def test_update_matches_numpy(std_learning_rate):
  rng = np.random.default_rng(0)
  mu0 = rng.normal(size=5).astype(np.float32)
  grads = [rng.normal(size=5).astype(np.float32) for _ in range(4)]
  log_std_grads = [rng.normal(size=5).astype(np.float32) * 0.1 for _ in range(4)]
  tx = bo.mfvi(
    1e-2, n_data=50, weight_decay=1e-2, init_std=0.3, std_learning_rate=std_learning_rate, b1=0.8, b2=0.99, eps=1e-6
  )
  params, state = jnp.asarray(mu0), tx.init(jnp.asarray(mu0))
  want = _np_mfvi(
    mu0, grads, log_std_grads, lr=1e-2, lr_std=std_learning_rate or 1e-2, n=50, delta=1e-2, init_std=0.3,
    b1=0.8, b2=0.99, eps=1e-6,
  )  # fmt: skip
  for g, gs, (mu_want, std_want) in zip(grads, log_std_grads, want, strict=True):
    updates, state = jax.jit(tx.update)(jnp.asarray(g), state, params, log_std_grads=jnp.asarray(gs))
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params, mu_want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bo.posterior(params, state)[1], std_want, rtol=1e-5)
  assert int(bo.find_posterior_state(state).count) == 4


def test_sample_is_mean_plus_std_times_noise():
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.asarray(-1.0)}
  tx = bo.mfvi(1e-2, n_data=10, init_std=0.2)
  state = tx.init(params)
  key = jax.random.key(3)
  theta = bo.mfvi_sample(key, params, state)
  z = _noise.normal_like(key, params)
  chex.assert_trees_all_close(theta, jax.tree.map(lambda w, z: w + 0.2 * z, params, z), rtol=1e-6)
  # Inside a chain, found by type.
  chained = optax.chain(optax.clip(1.0), tx)
  theta_c = bo.mfvi_sample(key, params, chained.init(params))
  chex.assert_trees_all_close(theta_c, theta)


def test_posterior_std_masked():
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  tx = optax.masked(bo.mfvi(1e-2, n_data=10, init_std=0.5), {"w": True, "b": False})
  state = tx.init(params)
  theta = bo.mfvi_sample(jax.random.key(0), params, state)
  chex.assert_trees_all_equal(theta["b"], params["b"])
  assert not np.allclose(theta["w"], params["w"])


def _bayes_linreg(n=200, d=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) * np.array([1.0, 0.5, 2.0]) + 0.3 * rng.normal(size=(n, 1))
  y = x @ np.array([1.0, -2.0, 0.5]) + rng.normal(size=n)
  return x.astype(np.float32), y.astype(np.float32)


def test_learned_std_is_the_mean_field_optimum():
  """On ℓ(w) = ½ mean (x·w − y)², MFVI's σ converges to 1 / sqrt(diag P), P = XᵀX + N δ I the exact precision."""
  x, y = _bayes_linreg()
  n, d = x.shape
  delta = 0.05
  precision = x.T.astype(np.float64) @ x + n * delta * np.eye(d)
  mean_exact = np.linalg.solve(precision, x.T.astype(np.float64) @ y)
  std_mean_field = 1.0 / np.sqrt(np.diag(precision))

  def loss(w):
    return 0.5 * jnp.mean((x @ w - y) ** 2)

  steps, samples = 4000, 16
  tx = bo.mfvi(optax.cosine_decay_schedule(3e-2, steps, alpha=1e-2), n_data=n, weight_decay=delta, init_std=0.3)

  def body(carry, i):
    w, state = carry
    keys = jax.random.split(jax.random.fold_in(jax.random.key(0), i), samples)
    thetas = jax.vmap(lambda k: bo.mfvi_sample(k, w, state))(keys)
    gs = jax.vmap(jax.grad(loss))(thetas)
    g, gs_log_std = jnp.mean(gs, 0), jnp.mean(gs * (thetas - w), 0)
    updates, state = tx.update(g, state, w, log_std_grads=gs_log_std)
    return (optax.apply_updates(w, updates), state), None

  w0 = jnp.zeros(d)
  (w, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))((w0, tx.init(w0)))
  np.testing.assert_allclose(bo.posterior(w, state)[1], std_mean_field, rtol=0.03)
  np.testing.assert_allclose(w, mean_exact, atol=0.1 * std_mean_field.min())


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(learning_rate=-1.0), ValueError, "learning_rate"),
    (dict(n_data=0), ValueError, "n_data"),
    (dict(weight_decay=0.0), ValueError, "weight_decay"),
    (dict(weight_decay="1e-4"), TypeError, "weight_decay"),
    (dict(init_std=-0.1), ValueError, "init_std"),
    (dict(std_learning_rate=-1.0), ValueError, "std_learning_rate"),
    (dict(b1=1.0), ValueError, "b1"),
    (dict(b2=-0.1), ValueError, "b2"),
    (dict(n_data=None), TypeError, "n_data"),
  ],
)
def test_bad_hyperparameters(kwargs, error, match):
  with pytest.raises(error, match=match):
    bo.mfvi(**{**dict(learning_rate=1e-2, n_data=10), **kwargs})


def test_bad_update_inputs():
  tx = bo.mfvi(1e-2, n_data=10)
  params = jnp.ones(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="log_std_grads"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, log_std_grads=params)
  with pytest.raises(TypeError, match="floating-point"):
    tx.init(jnp.ones(2, jnp.int32))
  with pytest.raises(ValueError, match="MFVIState"):
    bo.mfvi_sample(jax.random.key(0), params, optax.adam(1e-3).init(params))


# -- the step ------------------------------------------------------------------


def _mfvi_tx():
  return bo.mfvi(0.05, n_data=100, weight_decay=1e-3, init_std=0.1)


def _make_step(tx, **options):
  return bo.mfvi_step(checks.mlp_loss, tx, **options)


@pytest.mark.parametrize("m", [1, 4])
def test_step_matches_parts_written_out(m):
  params, batch = checks.mlp_problem()
  tx = _mfvi_tx()
  state = tx.init(params)
  key = jax.random.key(9)
  p, s, info = _make_step(tx, m=m)(params, state, batch, key)
  grads, log_std_grads, losses = [], [], []
  for i, part in enumerate(checks.parts(batch, m)):
    theta = bo.mfvi_sample(jax.random.fold_in(key, i), params, state)
    loss, g = jax.value_and_grad(checks.mlp_loss)(theta, part)
    grads.append(g)
    log_std_grads.append(jax.tree.map(lambda g, t, w: g * (t - w), g, theta, params))
    losses.append(loss)
  updates, s_ref = tx.update(checks.mean(grads), state, params, log_std_grads=checks.mean(log_std_grads))
  chex.assert_trees_all_close((p, s), (optax.apply_updates(params, updates), s_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.loss, np.mean(losses), rtol=1e-5)
  assert info.loss == info.second_loss


def test_step_splits_agree():
  checks.splits_agree(_make_step, _mfvi_tx())


def test_pmap_equals_m_on_one_device():
  checks.pmap_equals_m_on_one_device(_make_step, _mfvi_tx())


def test_shard_map_equals_m_on_one_device():
  checks.shard_map_equals_m_on_one_device(_make_step, _mfvi_tx())


def test_step_learns_the_mean_field_optimum():
  """Through mfvi_step: m parts, each the whole data set, are m Monte-Carlo samples of the ELBO's gradient."""
  x, y = _bayes_linreg()
  n, d = x.shape
  delta, m, steps = 0.05, 8, 3000
  precision = x.T.astype(np.float64) @ x + n * delta * np.eye(d)
  loss = lambda w, b: 0.5 * jnp.mean((b["x"] @ w["w"] - b["y"]) ** 2)
  batch = {"x": jnp.tile(x, (m, 1)), "y": jnp.tile(y, m)}
  tx = bo.mfvi(optax.cosine_decay_schedule(3e-2, steps, alpha=1e-2), n_data=n, weight_decay=delta, init_std=0.3)
  step = bo.mfvi_step(loss, tx, m=m)

  def body(carry, i):
    params, state, _ = step(*carry, batch, jax.random.fold_in(jax.random.key(1), i))
    return (params, state), None

  w0 = {"w": jnp.zeros(d)}
  (w, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(steps)))((w0, tx.init(w0)))
  mean, std = bo.posterior(w, state)
  np.testing.assert_allclose(std["w"], 1.0 / np.sqrt(np.diag(precision)), rtol=0.03)
  key = jax.random.key(0)
  samples = bo.sample_posterior(key, w, state, 4)
  chex.assert_trees_all_close(
    jax.tree.map(lambda s: s[1], samples), bo.mfvi_sample(jax.random.fold_in(key, 1), w, state)
  )


def test_posterior_tools_work_for_mfvi_and_vsam():
  """One protocol: posterior, sample_posterior, predictive and select_temperature read MFVI's and VSAM's σ."""
  params = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]])}
  x = jax.random.normal(jax.random.key(0), (16, 2))
  y = jnp.argmax(x @ params["w"], -1)
  apply_fn = lambda p, x: x @ p["w"]
  for tx in (bo.mfvi(1e-2, n_data=16, init_std=0.3), bo.vsam(1e-2, n_data=16, init_std=0.3)):
    state = optax.chain(optax.clip(1.0), tx).init(params)
    _, std = bo.posterior(params, state)
    np.testing.assert_allclose(std["w"], 0.3, rtol=1e-6)
    samples = bo.sample_posterior(jax.random.key(1), params, state, 8)
    assert samples["w"].shape == (8, 2, 2)
    probs = bo.predictive(apply_fn, jax.random.key(1), params, state, x, 8)
    np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-5)
    t, table = bo.select_temperature(apply_fn, jax.random.key(2), params, state, x, y, num_samples=8)
    assert t in table and 0.0 in table


def test_masked_mfvi_step():
  params, batch = checks.mlp_problem()
  mask = {"w1": True, "b1": False, "w2": True}
  tx = optax.masked(_mfvi_tx(), mask, mask_compatible_extra_args=True)
  state = tx.init(params)
  new, state, _ = _make_step(tx, m=2)(params, state, batch, jax.random.key(0))
  theta = bo.mfvi_sample(jax.random.key(1), new, state)  # masked leaves are point estimates
  chex.assert_trees_all_equal(theta["b1"], new["b1"])
  _, std = bo.posterior(new, state)
  assert not np.any(np.asarray(std["b1"])) and np.all(np.asarray(std["w1"]) > 0)


# -- optax's contract ---------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True])
def test_contract_extra_args_no_recompilation(wrap):
  contract.accepts_unexpected_extra_args_and_does_not_recompile(bo.mfvi, KWARGS, _extra, wrap)


def test_contract_inject_hyperparams():
  contract.inject_hyperparams_matches(bo.mfvi, KWARGS, _extra)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract_preserve_dtype(dtype):
  contract.preserve_dtype(bo.mfvi, KWARGS, _extra, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract_multisteps(dtype):
  contract.multisteps_accumulates(bo.mfvi, KWARGS, _extra, dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_contract_state_stable_under_cond(dtype):
  contract.state_stable_under_cond(bo.mfvi, KWARGS, _extra, dtype)


def test_contract_schedule_equals_constant():
  contract.schedule_equals_constant(bo.mfvi, KWARGS, _extra)


def test_contract_state_follows_params():
  contract.state_follows_params(bo.mfvi, KWARGS)
