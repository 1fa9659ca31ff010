"""VariationalSAM (Ujváry et al., Alg. 3): SAM's worst case inside a learned ellipsoid.

VSAM learns a diagonal Gaussian ``N(μ, Σ)``, ``Σ = diag(σ²)``, by minimizing
the seed's Eq. 55, in which the expected loss of MFVI's negative ELBO is
replaced by the worst case over the ellipsoid ``εᵀ Σ⁻¹ ε ≤ ρ²``::

  L(μ, Σ) = max_{εᵀ Σ⁻¹ ε ≤ ρ²} ℓ(μ + ε) + KL(N(μ, Σ) ‖ N(0, 1 / (N δ))) / N

To first order (the seed's Eq. 2 and 56) the maximizer and the loss are::

  ε* = ρ Σ g / sqrt(gᵀ Σ g),   L ≈ ℓ(μ) + ρ sqrt(gᵀ Σ g) + KL / N,   g = ∇ℓ(μ)

One step, with λ = log σ and elementwise operations (Alg. 3; the gradient of
Eq. 56 with respect to λ is ``ρ Σ g² / sqrt(gᵀ Σ g) = g ⊙ ε*``)::

  g   = ∇ℓ(μ)                                       # first gradient
  ε   = ρ Σ g / sqrt(gᵀ Σ g)                        # vsam_perturbed_params: μ + ε
  g_ε = ∇ℓ(μ + ε)                                   # second gradient
  μ ← μ − α Adam(g_ε + δ μ)                         # Alg. 3, step 5 (Eq. 4)
  λ ← λ − α_σ Adam(g ⊙ ε + δ σ² − 1 / N)            # Alg. 3, steps 6-7 (Eq. 56)

with N = ``n_data``, δ = ``weight_decay`` (prior ``N(0, σ0² I)``, σ0² = 1 / (N δ))
and ρ = ``rho``. μ and Σ are updated in turn (μ first); Σ's gradient needs no
third gradient because, to first order, it does not depend on μ's step. As
in :func:`bsam_optax.mfvi`, we take Adam steps on μ and λ = log σ where the
seed takes plain gradient steps on μ and Σ (λ keeps σ positive).

The radius: the seed sets ``ρ² = P`` (the number of parameters), where
samples of ``N(μ, Σ)`` concentrate (its Sec. 4.1), and initializes
``Σ = (ρ_SAM² / P) I`` so that VSAM's first ε is SAM's with radius ρ_SAM
(Sec. 6, ρ_SAM = 0.05); these are the defaults here (``rho=None``,
``init_std=None``).

Σ growth. The seed reports (Sec. 6) that Σ grows during training until the
Taylor approximation fails; it does here too (``benchmarks/results/vsam_sigma.md``).
ε is a single direction, so the data term's λ-gradient ``g ⊙ ε`` is of order
``σ ‖g‖ / sqrt(P)`` per coordinate, far below the KL's ``1 / N``: σ grows to
the prior's σ0 = 1 / sqrt(N δ), ‖ε‖ with it, and the loss at μ rises. Taking
Σ's gradient at the perturbed point (``g_ε ⊙ ε``, which keeps a curvature
term) did not stop it (measured, not kept). ``max_std`` bounds σ; with the
bound σ sits at it everywhere, and VSAM becomes SAM with radius
``ρ max_std`` in the Euclidean norm.

References:
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Alg. 3, App. C, Eq. 50-56).
"""

import math
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _mfvi

Params = Any
Updates = Any
ScalarOrSchedule = optax.ScalarOrSchedule

__all__ = ["VSAMState", "vsam", "vsam_perturbation", "vsam_perturbed_params"]

# The seed's SAM radius, from which its Σ is initialized (Sec. 6): Σ = (0.05² / P) I.
_SAM_RHO = 0.05


