"""Tests of VariationalSAM (_vsam.py): ε and the update against NumPy, defaults, bounds, the optax contract.

The NumPy references restate the seed's Eq. 2 (ε = ρ Σ g / sqrt(gᵀ Σ g)) and
Alg. 3 with Adam on (μ, λ = log σ) and the KL gradients of Eq. 56, in float64.
"""

import math

import _optax_contract as contract
import _step_checks as checks
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bsam_optax as bo

KWARGS = dict(learning_rate=1e-2, n_data=1000, rho=2.0, weight_decay=1e-3, init_std=0.1)


def _extra(grads):
  return {"log_std_grads": jax.tree.map(lambda g: 0.5 * jnp.abs(g), grads)}


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def test_perturbation_matches_numpy_and_lies_on_the_ellipsoid():
  params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.asarray(0.5)}
  tx = bo.scale_by_vsam(10, std_learning_rate=1e-2, rho=0.7, init_std=0.2)
  state = tx.init(params)
  # A non-constant Σ: set λ by hand.
  log_std = {"w": jnp.log(jnp.linspace(0.1, 0.6, 6).reshape(2, 3)), "b": jnp.log(jnp.asarray(0.3))}
  state = state._replace(log_std=log_std)
  grads = {"w": jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]), "b": jnp.asarray(2.0)}
  eps = bo.vsam_perturbation(params, state, grads)
  var, g = np.exp(2 * _flat(log_std)), _flat(grads)
  want = 0.7 * var * g / np.sqrt(g @ (var * g))
  np.testing.assert_allclose(_flat(eps), want, rtol=1e-5)
  np.testing.assert_allclose(_flat(eps) @ (_flat(eps) / var), 0.7**2, rtol=1e-5)  # εᵀ Σ⁻¹ ε = ρ²
  chex.assert_trees_all_close(bo.vsam_perturbed_params(params, state, grads), jax.tree.map(jnp.add, params, eps))
  # A zero gradient gives ε = 0.
  zero = bo.vsam_perturbation(params, state, jax.tree.map(jnp.zeros_like, grads))
  assert not np.any(_flat(zero))


def test_defaults_are_the_seeds():
  """ρ = sqrt(P) and Σ = (0.05² / P) I, so the first ε is SAM's with radius 0.05."""
  params = {"w": jnp.ones((4, 5)), "b": jnp.ones(5)}
  p = 25
  state = bo.vsam(1e-2, n_data=10).init(params)
  np.testing.assert_allclose(bo.find_posterior_state(state).rho, math.sqrt(p), rtol=1e-6)
  np.testing.assert_allclose(_flat(bo.posterior(params, state)[1]), 0.05 / math.sqrt(p), rtol=1e-6)
  grads = jax.tree.map(lambda w: jnp.linspace(-1, 1, w.size).reshape(w.shape), params)
  eps = bo.vsam_perturbation(params, state, grads)
  g = _flat(grads)
  np.testing.assert_allclose(_flat(eps), 0.05 * g / np.linalg.norm(g), rtol=1e-5)


def _np_adam(m, v, g, count, b1=0.9, b2=0.999, eps=1e-8):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g**2
  return m, v, (m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps)


@pytest.mark.parametrize("max_std", [None, 0.12])
def test_alg3_step_matches_numpy(max_std):
  """Two VSAM steps on a quadratic, written out: ε, μ's step at μ + ε, λ's step with g ⊙ ε + δ σ² − 1/N."""
  a = np.array([3.0, 0.5, 1.0, 0.1])
  target = np.array([1.0, -1.0, 0.5, 2.0])

  def loss(w):
    return 0.5 * jnp.sum(a * (w - target) ** 2)

  lr, lr_std, n, delta, rho, std0 = 0.05, 0.1, 20.0, 0.01, 1.5, 0.1
  tx = bo.vsam(lr, n_data=n, rho=rho, weight_decay=delta, init_std=std0, std_learning_rate=lr_std, max_std=max_std)
  mu = jnp.zeros(4)
  state = tx.init(mu)
  mu_np, lam = np.zeros(4), np.full(4, np.log(std0))
  mm, mv, lm, lv = (np.zeros(4) for _ in range(4))
  for t in (1, 2):
    g = jax.grad(loss)(mu)
    eps = bo.vsam_perturbation(mu, state, g)
    g_eps = jax.grad(loss)(mu + eps)
    updates, state = tx.update(g_eps, state, mu, log_std_grads=g * eps)
    mu = optax.apply_updates(mu, updates)
    # NumPy
    g_np = a * (mu_np - target)
    var = np.exp(2 * lam)
    e_np = rho * var * g_np / np.sqrt(g_np @ (var * g_np))
    ge_np = a * (mu_np + e_np - target)
    mm, mv, d_mu = _np_adam(mm, mv, ge_np + delta * mu_np, t)
    lm, lv, d_lam = _np_adam(lm, lv, g_np * e_np + delta * var - 1 / n, t)
    mu_np = mu_np - lr * d_mu
    lam = lam - lr_std * d_lam
    if max_std is not None:
      lam = np.minimum(lam, np.log(max_std))
    np.testing.assert_allclose(mu, mu_np, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bo.posterior(mu, state)[1], np.exp(lam), rtol=1e-5)
  if max_std is not None:
    assert float(jnp.max(bo.posterior(mu, state)[1])) <= max_std * (1 + 1e-6)


def test_rho_schedule_is_evaluated_at_the_count():
  schedule = optax.linear_schedule(1.0, 3.0, 2)
  tx = bo.vsam(1e-2, n_data=10, rho=schedule)
  params = jnp.ones(3)
  state = tx.init(params)
  np.testing.assert_allclose(bo.find_posterior_state(state).rho, 1.0)
  _, state = tx.update(params, state, params, log_std_grads=params)
  np.testing.assert_allclose(bo.find_posterior_state(state).rho, 2.0)


