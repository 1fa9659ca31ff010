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
  reproducible default) stays the default: ~10 ns per normal on this CPU
  (~5 ns with ``jax.config.update("jax_threefry_partitionable", False)``, a
  global JAX setting that changes the stream); JAX's ``"rbg"`` and
  ``"unsafe_rbg"`` keys are ~3x *slower* there. :data:`hash_prng_impl` is a
  counter-based hash generator, opt-in by the key, ~3 ns per normal::

    key = jax.random.key(seed, impl=bsam_optax.hash_prng_impl)

  It derives keys (``split``, ``fold_in``, ``seed``) exactly as threefry
  does, so one seed gives the same key tree under both; only the bulk bits
  differ. For a key ``k`` and a draw of ``n`` values, the ``i``-th 32-bit
  word is::

    (s0, s1) = threefry2x32(k, (0, 1))    # one small threefry per draw
    bits_i   = h(h(i ^ s0) + s1)         # h: lowbias32, a bijective 32-bit mixer

  ``h`` is Wellons' *lowbias32* (xorshift-multiply, 32-bit arithmetic, no
  table), so the words vectorize on any backend (0.7 ns each here). The two
  keyed rounds matter: with one (``h(i ^ s0)``), two keys whose ``s0``
  differ only in low bits would draw permutations of each other's noise. It works with every
  ``jax.random`` function and passes the statistical tests in
  ``tests/test_noise.py`` (moments, chi-square, tails, per-bit frequencies,
  correlations across neighbours, one-bit counter flips, parts, steps,
  leaves and related keys), but it is not a cryptographic or a
  TestU01-crushed generator, which is why threefry stays the default. A draw
  holds at most ``2**32`` values per key.

* **A cheaper inverse CDF for hash keys.** For float32 leaves and hash keys,
  :func:`normal_like` maps the bits to a uniform exactly as
  ``jax.random.normal`` does and then applies Giles' erfinv with
  ``log((1 - x)(1 + x))`` instead of XLA's ``log1p(-x²)``: 24% cheaper on
  XLA:CPU, and the normals are within 9e-7 of the exact inverse CDF of
  their uniforms (XLA's: 2e-5). Draws under threefry and other keys are
  ``jax.random.normal``'s, bit for bit.
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
  # iota reshaped afterwards fuses into a slower loop on XLA:CPU.
  if len(shape) <= 1:
    return jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride)
    stride *= shape[axis]
  return index


def _hash_words(key: jax.Array, shape, stream: int) -> jax.Array:
  seeds = jex_random.threefry_2x32(key, jnp.array([2 * stream, 2 * stream + 1], jnp.uint32))
  return _lowbias32(_lowbias32(_counter(shape) ^ seeds[0]) + seeds[1])


def _hash_random_bits(key: jax.Array, bit_width: int, shape) -> jax.Array:
  shape = tuple(shape)
  if bit_width not in _UINT:
    raise TypeError(f"bit_width must be 8, 16, 32 or 64, got {bit_width}")
  if math.prod(shape) >= 2**32:
    raise ValueError(f"hash_prng_impl draws at most 2**32 values per key, asked for shape {shape}")
  words = _hash_words(key, shape, 0)
  if bit_width == 64:
    high = words.astype(jnp.uint64) << np.uint64(32)
    return high | _hash_words(key, shape, 1).astype(jnp.uint64)
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


# M. Giles, "Approximating the erfinv function" (GPU Computing Gems, 2010),
# single precision: erfinv(x) = x p(w), w = -log(1 - x²), one polynomial for
# w < 5 (in w - 2.5) and one for the tails (in sqrt(w) - 3).
_ERFINV_CENTRAL = (
  2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
  -0.00125372503, -0.00417768164, 0.246640727, 1.50140941,
)  # fmt: skip
_ERFINV_TAIL = (
  -0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
  -0.0076224613, 0.00943887047, 1.00167406, 2.83297682,
)  # fmt: skip


def _erfinv(x: jax.Array) -> jax.Array:
  # Giles' approximation as XLA's erf_inv, but with log((1 - x)(1 + x)) for
  # log1p(-x²): 24% cheaper on XLA:CPU, and closer to the exact erfinv on the
  # inputs below (max abs error 6e-7 vs 1.5e-5), which never reach ±1.
  w = -jnp.log((1.0 - x) * (1.0 + x))
  central = w < 5.0
  w = jnp.where(central, w - 2.5, jnp.sqrt(w) - 3.0)
  p = jnp.where(central, np.float32(_ERFINV_CENTRAL[0]), np.float32(_ERFINV_TAIL[0]))
  for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:], strict=True):
    p = jnp.where(central, np.float32(a), np.float32(b)) + p * w
  return p * x


def _hash_normal(key: jax.Array, shape) -> jax.Array:
  # jax.random.normal's inverse-CDF transform (the same uniform in [-1 + 2^-24, 1)),
  # with the cheaper erfinv above.
  bits = jax.random.bits(key, shape, jnp.uint32)
  unit = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  u = jnp.maximum(low, unit * (1.0 - low) + low)
  return np.float32(np.sqrt(2.0)) * _erfinv(u)


def _draw_dtype(leaf):
  # Low-precision leaves get float32 draws (rounded afterwards); float64 stays.
  return jnp.promote_types(jnp.result_type(leaf), jnp.float32)


def _draw(key: jax.Array, shape, dtype) -> jax.Array:
  if dtype == jnp.float32 and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    if jax.random.key_impl(key) == hash_prng_impl:
      return _hash_normal(key, shape)
  return jax.random.normal(key, shape, dtype)


def normal_like(key: jax.Array, tree):
  """Draws a standard normal for every entry of ``tree``, in its dtypes.

  Leaf ``j`` (in ``jax.tree.leaves`` order) is
  ``jax.random.normal(jax.random.fold_in(key, j), leaf.shape)``, drawn in
  float32 (float64 for float64 leaves) and cast to the leaf's dtype. The
  generator is the one of ``key``'s implementation: threefry by default,
  :data:`hash_prng_impl` for speed.

  Args:
    key: a PRNG key.
    tree: a pytree of floating-point arrays.

  Returns:
    A pytree like ``tree`` of independent N(0, 1) draws.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bsam_optax._noise import hash_prng_impl, normal_like
    >>> z = normal_like(jax.random.key(0, impl=hash_prng_impl), {"w": jnp.zeros((2, 3))})
    >>> z["w"].shape
    (2, 3)
  """
  leaves, treedef = jax.tree.flatten(tree)
  out = [
    _draw(jax.random.fold_in(key, j), jnp.shape(leaf), _draw_dtype(leaf)).astype(jnp.result_type(leaf))
    for j, leaf in enumerate(leaves)
  ]
  return jax.tree.unflatten(treedef, out)
