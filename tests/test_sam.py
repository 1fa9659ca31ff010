"""Tests of the SAM family (_sam.py): equations by hand, m-splits, devices, noise, errors.

The hand-written references use a linear least-squares model, whose gradient
``Xᵀ (X w + b − y) / n`` is written out in NumPy (float64), so they share no
code with the library but the noise draw of RandomSAM.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _step_checks import mlp_loss
from _step_checks import mlp_problem
from jax.sharding import Mesh

import bsam_optax as bo

N_DEVICES = 8


# -- a linear model with a hand-written gradient -----------------------------


def linear_loss(params, batch):
  residual = batch["x"] @ params["w"] + params["b"] - batch["y"]
  return 0.5 * jnp.mean(residual**2)


def np_grad(params, batch):
  """∇ of linear_loss in float64 NumPy: (Xᵀ r / n, mean r)."""
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  r = x @ params["w"] + params["b"] - y
  return {"w": x.T @ r / len(y), "b": np.mean(r)}


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _linear_problem(batch_size=16, dim=5, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {"w": jax.random.normal(k[0], (dim,)), "b": jnp.asarray(0.3)}
  batch = {"x": jax.random.normal(k[1], (batch_size, dim)), "y": jax.random.normal(k[2], (batch_size,))}
  return params, batch


def _norm(tree):
  return np.sqrt(sum(np.sum(np.square(v)) for v in jax.tree.leaves(tree)))


def _close(got, want, rtol=2e-5, atol=1e-6):
  chex.assert_trees_all_close(_np(got), want, rtol=rtol, atol=atol)


# -- the split / device tests, on _step_checks' small tanh MLP ----------------


# The methods as (name, step factory, tx factory); every step has the same signature.
METHODS = {
  "sam": (lambda tx, **kw: bo.sam_step(mlp_loss, tx, rho=0.1, **kw), lambda: optax.sgd(0.1, momentum=0.9)),
  "sam_adam": (lambda tx, **kw: bo.sam_step(mlp_loss, tx, rho=0.05, **kw), lambda: optax.adam(1e-2)),
  "asam": (lambda tx, **kw: bo.asam_step(mlp_loss, tx, rho=0.5, eta=0.01, **kw), lambda: optax.sgd(0.1)),
  "random_sam": (lambda tx, **kw: bo.random_sam_step(mlp_loss, tx, sigma=0.05, **kw), lambda: optax.sgd(0.1)),
  "bsam_no_noise": (
    lambda tx, **kw: bo.bsam_no_noise_step(mlp_loss, tx, **kw),
    lambda: bo.bsam(0.05, n_data=100, rho=0.05, weight_decay=1e-3),
  ),
}


# -- equations, one step by hand ---------------------------------------------


def test_sam_sgd_one_step_by_hand():
  params, batch = _linear_problem()
  rho, lr = 0.2, 0.1
  step = bo.sam_step(linear_loss, optax.sgd(lr), rho=rho)
  new, _, out = step(params, optax.sgd(lr).init(params), batch, jax.random.key(0))

  w = _np(params)
  g = np_grad(w, batch)
  eps = jax.tree.map(lambda v: rho * v / _norm(g), g)  # ε = ρ g / ‖g‖, one norm over both leaves
  g_eps = np_grad(jax.tree.map(np.add, w, eps), batch)
  _close(new, jax.tree.map(lambda a, b: a - lr * b, w, g_eps))
  np.testing.assert_allclose(out["loss"], linear_loss(params, batch), rtol=1e-6)
  np.testing.assert_allclose(out["perturbed_loss"], linear_loss(jax.tree.map(np.add, w, eps), batch), rtol=1e-5)
  assert np.isclose(_norm(eps), rho)


def test_sam_adam_one_step_by_hand():
  params, batch = _linear_problem()
  rho, lr, b1, b2, adam_eps = 0.1, 0.01, 0.9, 0.999, 1e-8
  tx = optax.adam(lr, b1=b1, b2=b2, eps=adam_eps)
  state = tx.init(params)
  w = _np(params)
  for _ in range(2):  # two steps, so Adam's moments are not trivial
    params, state, _ = bo.sam_step(linear_loss, tx, rho=rho)(params, state, batch, jax.random.key(0))
  # Restatement: g_ε at ω + ρ g/‖g‖, then Adam with bias correction.
  mu = jax.tree.map(np.zeros_like, w)
  nu = jax.tree.map(np.zeros_like, w)
  for t in (1, 2):
    g = np_grad(w, batch)
    g_norm = _norm(g)
    g_eps = np_grad(jax.tree.map(lambda a, b, n=g_norm: a + rho * b / n, w, g), batch)
    mu = jax.tree.map(lambda m, ge: b1 * m + (1 - b1) * ge, mu, g_eps)
    nu = jax.tree.map(lambda v, ge: b2 * v + (1 - b2) * ge**2, nu, g_eps)
    w = jax.tree.map(lambda a, m, v, t=t: a - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + adam_eps), w, mu, nu)
  _close(params, w, rtol=1e-4, atol=1e-6)


def test_asam_one_step_by_hand():
  params, batch = _linear_problem()
  rho, eta, lr = 0.5, 0.01, 0.1
  new, _, _ = bo.asam_step(linear_loss, optax.sgd(lr), rho=rho, eta=eta)(
    params, optax.sgd(lr).init(params), batch, jax.random.key(0)
  )
  w = _np(params)
  g = np_grad(w, batch)
  t = jax.tree.map(lambda a: np.abs(a) + eta, w)
  tg = jax.tree.map(np.multiply, t, g)
  eps = jax.tree.map(lambda t, g: rho * t**2 * g / _norm(tg), t, g)  # ε = ρ T² g / ‖T g‖
  g_eps = np_grad(jax.tree.map(np.add, w, eps), batch)
  _close(new, jax.tree.map(lambda a, b: a - lr * b, w, g_eps))
  # ε lies on the boundary of the ellipsoid ‖T⁻¹ ε‖ = ρ.
  assert np.isclose(_norm(jax.tree.map(np.divide, eps, t)), rho)


def test_asam_is_scale_invariant_with_eta_zero():
  # Scaling w by c and x by 1/c leaves the model unchanged; ASAM's ε scales with w (SAM's does not).
  params, batch = _linear_problem()
  c = 4.0
  scaled_params = {"w": params["w"] * c, "b": params["b"]}
  scaled_batch = {"x": batch["x"] / c, "y": batch["y"]}
  g = jax.grad(linear_loss)(params, batch)
  g_scaled = jax.grad(linear_loss)(scaled_params, scaled_batch)
  eps = jax.tree.map(jnp.subtract, bo.asam_perturbed_params(params, g, rho=0.3, eta=0.0), params)
  eps_scaled = jax.tree.map(
    jnp.subtract, bo.asam_perturbed_params(scaled_params, g_scaled, rho=0.3, eta=0.0), scaled_params
  )
  np.testing.assert_allclose(eps_scaled["w"], c * eps["w"], rtol=1e-5)
  np.testing.assert_allclose(eps_scaled["b"], eps["b"], rtol=1e-5, atol=1e-7)


def test_random_sam_one_step_by_hand():
  params, batch = _linear_problem()
  sigma, lr = 0.3, 0.1
  key = jax.random.key(5)
  new, _, out = bo.random_sam_step(linear_loss, optax.sgd(lr), sigma=sigma)(
    params, optax.sgd(lr).init(params), batch, key
  )
  # The one part draws z from fold_in(key, 0); one gradient, at ω + σ z.
  z = jax.tree.map(jnp.subtract, bo.random_perturbed_params(jax.random.fold_in(key, 0), params, sigma=1.0), params)
  w = _np(params)
  theta = jax.tree.map(lambda a, b: a + sigma * b, w, _np(z))
  _close(new, jax.tree.map(lambda a, b: a - lr * b, w, np_grad(theta, batch)))
  np.testing.assert_allclose(out["loss"], linear_loss(theta, batch), rtol=1e-5)
  assert out["loss"] == out["perturbed_loss"]


def test_bsam_no_noise_one_step_by_hand():
  params, batch = _linear_problem()
  lr, n, rho, b1, b2, wd, gamma, s0 = 0.05, 100.0, 0.05, 0.9, 0.999, 1e-3, 0.1, 2.0
  tx = bo.bsam(lr, n_data=n, rho=rho, b1=b1, b2=b2, weight_decay=wd, damping=gamma, init_scale=s0)
  step = bo.bsam_no_noise_step(linear_loss, tx)
  new, state, _ = step(params, tx.init(params), batch, jax.random.key(0))
  # Alg. 1 without line 3: g at ω (not at θ), then ε, g_m, s, ω in the seed's order.
  w = _np(params)
  g = np_grad(w, batch)
  g_eps = np_grad(jax.tree.map(lambda a, b: a + rho * b / s0, w, g), batch)
  gm = jax.tree.map(lambda ge, a: (1 - b1) * (ge + wd * a), g_eps, w)
  s = jax.tree.map(lambda gi: b2 * s0 + (1 - b2) * (np.sqrt(s0) * np.abs(gi) + wd + gamma), g)
  _close(new, jax.tree.map(lambda a, m, s: a - lr * m / s, w, gm, s))
  _close(bo.find_bsam_state(state).scale, s)
  # Deterministic: the key is not used.
  again, _, _ = step(params, tx.init(params), batch, jax.random.key(123))
  chex.assert_trees_all_equal(new, again)


def test_bsam_no_noise_differs_from_bsam_only_by_the_noise():
  params, batch = mlp_problem()
  tx = bo.bsam(0.05, n_data=100, rho=0.05)
  state = tx.init(params)
  key = jax.random.key(0)
  # With N huge the posterior variance 1/(N s) vanishes: bSAM becomes bSAM without noise.
  tx_cold = bo.bsam(0.05, n_data=1e12, rho=0.05)
  cold = bo.bsam_step(mlp_loss, tx_cold)(params, tx_cold.init(params), batch, key)
  no_noise = bo.bsam_no_noise_step(mlp_loss, tx_cold)(params, tx_cold.init(params), batch, key)
  chex.assert_trees_all_close(cold[:2], no_noise[:2], rtol=1e-5, atol=1e-6)
  noisy = bo.bsam_step(mlp_loss, tx)(params, state, batch, key)
  plain = bo.bsam_no_noise_step(mlp_loss, tx)(params, state, batch, key)
  assert not np.allclose(noisy[0]["w1"], plain[0]["w1"])


def test_rho_zero_is_the_outer_optimizer():
  params, batch = mlp_problem()
  tx = optax.adam(1e-2)
  state = tx.init(params)
  got, _, _ = bo.sam_step(mlp_loss, tx, rho=0.0)(params, state, batch, jax.random.key(0))
  updates, _ = tx.update(jax.grad(mlp_loss)(params, batch), state, params)
  chex.assert_trees_all_close(got, optax.apply_updates(params, updates), rtol=1e-6, atol=1e-7)


def test_sam_with_a_zero_gradient_does_not_move():
  params = {"w": jnp.zeros(3)}
  batch = {"x": jnp.ones((4, 3))}
  step = bo.sam_step(lambda p, b: jnp.sum(p["w"] ** 2) + 0 * jnp.sum(b["x"]), optax.sgd(0.1), rho=0.1)
  new, _, out = step(params, optax.sgd(0.1).init(params), batch, jax.random.key(0))
  assert np.all(np.isfinite(new["w"])) and np.all(new["w"] == 0)


# -- RandomSAM noise statistics ----------------------------------------------


@pytest.mark.parametrize("m", [1, 4])
def test_random_sam_noise_statistics(m):
  # With ℓ(w) = ½‖w‖² and SGD with lr 1, ω' = ω − mean_i (ω + σ z_i) = −σ mean_i z_i.
  p, sigma = 20_000, 0.5
  params = {"a": jnp.full((p // 2,), 0.7), "b": jnp.full((p // 4, 2), -0.2)}
  batch = {"x": jnp.zeros((4 * m, 1))}
  loss = lambda w, b: 0.5 * sum(jnp.sum(v**2) for v in jax.tree.leaves(w)) + 0 * jnp.sum(b["x"])
  key = jax.random.key(3)
  tx = optax.sgd(1.0)
  new, _, _ = bo.random_sam_step(loss, tx, sigma=sigma, m=m)(params, tx.init(params), batch, key)
  flat = -np.concatenate([np.ravel(v) for v in jax.tree.leaves(new)]) / sigma  # mean_i z_i
  assert abs(flat.mean()) < 5 / np.sqrt(p * m)
  np.testing.assert_allclose(flat.std(), 1 / np.sqrt(m), rtol=0.03)
  # Part i's noise is fold_in(key, i), independent across parts and leaves.
  z = [
    np.concatenate(
      [np.ravel(v) for v in jax.tree.leaves(bo.random_perturbed_params(jax.random.fold_in(key, i), params, sigma=1.0))]
    )
    - np.concatenate([np.ravel(v) for v in jax.tree.leaves(params)])
    for i in range(m)
  ]
  np.testing.assert_allclose(flat, np.mean(z, axis=0), rtol=1e-4, atol=1e-5)
  if m > 1:
    corr = np.corrcoef(np.stack(z))
    assert np.all(np.abs(corr[~np.eye(m, dtype=bool)]) < 5 / np.sqrt(p))
  half = p // 2
  assert abs(np.corrcoef(z[0][: half // 2], z[0][half : half + half // 2])[0, 1]) < 5 / np.sqrt(half)


# -- m-sharpness: split equivalence -------------------------------------------


def _manual_parts(method, params, state, batch, key, m, tx):
  """The m-sharpness step written out part by part with the public point rules."""
  size = batch["y"].shape[0] // m
  grads, abs_grads = [], []
  for i in range(m):
    part = jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch)
    if method == "random_sam":
      x = bo.random_perturbed_params(jax.random.fold_in(key, i), params, sigma=0.05)
      grads.append(jax.grad(mlp_loss)(x, part))
      continue
    g = jax.grad(mlp_loss)(params, part)
    if method == "sam":
      y = bo.sam_perturbed_params(params, g, rho=0.1)
    elif method == "sam_adam":
      y = bo.sam_perturbed_params(params, g, rho=0.05)
    elif method == "asam":
      y = bo.asam_perturbed_params(params, g, rho=0.5, eta=0.01)
    else:
      y = bo.perturbed_params(params, state, g)
    grads.append(jax.grad(mlp_loss)(y, part))
    abs_grads.append(jax.tree.map(jnp.abs, g))
  mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)
  extra = {"noisy_grads": mean(abs_grads)} if method == "bsam_no_noise" else {}
  updates, state = tx.update(mean(grads), state, params, **extra)
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("m", [1, 4])
def test_m_split_matches_parts_written_out(method, m):
  make_step, make_tx = METHODS[method]
  params, batch = mlp_problem()
  tx = make_tx()
  state = tx.init(params)
  key = jax.random.key(9)
  p, s, _ = make_step(tx, m=m)(params, state, batch, key)
  p_ref, s_ref = _manual_parts(method, params, state, batch, key, m, tx)
  chex.assert_trees_all_close((p, s), (p_ref, s_ref), rtol=1e-5, atol=1e-6)
  if m > 1:  # scan (gradient accumulation) gives the same step
    p_scan, s_scan, _ = make_step(tx, m=m, split="scan")(params, state, batch, key)
    chex.assert_trees_all_close((p_scan, s_scan), (p, s), rtol=1e-5, atol=1e-6)


def test_sam_parts_have_their_own_epsilon():
  # m=2 on a batch of two different halves differs from one ε for the whole batch.
  params, batch = mlp_problem()
  tx = optax.sgd(0.1)
  one, _, _ = bo.sam_step(mlp_loss, tx, rho=0.5)(params, tx.init(params), batch, jax.random.key(0))
  two, _, _ = bo.sam_step(mlp_loss, tx, rho=0.5, m=2)(params, tx.init(params), batch, jax.random.key(0))
  assert not np.allclose(one["w1"], two["w1"], atol=1e-6)


# -- devices -------------------------------------------------------------------


def _replicate(tree, n):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _shard(batch, n):
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_pmap_equals_m_on_one_device(method):
  assert jax.device_count() >= N_DEVICES, "tests/conftest.py must set XLA_FLAGS before JAX is imported"
  make_step, make_tx = METHODS[method]
  params, batch = mlp_problem()
  tx = make_tx()
  state = tx.init(params)
  key = jax.random.key(11)
  for devices, m_local in ((8, 1), (4, 2)):
    p_ref, s_ref, out_ref = make_step(tx, m=devices * m_local)(params, state, batch, key)
    step = jax.pmap(make_step(tx, m=m_local, axis_name="d"), axis_name="d", devices=jax.devices()[:devices])
    p, s, out = step(
      _replicate(params, devices), _replicate(state, devices), _shard(batch, devices), _replicate(key, devices)
    )
    first = jax.tree.map(lambda x: x[0], (p, s))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], (p, s)), first)  # replicas agree
    chex.assert_trees_all_close(first, (p_ref, s_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["perturbed_loss"][0], out_ref["perturbed_loss"], rtol=1e-5)


@pytest.mark.parametrize("method", ["sam", "sam_adam", "random_sam"])
def test_shard_map_equals_m_on_one_device(method):
  # Regression: a first point that does not depend on the device (ω) used to get the gradient
  # summed over devices under shard_map (the transpose of the implicit replicated->varying cast).
  make_step, make_tx = METHODS[method]
  params, batch = mlp_problem()
  tx = make_tx()
  state = tx.init(params)
  key = jax.random.key(2)
  p_ref, s_ref, _ = make_step(tx, m=8)(params, state, batch, key)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  p, s, _ = make_step(tx, m=2, axis_name="data", mesh=mesh)(params, state, batch, key)
  chex.assert_trees_all_close((p, s), (p_ref, s_ref), rtol=1e-5, atol=1e-6)


# -- the rest of the API ----------------------------------------------------------


def test_aux_from_each_pass():
  params, batch = mlp_problem()
  tx = optax.sgd(0.1)
  loss = lambda p, b: (mlp_loss(p, b), p["b1"])
  _, _, first = bo.sam_step(loss, tx, rho=0.5, has_aux=True, aux_from="first")(
    params, tx.init(params), batch, jax.random.key(0)
  )
  _, _, second = bo.sam_step(loss, tx, rho=0.5, has_aux=True)(params, tx.init(params), batch, jax.random.key(0))
  np.testing.assert_allclose(first["aux"], params["b1"])
  g = jax.grad(mlp_loss)(params, batch)
  np.testing.assert_allclose(second["aux"], bo.sam_perturbed_params(params, g, rho=0.5)["b1"], rtol=1e-5)


def test_sam_adam_trains_and_compiles_once():
  params, batch = mlp_problem(batch_size=64)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-2))
  state = tx.init(params)
  step = bo.sam_step(mlp_loss, tx, rho=0.05, m=2)
  first = float(mlp_loss(params, batch))
  for i in range(100):
    params, state, _ = step(params, state, batch, jax.random.fold_in(jax.random.key(0), i))
  assert float(mlp_loss(params, batch)) < 0.5 * first
  assert step._cache_size() == 1


def test_rho_can_be_a_traced_array():
  # A hyper-parameter search can vmap over ρ.
  params, batch = mlp_problem()
  tx = optax.sgd(0.1)
  state = tx.init(params)

  def run(rho):
    return bo.sam_step(mlp_loss, tx, rho=rho)(params, state, batch, jax.random.key(0))[0]

  many = jax.vmap(run)(jnp.array([0.0, 0.1]))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[1], many), run(0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "build,match",
  [
    (lambda: bo.sam_step(mlp_loss, optax.sgd(0.1), rho=-0.1), "rho must be >= 0"),
    (lambda: bo.asam_step(mlp_loss, optax.sgd(0.1), rho=-1.0), "rho must be >= 0"),
    (lambda: bo.asam_step(mlp_loss, optax.sgd(0.1), rho=0.5, eta=-0.01), "eta must be >= 0"),
    (lambda: bo.random_sam_step(mlp_loss, optax.sgd(0.1), sigma=-1.0), "sigma must be >= 0"),
    (lambda: bo.sam_step(mlp_loss, optax.sgd(0.1), rho=0.1, eps=0.0), "eps must be > 0"),
    (lambda: bo.sam_step(mlp_loss, optax.sgd(0.1), rho=float("nan")), "rho must be >= 0"),
    (lambda: bo.sam_step(mlp_loss, optax.sgd(0.1), rho=0.1, aux_from="noisy"), "aux_from"),
    (lambda: bo.sam_step(mlp_loss, optax.sgd(0.1), rho=0.1, m=0), "m must be >= 1"),
  ],
)
def test_bad_values_raise_value_errors_naming_the_argument(build, match):
  with pytest.raises(ValueError, match=match):
    build()


@pytest.mark.parametrize("value", ["0.1", None, True, lambda c: 0.1])
def test_bad_types_raise_type_errors(value):
  with pytest.raises(TypeError, match="rho must be a number"):
    bo.sam_step(mlp_loss, optax.sgd(0.1), rho=value)
  with pytest.raises(TypeError, match="sigma must be a number"):
    bo.random_sam_step(mlp_loss, optax.sgd(0.1), sigma=value)


def test_rho_is_required():
  with pytest.raises(TypeError, match="rho"):
    bo.sam_step(mlp_loss, optax.sgd(0.1))


def test_bsam_no_noise_needs_bsam_in_tx():
  params, batch = mlp_problem()
  tx = optax.adam(0.1)
  with pytest.raises(ValueError, match="BSAMState"):
    bo.bsam_no_noise_step(mlp_loss, tx)(params, tx.init(params), batch, jax.random.key(0))
