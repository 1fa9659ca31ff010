"""Tests of Fisher SAM (_fisher_sam.py): the perturbation against NumPy and its constraint."""

import _step_checks as checks
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bsam_optax as bo


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


PARAMS = {"w": jnp.arange(6.0).reshape(2, 3) / 5, "b": jnp.asarray(-0.5)}
GRADS = {"w": jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -0.1]]), "b": jnp.asarray(0.7)}


@pytest.mark.parametrize("eta", [0.0, 1.0, 10.0])
def test_perturbation_matches_numpy(eta):
  rho = 0.3
  got = _flat(bo.fisher_sam_perturbed_params(PARAMS, GRADS, rho=rho, eta=eta)) - _flat(PARAMS)
  g = _flat(GRADS)
  f = 1 + eta * g**2  # the diagonal Fisher of Kim et al., Sec. 3
  want = rho * (g / f) / np.sqrt(g @ (g / f))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got @ (f * got), rho**2, rtol=1e-5)  # on the ellipsoid εᵀ f ε = ρ²


def test_eta_zero_is_sam():
  chex.assert_trees_all_close(
    bo.fisher_sam_perturbed_params(PARAMS, GRADS, rho=0.2, eta=0.0),
    bo.sam_perturbed_params(PARAMS, GRADS, rho=0.2),
    rtol=1e-6,
  )


def test_zero_gradient_and_dtypes():
  zero = jax.tree.map(jnp.zeros_like, GRADS)
  chex.assert_trees_all_equal(bo.fisher_sam_perturbed_params(PARAMS, zero, rho=0.2, eta=1.0), PARAMS)
  half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), PARAMS)
  out = bo.fisher_sam_perturbed_params(half, GRADS, rho=0.2, eta=1.0)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))


# -- the step ------------------------------------------------------------------


def _make_step(tx, **options):
  return bo.fisher_sam_step(checks.mlp_loss, tx, rho=0.1, eta=5.0, **options)


def test_one_step_by_hand_in_numpy():
  """Linear least squares, gradient Xᵀ r / n written out: ε, the gradient at ω + ε, an SGD step."""
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w": jax.random.normal(k[0], (5,))}
  batch = {"x": jax.random.normal(k[1], (16, 5)), "y": jax.random.normal(k[2], (16,))}
  loss = lambda p, b: 0.5 * jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
  rho, eta, lr = 0.2, 3.0, 0.1
  new, _, info = bo.fisher_sam_step(loss, optax.sgd(lr), rho=rho, eta=eta)(
    params, optax.sgd(lr).init(params), batch, jax.random.key(0)
  )
  x, y, w = (np.asarray(a, np.float64) for a in (batch["x"], batch["y"], params["w"]))
  grad = lambda w: x.T @ (x @ w - y) / len(y)
  g = grad(w)
  f = 1 + eta * g**2
  eps = rho * (g / f) / np.sqrt(g @ (g / f))
  np.testing.assert_allclose(new["w"], w - lr * grad(w + eps), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.second_loss, 0.5 * np.mean((x @ (w + eps) - y) ** 2), rtol=1e-5)


@pytest.mark.parametrize("m", [1, 4])
def test_step_matches_parts_written_out(m):
  params, batch = checks.mlp_problem()
  tx = optax.adam(1e-2)
  state = tx.init(params)
  p, s, _ = _make_step(tx, m=m)(params, state, batch, jax.random.key(0))
  grads = []
  for part in checks.parts(batch, m):
    g = jax.grad(checks.mlp_loss)(params, part)
    grads.append(jax.grad(checks.mlp_loss)(bo.fisher_sam_perturbed_params(params, g, rho=0.1, eta=5.0), part))
  updates, s_ref = tx.update(checks.mean(grads), state, params)
  chex.assert_trees_all_close((p, s), (optax.apply_updates(params, updates), s_ref), rtol=1e-5, atol=1e-6)


def test_step_splits_agree():
  checks.splits_agree(_make_step, optax.sgd(0.1, momentum=0.9))


def test_pmap_equals_m_on_one_device():
  checks.pmap_equals_m_on_one_device(_make_step, optax.sgd(0.1, momentum=0.9))


def test_shard_map_equals_m_on_one_device():
  checks.shard_map_equals_m_on_one_device(_make_step, optax.adam(1e-2))


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(rho=-0.1), ValueError, "rho must be >= 0"),
    (dict(rho=0.1, eta=-1.0), ValueError, "eta must be >= 0"),
    (dict(rho=0.1, eps=0.0), ValueError, "eps must be > 0"),
    (dict(rho="0.1"), TypeError, "rho"),
    (dict(rho=0.1, eta=None), TypeError, "eta"),
    (dict(rho=0.1, m=0), ValueError, "m must be >= 1"),
  ],
)
def test_bad_inputs_name_the_argument(kwargs, error, match):
  with pytest.raises(error, match=match):
    bo.fisher_sam_step(checks.mlp_loss, optax.sgd(0.1), **kwargs)


def test_rho_is_required():
  with pytest.raises(TypeError, match="rho"):
    bo.fisher_sam_step(checks.mlp_loss, optax.sgd(0.1))
