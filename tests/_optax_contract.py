"""optax's contract for contributed optimizers (optax/contrib/_common_test.py), for any bsam_optax
transformation whose update takes one keyword-only extra argument besides the gradient.

Each check takes ``factory`` (e.g. ``bo.mfvi``), its keyword arguments, and ``extra(grads) -> dict``,
the extra arguments to feed with ``grads`` (where optax's suite feeds one gradient).
"""

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import optax

import bsam_optax as bo


def parabola(dtype=jnp.float32):
  initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
  return initial, final, lambda w: jnp.sum(jnp.square(w - final))


def accepts_unexpected_extra_args_and_does_not_recompile(factory, kwargs, extra, wrap):
  tx = factory(**kwargs)
  if wrap:
    tx = optax.chain(optax.clip_by_global_norm(1.0), tx)
  params, _, objective = parabola()

  @jax.jit
  def step(params, state):
    g = jax.grad(objective)(params)
    updates, state = tx.update(g, state, params, unexpected_extra_arg=1, **extra(g))
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  params, state = step(params, state)
  before = step._cache_size()
  params, state = step(params, state)
  assert step._cache_size() == before


def inject_hyperparams_matches(factory, kwargs, extra):
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  tx = factory(**kwargs)
  injected = optax.inject_hyperparams(factory)(**kwargs)
  updates, state = jax.jit(functools.partial(tx.update, **extra(grads)))(grads, jax.jit(tx.init)(params), params)
  updates_i, state_i = jax.jit(functools.partial(injected.update, **extra(grads)))(
    grads, jax.jit(injected.init)(params), params
  )
  chex.assert_trees_all_close(updates_i, updates, rtol=1e-5)
  chex.assert_trees_all_close(state_i.inner_state, state, rtol=1e-5, atol=1e-5)


def preserve_dtype(factory, kwargs, extra, dtype):
  params = jnp.array([1.0, 2.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  tx = factory(**kwargs)
  updates, _ = jax.jit(functools.partial(tx.update, **extra(grads)))(grads, jax.jit(tx.init)(params), params)
  assert updates.dtype == params.dtype


def multisteps_accumulates(factory, kwargs, extra, dtype):
  params = jnp.array([1.0, 2.0], dtype=dtype)
  grads = jax.grad(lambda x: jnp.sum(x**2))(params)
  tx = optax.MultiSteps(factory(**kwargs), every_k_schedule=4)
  state = jax.jit(tx.init)(params)
  for i in range(4):
    updates, state = jax.jit(functools.partial(tx.update, **extra(grads)))(grads, state, params)
    if i < 3:
      chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))
  assert int(bo.find_posterior_state(state.inner_opt_state).count) == 1
  assert bool(jnp.any(updates != 0))


def state_stable_under_cond(factory, kwargs, extra, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    tx = factory(**kwargs)
    initial, _, objective = parabola(dtype)

    @jax.jit
    def step(params, state):
      g = jax.grad(objective)(params)
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      updates, state = jax.lax.cond(
        cond, lambda: tx.update(g, state, params, **extra(g)), lambda: (params, state)
      )  # fmt: skip
      return optax.apply_updates(params, updates), state

    params, state = initial, tx.init(initial)
    for _ in range(2):
      params, new_state = step(params, state)
      assert params.dtype == dtype
      cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
      state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023


def schedule_equals_constant(factory, kwargs, extra):
  lr = inspect.signature(factory).parameters["learning_rate"]
  assert lr.annotation is optax.ScalarOrSchedule
  params, _, objective = parabola()
  kwargs = {k: v for k, v in kwargs.items() if k != "learning_rate"}
  results = []
  for learning_rate in (optax.constant_schedule(1e-3), 1e-3):
    tx = factory(learning_rate, **kwargs)
    p, s = params, tx.init(params)
    for _ in range(10):
      g = jax.grad(objective)(p)
      u, s = tx.update(g, s, p, **extra(g))
      p = optax.apply_updates(p, u)
    results.append(p)
  chex.assert_trees_all_close(*results)


def state_follows_params(factory, kwargs):
  """Every state leaf shaped like a params leaf can be mapped by optax.tree.map_params."""
  params = {"a": jnp.ones((2, 3)), "b": jnp.zeros(4)}
  tx = factory(**kwargs)
  state = tx.init(params)
  mapped = optax.tree.map_params(tx, lambda v: v + 1, state)
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
