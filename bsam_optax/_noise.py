"""Standard-normal noise shaped like a parameter pytree, and the generator behind it.

bSAM draws ``P`` normals per step and m-sharpness part (``P`` = number of
parameters): at ``m = 8`` that is ``8 P`` normals, on a CPU more work than
the rest of a small model's step. :func:`normal_like` draws them; its
``noise=`` argument picks the generator, the key stays the user's:

* ``noise="auto"`` (the default): the library's own counter-based generator,
  derived from whatever key is passed (``jax.random.key(seed)``, ``"rbg"``
  and ``"unsafe_rbg"`` keys, raw ``uint32`` keys, :data:`hash_prng_impl`
  keys). In the bSAM step on a 2-core CPU a normal costs 2.6-2.9 ns of CPU
  time, against 7.7-18 ns for ``jax.random.normal`` with a threefry key (the
  step with minus without noise, ``benchmarks/results/cost.md``).
* ``noise="jax"``: ``jax.random.normal(jax.random.fold_in(key, j), shape)``
  for leaf ``j``, bit for bit: JAX's own stream of the key's implementation.

**The generator** (``"auto"``). Leaf ``j`` of the tree draws from
``k = fold_in(key, j)`` (JAX's ``fold_in`` of the key's implementation), so
that parts (``fold_in(key, part)``), steps and leaves get unrelated streams.
For every leaf, one small threefry call turns ``k`` into three 32-bit seeds
(the fold-ins and seeds of all leaves are computed together, vectorized over
the leaf index: XLA:CPU runs each threefry call as a loop of its own, 13 per
part for a 6-leaf model leaf by leaf, 2 vectorized), and the entry at
row-major index ``i`` gets the 32-bit word::

    (s0, s1, s2, _) = threefry2x32(k, (0, 1, 2, 3))   # once per leaf
    x   = h(h(i ^ s0) + s1)
    w_i = x + h(x ^ s2)

``h`` is Wellons' *lowbias32* (xorshift-multiply, a bijection of ``uint32``
with low avalanche bias). Two keyed rounds make ``x`` a keyed permutation of
the counter; the feed-forward third round (``x + h(x ^ s2)``, as in the
Davies-Meyer construction) makes ``w`` no longer a permutation, so a leaf's
words repeat at the rate of random 32-bit words (a permutation never repeats:
a collision count over ``2^20`` words tells it apart). ``w_i`` depends only on
``(k, i)``: no sequential state, so XLA fuses the draw into its consumer
(``θ = ω + z / sqrt(N s)``, one pass over each leaf, no noise buffer) and each
shard of a sharded leaf computes its own entries (the index is an ``iota`` in
the leaf's shape, which the SPMD partitioner splits). A leaf holds at most
``2**32`` entries. Every operation is 32-bit integer arithmetic, so it
vectorizes on CPUs and GPUs alike and needs no ``jax_enable_x64``.

Soundness: the raw words pass the ``dieharder`` battery for several keys, leaf
and part indices, consecutive seeds and interleaved related keys
(``benchmarks/noise_battery.py``, summary in
``benchmarks/results/noise_battery.md``), and the statistical tests of
``tests/test_noise.py`` (moments, chi-square, KS, tails, per-bit frequencies,
32-bit collisions, correlations across neighbours, one-bit counter flips,
parts, steps, leaves and related keys). It is not a cryptographic generator.

**Normals** from one word per entry, by Box-Muller:
``z = sqrt(-2 log u) cos(2 pi v)`` with ``u = (w >> 16 + 1/2) 2^-16`` and
``v = (w & 0xFFFF + 1/2) 2^-16 - 1/2``, a polynomial ``log`` (bit-exact
exponent, degree-8 mantissa polynomial) and a polynomial ``cos`` (via
``sin(pi v)``). 16 bits each is the split of the 32 bits whose distribution is
closest to N(0, 1): ``sup |F - Φ| = 4.8e-6`` (computed exactly over the
``2^32`` words), the variance is ``1 - 5e-6`` and the tails reach
``|z| <= 4.85`` (``P(|z| > 4.85) = 1.2e-6``). More bits for ``u`` reach further
but coarsen the normals near 0, where most of the mass is (20 bits: reach
5.40, ``sup |F - Φ| = 8e-5``). The noise enters bSAM as ``σ z`` with
``σ = 1 / sqrt(N s)``: a scale, so what matters is the distribution of ``z``,
not its resolution, and a ``5e-6`` distance from Φ is below what the update can
resolve (a KS test needs ``~10^11`` draws to see it). Two words per normal (24
bits each, reach 5.77) cost 1.2x the time of the draw. Float32 rounding of the
transform stays within 2e-6 of the exact transform of the same word.

Float64 leaves draw ``jax.random.normal`` under either setting; bfloat16 and
float16 leaves are drawn in float32 and rounded.
"""

