"""Bayesian Sharpness-Aware Minimization (bSAM) as an optax transformation.

bSAM (Möllenhoff & Khan, 2023, Alg. 1) learns a diagonal Gaussian posterior
``N(ω, 1 / (N s))`` over the parameters while it trains. One step reads::

  θ   ~ N(ω, 1 / (N s))                              # noisy_params
  g   = ∇ℓ(θ)                                        # first gradient
  ε   = ρ g / s                                      # perturbed_params: ω + ε
  g_ε = ∇ℓ(ω + ε)                                    # second gradient
  g_m ← β1 g_m + (1 − β1) (g_ε + δ ω)                # tx.update ...
  s   ← β2 s   + (1 − β2) (√s · |g| + δ + γ)
  ω   ← ω − α g_m / s                                # ... with the NEW s

with α = ``learning_rate``, N = ``n_data``, ρ = ``rho``, β1 = ``b1``,
β2 = ``b2``, δ = ``weight_decay``, γ = ``damping``; all operations are
elementwise. :func:`scale_by_bsam` is the momentum and scale lines (it returns
``g_m / s``), :func:`bsam` chains it with the learning rate, as optax's
``sophia`` does; :func:`noisy_params` and :func:`perturbed_params` are the
first stages; :func:`bsam_rule` hands them to the step machinery, and
:func:`bsam_step` fuses all of them into one compiled step.

Deviation from the authors' research code: their mean update divides by the
*old* scale ``s`` (computed before the scale update). We follow the seed
equations above and the paper's Alg. 1 ordering, dividing by the *new* ``s``.

``curvature="reparam"`` replaces the data term ``√s · |g|`` of the scale
update by the reparameterization estimate of the diagonal Hessian at θ,
``ĥ = g · (θ − ω) · N s = g · z · √(N s)`` (unbiased: Stein's lemma), with the
correction of IVON (Shen et al., 2024) that keeps ``s`` positive::

  t = ĥ + δ + γ
  s ← β2 s + (1 − β2) t + ½ (1 − β2)² (s − t)² / s

``curvature="reparam_cv"`` subtracts the second gradient, taken on the same
data, as a control variate: ``ĥ = (g − g_ε) · (θ − ω) · N s``. The minibatch
gradient at ω, whose variance swamps ``g · z / σ`` on a network, cancels; the
price is a bias of ``−ρ H² / s`` (``E[g_ε z] = ρ H E[g z] / s``): ĥ estimates
``H (1 − ρ H / s)``, within a factor ``1 − ρ`` of H once ``s ≈ H + δ``.

Why: at θ = ω + σz the data part of ``g`` is about ``H σ z``, so ``√s · |g|``
is about ``H |z| / √N``, √N times smaller than the curvature H that the
posterior's precision should hold (the paper's App. E.3 drops that factor);
with the default damping the scale stays at ``δ + γ`` and the posterior is
isotropic. ``benchmarks/posterior_scale.py`` measures both on problems with a
known posterior.
"""

from typing import Any
from typing import NamedTuple
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from bsam_optax import _posterior
from bsam_optax import _step
from bsam_optax._checks import check_decay
from bsam_optax._checks import check_nonnegative
from bsam_optax._checks import check_positive

Params = Any
Updates = Any
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule

__all__ = [
  "BSAMState",
  "bsam",
  "bsam_no_noise_step",
  "bsam_rule",
  "bsam_step",
  "find_bsam_state",
  "noisy_params",
  "perturbed_params",
  "reparam_hessian",
  "scale_by_bsam",
]