def test_masked_leaves_are_not_perturbed():
  params = {"w": jnp.ones(3), "b": jnp.ones(2)}
  tx = optax.masked(bo.vsam(1e-2, n_data=10, rho=1.0, init_std=0.5), {"w": True, "b": False})
  state = tx.init(params)
  eps = bo.vsam_perturbation(params, state, jax.tree.map(jnp.ones_like, params))
  assert not np.any(np.asarray(eps["b"]))
  np.testing.assert_allclose(_flat(eps["w"]) @ (_flat(eps["w"]) / 0.25), 1.0, rtol=1e-5)
  # Default ρ counts the unmasked parameters only.
  state = optax.masked(bo.vsam(1e-2, n_data=10), {"w": True, "b": False}).init(params)
  np.testing.assert_allclose(bo.find_posterior_state(state).rho, math.sqrt(3), rtol=1e-6)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(learning_rate=-1.0), ValueError, "learning_rate"),
    (dict(n_data=-5), ValueError, "n_data"),
    (dict(rho=-0.1), ValueError, "rho"),
    (dict(rho="big"), TypeError, "rho"),
    (dict(weight_decay=0.0), ValueError, "weight_decay"),
    (dict(init_std=0.0), ValueError, "init_std"),
    (dict(max_std=-1.0), ValueError, "max_std"),
    (dict(std_learning_rate=-1.0), ValueError, "std_learning_rate"),
    (dict(b1=1.5), ValueError, "b1"),
  ],
)
def test_bad_hyperparameters(kwargs, error, match):
  with pytest.raises(error, match=match):
    bo.vsam(**{**dict(learning_rate=1e-2, n_data=10), **kwargs})


def test_bad_update_inputs():
  tx = bo.vsam(1e-2, n_data=10)
  params = jnp.ones(2)
  state = tx.init(params)
  with pytest.raises(ValueError, match="log_std_grads"):
    tx.update(params, state, params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, log_std_grads=params)
  with pytest.raises(ValueError, match="VSAMState"):
    bo.vsam_perturbation(params, optax.sgd(0.1).init(params), params)


# -- the step ------------------------------------------------------------------


def _vsam_tx():
  return bo.vsam(0.05, n_data=100, rho=3.0, weight_decay=1e-3, init_std=0.1)


def _make_step(tx, **options):
  return bo.vsam_step(checks.mlp_loss, tx, **options)


@pytest.mark.parametrize("m", [1, 4])
def test_step_matches_parts_written_out(m):
  params, batch = checks.mlp_problem()
  tx = _vsam_tx()
  state = tx.init(params)
  p, s, info = _make_step(tx, m=m)(params, state, batch, jax.random.key(0))
  grads, log_std_grads, losses = [], [], []
  for part in checks.parts(batch, m):
    g = jax.grad(checks.mlp_loss)(params, part)
    eps = bo.vsam_perturbation(params, state, g)
    loss, g_eps = jax.value_and_grad(checks.mlp_loss)(jax.tree.map(jnp.add, params, eps), part)
    grads.append(g_eps)
    log_std_grads.append(jax.tree.map(jnp.multiply, g, eps))
    losses.append(loss)
  updates, s_ref = tx.update(checks.mean(grads), state, params, log_std_grads=checks.mean(log_std_grads))
  chex.assert_trees_all_close((p, s), (optax.apply_updates(params, updates), s_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.second_loss, np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(info.loss, checks.mlp_loss(params, batch), rtol=1e-5)


def test_step_splits_agree():
  checks.splits_agree(_make_step, _vsam_tx())


def test_pmap_equals_m_on_one_device():
  checks.pmap_equals_m_on_one_device(_make_step, _vsam_tx())


def test_shard_map_equals_m_on_one_device():
  checks.shard_map_equals_m_on_one_device(_make_step, _vsam_tx())


def test_step_is_deterministic_and_trains():
  params, batch = checks.mlp_problem(batch_size=64)
  tx = bo.vsam(1e-2, n_data=64, weight_decay=1e-2, max_std=1e-2)
  state = tx.init(params)
  step = bo.vsam_step(checks.mlp_loss, tx, m=2)
  again = step(params, state, batch, jax.random.key(1))
  chex.assert_trees_all_equal(step(params, state, batch, jax.random.key(0))[:2], again[:2])
  first = float(checks.mlp_loss(params, batch))
  for i in range(100):
    params, state, _ = step(params, state, batch, jax.random.key(i))
  assert float(checks.mlp_loss(params, batch)) < 0.5 * first
  assert step._cache_size() == 1


# -- optax's contract ---------------------------------------------------------


@pytest.mark.parametrize("wrap", [False, True])
def test_contract_extra_args_no_recompilation(wrap):
  contract.accepts_unexpected_extra_args_and_does_not_recompile(bo.vsam, KWARGS, _extra, wrap)


def test_contract_inject_hyperparams():
  contract.inject_hyperparams_matches(bo.vsam, KWARGS, _extra)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract_preserve_dtype(dtype):
  contract.preserve_dtype(bo.vsam, KWARGS, _extra, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract_multisteps(dtype):
  contract.multisteps_accumulates(bo.vsam, KWARGS, _extra, dtype)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_contract_state_stable_under_cond(dtype):
  contract.state_stable_under_cond(bo.vsam, KWARGS, _extra, dtype)


def test_contract_schedule_equals_constant():
  contract.schedule_equals_constant(bo.vsam, KWARGS, _extra)


def test_contract_state_follows_params():
  contract.state_follows_params(bo.vsam, KWARGS)