import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

__all__ = ["hash_prng_impl", "normal_like"]

NOISE_CHOICES = ("auto", "jax")

_THREEFRY = jex_random.threefry_prng_impl
_UINT = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}


def _lowbias32(x: jax.Array) -> jax.Array:
  # C. Wellons, "Hash function prospector" (2018): lowbias32, a bijection of
  # uint32 with low avalanche bias.
  x = x ^ (x >> 16)
  x = x * np.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * np.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _counter(shape) -> jax.Array:
  # The row-major index of every entry, built in the output's own shape: a 1-D
  # iota reshaped afterwards fuses into a slower loop on XLA:CPU, and an iota in
  # the leaf's shape is what the SPMD partitioner splits across shards. A
  # uint32 counter is what limits a leaf to 2**32 entries.
  shape = tuple(shape)
  if math.prod(shape) >= 2**32:
    raise ValueError(f"the noise generator draws fewer than 2**32 values per key, asked for shape {shape}")
  if len(shape) <= 1:
    return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
    stride *= shape[axis]
  return index


def _key_words(key: jax.Array) -> jax.Array:
  """Two uint32 words carrying all of a key's data (typed key of any impl, or raw uint32 key data)."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  if key.dtype != jnp.uint32 or key.ndim != 1:
    raise TypeError(f"key must be a PRNG key or raw uint32 key data of shape (n,), got {key.dtype}{key.shape}")
  words = key if key.shape[0] % 2 == 0 else jnp.concatenate([key, jnp.zeros(1, jnp.uint32)])
  pair = words[:2]
  for start in range(2, words.shape[0], 2):  # rbg keys: 4 words
    pair = jex_random.threefry_2x32(pair, words[start : start + 2])
  return pair


def _seeds(pair: jax.Array, stream: int = 0) -> jax.Array:
  # The per-leaf derivation: one threefry2x32 block pair (4 words) per stream.
  return jex_random.threefry_2x32(pair, jnp.arange(4 * stream, 4 * stream + 4, dtype=jnp.uint32))


def _leaf_seeds(key: jax.Array, num_leaves: int) -> jax.Array:
  """``_seeds(_key_words(fold_in(key, j)))[:3]`` for the leaves ``j < num_leaves``, shape ``(num_leaves, 3)``.

  Vectorized over the leaves: on XLA:CPU each threefry call is a loop of its
  own, so leaf by leaf a 6-leaf model ran 13 per part (a threefry key);
  vectorized, 2.
  """
  if not _folds_in_alike_under_vmap(key):
    return jnp.stack([_seeds(_key_words(jax.random.fold_in(key, j)))[:3] for j in range(num_leaves)])
  leaf_keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(jnp.arange(num_leaves, dtype=jnp.uint32))
  return jax.vmap(lambda k: _seeds(_key_words(k))[:3])(leaf_keys)


def _folds_in_alike_under_vmap(key: jax.Array) -> bool:
  # jax.random.fold_in gives the same keys under vmap for these implementations; "unsafe_rbg" (and
  # implementations this module does not know) may not, so they fold in leaf by leaf.
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # raw key data: the default implementation's
  impl = jax.random.key_impl(key)
  return impl in ("threefry2x32", "rbg") or impl == hash_prng_impl


def _words(seeds: jax.Array, index: jax.Array) -> jax.Array:
  """The generator's 32-bit word at every ``index`` (uint32) for the seeds of one key."""
  x = _lowbias32(_lowbias32(index ^ seeds[0]) + seeds[1])
  return x + _lowbias32(x ^ seeds[2])


