"""Tests for bsam_optax._noise: per-leaf normal draws and the hash generator.

Every statistical check is a 5-sigma bound, so a correct generator fails one of
them with probability ~1e-6; keys are fixed, so the suite is deterministic.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats

import bsam_optax as bo
from bsam_optax import _noise

HASH = _noise.hash_prng_impl
IMPLS = {"threefry": None, "hash": HASH}
N = 1 << 20
# The hash generator's first words and normals for jax.random.key(0): changing
# them changes every hash-keyed run.
GOLDEN_HASH_WORDS = [3903024131, 2946915408, 1204809406]
GOLDEN_HASH_NORMALS = [0.7833456, -0.6590632, -1.9040020, 1.0497181]


# Jitted once: eager jnp ops compile one by one and make the suite slow.
normal_like = jax.jit(_noise.normal_like)


def _key(seed, impl):
  return jax.random.key(seed) if impl is None else jax.random.key(seed, impl=impl)


def _normals(key, n=N):
  # Through normal_like, the path the bSAM step takes (for hash keys it has its own transform).
  return np.asarray(normal_like(key, jnp.zeros(n)), np.float64)


def _corr_bound(n):
  return 5.0 / np.sqrt(n)


# --- normal_like -------------------------------------------------------------


def test_normal_like_keeps_structure_and_dtypes():
  tree = {"a": jnp.zeros((3, 4)), "b": (jnp.zeros(5, jnp.bfloat16), jnp.zeros((), jnp.float16)), "c": jnp.zeros((0, 2))}
  z = normal_like(jax.random.key(0), tree)
  chex.assert_trees_all_equal_shapes_and_dtypes(z, tree)


def test_leaf_j_is_a_draw_from_fold_in_key_j():
  tree = [jnp.zeros((2, 3)), jnp.zeros(4, jnp.bfloat16)]
  key = jax.random.key(3)
  z = normal_like(key, tree)
  np.testing.assert_array_equal(z[0], jax.random.normal(jax.random.fold_in(key, 0), (2, 3)))
  expected = jax.random.normal(jax.random.fold_in(key, 1), (4,), jnp.float32).astype(jnp.bfloat16)
  np.testing.assert_array_equal(z[1], expected)
  # Hash keys: Box-Muller's r cos(2 pi v) on the two words of every entry
  # (streams 0 and 1; stream 0 is jax.random.bits), within float32 rounding of
  # the exact transform of the same words.
  key = jax.random.key(3, impl=HASH)
  z = np.asarray(normal_like(key, tree)[0], np.float64)
  first = np.asarray(jax.random.bits(jax.random.fold_in(key, 0), (2, 3), jnp.uint32))
  data = jax.random.key_data(jax.random.fold_in(key, 0))
  np.testing.assert_array_equal(first, _noise._hash_words(data, _noise._counter((2, 3)), 0))
  second = np.asarray(_noise._hash_words(data, _noise._counter((2, 3)), 1))
  np.testing.assert_allclose(z, _exact_box_muller(first, second), rtol=2e-6, atol=2e-6)


def _exact_box_muller(first, second):
  u = 1.0 - (first >> 8).astype(np.float64) * 2.0**-24
  v = (second >> 8).astype(np.float64) * 2.0**-24 - 0.5
  return np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * v)


def test_hash_transform_accuracy_over_the_whole_range():
  # The log: every one of the 2**24 values of u = 1 - k 2^-24, relative error.
  u = 1.0 - np.arange(1 << 24, dtype=np.float64) * 2.0**-24
  got = np.asarray(jax.jit(_noise._log)(jnp.asarray(u, jnp.float32)), np.float64)
  exact = np.log(u)
  assert got[0] == 0.0
  assert np.max(np.abs(got[1:] - exact[1:]) / np.abs(exact[1:])) < 5e-7
  # The normals: words at both ends of u's and v's range and a grid, all pairs.
  k = np.concatenate([np.arange(4096), np.arange((1 << 24) - 4096, 1 << 24), np.arange(0, 1 << 24, 1 << 12)])
  words = (k.astype(np.uint32) << np.uint32(8)) | np.uint32(0xAB)
  first, second = np.meshgrid(words, words[:: 1 << 4])
  got = np.asarray(jax.jit(_noise._box_muller)(jnp.asarray(first), jnp.asarray(second)), np.float64)
  exact = _exact_box_muller(first, second)
  assert np.all(np.isfinite(got))
  assert np.max(np.abs(got - exact) / np.maximum(np.abs(exact), 1.0)) < 2e-6
  assert np.max(np.abs(got)) <= np.sqrt(-2.0 * np.log(2.0**-24)) + 1e-5


@pytest.mark.parametrize("name", list(IMPLS))
def test_reproducible_under_jit_and_vmap(name):
  impl = IMPLS[name]
  tree = {"w": jnp.zeros((7, 5)), "b": jnp.zeros(3)}
  key = _key(11, impl)
  # One program gives the same bits for the same key. Threefry's normals are
  # bit-identical across programs too (here: jit and vmap); the hash
  # transform's polynomial may be rounded differently (1 ulp) by differently
  # fused or vectorized loops, as any jnp expression may.
  same = chex.assert_trees_all_equal if impl is None else chex.assert_trees_all_close
  tol = {} if impl is None else {"rtol": 1e-6, "atol": 1e-7}
  first = normal_like(key, tree)
  chex.assert_trees_all_equal(first, normal_like(_key(11, impl), tree))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(3))
  batched = jax.jit(jax.vmap(_noise.normal_like, in_axes=(0, None)))(keys, tree)
  for i in range(3):
    same(jax.tree.map(lambda x, i=i: x[i], batched), normal_like(jax.random.fold_in(key, i), tree), **tol)
  assert not np.allclose(first["w"], normal_like(_key(12, impl), tree)["w"])


def test_golden_values():
  # Pins both streams: a change here changes every user's results for a seed.
  tree = {"w": jnp.zeros(4)}
  np.testing.assert_allclose(
    normal_like(jax.random.key(0), tree)["w"],
    jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (4,)),
  )
  words = np.asarray(jax.random.bits(jax.random.key(0, impl=HASH), (3,), jnp.uint32))
  np.testing.assert_array_equal(words, GOLDEN_HASH_WORDS)
  hashed = np.asarray(normal_like(jax.random.key(0, impl=HASH), tree)["w"])
  np.testing.assert_allclose(hashed, GOLDEN_HASH_NORMALS, rtol=1e-6)


# --- the hash generator: a JAX PRNG implementation ------------------------------


def test_hash_keys_derive_like_threefry():
  fry, hsh = jax.random.key(5), jax.random.key(5, impl=HASH)
  np.testing.assert_array_equal(jax.random.key_data(fry), jax.random.key_data(hsh))
  np.testing.assert_array_equal(
    jax.random.key_data(jax.random.fold_in(fry, 9)), jax.random.key_data(jax.random.fold_in(hsh, 9))
  )
  np.testing.assert_array_equal(
    jax.random.key_data(jax.random.split(fry, 4)), jax.random.key_data(jax.random.split(hsh, 4))
  )
  # ... but the bulk bits are not threefry's.
  assert not np.allclose(jax.random.normal(fry, (8,)), jax.random.normal(hsh, (8,)))


def test_hash_works_with_the_jax_random_api():
  key = jax.random.key(1, impl=HASH)
  u = np.asarray(jax.random.uniform(key, (N,)))
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / N)
  b = np.asarray(jax.random.bernoulli(key, 0.3, (N,)))
  assert abs(b.mean() - 0.3) < 5 * np.sqrt(0.21 / N)
  r = np.asarray(jax.random.randint(key, (N,), 0, 10))
  np.testing.assert_array_equal(np.unique(r), np.arange(10))
  for dtype in (jnp.uint8, jnp.uint16, jnp.uint32):
    bits = jax.random.bits(key, (3, 5), dtype)
    assert bits.shape == (3, 5) and bits.dtype == dtype
  np.testing.assert_array_equal(np.sort(jax.random.permutation(key, 100)), np.arange(100))


def test_hash_refuses_more_than_2_to_the_32_values_per_key():
  key = jax.random.key(0, impl=HASH)
  with pytest.raises(ValueError, match="2\\*\\*32"):
    jax.jit(lambda k: jax.random.bits(k, (1 << 16, 1 << 16))).lower(key)  # lowering calls the impl


def test_hash_bits_are_balanced():
  words = np.asarray(jax.random.bits(jax.random.key(2, impl=HASH), (N,), jnp.uint32))
  ones = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
  assert np.all(np.abs(ones - 0.5) < 5 * np.sqrt(0.25 / N)), ones
  assert len(np.unique(words)) == N  # a bijection of the counter, per key


# --- the normals: moments, shape of the distribution, independence --------------


@pytest.mark.parametrize("name", list(IMPLS))
@pytest.mark.parametrize("seed", [0, 1])
def test_moments_and_distribution(name, seed):
  z = _normals(_key(seed, IMPLS[name]))
  n = z.size
  assert abs(z.mean()) < 5 / np.sqrt(n)
  assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)
  assert abs(np.mean(z**3)) < 5 * np.sqrt(15 / n)
  assert abs(np.mean(z**4) - 3.0) < 5 * np.sqrt(96 / n)
  # Chi-square over 64 equiprobable bins of N(0, 1).
  edges = np.asarray(jax.scipy.special.ndtri(jnp.linspace(0.0, 1.0, 65)[1:-1]), np.float64)
  counts = np.bincount(np.searchsorted(edges, z), minlength=64)
  chi2 = np.sum((counts - n / 64) ** 2 / (n / 64))
  assert chi2 < 63 + 5 * np.sqrt(2 * 63), chi2
  # Tails: P(|z| > 4) = 6.3e-5.
  assert abs(np.mean(np.abs(z) > 4) - 6.334e-5) < 5 * np.sqrt(6.334e-5 / n)


@pytest.mark.parametrize("name", list(IMPLS))
def test_kolmogorov_smirnov_and_tails(name):
  # 2**20 draws over several leaves of one tree (the step's layout), against
  # the exact N(0, 1) CDF; and the frequencies beyond 2, 3 and 4 sigma, each
  # side (a generator that is right on average can still skew one tail).
  tree = [jnp.zeros((1024, 768)), jnp.zeros(1 << 18)]
  z = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in normal_like(_key(5, IMPLS[name]), tree)])
  n = z.size
  assert scipy.stats.kstest(z, "norm").pvalue > 1e-6
  for t in (2.0, 3.0, 4.0):
    p = scipy.stats.norm.sf(t)
    for side in (z > t, z < -t):
      assert abs(side.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), (t, side.mean(), p)


@pytest.mark.parametrize("name", list(IMPLS))
def test_neighbours_are_uncorrelated(name):
  key = _key(3, IMPLS[name])
  z = _normals(key)
  bound = _corr_bound(z.size)
  for lag in (1, 2, 3, 7, 64):
    assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
  # Counters that differ in one bit (the hash xors the counter with a seed).
  index = np.arange(z.size)
  for bit in range(20):
    partner = index ^ (1 << bit)
    assert abs(np.mean(z * z[partner])) < bound, bit
  # Squares too (dependence that correlation of the values misses).
  assert abs(np.corrcoef(z[:-1] ** 2, z[1:] ** 2)[0, 1]) < bound
  # Rows and columns of a 2-D leaf.
  w = np.asarray(normal_like(jax.random.fold_in(key, 1), jnp.zeros((1024, 1024))), np.float64)
  assert abs(np.mean(w[1:] * w[:-1])) < _corr_bound(w[1:].size)
  assert abs(np.mean(w[:, 1:] * w[:, :-1])) < _corr_bound(w[:, 1:].size)


def _max_offdiag_corr(rows):
  corr = np.corrcoef(np.stack(rows))
  return np.max(np.abs(corr[~np.eye(len(rows), dtype=bool)]))


@pytest.mark.parametrize("name", list(IMPLS))
def test_independent_across_parts_steps_and_leaves(name):
  impl = IMPLS[name]
  n = 1 << 17
  key = _key(4, impl)
  tree = [jnp.zeros(n), jnp.zeros((n // 256, 256)), jnp.zeros(n)]
  # Parts: the step folds the part index into the step's key.
  parts = [normal_like(jax.random.fold_in(key, i), tree) for i in range(8)]
  assert _max_offdiag_corr([p[0] for p in parts]) < _corr_bound(n)
  # Steps: a training loop folds the step count into its key (then the part).
  steps = [normal_like(jax.random.fold_in(jax.random.fold_in(key, t), 0), tree) for t in range(8)]
  assert _max_offdiag_corr([s[0] for s in steps]) < _corr_bound(n)
  # Leaves of one draw, and the same leaf index under related keys.
  assert _max_offdiag_corr([np.ravel(leaf) for leaf in parts[0]]) < _corr_bound(n)
  related = [normal_like(_key(seed, impl), tree)[0] for seed in (0, 1, 2, 3, 1 << 31)]
  assert _max_offdiag_corr(related) < _corr_bound(n)


# --- in the step ----------------------------------------------------------------


def test_bsam_step_runs_on_hash_keys():
  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)

  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones((8, 2))}
  tx = bo.bsam(1e-2, n_data=8, rho=0.01)
  state = tx.init(params)
  key = jax.random.key(7, impl=HASH)
  # One compiled step (m=2, vmap); the m-split and device contracts are tested
  # for any key in tests/test_step.py.
  step = bo.bsam_step(loss_fn, tx, m=2)
  new_params, new_state, out = step(params, state, batch, key)
  chex.assert_trees_all_equal((new_params, new_state, out), step(params, state, batch, key))
  assert step(params, state, batch, jax.random.fold_in(key, 1))[0]["w"].tolist() != new_params["w"].tolist()
  updates = jax.tree.map(lambda new, old: new - old, new_params, params)
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
  assert optax.tree.norm(updates) > 0
