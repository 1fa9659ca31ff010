"""Checks every step builder meets, shared by the method test files: devices equal m parts on one device.

``make_step(tx, **options)`` builds the method's step; the problem is a small tanh MLP.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh


def mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean((h @ params["w2"] - batch["y"][:, None]) ** 2)


def mlp_problem(batch_size=32, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k[0], (5, 8)) * 0.5,
    "b1": jnp.full(8, 0.1, jnp.float32),
    "w2": jax.random.normal(k[1], (8, 1)) * 0.5,
  }
  batch = {"x": jax.random.normal(k[2], (batch_size, 5)), "y": jax.random.normal(k[3], (batch_size,))}
  return params, batch


def parts(batch, m):
  size = batch["y"].shape[0] // m
  return [jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch) for i in range(m)]


def mean(trees):
  return jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)


def _replicate(tree, n):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _shard(batch, n):
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


def splits_agree(make_step, tx, m=4, seed=9):
  """vmap and scan give the same step (unroll is the machinery's own test)."""
  key = jax.random.key(seed)
  params, batch = mlp_problem()
  state = tx.init(params)
  ref = make_step(tx, m=m)(params, state, batch, key)[:2]
  for split in ("scan",):
    chex.assert_trees_all_close(
      make_step(tx, m=m, split=split)(params, state, batch, key)[:2], ref, rtol=1e-5, atol=1e-6
    )


def pmap_equals_m_on_one_device(make_step, tx, seed=11):
  key = jax.random.key(seed)
  assert jax.device_count() >= 8, "tests/conftest.py must set XLA_FLAGS before JAX is imported"
  params, batch = mlp_problem()
  state = tx.init(params)
  for devices, m_local in ((8, 1), (4, 2)):
    p_ref, s_ref, info_ref = make_step(tx, m=devices * m_local)(params, state, batch, key)
    step = jax.pmap(make_step(tx, m=m_local, axis_name="d"), axis_name="d", devices=jax.devices()[:devices])
    p, s, info = step(
      _replicate(params, devices), _replicate(state, devices), _shard(batch, devices), _replicate(key, devices)
    )
    first = jax.tree.map(lambda x: x[0], (p, s))
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[-1], (p, s)), first)  # replicas agree
    chex.assert_trees_all_close(first, (p_ref, s_ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(info.second_loss[0], info_ref.second_loss, rtol=1e-5)


def shard_map_equals_m_on_one_device(make_step, tx, seed=2):
  key = jax.random.key(seed)
  params, batch = mlp_problem()
  state = tx.init(params)
  p_ref, s_ref, _ = make_step(tx, m=8)(params, state, batch, key)
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  p, s, _ = make_step(tx, m=2, axis_name="data", mesh=mesh)(params, state, batch, key)
  chex.assert_trees_all_close((p, s), (p_ref, s_ref), rtol=1e-5, atol=1e-6)