def _hash_random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
  if bit_width not in _UINT:
    raise TypeError(f"bit_width must be 8, 16, 32 or 64, got {bit_width}")
  counter = _counter(shape)
  words = _words(_seeds(key, 0), counter)
  if bit_width == 64:
    return (words.astype(jnp.uint64) << np.uint64(32)) | _words(_seeds(key, 1), counter).astype(jnp.uint64)
  if bit_width < 32:
    return (words >> np.uint32(32 - bit_width)).astype(_UINT[bit_width])
  return words


#: A JAX PRNG implementation on the library's generator, for every
#: ``jax.random`` function: ``jax.random.key(seed, impl=hash_prng_impl)``.
#: Threefry's key derivation (``seed``, ``split``, ``fold_in``), the words of
#: the module docstring for the bulk bits. :func:`normal_like` no longer needs
#: it (its default uses the generator with any key); it stays for code that
#: wants the fast bits in ``jax.random.uniform``, ``bernoulli`` and the like.
hash_prng_impl = jex_random.define_prng_impl(
  key_shape=_THREEFRY.key_shape,
  seed=_THREEFRY.seed,
  split=_THREEFRY.split,
  fold_in=_THREEFRY.fold_in,
  random_bits=_hash_random_bits,
  name="bsam_optax_hash32",
  tag="bsh",
)


# Polynomials for float32 Box-Muller (least squares on Chebyshev nodes, iterated
# towards minimax): log1p(x) = x q(x) on [sqrt(1/2) - 1, sqrt(2) - 1] (relative
# error 2.4e-7 in float32) and sin(pi v) = v p(v^2) on [-1/2, 1/2] (absolute
# error 3e-9). On this XLA:CPU, jnp.log costs ~2x the polynomial log and
# jnp.sin + jnp.cos ~10x the polynomial (benchmarks/results/cost.md).
_LOG1P = (
  0.9999999403953552, -0.5000036358833313, 0.3333505392074585, -0.2496989518404007,
  0.19900307059288025, -0.17251162230968475, 0.16221554577350616, -0.10104511678218842,
)  # fmt: skip
_SIN_PI = (3.141592502593994, -5.1677069664001465, 2.5500314235687256, -0.5980451703071594, 0.07722010463476181)
_SQRT_HALF_BITS = np.int32(0x3F3504F3)  # float32 sqrt(1/2)
_HALF_BITS = 16  # of each word: the high half for the radius, the low half for the angle


def _horner(coefficients, x: jax.Array) -> jax.Array:
  p = np.float32(coefficients[-1])
  for a in coefficients[-2::-1]:
    p = p * x + np.float32(a)
  return p


def _log(u: jax.Array) -> jax.Array:
  # log u = e log 2 + log1p(m - 1) for u = 2^e m, m in [sqrt(1/2), sqrt(2)); u
  # positive and normal.
  bits = jax.lax.bitcast_convert_type(u, jnp.int32) - _SQRT_HALF_BITS
  exponent = (bits >> 23).astype(jnp.float32)
  x = jax.lax.bitcast_convert_type((bits & np.int32(0x007FFFFF)) + _SQRT_HALF_BITS, jnp.float32) - 1.0
  return exponent * np.float32(math.log(2.0)) + x * _horner(_LOG1P, x)


def _unit(bits: jax.Array) -> jax.Array:
  # (k + 1/2) 2^-16 for the 16-bit integers k: the midpoints of 2^16 equal cells of (0, 1), exact in float32.
  return (bits.astype(jnp.int32).astype(jnp.float32) + 0.5) * np.float32(2.0**-_HALF_BITS)