class BSAMState(NamedTuple):
  """State of :func:`scale_by_bsam` (and so of :func:`bsam`).

  The posterior is ``N(params, 1 / (n_data * scale))``; ``rho`` and ``n_data``
  live here (as scalars) so that the stages :func:`noisy_params` and
  :func:`perturbed_params` need nothing but the optimizer state.
  """

  count: jax.Array  # type: ignore[assignment]  # shape (), int32: number of updates so far
  momentum: Updates  # g_m, the EMA of perturbed gradients (+ δω)
  scale: Updates  # s, the diagonal precision; variance is 1 / (N s)
  rho: jax.Array  # shape (), ρ for the next step (schedules evaluated at count)
  n_data: jax.Array  # shape (), N, the (possibly tempered) dataset size
  # s = init_part + damping_part + (the data's part), for posterior_diagnostics:
  init_part: jax.Array  # shape (), β2^t s₀: what is left of the initial scale
  damping_part: jax.Array  # shape (), (1 − β2^t)(δ + γ): what the prior and damping added (δ unmasked)

  def posterior_std(self) -> Updates:
    """``1 / sqrt(N s)`` per entry (``optax.MaskedNode`` where masked): the Gaussian-posterior protocol."""
    return jax.tree.map(
      lambda s: s if _is_masked(s) else jax.lax.rsqrt(self.n_data * s), self.scale, is_leaf=_is_masked
    )

  def damping_dominated(self, threshold: float = 0.1) -> Updates:
    """Per entry, whether the data's average share of ``s`` is below ``threshold × (δ + γ)``.

    ``s − init_part − damping_part`` is the data terms' exponential sum; it is
    compared with ``threshold × damping_part`` (both carry the factor
    ``1 − β2^t``). See :func:`~bsam_optax.posterior_diagnostics`.
    """
    return jax.tree.map(
      lambda s: s if _is_masked(s) else s - self.init_part - self.damping_part < threshold * self.damping_part,
      self.scale,
      is_leaf=_is_masked,
    )


class _ReparamBSAMState(BSAMState):
  """:class:`BSAMState` of ``scale_by_bsam(..., curvature="reparam")``.

  The type tells :func:`bsam_rule` which data term the update takes; a state
  is a pytree of arrays, so the choice lives in its type, not in a field.
  """

  __slots__ = ()


class _ReparamCVBSAMState(BSAMState):
  """:class:`BSAMState` of ``scale_by_bsam(..., curvature="reparam_cv")`` (see :class:`_ReparamBSAMState`)."""

  __slots__ = ()


CURVATURES = ("abs_grad", "reparam", "reparam_cv")
_STATE_TYPES = {"abs_grad": BSAMState, "reparam": _ReparamBSAMState, "reparam_cv": _ReparamCVBSAMState}


def _check_curvature(curvature) -> None:
  if not isinstance(curvature, str) or curvature not in CURVATURES:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


def reparam_hessian(params: Params, opt_state, noisy_params: Params, noisy_grads: Updates) -> Updates:
  """The reparameterization estimate ``ĥ = g · (θ − ω) · N s`` of the diagonal Hessian at θ.

  With θ = ω + z / √(N s), ``ĥ = g · z · √(N s)`` and ``E[ĥ] = E[diag ∇²ℓ(θ)]``
  (Stein's lemma), whatever the minibatch noise in ``g``. The scale update of
  ``bsam(..., curvature="reparam")`` takes it as ``hessian=``; under
  m-sharpness the step averages each part's estimate.

  Args:
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.
    noisy_params: θ, drawn by :func:`noisy_params` from this state.
    noisy_grads: g, the gradient at θ.

  Returns:
    ĥ, shaped like ``params`` (masked leaves: ``g`` unchanged, unused).
  """
  state = find_bsam_state(opt_state)
  return _map_unmasked(
    lambda s, g, theta, w: g * (theta - w) * (state.n_data * s).astype(g.dtype),
    state.scale,
    noisy_grads,
    noisy_params,
    params,
  )


