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
and ρ = ``rho``. :func:`scale_by_vsam` is the rule, :func:`vsam` chains it with
the learning rate; :func:`vsam_rule` and :func:`vsam_step` are the method on
the step machinery (``m`` parts, each with its own ε, and devices). μ and Σ
are updated in turn (μ first); Σ's gradient needs no third gradient because,
to first order, it does not depend on μ's step. As in :func:`bsam_optax.mfvi`, we take
Adam steps on μ and λ = log σ where the seed takes plain gradient steps on μ and Σ (λ keeps σ positive).

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
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _mfvi
from bsam_optax import _posterior
from bsam_optax import _step
from bsam_optax._checks import check_nonnegative
from bsam_optax._checks import check_positive

Params = Any
Updates = Any
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule

__all__ = [
  "VSAMState",
  "scale_by_vsam",
  "vsam",
  "vsam_perturbation",
  "vsam_perturbed_params",
  "vsam_rule",
  "vsam_step",
]

# The seed's SAM radius, from which its Σ is initialized (Sec. 6): Σ = (0.05² / P) I.
_SAM_RHO = 0.05


class VSAMState(NamedTuple):
  """State of :func:`scale_by_vsam`: Adam moments of μ and of λ = log σ, λ itself, and ρ."""

  count: jax.Array  # type: ignore[assignment]  # shape (), int32: number of updates so far
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


def scale_by_vsam(
  n_data: float,
  *,
  std_learning_rate: ScalarOrSchedule,
  rho: ScalarOrSchedule | None = None,
  weight_decay: float = 1e-4,
  init_std: float | None = None,
  max_std: float | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""VSAM's rule: the Adam direction of ``g_ε + δ μ``; λ = log σ steps in the state.

  ``update(perturbed_grads, state, params, log_std_grads=g ⊙ ε)``; chain it
  with ``optax.scale_by_learning_rate`` (as :func:`vsam` does). Args as for
  :func:`vsam`; ``std_learning_rate`` is required.
  """
  if rho is not None:
    check_nonnegative("rho", rho, schedule=True)
  if max_std is not None:
    check_positive("max_std", max_std)
  _mfvi._check_gaussian(n_data, weight_decay, init_std, std_learning_rate, b1, b2, eps)

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
    direction, count, mean_m, mean_v, log_std, log_std_m, log_std_v = _mfvi._gaussian_adam_update(
      state,
      updates,
      log_std_grads,
      params,
      std_learning_rate=std_learning_rate,
      n_data=n_data,
      weight_decay=weight_decay,
      b1=b1,
      b2=b2,
      eps=eps,
    )
    if max_std is not None:
      log_std = jax.tree.map(lambda ls: jnp.minimum(ls, jnp.log(max_std)), log_std)
    new_rho = rho_at(count, _num_params(params)).astype(state.rho.dtype)
    return direction, VSAMState(count, mean_m, mean_v, log_std, log_std_m, log_std_v, new_rho)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
  λ along ``-α_σ Adam(log_std_grads + δ σ² − 1 / N)``. It is
  :func:`scale_by_vsam` chained with ``optax.scale_by_learning_rate``.

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
    An :class:`optax.GradientTransformationExtraArgs`; its state holds a :class:`VSAMState`.

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
  check_nonnegative("learning_rate", learning_rate, schedule=True)
  return optax.chain(
    scale_by_vsam(
      n_data,
      std_learning_rate=learning_rate if std_learning_rate is None else std_learning_rate,
      rho=rho,
      weight_decay=weight_decay,
      init_std=init_std,
      max_std=max_std,
      b1=b1,
      b2=b2,
      eps=eps,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def find_vsam_state(opt_state) -> VSAMState:
  """The one :class:`VSAMState` inside any optax state (chains, wrappers), by type."""
  return _posterior.find_state(opt_state, lambda x: isinstance(x, VSAMState), "VSAMState (the state of vsam)")


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
  var = jax.tree.map(
    lambda ls, g: jnp.zeros_like(g) if isinstance(ls, optax.MaskedNode) else jnp.exp(2 * ls),
    state.log_std,
    grads,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  g32 = jax.tree.map(lambda g: g.astype(jnp.promote_types(g.dtype, jnp.float32)), grads)
  leaves = zip(jax.tree.leaves(var), jax.tree.leaves(g32), strict=True)
  norm = jnp.sqrt(sum(jnp.sum(v * jnp.square(g)) for v, g in leaves))
  scale = state.rho / (norm + eps)
  return jax.tree.map(lambda v, g, w: (scale * v * g).astype(jnp.result_type(w)), var, g32, params)


def vsam_perturbed_params(params: Params, opt_state, grads: Updates, *, eps: float = 1e-12) -> Params:
  """Returns μ + ε with VSAM's ε = ρ Σ g / sqrt(gᵀ Σ g) (:func:`vsam_perturbation`)."""
  return jax.tree.map(
    lambda w, e: (w + e).astype(jnp.result_type(w)), params, vsam_perturbation(params, opt_state, grads, eps=eps)
  )


def vsam_rule(*, eps: float = 1e-12) -> _step.PerturbationRule:
  """VSAM as a :class:`~bsam_optax.PerturbationRule`: the second point μ + ε, and ``log_std_grads=g ⊙ ε``.

  Args:
    eps: added to ``sqrt(gᵀ Σ g)`` in ε's denominator.
  """
  check_positive("eps", eps)

  def second_point(params, opt_state, g):
    return vsam_perturbed_params(params, opt_state, g, eps=eps)

  def update_args(params, opt_state, x, g):
    del x  # = μ: VSAM's first gradient is at the mean
    eps_ = vsam_perturbation(params, opt_state, g, eps=eps)
    return {"log_std_grads": jax.tree.map(lambda g, e: g * e.astype(g.dtype), g, eps_)}

  return _step.PerturbationRule(second_point=second_point, update_args=update_args)


def vsam_step(loss_fn, tx: optax.GradientTransformation, *, eps: float = 1e-12, **options):
  """The compiled VariationalSAM step (Alg. 3) with m-sharpness.

  For each of the ``m`` parts of the batch (and of every device)::

    g_i   = ∇ loss_fn(μ, part_i)
    ε_i   = ρ Σ g_i / sqrt(g_iᵀ Σ g_i)
    g_ε,i = ∇ loss_fn(μ + ε_i, part_i)

  then ``tx.update(mean_i g_ε,i, state, μ, log_std_grads=mean_i g_i ⊙ ε_i)``.
  ``tx`` may be any optax pipeline containing one :func:`vsam`. It is
  :func:`~bsam_optax.make_perturbation_step` with :func:`vsam_rule`.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: an optax transformation containing :func:`vsam`.
    eps: added to ``sqrt(gᵀ Σ g)`` in ε's denominator.
    **options: the fields of :class:`~bsam_optax.StepOptions` (``m``,
      ``axis_name``, ``mesh``, ``has_aux``, ``aux_from``, ``aux_reduce``,
      ``thread_aux``, ``split``, ``donate``).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``; ``info.loss`` is the mean loss at μ, ``info.second_loss`` at
    μ + ε_i. ``key`` is unused (VSAM is deterministic).

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.vsam(1e-2, n_data=8)
    >>> step = bo.vsam_step(loss_fn, tx, m=2)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))
    >>> mean, std = bo.posterior(params, state)
  """
  return _step.make_perturbation_step(loss_fn, tx, vsam_rule(eps=eps), **options)
