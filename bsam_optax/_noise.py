"""Standard-normal noise shaped like a parameter pytree, and a fast generator for it.

bSAM draws ``P`` normals per step and m-sharpness part (``P`` = number of
parameters): at ``m = 8`` that is ``8 P`` normals, on a CPU more work than
the rest of a small model's step. Three choices keep it cheap (numbers: MLP
784-500-300-10, 2-core CPU, ``benchmarks/results/cost.md``):

* **Per-leaf draws.** Leaf ``j`` of the tree gets a draw from
  ``fold_in(key, j)`` in the leaf's own shape, so that XLA fuses it into its
  consumer (``θ = ω + z / sqrt(N s)``): one pass over each leaf, no noise
  buffer. An earlier version drew one flat vector of ``P`` normals and sliced
  it into the leaves; the slices and reshapes cost copies, and the bSAM step
  was 1.1-1.2x (m = 1) and 1.3-1.7x (m = 8) slower with it.

* **The generator is the key's.** ``jax.random.key(seed)`` (threefry, JAX's
  reproducible default) stays the default: ~6.5-10 ns per normal on this CPU
  (~5 ns with ``jax.config.update("jax_threefry_partitionable", False)``, a
  global JAX setting that changes the stream); JAX's ``"rbg"`` and
  ``"unsafe_rbg"`` keys are ~3x *slower* there. :data:`hash_prng_impl` is a
  counter-based hash generator, opt-in by the key, ~1-2 ns per normal::

    key = jax.random.key(seed, impl=bsam_optax.hash_prng_impl)

  It derives keys (``split``, ``fold_in``, ``seed``) exactly as threefry
  does, so one seed gives the same key tree under both; only the bulk bits
  differ. For a key ``k`` and a draw of ``n`` values, the ``i``-th 32-bit
  word is::

    (s0, s1) = threefry2x32(k, (0, 1))    # one small threefry per draw
    bits_i   = h(h(i ^ s0) + s1)         # h: lowbias32, a bijective 32-bit mixer

  ``h`` is Wellons' *lowbias32* (xorshift-multiply, 32-bit arithmetic, no
  table), so the words vectorize on any backend (0.5-0.7 ns each here). The two
  keyed rounds matter: with one (``h(i ^ s0)``), two keys whose ``s0``
  differ only in low bits would draw permutations of each other's noise. It works with every
  ``jax.random`` function and passes the statistical tests in
  ``tests/test_noise.py`` (moments, chi-square, tails, per-bit frequencies,
  correlations across neighbours, one-bit counter flips, parts, steps,
  leaves and related keys), but it is not a cryptographic or a
  TestU01-crushed generator, which is why threefry stays the default. A draw
  holds at most ``2**32`` values per key.

* **Box-Muller normals for hash keys.** For float32 leaves and hash keys,
  :func:`normal_like` draws every entry's normal from a 64-bit word (the
  generator's streams 0 and 1: ``u`` and ``v``, 24 bits each) as
  ``sqrt(-2 log u) cos(2 pi v)``, with ``u`` in ``[2^-24, 1]`` (so
  ``|z| <= 5.77``), a polynomial ``log`` (bit-exact exponent, degree-8
  mantissa polynomial) and a polynomial ``cos`` (via ``sin(pi v)``). This is
  exact Box-Muller up to float32 rounding (within 2e-6 relative of the exact
  transform of the same words), and 0.68x the time of the inverse CDF it
  replaced (Giles' erfinv: XLA's ``log`` and nine ``where``-selected
  coefficients per entry). The pair's second normal, ``r sin(2 pi v)``, is
  not used: XLA fuses the draw into its consumer, which computes every
  entry on its own, so a normal shared by two entries computes ``r`` twice
  anyway (measured: no faster, and it needs a concatenation). Draws under
  threefry and other keys are ``jax.random.normal``'s, bit for bit, and
  ``jax.random.normal`` with a hash key keeps JAX's own transform.
"""

import math

import jax
import jax.extend.random as jex_random
import jax.numpy as jnp
import numpy as np

__all__ = ["hash_prng_impl", "normal_like"]

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
  # iota reshaped afterwards fuses into a slower loop on XLA:CPU. A uint32
  # counter is what limits a draw to 2**32 values.
  if math.prod(shape) >= 2**32:
    raise ValueError(f"hash_prng_impl draws at most 2**32 values per key, asked for shape {shape}")
  if len(shape) <= 1:
    return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return index


