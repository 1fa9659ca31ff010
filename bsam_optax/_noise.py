"""Standard-normal noise shaped like a parameter pytree.

bSAM draws ``P`` normals per step and part (``P`` = number of parameters). We
draw them as **one** flat vector and slice it into the leaves, rather than one
``jax.random.normal`` call per leaf (the authors' approach): one generator
launch instead of one per leaf, and no per-leaf key splitting.

The generator is the one of the key's implementation, so a user picks it with
the key: ``jax.random.key(seed)`` (threefry, the reproducible default) or
``jax.random.key(seed, impl="rbg")`` / ``"unsafe_rbg"``.
"""

import math

import jax
import jax.numpy as jnp


def _draw_dtype(leaves):
  if any(jnp.result_type(x) == jnp.float64 for x in leaves):
    return jnp.float64
  return jnp.float32


def normal_like(key: jax.Array, tree):
  """Draws a standard normal for every entry of ``tree``, in its dtypes.

  Args:
    key: a PRNG key.
    tree: a pytree of floating-point arrays.

  Returns:
    A pytree like ``tree`` of independent N(0, 1) draws.
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [math.prod(jnp.shape(x)) for x in leaves]
  flat = jax.random.normal(key, (sum(sizes),), _draw_dtype(leaves))
  out, start = [], 0
  for leaf, size in zip(leaves, sizes, strict=False):
    out.append(flat[start : start + size].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
    start += size
  return jax.tree.unflatten(treedef, out)
