"""Fisher SAM (Kim et al., ICML 2022): SAM's worst case in the Fisher ellipsoid.

Fisher SAM replaces SAM's Euclidean ball by the ellipsoid of the Fisher
information, ``εᵀ F(ω) ε ≤ γ²`` (to second order, the KL divergence between the
models at ω and ω + ε), and takes its first-order worst case::

  ε* = γ F⁻¹ g / sqrt(gᵀ F⁻¹ g)

with F approximated by a diagonal built from the mini-batch gradient,
``f = 1 + η g²`` (elementwise), so that::

  g   = ∇ℓ(ω)                                      # first gradient
  f   = 1 + η g²                                   # diagonal Fisher
  ε   = γ (g / f) / sqrt(Σ g² / f)                 # fisher_sam_perturbed_params
  g_ε = ∇ℓ(ω + ε)                                  # second gradient → any optax tx

``γ`` is ``rho`` here (the radius, as in :func:`bsam_optax.sam_step`) and η is
``eta``. ``εᵀ f ε = γ²`` exactly; η = 0 gives SAM. In Ujváry et al.'s Table 1
Fisher SAM is the worst case with ``Σ = diag(F)⁻¹``; their Table 4 uses
γ = 0.1, η = 1 (from Kim et al.).

References:
  Kim, Li, Hu & Hospedales, `Fisher SAM: Information Geometry and Sharpness
  Aware Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022 (Sec. 3).
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Table 1, Table 4).
"""

from typing import Any

import jax
import jax.numpy as jnp

Params = Any
Updates = Any

__all__ = ["fisher_sam_perturbed_params"]


def _f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def fisher_sam_perturbed_params(params: Params, grads: Updates, *, rho, eta, eps: float = 1e-12) -> Params:
  """Returns ω + ε with Fisher SAM's ε = ρ (g / f) / sqrt(Σ g² / f), f = 1 + η g².

  Args:
    params: ω.
    grads: g, the gradient at ω (of one m-sharpness part).
    rho: γ, the radius: ``εᵀ f ε = γ²``.
    eta: η ≥ 0, the weight of the squared gradient in the diagonal Fisher f.
    eps: added to the denominator so that a zero gradient gives ε = 0.

  Returns:
    ω + ε, with the structure and dtypes of ``params``.
  """
  g32 = jax.tree.map(_f32, grads)
  inv_f = jax.tree.map(lambda g: 1.0 / (1.0 + eta * jnp.square(g)), g32)
  norm = jnp.sqrt(
    sum(jnp.sum(i * jnp.square(g)) for i, g in zip(jax.tree.leaves(inv_f), jax.tree.leaves(g32), strict=True))
  )
  scale = rho / (norm + eps)
  return jax.tree.map(lambda w, i, g: (w + scale * i * g).astype(jnp.result_type(w)), params, inv_f, g32)