def _hash_words(key: jax.Array, counter: jax.Array, stream: int) -> jax.Array:
  seeds = jex_random.threefry_2x32(key, jnp.array([2 * stream, 2 * stream + 1], jnp.uint32))
  return _lowbias32(_lowbias32(counter ^ seeds[0]) + seeds[1])


def _hash_random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
  shape = tuple(shape)
  if bit_width not in _UINT:
    raise TypeError(f"bit_width must be 8, 16, 32 or 64, got {bit_width}")
  counter = _counter(shape)
  words = _hash_words(key, counter, 0)
  if bit_width == 64:
    high = words.astype(jnp.uint64) << np.uint64(32)
    return high | _hash_words(key, counter, 1).astype(jnp.uint64)
  if bit_width < 32:
    return (words >> np.uint32(32 - bit_width)).astype(_UINT[bit_width])
  return words


#: A fast counter-based PRNG for JAX keys, opt-in:
#: ``jax.random.key(seed, impl=hash_prng_impl)``. Threefry's key derivation
#: (``seed``, ``split``, ``fold_in``) with a cheap hash for the bulk bits (see
#: the module docstring); works with every ``jax.random`` function, under
#: ``jit``, ``vmap``, ``pmap`` and ``shard_map``.
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


def _box_muller(first: jax.Array, second: jax.Array) -> jax.Array:
  # An exact N(0, 1) from two 32-bit words (24 bits each): r cos(2 pi v) with
  # r = sqrt(-2 log u), u = 1 - k 2^-24 in [2^-24, 1] (so |z| <= 5.77), and
  # v in [-1/2, 1/2); cos(2 pi v) = 1 - 2 sin^2(pi v).
  u = 1.0 - (first >> np.uint32(8)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-24)
  v = (second >> np.uint32(8)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-24) - 0.5
  sin = v * _horner(_SIN_PI, v * v)
  return jnp.sqrt(np.float32(-2.0) * _log(u)) * (1.0 - 2.0 * sin * sin)


def _hash_normal(key: jax.Array, shape) -> jax.Array:
  # Box-Muller's r cos(2 pi v) on the two words of every entry's 64-bit draw
  # (streams 0 and 1, as jax.random.bits(key, shape, jnp.uint64)), one normal
  # per entry: the pair's other normal, r sin(2 pi v), would sit at another
  # entry, and XLA's fused loops compute every output entry on its own, so
  # sharing r across two entries would compute it twice anyway.
  counter = _counter(tuple(shape))
  return _box_muller(_hash_words(key, counter, 0), _hash_words(key, counter, 1))


def _draw_dtype(leaf):
  # Low-precision leaves get float32 draws (rounded afterwards); float64 stays.
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _draw(key: jax.Array, shape, dtype) -> jax.Array:
  if dtype == jnp.float32 and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if jax.random.key_impl(key) == hash_prng_impl:
      return _hash_normal(jax.random.key_data(key), shape)
  return jax.random.normal(key, shape, dtype)


def normal_like(key: jax.Array, tree, *, noise: str = "auto"):
  """Draws a standard normal for every entry of ``tree``, in its dtypes.

  Leaf ``j`` (in ``jax.tree.leaves`` order) is
  ``jax.random.normal(jax.random.fold_in(key, j), leaf.shape)``, drawn in
  float32 (float64 for float64 leaves) and cast to the leaf's dtype. The
  generator is the one of ``key``'s implementation: threefry by default,
  :data:`hash_prng_impl` for speed.

  Args:
    key: a PRNG key.
    tree: a pytree of floating-point arrays.
    noise: ``"auto"`` (the library's choice of generator) or ``"jax"``
      (``jax.random.normal``'s exact stream for ``key``).

  Returns:
    A pytree like ``tree`` of independent N(0, 1) draws.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bsam_optax._noise import hash_prng_impl, normal_like
    >>> z = normal_like(jax.random.key(0, impl=hash_prng_impl), {"w": jnp.zeros((2, 3))})
    >>> z["w"].shape
    (2, 3)
  """
  if noise not in ("auto", "jax"):
    raise ValueError(f"noise must be 'auto' or 'jax', got {noise!r}")
  leaves, treedef = jax.tree.flatten(tree)
  if noise == "jax":
    return jax.tree.unflatten(
      treedef,
      [
        jax.random.normal(jax.random.fold_in(key, j), jnp.shape(x), _draw_dtype(x)).astype(jnp.result_type(x))
        for j, x in enumerate(leaves)
      ],
    )
  out = [
    _draw(jax.random.fold_in(key, j), jnp.shape(leaf), _draw_dtype(leaf)).astype(jnp.result_type(leaf))
    for j, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, out)
