"""Tests for bsam_optax._noise: per-leaf normal draws and the library's generator.

Every statistical check is a 5-sigma bound, so a correct generator fails one of
them with probability ~1e-6; keys are fixed, so the suite is deterministic.
The generator is restated in NumPy (threefry2x32 checked against Random123's
known-answer vectors, lowbias32, Box-Muller in float64) and compared word for
word. ``benchmarks/noise_battery.py`` runs the words through dieharder.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import bsam_optax as bo
from bsam_optax import _noise

HASH = _noise.hash_prng_impl
N = 1 << 20
# (key kind, noise): the draws the statistical tests cover.
DRAWS = {"threefry/auto": ("threefry", "auto"), "rbg/auto": ("rbg", "auto"), "threefry/jax": ("threefry", "jax")}
# The generator's first words and normals for jax.random.key(0) (leaf 0): changing them changes every run.
GOLDEN_WORDS = [142321975, 3092310882, 529381765]
GOLDEN_NORMALS = [1.3848209, -0.7090320, 0.3239941, 0.1328857]


@functools.partial(jax.jit, static_argnames="noise")
def normal_like(key, tree, noise="auto"):
  # Jitted once: eager jnp ops compile one by one and make the suite slow.
  return _noise.normal_like(key, tree, noise=noise)


def _key(seed, kind="threefry"):
  if kind == "threefry":
    return jax.random.key(seed)
  if kind == "raw":
    return jax.random.PRNGKey(seed)
  return jax.random.key(seed, impl=HASH if kind == "hash" else kind)


def _normals(key, noise="auto", n=N):
  return np.asarray(normal_like(key, jnp.zeros(n), noise), np.float64)


def _corr_bound(n):
  return 5.0 / np.sqrt(n)


# --- an independent restatement in NumPy ------------------------------------------


def _np_threefry2x32(key, x0, x1):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011; Random123's threefry.h), on uint32 arrays."""
  with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as intended
    return _np_threefry2x32_rounds(key, x0, x1)


def _np_threefry2x32_rounds(key, x0, x1):
  rotations = (13, 15, 26, 6, 17, 29, 16, 24)
  k0, k1 = np.uint32(key[0]), np.uint32(key[1])
  ks = (k0, k1, np.uint32(k0 ^ k1 ^ np.uint32(0x1BD11BDA)))
  x0, x1 = np.asarray(x0, np.uint32) + ks[0], np.asarray(x1, np.uint32) + ks[1]
  for r in range(20):
    x0 = x0 + x1
    x1 = (x1 << np.uint32(rotations[r % 8])) | (x1 >> np.uint32(32 - rotations[r % 8]))
    x1 = x1 ^ x0
    if r % 4 == 3:
      i = r // 4 + 1
      x0, x1 = x0 + ks[i % 3], x1 + ks[(i + 1) % 3] + np.uint32(i)
  return x0, x1


def _np_lowbias32(x):
  x = x ^ (x >> np.uint32(16))
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> np.uint32(15))
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> np.uint32(16))


def _np_words(key_data, n):
  """The words of the module docstring for a key's data and entries 0..n-1."""
  words = np.asarray(key_data, np.uint32)
  pair = words[:2]
  if len(words) == 4:  # rbg keys
    pair = np.stack(_np_threefry2x32(pair, words[2], words[3]))
  (s0, s1), (s2, _) = _np_threefry2x32(pair, [0, 1], [2, 3])  # jax's threefry_2x32(k, [0, 1, 2, 3])
  i = np.arange(n, dtype=np.uint32)
  x = _np_lowbias32(_np_lowbias32(i ^ s0) + s1)
  return x + _np_lowbias32(x ^ s2)


def _np_box_muller(words):
  u = ((words >> 16).astype(np.float64) + 0.5) * 2.0**-16
  v = ((words & 0xFFFF).astype(np.float64) + 0.5) * 2.0**-16 - 0.5
  return np.sqrt(-2.0 * np.log(u)) * np.cos(2.0 * np.pi * v)


def test_threefry_known_answers():
  # Random123's kat_vectors, threefry2x32_20: (counter, key) -> output.
  cases = [
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
  ]
  for counter, key, expected in cases:
    got = _np_threefry2x32(key, np.uint32(counter[0]), np.uint32(counter[1]))
    assert (int(got[0]), int(got[1])) == expected
    # ... and the library's per-leaf derivation uses the same function.
    jax_got = jax.extend.random.threefry_2x32(jnp.asarray(key, jnp.uint32), jnp.asarray(counter, jnp.uint32))
    np.testing.assert_array_equal(jax_got, expected)


