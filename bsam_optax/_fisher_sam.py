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
``eta``. ``εᵀ f ε = γ²`` exactly; η = 0 gives SAM.

What this was checked against. Ujváry et al.'s Eq. 2, the first-order worst
case ``ε* = ρ Σ g / sqrt(gᵀ Σ g)`` (which they attribute to Foret et al., Kwon et
al. and Kim et al.), with Fisher SAM's ``Σ = diag(F)⁻¹`` from their Table 1,
gives the ε above. Their Sec. 6 (Table 4) sets Fisher SAM's two
hyper-parameters to Kim et al.'s values, 0.1 and 1.0 (the Greek letters did not
survive the text extraction of the seed; the values match ``rho=0.1, eta=1``).
The text of Kim et al. was not available here, so no equation number of theirs
is cited; the diagonal ``f = 1 + η g²`` of the mini-batch gradient, with the
names γ (radius) and η, agrees with public re-implementations of Fisher SAM,
not with the authors' own code, which was not available either.

With η = 1 the Fisher term is small where gradients are: on MNIST-1D at
initialization (one part of 16 examples) the largest ``η g²`` is 0.15 (MLP) and
0.19 (CNN), the median 3e-5 and 7e-5, and ``sqrt(gᵀ f⁻¹ g) / ‖g‖`` is 0.99, so
ε is within a few percent of SAM's (``benchmarks/results/uncertainty_variational.md``).

References:
  Kim, Li, Hu & Hospedales, `Fisher SAM: Information Geometry and Sharpness
  Aware Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Eq. 2, Table 1, Sec. 6 and Table 4).
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _step
from bsam_optax._checks import check_nonnegative
from bsam_optax._checks import check_positive

Params = Any
Updates = Any

__all__ = ["fisher_sam_perturbed_params", "fisher_sam_rule", "fisher_sam_step"]


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
  # h = g / f is materialized (the barrier) and then reduced: with the division fused into the reduction's loop,
  # XLA:CPU took 2.5x as long for 8 vmapped parts of the MLP of benchmarks/cost.py (benchmarks/results/methods_cost.md).
  h = jax.lax.optimization_barrier(jax.tree.map(lambda g: g / (1.0 + eta * jnp.square(g)), jax.tree.map(_f32, grads)))
  norm = jnp.sqrt(sum(jnp.sum(a * _f32(b)) for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(grads), strict=True)))
  scale = rho / (norm + eps)
  return jax.tree.map(lambda w, h: (w + scale * h).astype(jnp.result_type(w)), params, h)


def fisher_sam_rule(*, rho, eta=1.0, eps: float = 1e-12) -> _step.PerturbationRule:
  """Fisher SAM as a :class:`~bsam_optax.PerturbationRule`: the second point ``ω + ρ (g / f) / sqrt(Σ g² / f)``.

  Args:
    rho: γ, the radius of ``εᵀ f ε ≤ γ²`` (``>= 0``).
    eta: η, the weight of g² in the diagonal Fisher ``f = 1 + η g²`` (``>= 0``).
    eps: added to the denominator.
  """
  check_nonnegative("rho", rho)
  check_nonnegative("eta", eta)
  check_positive("eps", eps)
  return _step.PerturbationRule(
    second_point=lambda params, opt_state, grads: fisher_sam_perturbed_params(params, grads, rho=rho, eta=eta, eps=eps)
  )


def fisher_sam_step(loss_fn, tx: optax.GradientTransformation, *, rho, eta=1.0, eps: float = 1e-12, **options):
  """The compiled Fisher SAM step (Kim et al.) with any optax outer optimizer.

  For each of the ``m`` parts of the batch (and of every device)::

    g_i   = ∇ loss_fn(ω, part_i)
    f_i   = 1 + η g_i²                        # elementwise: the diagonal Fisher
    ε_i   = ρ (g_i / f_i) / sqrt(Σ g_i² / f_i)
    g_ε,i = ∇ loss_fn(ω + ε_i, part_i)

  then ``tx.update(mean_i g_ε,i, opt_state, ω)``, like :func:`~bsam_optax.sam_step`
  (η = 0 is SAM). It is :func:`~bsam_optax.make_perturbation_step` with
  :func:`fisher_sam_rule`.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: any optax transformation, applied to the averaged perturbed gradient.
    rho: γ, the radius (``>= 0``); Kim et al. and Ujváry et al. (Table 4) use 0.1.
    eta: η (``>= 0``); they use 1.
    eps: added to the denominator.
    **options: the fields of :class:`~bsam_optax.StepOptions` (``m``,
      ``axis_name``, ``mesh``, ``has_aux``, ``aux_from``, ``aux_reduce``,
      ``thread_aux``, ``split``, ``donate``).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)`` as for :func:`~bsam_optax.sam_step`; ``key`` is unused.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.sgd(1e-2, momentum=0.9)
    >>> step = bo.fisher_sam_step(loss_fn, tx, rho=0.1, eta=1.0, m=2)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Kim, Li, Hu & Hospedales, `Fisher SAM: Information Geometry and Sharpness
    Aware Minimisation <https://arxiv.org/abs/2206.04920>`_, ICML 2022.
  """
  return _step.make_perturbation_step(loss_fn, tx, fisher_sam_rule(rho=rho, eta=eta, eps=eps), **options)