def _box_muller(word: jax.Array) -> jax.Array:
  # z = r cos(2 pi v), r = sqrt(-2 log u): u from the word's high 16 bits, v
  # (shifted to [-1/2, 1/2)) from its low 16 bits; cos(2 pi v) = 1 - 2 sin^2(pi v).
  u = _unit(word >> np.uint32(_HALF_BITS))
  v = _unit(word & np.uint32(2**_HALF_BITS - 1)) - 0.5
  sin = v * _horner(_SIN_PI, v * v)
  return jnp.sqrt(np.float32(-2.0) * _log(u)) * (1.0 - 2.0 * sin * sin)


def _auto_normal(key: jax.Array, shape) -> jax.Array:
  return _normal_from_seeds(_seeds(_key_words(key)), shape)


def _normal_from_seeds(seeds: jax.Array, shape) -> jax.Array:
  return _box_muller(_words(seeds, _counter(shape)))


def _draw_dtype(leaf):
  # Low-precision leaves get float32 draws (rounded afterwards); float64 stays.
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _draw(key: jax.Array, shape, dtype, noise: str) -> jax.Array:
  if noise == "auto" and dtype == jnp.float32:
    return _auto_normal(key, shape)
  return jax.random.normal(key, shape, dtype)


def normal_like(key: jax.Array, tree, *, noise: str = "auto"):
  """Draws a standard normal for every entry of ``tree``, in its dtypes.

  Leaf ``j`` (in ``jax.tree.leaves`` order) is drawn from
  ``k = jax.random.fold_in(key, j)`` in the leaf's shape:

  * ``noise="auto"``: ``z_i = BoxMuller(w_i)`` with ``w_i`` the word of the
    library's generator for ``(k, i)`` (see the module docstring), ``i`` the
    row-major index, for any kind of key;
  * ``noise="jax"``: ``jax.random.normal(k, leaf.shape)``, bit for bit.

  Draws are float32 (float64 for float64 leaves, always by
  ``jax.random.normal``) and cast to the leaf's dtype.

  Args:
    key: a PRNG key of any implementation (``jax.random.key(seed)``,
      ``impl="rbg"``, :data:`hash_prng_impl`, ...) or raw ``uint32`` key data.
    tree: a pytree of floating-point arrays.
    noise: ``"auto"`` (the library's generator) or ``"jax"``
      (``jax.random.normal``'s stream for the key).

  Returns:
    A pytree like ``tree`` of independent N(0, 1) draws.

  Raises:
    ValueError: ``noise`` is not one of ``"auto"``, ``"jax"``; or a leaf has
      more than ``2**32`` entries under ``"auto"``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bsam_optax._noise import normal_like
    >>> z = normal_like(jax.random.key(0), {"w": jnp.zeros((2, 3))})
    >>> z["w"].shape, z["w"].dtype
    ((2, 3), dtype('float32'))
    >>> exact = normal_like(jax.random.key(0), {"w": jnp.zeros(3)}, noise="jax")["w"]
    >>> bool(jnp.all(exact == jax.random.normal(jax.random.fold_in(jax.random.key(0), 0), (3,))))
    True
  """
  if noise not in NOISE_CHOICES:
    raise ValueError(f"noise must be one of {NOISE_CHOICES}, got {noise!r}")
  leaves, treedef = jax.tree.flatten(tree)
  auto = [noise == "auto" and _draw_dtype(leaf) == jnp.float32 for leaf in leaves]
  seeds = _leaf_seeds(key, len(leaves)) if any(auto) else None
  out = [
    (
      _normal_from_seeds(seeds[j], jnp.shape(leaf))
      if seeds is not None and auto[j]
      else _draw(jax.random.fold_in(key, j), jnp.shape(leaf), _draw_dtype(leaf), noise)
    ).astype(jnp.result_type(leaf))
    for j, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, out)