@pytest.mark.parametrize("kind", ["threefry", "rbg", "unsafe_rbg", "hash", "raw"])
def test_all_leaves_seeds_at_once_are_each_leafs_fold_in(kind):
  key = _key(11, kind)
  seeds = jax.jit(lambda k: _noise._leaf_seeds(k, 40))(key)
  for j in range(40):
    expected = _noise._seeds(_noise._key_words(jax.random.fold_in(key, j)))[:3]
    np.testing.assert_array_equal(seeds[j], expected)


@pytest.mark.parametrize("kind", ["threefry", "rbg", "unsafe_rbg", "hash", "raw"])
def test_auto_is_the_numpy_restatement_for_every_kind_of_key(kind):
  key = _key(3, kind)
  tree = [jnp.zeros((3, 5)), jnp.zeros(7), jnp.zeros((2, 2, 2), jnp.bfloat16)]
  z = normal_like(key, tree)
  for j, leaf in enumerate(tree):
    leaf_key = jax.random.fold_in(key, j)
    data = leaf_key if kind == "raw" else jax.random.key_data(leaf_key)
    expected = _np_box_muller(_np_words(np.asarray(data), leaf.size)).reshape(leaf.shape)
    got = np.asarray(z[j], np.float64)
    tol = 2e-6 if leaf.dtype == jnp.float32 else 1e-2  # bfloat16: rounded float32 draws
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)


def test_jax_noise_is_jax_random_normal_of_fold_in_key_j():
  tree = [jnp.zeros((2, 3)), jnp.zeros(4, jnp.bfloat16)]
  for key in (jax.random.key(3), jax.random.key(3, impl=HASH), jax.random.key(3, impl="rbg")):
    z = normal_like(key, tree, "jax")
    np.testing.assert_array_equal(z[0], jax.random.normal(jax.random.fold_in(key, 0), (2, 3)))
    expected = jax.random.normal(jax.random.fold_in(key, 1), (4,), jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(z[1], expected)


def test_same_key_data_same_noise():
  # The generator reads the key's data: a threefry key, a hash key and a raw
  # key of one seed derive the same leaf keys, so they draw the same noise.
  tree = {"w": jnp.zeros((4, 5))}
  first = normal_like(jax.random.key(9), tree)
  chex.assert_trees_all_equal(first, normal_like(jax.random.key(9, impl=HASH), tree))
  chex.assert_trees_all_equal(first, normal_like(jax.random.PRNGKey(9), tree))


def test_bad_noise_and_bad_keys():
  with pytest.raises(ValueError, match="noise"):
    _noise.normal_like(jax.random.key(0), jnp.zeros(3), noise="threefry")
  with pytest.raises(TypeError, match="key"):
    _noise._key_words(jnp.zeros(2, jnp.float32))


def test_golden_values():
  # Pins the generator: a change here changes every user's results for a seed.
  data = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 0))
  words = _noise._words(_noise._seeds(data), jnp.arange(3, dtype=jnp.uint32))
  np.testing.assert_array_equal(words, GOLDEN_WORDS)
  z = np.asarray(normal_like(jax.random.key(0), {"w": jnp.zeros(4)})["w"])
  np.testing.assert_allclose(z, GOLDEN_NORMALS, rtol=1e-6)


def test_normal_like_keeps_structure_and_dtypes():
  tree = {"a": jnp.zeros((3, 4)), "b": (jnp.zeros(5, jnp.bfloat16), jnp.zeros((), jnp.float16)), "c": jnp.zeros((0, 2))}
  for noise in ("auto", "jax"):
    chex.assert_trees_all_equal_shapes_and_dtypes(normal_like(jax.random.key(0), tree, noise), tree)


@pytest.mark.parametrize("noise", ["auto", "jax"])
def test_reproducible_under_jit_and_vmap(noise):
  tree = {"w": jnp.zeros((7, 5)), "b": jnp.zeros(3)}
  key = jax.random.key(11)
  # One program gives the same bits for the same key. Threefry's normals are
  # bit-identical across programs too (here: jit and vmap); the auto
  # transform's polynomial may be rounded differently (1 ulp) by differently
  # fused or vectorized loops, as any jnp expression may.
  same = chex.assert_trees_all_equal if noise == "jax" else chex.assert_trees_all_close
  tol = {} if noise == "jax" else {"rtol": 1e-6, "atol": 1e-7}
  first = normal_like(key, tree, noise)
  chex.assert_trees_all_equal(first, normal_like(jax.random.key(11), tree, noise))
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(3))
  batched = jax.jit(jax.vmap(functools.partial(_noise.normal_like, noise=noise), in_axes=(0, None)))(keys, tree)
  for i in range(3):
    same(jax.tree.map(lambda x, i=i: x[i], batched), normal_like(jax.random.fold_in(key, i), tree, noise), **tol)
  assert not np.allclose(first["w"], normal_like(jax.random.key(12), tree, noise)["w"])