def reparam_cv_hessian(
  params: Params, opt_state, noisy_params: Params, noisy_grads: Updates, perturbed_grads: Updates
) -> Updates:
  """The reparameterization estimate with the second gradient as control variate, ``(g − g_ε) · (θ − ω) · N s``.

  ``g`` is the gradient at θ and ``g_ε`` the gradient at ``ω + ρ g / s`` on
  the same data: the minibatch gradient at ω cancels in ``g − g_ε``, and the
  estimate's mean is ``diag H (1 − ρ H / s)`` on a quadratic loss (the
  perturbation follows ``g``, so ``E[g_ε z] ≠ 0``). ``bsam(...,
  curvature="reparam_cv")`` takes it as ``hessian=``.

  Args:
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.
    noisy_params: θ, drawn by :func:`noisy_params` from this state.
    noisy_grads: g, the gradient at θ.
    perturbed_grads: g_ε, the gradient at :func:`perturbed_params` on the same data.

  Returns:
    ĥ, shaped like ``params`` (masked leaves: ``g`` unchanged, unused).
  """
  state = find_bsam_state(opt_state)
  return _map_unmasked(
    lambda s, g, g_eps, theta, w: (g - g_eps) * (theta - w) * (state.n_data * s).astype(g.dtype),
    state.scale,
    noisy_grads,
    perturbed_grads,
    noisy_params,
    params,
  )


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _check_params(params) -> None:
  for leaf in jax.tree.leaves(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"params must have floating-point dtypes (bSAM samples Gaussian noise around them), got a leaf of dtype {dtype}"
      )


def _value_at(value: ScalarOrSchedule, count) -> jax.Array:
  return value(count) if callable(value) else value


