"""optax's contract for contributed optimizers (optax/contrib/_common_test.py), adapted to bsam.

bsam's update takes the gradient at ω + ε and ``noisy_grads=`` (the gradient
at θ); where optax's suite feeds one gradient, we feed it as both.
"""

import logging

import _optax_contract as contract
import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import bsam_optax as bo

KWARGS = dict(learning_rate=1e-2, n_data=1000, rho=0.01)


_parabola = contract.parabola


def _matrix_parabola(dtype):
  initial = jnp.zeros((2, 2), dtype=dtype)
  final = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype)
  return initial, final, lambda w: jnp.sum(jnp.square(w - final))


def _mixed_tensors(dtype):
  initial = {"a": jnp.zeros((2,), dtype), "b": [jnp.ones((2, 3), dtype), jnp.zeros((), dtype)]}
  final = {"a": jnp.array([0.5, -0.5], dtype), "b": [jnp.full((2, 3), -1.0, dtype), jnp.ones((), dtype)]}

  def objective(w):
    return sum(jnp.sum(jnp.square(a - b)) for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(final), strict=True))

  return initial, final, objective


@pytest.mark.parametrize("target", [_parabola, _matrix_parabola, _mixed_tensors])
def test_bsam_step_converges(target):
  initial, final, objective = target(jnp.float32)
  tx = bo.bsam(0.05, n_data=10_000, rho=0.01, damping=1.0)
  state = tx.init(initial)
  state = optax.tree.map_params(tx, lambda v: v, state)  # tree_map_params is a no-op here
  step = bo.bsam_step(lambda w, _: objective(w), tx)
  batch = jnp.zeros((1,))

  def body(carry, i):
    params, state = carry
    params, state, _ = step(params, state, batch, jax.random.fold_in(jax.random.key(0), i))
    return (params, state), None

  (params, _), _ = jax.lax.scan(body, (initial, state), jnp.arange(3000))
  chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


def _extra(grads):
  return {"noisy_grads": grads}  # where optax's suite feeds one gradient, feed it as both


@pytest.mark.parametrize("wrap", [False, True])
def test_accepts_unexpected_extra_args_and_does_not_recompile(wrap):
  contract.accepts_unexpected_extra_args_and_does_not_recompile(bo.bsam, KWARGS, _extra, wrap)


def test_no_recompilation_logged(caplog):
  tx = bo.bsam(**KWARGS)
  params, _, objective = _parabola(jnp.float32)
  step = bo.bsam_step(lambda w, _: objective(w), tx, m=2)
  state = tx.init(params)
  params, state, _ = step(params, state, jnp.zeros(2), jax.random.key(0))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    step(params, state, jnp.zeros(2), jax.random.key(1))
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_inject_hyperparams_matches():
  contract.inject_hyperparams_matches(bo.bsam, KWARGS, _extra)


def test_inject_hyperparams_with_a_learning_rate_schedule():
  tx = optax.inject_hyperparams(bo.bsam)(learning_rate=optax.cosine_decay_schedule(0.1, 100), n_data=10)
  params, _, objective = _parabola(jnp.float32)
  state = tx.init(params)
  step = bo.bsam_step(lambda w, _: objective(w), tx)
  for i in range(3):
    params, state, _ = step(params, state, jnp.zeros(1), jax.random.key(i))
  chex.assert_trees_all_close(
    state.hyperparams["learning_rate"], optax.cosine_decay_schedule(0.1, 100)(2)
  )  # value used by the 3rd update


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(dtype):
  contract.preserve_dtype(bo.bsam, KWARGS, _extra, dtype)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gradient_accumulation_with_multisteps(dtype):
  contract.multisteps_accumulates(bo.bsam, KWARGS, _extra, dtype)
  # Through bsam_step: after 4 mini-steps the inner bsam has taken exactly one step.
  params = jnp.array([1.0, 2.0], dtype=dtype)
  tx = optax.MultiSteps(bo.bsam(**KWARGS), every_k_schedule=4)
  state = tx.init(params)
  step = bo.bsam_step(lambda w, _: jnp.sum(w**2), tx)
  for i in range(4):
    params, state, _ = step(params, state, jnp.zeros(1), jax.random.key(i))
  assert int(bo.find_bsam_state(state).count) == 1


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_state_shape_dtype_stability_under_cond(dtype):
  contract.state_stable_under_cond(bo.bsam, KWARGS, _extra, dtype)


def test_learning_rate_annotated_as_schedule_and_schedule_equals_constant():
  contract.schedule_equals_constant(bo.bsam, KWARGS, _extra)


def test_state_follows_params():
  contract.state_follows_params(bo.bsam, KWARGS)


def test_apply_if_finite_skips_a_non_finite_step():
  # optax.apply_if_finite composes with bsam and its step: a step whose loss (so g and g_ε) is NaN leaves the
  # params and bSAM's state unchanged and is counted; the next finite step goes on from where the last good one was.
  tx = optax.apply_if_finite(bo.bsam(**KWARGS), max_consecutive_errors=2)
  step = jax.jit(bo.bsam_step(lambda w, batch: jnp.mean(jnp.sum(batch * (w - 1.0) ** 2, axis=-1)), tx, m=2))
  good = jnp.ones((4, 3))
  bad = good.at[0, 1].set(jnp.nan)
  params = jnp.array([0.5, -1.0, 2.0])
  params, state, _ = step(params, tx.init(params), good, jax.random.key(0))
  skipped_params, skipped_state, info = step(params, state, bad, jax.random.key(1))
  assert not jnp.isfinite(info["loss"])
  chex.assert_trees_all_equal(skipped_params, params)
  chex.assert_trees_all_equal(bo.find_bsam_state(skipped_state), bo.find_bsam_state(state))
  assert int(skipped_state.notfinite_count) == 1 and int(skipped_state.total_notfinite) == 1
  after, after_state, info = step(skipped_params, skipped_state, good, jax.random.key(2))
  assert jnp.isfinite(info["loss"]) and int(after_state.notfinite_count) == 0
  assert int(bo.find_bsam_state(after_state).count) == int(bo.find_bsam_state(state).count) + 1
  chex.assert_tree_all_finite((after, after_state))
  # What it checks is the gradient tx.update receives, g_ε: with ρ = 0 (g_ε at ω) a NaN noisy gradient g alone
  # is not caught, and reaches the scale s (README: "Skipping non-finite steps").
  tx = optax.apply_if_finite(bo.bsam(**{**KWARGS, "rho": 0.0}), max_consecutive_errors=2)
  state = tx.init(params)
  _, state = tx.update(jnp.ones(3), state, params, noisy_grads=jnp.full(3, jnp.nan))
  assert int(state.notfinite_count) == 0 and not jnp.all(jnp.isfinite(bo.find_bsam_state(state).scale))