class VSAMState(NamedTuple):
  """State of :func:`vsam`: Adam moments of μ and of λ = log σ, λ itself, and ρ."""

  count: jax.Array  # shape (), int32: number of updates so far
  mean_m: Updates  # Adam's first moment of the mean's gradient
  mean_v: Updates  # Adam's second moment of the mean's gradient
  log_std: Updates  # λ = log σ; Σ = diag(exp(2 λ))
  log_std_m: Updates  # Adam's first moment of λ's gradient
  log_std_v: Updates  # Adam's second moment of λ's gradient
  rho: jax.Array  # shape (), ρ for the next step: the radius of εᵀ Σ⁻¹ ε ≤ ρ²

  def posterior_std(self):
    """σ = exp(λ), the posterior standard deviation (``optax.MaskedNode`` where masked)."""
    return jax.tree.map(jnp.exp, self.log_std)


def _num_params(params) -> int:
  return sum(math.prod(jnp.shape(w)) for w in jax.tree.leaves(params))


def vsam(
  learning_rate: ScalarOrSchedule,
  n_data: float,
  *,
  rho: ScalarOrSchedule | None = None,
  weight_decay: float = 1e-4,
  init_std: float | None = None,
  std_learning_rate: ScalarOrSchedule | None = None,
  max_std: float | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""VariationalSAM: Adam steps on μ (at the worst case in Σ's ellipsoid) and on λ = log σ.

  ``update(perturbed_grads, state, params, log_std_grads=...)`` takes the
  gradient ``g_ε`` at ``μ + ε`` (from :func:`vsam_perturbed_params`) as
  ``updates`` and λ's data gradient ``g ⊙ ε`` (Eq. 56; :func:`vsam_perturbation`
  gives ε) as ``log_std_grads``; it returns ``-α Adam(g_ε + δ μ)`` and moves
  λ along ``-α_σ Adam(log_std_grads + δ σ² − 1 / N)``.

  Args:
    learning_rate: α, for the mean; a float or a schedule.
    n_data: N, the number of training examples.
    rho: ρ, the radius of the ellipsoid ``εᵀ Σ⁻¹ ε ≤ ρ²``; a float, a
      schedule, or ``None`` for ``sqrt(P)`` with P the number of (unmasked)
      parameters, the seed's choice.
    weight_decay: δ > 0, the prior precision per example (prior ``N(0, 1 / (N δ))``).
    init_std: the initial σ; ``None`` for ``0.05 / sqrt(P)``, the seed's
      (the first ε is then SAM's with radius 0.05 when ``rho=None``).
    std_learning_rate: α_σ, for λ; ``None`` uses ``learning_rate``.
    max_std: if given, σ is clipped to at most this after every update (a
      bound on Σ against its growth; see the module docstring).
    b1: Adam's decay of the first moments.
    b2: Adam's decay of the second moments.
    eps: Adam's ε.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state :class:`VSAMState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> params = {"w": jnp.ones(3)}
    >>> tx = bo.vsam(1e-2, n_data=100)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> g = jax.grad(loss)(params)
    >>> eps = bo.vsam_perturbation(params, state, g)
    >>> g_eps = jax.grad(loss)(jax.tree.map(jnp.add, params, eps))
    >>> log_std_grads = jax.tree.map(jnp.multiply, g, eps)
    >>> updates, state = tx.update(g_eps, state, params, log_std_grads=log_std_grads)
    >>> params = optax.apply_updates(params, updates)

  References:
    Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
    Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Alg. 3, Eq. 55-56).
  """
  _check = _mfvi._check_number
  _check("learning_rate", learning_rate, nonnegative=True, schedule=True)
  _check("n_data", n_data, positive=True)
  if rho is not None:
    _check("rho", rho, nonnegative=True, schedule=True)
  _check("weight_decay", weight_decay, positive=True)
  if init_std is not None:
    _check("init_std", init_std, positive=True)
  if std_learning_rate is not None:
    _check("std_learning_rate", std_learning_rate, nonnegative=True, schedule=True)
  if max_std is not None:
    _check("max_std", max_std, positive=True)
  _check("b1", b1, unit=True)
  _check("b2", b2, unit=True)
  _check("eps", eps, nonnegative=True)

  def rho_at(count, num_params):
    value = math.sqrt(num_params) if rho is None else _mfvi._value_at(rho, count)
    return jnp.asarray(value, jnp.float32)

  def init_fn(params):
    _mfvi._check_params(params, "vsam")
    num_params = _num_params(params)
    std = _SAM_RHO / math.sqrt(max(num_params, 1)) if init_std is None else init_std
    if max_std is not None:
      std = jnp.minimum(std, max_std)  # hyper-parameters may be traced arrays (vmapped grids)
    zeros, log_std = _mfvi._init_gaussian(params, std)
    count = jnp.zeros([], jnp.int32)
    return VSAMState(count, zeros, zeros, log_std, zeros, zeros, rho_at(count, num_params))

  def update_fn(updates, state, params=None, *, log_std_grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("vsam needs params (the mean μ) in update(..., params)")
    if log_std_grads is None:
      raise ValueError(
        "vsam's update needs log_std_grads=, the gradient g at μ times the perturbation ε = vsam_perturbation(...) "
        "(Eq. 56); call tx.update(perturbed_grads, state, params, log_std_grads=g * eps) or use vsam_step"
      )
    new_updates, count, mean_m, mean_v, log_std, log_std_m, log_std_v = _mfvi._gaussian_adam_update(
      state,
      updates,
      log_std_grads,
      params,
      learning_rate=learning_rate,
      std_learning_rate=std_learning_rate,
      n_data=n_data,
      weight_decay=weight_decay,
      b1=b1,
      b2=b2,
      eps=eps,
      max_std=max_std,
    )
    new_rho = rho_at(count, _num_params(params)).astype(state.rho.dtype)
    return new_updates, VSAMState(count, mean_m, mean_v, log_std, log_std_m, log_std_v, new_rho)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_vsam_state(opt_state) -> VSAMState:
  return _mfvi.find_state(opt_state, VSAMState, "vsam")


def vsam_perturbation(params: Params, opt_state, grads: Updates, *, eps: float = 1e-12) -> Updates:
  """Returns ε = ρ Σ g / sqrt(gᵀ Σ g), the first-order worst case in ``εᵀ Σ⁻¹ ε ≤ ρ²`` (seed Eq. 2).

  Args:
    params: μ (for the structure and dtypes of the result).
    opt_state: the state of a transformation containing one :func:`vsam`.
    grads: g, the gradient at μ (of one part, under m-sharpness).
    eps: added to ``sqrt(gᵀ Σ g)`` so that a zero gradient gives ε = 0.

  Returns:
    ε, like ``params`` (0 where ``optax.masked`` masked vsam out).
  """
  state = find_vsam_state(opt_state)
  var = _mfvi._map_unmasked(lambda ls, g: jnp.exp(2 * ls), state.log_std, jax.tree.map(jnp.zeros_like, grads))
  g32 = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads)
  norm = jnp.sqrt(
    sum(jnp.sum(v * jnp.square(g)) for v, g in zip(jax.tree.leaves(var), jax.tree.leaves(g32), strict=True))
  )
  scale = state.rho / (norm + eps)
  return jax.tree.map(lambda v, g, w: (scale * v * g).astype(jnp.result_type(w)), var, g32, params)


def vsam_perturbed_params(params: Params, opt_state, grads: Updates, *, eps: float = 1e-12) -> Params:
  """Returns μ + ε with VSAM's ε = ρ Σ g / sqrt(gᵀ Σ g) (:func:`vsam_perturbation`)."""
  return jax.tree.map(
    lambda w, e: (w + e).astype(jnp.result_type(w)), params, vsam_perturbation(params, opt_state, grads, eps=eps)
  )