def scale_by_bsam(
  n_data: float,
  *,
  rho: ScalarOrSchedule = 0.05,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.0,
  damping: float = 0.1,
  init_scale: float = 1.0,
  weight_decay_mask: Any = None,
  state_dtype: Any = None,
  curvature: str = "abs_grad",
) -> optax.GradientTransformationExtraArgs:
  r"""bSAM's momentum and scale updates (Alg. 1, lines 6-7), returning ``g_m / s``.

  ``update(perturbed_grads, state, params, noisy_grads=|g|)`` takes the
  gradient ``g_ε`` at ``ω + ε`` as ``updates`` and ``|g|``, the gradient at the
  noisy sample θ (its absolute value, or the mean over m-sharpness parts of
  the absolute values), as the keyword-only extra argument ``noisy_grads``::

    g_m ← β1 g_m + (1 − β1) (g_ε + δ ω)
    s   ← β2 s   + (1 − β2) (√s · |g| + δ + γ)
    return g_m / s                                   # the NEW s

  Chain it with a learning rate (:func:`bsam` does) for the step
  ``ω ← ω − α g_m / s``.

  With ``curvature="reparam"`` the update takes ``hessian=ĥ`` (see
  :func:`reparam_hessian`; :func:`bsam_step` passes the mean over parts of
  each part's ``ĥ``), or ``noisy_grads=g`` with ``noisy_params=θ`` to compute
  it, and the scale update is IVON's::

    t = ĥ + δ + γ
    s ← β2 s + (1 − β2) t + ½ (1 − β2)² (s − t)² / s     # > 0 whatever ĥ

  Args:
    n_data: N, the number of training examples. Scaling it up tempers the
      posterior (the paper does so under data augmentation, App. G).
    rho: ρ, the perturbation radius used by :func:`perturbed_params`, a float
      or a schedule of the step count.
    b1: β1, decay of the momentum ``g_m``.
    b2: β2, decay of the scale ``s``.
    weight_decay: δ, the L2 regularizer (Gaussian prior precision N δ).
    damping: γ, added to the scale in every update.
    init_scale: initial value of every entry of ``s``.
    weight_decay_mask: which leaves the prior's δ applies to, as
      ``optax.adamw(mask=...)``: a pytree of bools shaped like the params (or
      a prefix of it), or a callable ``params -> such a pytree``; ``None``
      for all. Masked-out leaves get δ = 0 in **both** lines (their prior is
      flat; their scale still gets γ). Prefer this to chaining
      ``optax.add_decayed_weights``: that adds δω to the momentum but not δ to
      the scale, so the posterior precision would lose the prior's N δ.
      Flax's ImageNet example decays kernels only:
      ``weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)``.
    state_dtype: the dtype of ``g_m`` and ``s`` (as optax's ``mu_dtype``),
      e.g. ``jnp.float32`` under bfloat16 parameters; ``None`` for each
      parameter's own dtype. The updates are computed in the promoted dtype
      and returned in the parameters' dtypes.
    curvature: the scale update's data term: ``"abs_grad"`` (Alg. 1,
      ``√s · |g|``), ``"reparam"`` (the reparameterization estimate of the
      diagonal Hessian, IVON's update; a data-shaped posterior, see the
      module docstring) or ``"reparam_cv"`` (the same with the second
      gradient as control variate, :func:`reparam_cv_hessian`; its update
      takes ``hessian=``, or ``noisy_grads=g`` with ``noisy_params=θ`` and
      then uses ``updates`` as ``g_ε``, so chain nothing that changes the
      gradient before it).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` with state :class:`BSAMState`.
  """
  _check_curvature(curvature)
  state_type = _STATE_TYPES[curvature]
  check_positive("n_data", n_data)
  check_nonnegative("rho", rho, schedule=True)
  check_decay("b1", b1)
  check_decay("b2", b2)
  check_nonnegative("weight_decay", weight_decay)
  check_nonnegative("damping", damping)
  check_positive("init_scale", init_scale)
  if state_dtype is not None:
    state_dtype = jnp.dtype(state_dtype)
    if not jnp.issubdtype(state_dtype, jnp.floating):
      raise ValueError(f"state_dtype must be a floating-point dtype, got {state_dtype}")
  if weight_decay_mask is not None and isinstance(weight_decay_mask, (bool, str, int, float)):
    raise TypeError(f"weight_decay_mask must be a pytree of bools or a callable of params, got {weight_decay_mask!r}")

  def decays(params):
    """δ per leaf: weight_decay where the mask holds, 0 elsewhere."""
    if weight_decay_mask is None:
      return jax.tree.map(lambda _: weight_decay, params)
    mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
    return jax.tree.map(
      lambda keep, sub: jax.tree.map(lambda _: weight_decay * jnp.asarray(keep, jnp.float32), sub), mask, params
    )

  def init_fn(params):
    _check_params(params)
    count = jnp.zeros([], jnp.int32)
    return state_type(
      count=count,
      momentum=otu.zeros_like(params, dtype=state_dtype),
      scale=otu.full_like(params, init_scale, dtype=state_dtype),
      rho=jnp.asarray(_value_at(rho, count), jnp.float32),
      n_data=jnp.asarray(n_data, jnp.float32),
      init_part=jnp.asarray(init_scale, jnp.float32),
      damping_part=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, *, noisy_grads=None, hessian=None, noisy_params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("bsam needs params (ω) in update(..., params)")
    if curvature != "abs_grad":
      if hessian is None and (noisy_grads is None or noisy_params is None):
        raise ValueError(
          f"bsam(curvature={curvature!r})'s update needs hessian= (the mean over parts of each part's estimate, as "
          "bsam_step passes it), or noisy_grads=g with noisy_params=θ (the sample drawn by noisy_params)"
        )
      if hessian is None and curvature == "reparam":
        hessian = reparam_hessian(params, state, noisy_params, noisy_grads)
      elif hessian is None:
        hessian = reparam_cv_hessian(params, state, noisy_params, noisy_grads, updates)
    elif noisy_grads is None:
      raise ValueError(
        "bsam's update needs noisy_grads=, the gradient at θ drawn by noisy_params; call "
        "tx.update(perturbed_grads, state, params, noisy_grads=noisy_grads) or use bsam_step. If you did pass it, "
        "a wrapper dropped it: flax.training.train_state.TrainState.apply_gradients does, use "
        "bsam_optax.flax.TrainState"
      )
    delta = decays(params)
    momentum = jax.tree.map(
      lambda m, g_eps, w, d: (b1 * m + (1 - b1) * (g_eps + d * w)).astype(m.dtype),
      state.momentum,
      updates,
      params,
      delta,
    )
    if curvature != "abs_grad":

      def scale_update(s, h, d):
        t = h + d + damping
        return (b2 * s + (1 - b2) * t + 0.5 * (1 - b2) ** 2 * (s - t) ** 2 / s).astype(s.dtype)

      scale = jax.tree.map(scale_update, state.scale, hessian, delta)
    else:
      scale = jax.tree.map(
        lambda s, g, d: (b2 * s + (1 - b2) * (jnp.sqrt(s) * jnp.abs(g) + d + damping)).astype(s.dtype),
        state.scale,
        noisy_grads,
        delta,
      )
    new_updates = jax.tree.map(lambda m, s, w: (m / s).astype(jnp.result_type(w)), momentum, scale, params)
    count = optax.safe_increment(state.count)
    new_state = state_type(
      count=count,
      momentum=momentum,
      scale=scale,
      rho=jnp.asarray(_value_at(rho, count), state.rho.dtype),
      n_data=jnp.asarray(n_data, state.n_data.dtype),
      init_part=(b2 * state.init_part).astype(state.init_part.dtype),
      damping_part=(b2 * state.damping_part + (1 - b2) * (weight_decay + damping)).astype(state.damping_part.dtype),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bsam(
  learning_rate: ScalarOrSchedule,
  n_data: float,
  *,
  rho: ScalarOrSchedule = 0.05,
  b1: float = 0.9,
  b2: float = 0.999,
  weight_decay: float = 0.0,
  damping: float = 0.1,
  init_scale: float = 1.0,
  weight_decay_mask: Any = None,
  state_dtype: Any = None,
  curvature: str = "abs_grad",
) -> optax.GradientTransformationExtraArgs:
  r"""Bayesian SAM: the momentum, scale and mean updates of Alg. 1.

  ``update(perturbed_grads, state, params, noisy_grads=g)`` takes the gradient
  ``g_ε`` at the perturbed point ``ω + ε`` as ``updates`` and the gradient
  ``g`` at the noisy sample ``θ`` as the keyword-only extra argument
  ``noisy_grads``; it returns ``-α g_m / s`` with the *new* momentum and
  scale::

    g_m ← β1 g_m + (1 − β1) (g_ε + δ ω)
    s   ← β2 s   + (1 − β2) (√s · |g| + δ + γ)
    ω   ← ω − α g_m / s

  It is ``optax.chain(scale_by_bsam(...), optax.scale_by_learning_rate(α))``.
  The posterior over the parameters is ``N(ω, 1 / (N s))``; see
  :func:`~bsam_optax.posterior`. Use :func:`noisy_params` and
  :func:`perturbed_params` to build the two points at which the gradients are
  taken, or :func:`bsam_step` for the whole compiled step.

  Under m-sharpness the step passes ``noisy_grads = mean_k |g_k|`` (already
  nonnegative), so the scale update uses the mean over parts of ``√s |g_k|``.

  The authors' research code divides the mean update by the *old* scale; this
  implementation follows the paper's equations and divides by the new one.

  Args:
    learning_rate: α, a float or an optax schedule of the step count.
    n_data: N, the number of training examples. Scaling it up tempers the
      posterior (the paper does so under data augmentation, App. G).
    rho: ρ, the perturbation radius, a float or a schedule.
    b1: β1, decay of the momentum ``g_m``.
    b2: β2, decay of the scale ``s``.
    weight_decay: δ, the L2 regularizer (Gaussian prior precision N δ).
    damping: γ, added to the scale in every update.
    init_scale: initial value of every entry of ``s``.
    weight_decay_mask: the leaves δ applies to; see :func:`scale_by_bsam`.
    state_dtype: the dtype of ``g_m`` and ``s``; see :func:`scale_by_bsam`.
    curvature: ``"abs_grad"`` (Alg. 1's ``√s · |g|``), ``"reparam"`` (the
      reparameterization estimate of the diagonal Hessian with IVON's update)
      or ``"reparam_cv"`` (the same with the second gradient as control
      variate); see :func:`scale_by_bsam`. :func:`bsam_step` passes what each
      needs.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> params = {"w": jnp.ones(3)}
    >>> tx = bo.bsam(1e-2, n_data=100, rho=0.01)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> theta = bo.noisy_params(jax.random.key(0), params, state)
    >>> g = jax.grad(loss)(theta)
    >>> g_eps = jax.grad(loss)(bo.perturbed_params(params, state, g))
    >>> updates, state = tx.update(g_eps, state, params, noisy_grads=g)
    >>> params = optax.apply_updates(params, updates)

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023.
  """
  check_nonnegative("learning_rate", learning_rate, schedule=True)
  return optax.chain(
    scale_by_bsam(
      n_data,
      rho=rho,
      b1=b1,
      b2=b2,
      weight_decay=weight_decay,
      damping=damping,
      init_scale=init_scale,
      weight_decay_mask=weight_decay_mask,
      state_dtype=state_dtype,
      curvature=curvature,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def _is_bsam_state(x) -> bool:
  return isinstance(x, BSAMState)


def find_bsam_state(opt_state) -> BSAMState:
  """Finds the one :class:`BSAMState` inside any optax state.

  Works through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.masked`` and any other wrapper whose state is
  a pytree, by type rather than by position.

  Raises:
    ValueError: if ``opt_state`` holds no bsam state, or more than one.
  """
  return _posterior.find_state(opt_state, _is_bsam_state, "BSAMState (the state of bsam_optax.bsam)")


def _map_unmasked(fn, scale, *trees):
  """``jax.tree.map(fn, scale, *trees)``, leaving leaves masked by optax.masked."""
  return jax.tree.map(
    lambda s, *xs: xs[0] if _is_masked(s) else fn(s, *xs),
    scale,
    *trees,
    is_leaf=_is_masked,
  )


def noisy_params(key: jax.Array, params: Params, opt_state, *, noise: str = "auto") -> Params:
  """Draws θ ~ N(ω, 1 / (N s)) for the first gradient of a bSAM step.

  Each leaf gets its own standard-normal draw from ``fold_in(key, leaf
  index)`` (see :mod:`bsam_optax._noise`).

  Args:
    key: a PRNG key; the only source of randomness.
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.
    noise: ``"auto"`` (the library's generator) or ``"jax"``
      (``jax.random.normal``'s stream for ``key``).

  Returns:
    θ, with the structure and dtypes of ``params``.
  """
  state = find_bsam_state(opt_state)
  return _posterior.gaussian_params(key, params, state, noise=noise)


def perturbed_params(params: Params, opt_state, noisy_grads: Updates) -> Params:
  """Returns ω + ε with ε = ρ g / s, the point of bSAM's second gradient.

  Args:
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.
    noisy_grads: g, the gradient at θ drawn by :func:`noisy_params`.

  Returns:
    ω + ρ g / s, with the structure and dtypes of ``params``.
  """
  state = find_bsam_state(opt_state)
  return _map_unmasked(
    lambda s, w, g: (w + state.rho * g / s).astype(w.dtype),
    state.scale,
    params,
    noisy_grads,
  )


def _abs_noisy_grads(params, opt_state, x, g) -> dict:
  state = find_bsam_state(opt_state)
  if isinstance(state, _ReparamCVBSAMState):
    return {}
  if isinstance(state, _ReparamBSAMState):
    return {"hessian": reparam_hessian(params, opt_state, x, g)}
  return {"noisy_grads": jax.tree.map(jnp.abs, g)}


def _cv_hessian(params, opt_state, x, g, g_eps) -> dict:
  if isinstance(find_bsam_state(opt_state), _ReparamCVBSAMState):
    return {"hessian": reparam_cv_hessian(params, opt_state, x, g, g_eps)}
  return {}


def bsam_rule(*, noise: str = "auto") -> _step.PerturbationRule:
  """bSAM as a :class:`~bsam_optax.PerturbationRule`: θ ~ N(ω, 1/(N s)), then ω + ρ g / s, and ``noisy_grads=|g|``.

  With ``bsam(..., curvature="reparam")`` (read from the state's type) the
  update gets ``hessian=`` :func:`reparam_hessian` instead of ``noisy_grads``;
  with ``"reparam_cv"``, :func:`reparam_cv_hessian` (from the part's second
  gradient too).

  Args:
    noise: the generator of θ's noise, see :func:`noisy_params`.
  """
  return _step.PerturbationRule(
    first_point=lambda key, params, opt_state: noisy_params(key, params, opt_state, noise=noise),
    second_point=perturbed_params,
    update_args=_abs_noisy_grads,
    second_update_args=_cv_hessian,
  )


def bsam_step(
  loss_fn,
  tx: optax.GradientTransformation,
  m: int = 1,
  axis_name: str | None = None,
  *,
  noise: str = "auto",
  **options,
):
  """The fused, compiled bSAM step with m-sharpness.

  For each of the ``m`` parts of the batch (and of every device)::

    θ_i   = noisy_params(fold_in(key, i), ω, state)     # θ_i ~ N(ω, 1/(N s))
    g_i   = ∇ loss_fn(θ_i, part_i)
    g_ε,i = ∇ loss_fn(ω + ρ g_i / s, part_i)

  then ``tx.update(mean_i g_ε,i, state, ω, noisy_grads=mean_i |g_i|)``, which
  for :func:`bsam` makes the scale update use the mean over parts of
  ``√s |g_i|``. ``tx`` may be any optax pipeline containing one ``bsam``
  (``optax.chain`` with clipping, ``inject_hyperparams``, ``MultiSteps``).
  It is :func:`~bsam_optax.make_perturbation_step` with :func:`bsam_rule`.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``. ``loss_args`` are
      passed unsplit to every part (e.g. BatchNorm statistics).
    tx: an optax transformation containing :func:`bsam`.
    m: the number of m-sharpness parts (per device).
    axis_name: the device axis; the returned step is then meant for
      ``jax.pmap(step, axis_name=axis_name)`` with params, state and key
      replicated and the batch sharded, unless ``mesh`` is given.
    noise: the generator of θ's noise, see :func:`noisy_params`.
    **options: the other fields of :class:`~bsam_optax.StepOptions`:
      ``mesh``, ``has_aux``, ``aux_from`` (``"first"`` at θ or ``"second"``
      at ω + ε; the earlier ``"noisy"``/``"perturbed"`` still work),
      ``aux_reduce``, ``thread_aux``,
      ``split``, ``donate``.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``, ``info`` a :class:`~bsam_optax.StepInfo`: ``info.loss`` the mean
    loss at the noisy samples θ_i, ``info.second_loss`` (also
    ``info["perturbed_loss"]``) at ω + ε_i, ``info.aux`` the reduced aux.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.bsam(1e-2, n_data=8)
    >>> state = tx.init(params)
    >>> step = bo.bsam_step(loss_fn, tx, m=2)
    >>> params, state, info = step(params, state, batch, jax.random.key(0))
  """
  # bSAM's earlier names for the passes, kept for code written against them.
  aux_from = options.get("aux_from", "second")
  aux_from = {"noisy": "first", "perturbed": "second"}.get(aux_from, aux_from)
  options = dict(options, aux_from=aux_from)
  return _step.make_perturbation_step(loss_fn, tx, bsam_rule(noise=noise), m=m, axis_name=axis_name, **options)


def bsam_no_noise_step(loss_fn, tx: optax.GradientTransformation, **options):
  """bSAM without noise, the ablation of the paper's Sec. F.5 / Table 3.

  Alg. 1 with line 3 (θ ~ N(ω, 1/(N s))) removed: the first gradient is
  taken at the mean ω instead of at a sample θ. For each part::

    g_i   = ∇ loss_fn(ω, part_i)                  # bSAM: at θ_i ~ N(ω, 1/(N s))
    g_ε,i = ∇ loss_fn(ω + ρ g_i / s, part_i)

  then ``tx.update(mean_i g_ε,i, state, ω, noisy_grads=mean_i |g_i|)``, so
  the scale update also sees the gradient at ω. Everything else is
  :func:`bsam_step`; ``tx`` must contain one :func:`bsam` and the learned
  posterior is still ``N(ω, 1/(N s))``.

  Args:
    loss_fn: as for :func:`bsam_step`.
    tx: an optax transformation containing :func:`bsam`.
    **options: the fields of :class:`~bsam_optax.StepOptions`; ``aux_from``
      is ``"first"`` (at ω) or ``"second"`` (at ω + ε).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``; ``info.loss`` is the mean loss at ω, ``info.second_loss`` at
    ω + ε_i. ``key`` is unused.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.bsam(1e-2, n_data=8)
    >>> step = bo.bsam_no_noise_step(loss_fn, tx, m=2)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023, Sec. F.5.
  """
  rule = _step.PerturbationRule(
    second_point=perturbed_params, update_args=_abs_noisy_grads, second_update_args=_cv_hessian
  )
  return _step.make_perturbation_step(loss_fn, tx, rule, **options)