def test_a_sharded_leaf_draws_shard_locally():
  # Partitionable: entry i depends on (key, i) only, so a leaf sharded over 8
  # devices draws the same values as on one device, without communication.
  mesh = jax.make_mesh((8,), ("x",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
  tree = {"w": jnp.zeros((64, 48)), "b": jnp.zeros(48)}
  key = jax.random.key(5)
  draw = jax.jit(_noise.normal_like, out_shardings={"w": sharding, "b": None})
  sharded = draw(key, tree)
  chex.assert_trees_all_close(sharded, normal_like(key, tree), rtol=1e-6, atol=1e-7)
  assert sharded["w"].sharding.is_equivalent_to(sharding, 2)
  hlo = draw.lower(key, tree).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in hlo, collective


# --- the transform -----------------------------------------------------------------


def test_box_muller_accuracy_over_all_words():
  # z = r(high 16 bits) * c(low 16 bits): every one of the 2^16 radii and the
  # 2^16 cosines against float64, so every one of the 2^32 words is covered.
  k = jnp.arange(1 << 16, dtype=jnp.uint32)
  u = (np.arange(1 << 16) + 0.5) * 2.0**-16
  log = np.asarray(jax.jit(lambda k: _noise._log(_noise._unit(k)))(k), np.float64)
  assert np.max(np.abs(log - np.log(u)) / np.abs(np.log(u))) < 5e-7
  radius = np.asarray(jax.jit(lambda k: _noise._box_muller(k << 16))(k), np.float64)  # angle bits 0: cos ~ -1
  cos = np.asarray(jax.jit(lambda k: _noise._box_muller(k | np.uint32(0xFFFF << 16)))(k), np.float64)
  r_min = np.sqrt(-2.0 * np.log(1.0 - 2.0**-17))
  np.testing.assert_allclose(radius, _np_box_muller(np.arange(1 << 16, dtype=np.uint32) << 16), rtol=2e-6)
  np.testing.assert_allclose(cos / r_min, np.cos(2 * np.pi * ((np.arange(1 << 16) + 0.5) * 2.0**-16 - 0.5)), atol=3e-6)
  assert np.max(np.abs(radius)) <= np.sqrt(-2.0 * np.log(2.0**-17)) * (1 + 1e-6)


def test_distribution_of_the_transform_is_within_5e_6_of_normal():
  # The exact CDF of z over all 2^32 equally likely words (the docstring's
  # sup |F - Φ| = 4.8e-6), on a grid dense near 0, where the 16-bit radius
  # and angle are coarsest, and over the whole range.
  n = 1 << 16
  cos = np.cos(2 * np.pi * ((np.arange(n) + 0.5) / n - 0.5))
  cos = cos[cos > 0]  # the other half mirrors it: P(r c <= z) for c < 0 is 1 - P(r |c| < -z)

  def radius_cdf(t):  # P(r <= t) for r = sqrt(-2 log u), u = (k + 1/2) / n
    return (n - np.clip(np.ceil(np.exp(-t * t / 2) * n - 0.5), 0, n)) / n

  z = np.concatenate([np.linspace(-5.5, 5.5, 441), np.linspace(-0.01, 0.01, 201)])
  cdf = np.zeros_like(z)
  for chunk in np.array_split(cos, 64):
    t = z[:, None] / chunk[None, :]
    cdf += np.sum(np.where(t < 0, 0.0, radius_cdf(np.abs(t))) + np.where(t > 0, 1.0, 1.0 - radius_cdf(np.abs(t))), 1)
  cdf /= n
  assert np.max(np.abs(cdf - scipy.stats.norm.cdf(z))) < 5e-6


# --- the generator as a JAX PRNG implementation ----------------------------------------


def test_hash_keys_derive_like_threefry():
  fry, hsh = jax.random.key(5), jax.random.key(5, impl=HASH)
  np.testing.assert_array_equal(jax.random.key_data(fry), jax.random.key_data(hsh))
  np.testing.assert_array_equal(
    jax.random.key_data(jax.random.fold_in(fry, 9)), jax.random.key_data(jax.random.fold_in(hsh, 9))
  )
  np.testing.assert_array_equal(
    jax.random.key_data(jax.random.split(fry, 4)), jax.random.key_data(jax.random.split(hsh, 4))
  )
  # ... its bits are the generator's words, not threefry's.
  np.testing.assert_array_equal(jax.random.bits(hsh, (8,)), _np_words(np.asarray(jax.random.key_data(hsh)), 8))
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


def test_refuses_2_to_the_32_values_per_key():
  with pytest.raises(ValueError, match="2\\*\\*32"):
    jax.jit(lambda k: jax.random.bits(k, (1 << 16, 1 << 16))).lower(jax.random.key(0, impl=HASH))
  with pytest.raises(ValueError, match="2\\*\\*32"):
    jax.jit(_noise.normal_like).lower(jax.random.key(0), jax.ShapeDtypeStruct((1 << 16, 1 << 16), jnp.float32))


def test_words_are_balanced_and_repeat_like_random_words():
  words = np.asarray(jax.random.bits(jax.random.key(2, impl=HASH), (N,), jnp.uint32))
  ones = ((words[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
  assert np.all(np.abs(ones - 0.5) < 5 * np.sqrt(0.25 / N)), ones
  # Random 32-bit words collide: N (N - 1) / 2^33 = 128 expected pairs. A
  # keyed permutation of the counter (the generator without its feed-forward
  # round) never does.
  duplicates = N - len(np.unique(words))
  expected = N * (N - 1) / 2**33
  assert abs(duplicates - expected) < 5 * np.sqrt(expected), duplicates


# --- the normals: moments, shape of the distribution, independence --------------


@pytest.mark.parametrize("draw", list(DRAWS))
@pytest.mark.parametrize("seed", [0, 1])
def test_moments_and_distribution(draw, seed):
  kind, noise = DRAWS[draw]
  z = _normals(_key(seed, kind), noise)
  n = z.size
  assert abs(z.mean()) < 5 / np.sqrt(n)
  assert abs(z.var() - 1.0) < 5 * np.sqrt(2 / n)
  assert abs(np.mean(z**3)) < 5 * np.sqrt(15 / n)
  assert abs(np.mean(z**4) - 3.0) < 5 * np.sqrt(96 / n)
  # Chi-square over 64 equiprobable bins of N(0, 1).
  edges = scipy.stats.norm.ppf(np.linspace(0.0, 1.0, 65)[1:-1])
  counts = np.bincount(np.searchsorted(edges, z), minlength=64)
  chi2 = np.sum((counts - n / 64) ** 2 / (n / 64))
  assert chi2 < 63 + 5 * np.sqrt(2 * 63), chi2
  # Tails: P(|z| > 4) = 6.3e-5.
  assert abs(np.mean(np.abs(z) > 4) - 6.334e-5) < 5 * np.sqrt(6.334e-5 / n)


@pytest.mark.parametrize("draw", list(DRAWS))
def test_kolmogorov_smirnov_and_tails(draw):
  # 2**20 draws over several leaves of one tree (the step's layout), against
  # the exact N(0, 1) CDF; and the frequencies beyond 2, 3 and 4 sigma, each
  # side (a generator that is right on average can still skew one tail).
  kind, noise = DRAWS[draw]
  tree = [jnp.zeros((1024, 768)), jnp.zeros(1 << 18)]
  z = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in normal_like(_key(5, kind), tree, noise)])
  n = z.size
  assert scipy.stats.kstest(z, "norm").pvalue > 1e-6
  for t in (2.0, 3.0, 4.0):
    p = scipy.stats.norm.sf(t)
    for side in (z > t, z < -t):
      assert abs(side.mean() - p) < 5 * np.sqrt(p * (1 - p) / n), (t, side.mean(), p)


@pytest.mark.parametrize("draw", list(DRAWS))
def test_neighbours_are_uncorrelated(draw):
  kind, noise = DRAWS[draw]
  key = _key(3, kind)
  z = _normals(key, noise)
  bound = _corr_bound(z.size)
  for lag in (1, 2, 3, 7, 23, 64):
    assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < bound, lag
  # Counters that differ in one bit (the generator xors the counter with a seed).
  index = np.arange(z.size)
  for bit in range(20):
    partner = index ^ (1 << bit)
    assert abs(np.mean(z * z[partner])) < bound, bit
  # Squares too (dependence that correlation of the values misses).
  assert abs(np.corrcoef(z[:-1] ** 2, z[1:] ** 2)[0, 1]) < bound
  # Rows and columns of a 2-D leaf.
  w = np.asarray(normal_like(jax.random.fold_in(key, 1), jnp.zeros((1024, 1024)), noise), np.float64)
  assert abs(np.mean(w[1:] * w[:-1])) < _corr_bound(w[1:].size)
  assert abs(np.mean(w[:, 1:] * w[:, :-1])) < _corr_bound(w[:, 1:].size)


def _max_offdiag_corr(rows):
  corr = np.corrcoef(np.stack(rows))
  return np.max(np.abs(corr[~np.eye(len(rows), dtype=bool)]))


@pytest.mark.parametrize("draw", list(DRAWS))
def test_independent_across_parts_steps_and_leaves(draw):
  kind, noise = DRAWS[draw]
  n = 1 << 17
  key = _key(4, kind)
  tree = [jnp.zeros(n), jnp.zeros((n // 256, 256)), jnp.zeros(n)]
  # Parts: the step folds the part index into the step's key.
  parts = [normal_like(jax.random.fold_in(key, i), tree, noise) for i in range(8)]
  assert _max_offdiag_corr([p[0] for p in parts]) < _corr_bound(n)
  # Steps: a training loop folds the step count into its key (then the part).
  steps = [normal_like(jax.random.fold_in(jax.random.fold_in(key, t), 0), tree, noise) for t in range(8)]
  assert _max_offdiag_corr([s[0] for s in steps]) < _corr_bound(n)
  # Leaves of one draw, and the same leaf index under related keys.
  assert _max_offdiag_corr([np.ravel(leaf) for leaf in parts[0]]) < _corr_bound(n)
  related = [normal_like(_key(seed, kind), tree, noise)[0] for seed in (0, 1, 2, 3, 1 << 31)]
  assert _max_offdiag_corr(related) < _corr_bound(n)


# --- in the step ----------------------------------------------------------------


def test_bsam_step_runs_on_every_kind_of_key():
  def loss_fn(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2)

  params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
  batch = {"x": jax.random.normal(jax.random.key(0), (8, 3)), "y": jnp.ones((8, 2))}
  tx = bo.bsam(1e-2, n_data=8, rho=0.01)
  state = tx.init(params)
  # One compiled step (m=2, vmap); the m-split and device contracts are tested
  # for any key in tests/test_step.py.
  step = bo.bsam_step(loss_fn, tx, m=2)
  for kind in ("hash", "rbg", "raw"):
    key = _key(7, kind)
    new_params, new_state, out = step(params, state, batch, key)
    chex.assert_trees_all_equal((new_params, new_state, out), step(params, state, batch, key))
    assert step(params, state, batch, jax.random.fold_in(key, 1))[0]["w"].tolist() != new_params["w"].tolist()
    updates = jax.tree.map(lambda new, old: new - old, new_params, params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))
    assert optax.tree.norm(updates) > 0


def test_bsam_posterior_is_the_same_in_distribution_under_both_noises():
  # The exact-posterior problem of notebooks/02_logistic_regression.ipynb (2-D
  # Bayesian logistic regression, N = 30, full batch): bSAM's posterior mean
  # and std after 1500 steps, over 16 keys, with the generator and with
  # jax.random.normal. The two must agree within their Monte Carlo spread.
  rng = np.random.default_rng(0)
  n_data = 30
  x = np.concatenate([rng.normal([-1.0, 1.0], 0.9, (15, 2)), rng.normal([1.0, -1.0], 0.9, (15, 2))])
  batch = (jnp.asarray(x, jnp.float32), jnp.asarray(np.repeat([0.0, 1.0], 15), jnp.float32))

  def mean_loss(w, batch):
    return jnp.mean(optax.sigmoid_binary_cross_entropy(batch[0] @ w, batch[1]))

  steps = 1500
  tx = bo.bsam(
    optax.cosine_decay_schedule(0.1, steps), n_data=n_data, rho=0.05, weight_decay=1 / n_data, damping=0.0, b2=0.99
  )

  def fit(noise):
    step = bo.bsam_step(mean_loss, tx, noise=noise)

    def run(key):
      def body(carry, i):
        w, state = carry
        w, state, _ = step(w, state, batch, jax.random.fold_in(key, i))
        return (w, state), None

      w0 = jnp.zeros(2)
      (w, state), _ = jax.lax.scan(body, (w0, tx.init(w0)), jnp.arange(steps))
      return jnp.concatenate(bo.posterior(w, state))

    return np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(1), 16)), np.float64)

  auto, exact = fit("auto"), fit("jax")
  spread = np.sqrt((auto.var(0) + exact.var(0)) / 16)
  assert np.all(np.abs(auto.mean(0) - exact.mean(0)) < 5 * spread + 1e-3), (auto.mean(0), exact.mean(0), spread)
