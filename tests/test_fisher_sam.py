"""Tests of Fisher SAM (_fisher_sam.py): the perturbation against NumPy and its constraint."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
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
