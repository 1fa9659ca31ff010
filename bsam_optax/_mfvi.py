"""Mean-field variational inference (Bayes by backprop) as an optax transformation.

MFVI (Ujváry et al., Alg. 1; Blundell et al., 2015) learns a diagonal Gaussian
``q(θ) = N(μ, diag(σ²))`` by minimizing the negative ELBO per example, the
seed's Eq. 52 with the prior ``N(0, σ0² I)``, ``σ0² = 1 / (N δ)``::

  L(μ, σ) = E_{z ~ N(0, I)} ℓ(μ + σ z) + KL(q ‖ N(0, 1 / (N δ))) / N

One step reads (λ = log σ, elementwise operations; the reparameterization
gradients of the seed's Eq. 6-7 and Alg. 1, steps 2-5)::

  θ   = μ + σ z,  z ~ N(0, I)                      # mfvi_sample (first point)
  g   = ∇ℓ(θ)                                      # one gradient per step
  g_μ = g + δ μ                                    # ∂L/∂μ
  g_λ = g ⊙ (θ − μ) + δ σ² − 1 / N                 # ∂L/∂λ  (g ⊙ (θ − μ) = σ g ⊙ z)
  (μ, λ) ← Adam((μ, λ), (g_μ, g_λ))                # rates α (μ) and α_σ (λ)

with N = ``n_data``, δ = ``weight_decay``. The seed's Alg. 1 takes plain
gradient steps on μ and Σ; we take Adam steps on μ and on λ = log σ (as is
usual for Bayes by backprop): λ is unconstrained, so σ stays positive, and
Adam makes one learning rate fit both. For a quadratic loss with Hessian H the
stationary point is the mean-field optimum ``σ² = 1 / (N (H_ii + δ))``, the
inverse diagonal of the exact posterior precision (tested).

:func:`scale_by_mfvi` is the rule (the Adam direction of μ, and λ's step in
its state), :func:`mfvi` chains it with the learning rate as optax's own
optimizers do; :func:`mfvi_sample` draws the first point, :func:`mfvi_rule` is
the method as a :class:`~bsam_optax.PerturbationRule`, and :func:`mfvi_step`
the whole compiled step (``m`` parts, each with its own draw, and devices:
the gradients are averaged over ``m`` samples). The posterior ``N(μ, σ²)``
works with :func:`bsam_optax.posterior`, :func:`bsam_optax.sample_posterior`
and :func:`bsam_optax.predictive` through :meth:`MFVIState.posterior_std`.

References:
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Eq. 5-7, 52-53, Alg. 1).
  Blundell et al., `Weight Uncertainty in Neural Networks
  <https://arxiv.org/abs/1505.05424>`_, ICML 2015.
"""

from typing import Any
from typing import NamedTuple
from typing import TypeAlias

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _posterior
from bsam_optax import _step
from bsam_optax._checks import check_decay
from bsam_optax._checks import check_nonnegative
from bsam_optax._checks import check_positive

Params = Any
Updates = Any
ScalarOrSchedule: TypeAlias = optax.ScalarOrSchedule

__all__ = ["MFVIState", "mfvi", "mfvi_rule", "mfvi_sample", "mfvi_step", "scale_by_mfvi"]


class MFVIState(NamedTuple):
  """State of :func:`scale_by_mfvi`: Adam moments of the mean μ and of λ = log σ, and λ itself."""

  count: jax.Array  # type: ignore[assignment]  # shape (), int32: number of updates so far
  mean_m: Updates  # Adam's first moment of g_μ
  mean_v: Updates  # Adam's second moment of g_μ
  log_std: Updates  # λ = log σ, the variational log standard deviation
  log_std_m: Updates  # Adam's first moment of g_λ
  log_std_v: Updates  # Adam's second moment of g_λ

  def posterior_std(self):
    """σ = exp(λ), the posterior standard deviation (``optax.MaskedNode`` where masked)."""
    return jax.tree.map(jnp.exp, self.log_std)


def _check_params(params, method: str) -> None:
  for leaf in jax.tree.leaves(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"params must have floating-point dtypes ({method} samples around them), got dtype {dtype}")


def _state_dtype(x):
  # Moments and log σ are kept in float32 at least (a bf16 log σ would move in steps of 1/128).
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def _value_at(value, count):
  return value(count) if callable(value) else value


def _check_gaussian(n_data, weight_decay, init_std, std_learning_rate, b1, b2, eps) -> None:
  check_positive("n_data", n_data)
  check_positive("weight_decay", weight_decay)
  if init_std is not None:
    check_positive("init_std", init_std)
  check_nonnegative("std_learning_rate", std_learning_rate, schedule=True)
  check_decay("b1", b1)
  check_decay("b2", b2)
  check_nonnegative("eps", eps)


def _adam_moments(m, v, g, b1, b2):
  m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
  v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), v, g)
  return m, v


def _adam_direction(m, v, count, b1, b2, eps):
  """Adam's bias-corrected ``m̂ / (sqrt(v̂) + eps)``."""
  c1 = 1 - jnp.asarray(b1, jnp.float32) ** count
  c2 = 1 - jnp.asarray(b2, jnp.float32) ** count
  return jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), m, v)


def _init_gaussian(params, init_std):
  zeros = jax.tree.map(lambda w: jnp.zeros(jnp.shape(w), _state_dtype(w)), params)
  log_std = jax.tree.map(lambda w: jnp.full(jnp.shape(w), jnp.log(init_std), _state_dtype(w)), params)
  return zeros, log_std


def _gaussian_adam_update(state, grads, log_std_grads, params, *, std_learning_rate, n_data, weight_decay, b1, b2, eps):
  """The shared Adam step of a diagonal Gaussian with prior N(0, 1 / (N δ)).

  Returns ``(direction, count, mean_m, mean_v, log_std, log_std_m, log_std_v)``:
  ``direction`` is ``Adam(g + δ μ)`` (to be scaled by ``-α``) in the dtypes of
  ``params``; λ has taken its step ``-α_σ Adam(log_std_grads + δ σ² − 1 / N)``.
  """
  count = optax.safe_increment(state.count)
  std = state.posterior_std()
  g_mean = jax.tree.map(lambda g, w: g.astype(_state_dtype(w)) + weight_decay * w, grads, params)
  g_log_std = jax.tree.map(
    lambda gs, s: gs.astype(s.dtype) + weight_decay * jnp.square(s) - 1.0 / n_data, log_std_grads, std
  )
  mean_m, mean_v = _adam_moments(state.mean_m, state.mean_v, g_mean, b1, b2)
  log_std_m, log_std_v = _adam_moments(state.log_std_m, state.log_std_v, g_log_std, b1, b2)
  direction = jax.tree.map(
    lambda d, w: d.astype(jnp.result_type(w)), _adam_direction(mean_m, mean_v, count, b1, b2, eps), params
  )
  lr_std = _value_at(std_learning_rate, state.count)
  log_std = jax.tree.map(
    lambda ls, d: ls - lr_std * d, state.log_std, _adam_direction(log_std_m, log_std_v, count, b1, b2, eps)
  )
  return direction, count, mean_m, mean_v, log_std, log_std_m, log_std_v


def scale_by_mfvi(
  n_data: float,
  *,
  std_learning_rate: ScalarOrSchedule,
  weight_decay: float = 1e-4,
  init_std: float = 1e-2,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""MFVI's rule: the Adam direction of the mean's gradient ``g + δ μ``; λ = log σ steps in the state.

  ``update(grads, state, params, log_std_grads=...)`` takes ``g = ∇ℓ(θ)`` at
  ``θ = μ + σ z`` and ``log_std_grads = g ⊙ (θ − μ)``, and returns
  ``Adam(g + δ μ)``; chain it with ``optax.scale_by_learning_rate`` (as
  :func:`mfvi` does). Args as for :func:`mfvi`; ``std_learning_rate`` is required.
  """
  _check_gaussian(n_data, weight_decay, init_std, std_learning_rate, b1, b2, eps)

  def init_fn(params):
    _check_params(params, "mfvi")
    zeros, log_std = _init_gaussian(params, init_std)
    return MFVIState(jnp.zeros([], jnp.int32), zeros, zeros, log_std, zeros, zeros)

  def update_fn(updates, state, params=None, *, log_std_grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("mfvi needs params (the mean μ) in update(..., params)")
    if log_std_grads is None:
      raise ValueError(
        "mfvi's update needs log_std_grads=, the product g ⊙ (θ − μ) of the gradient at the sample "
        "θ = mfvi_sample(...) and θ − μ; call tx.update(grads, state, params, log_std_grads=...) or use mfvi_step"
      )
    direction, *new = _gaussian_adam_update(
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
    return direction, MFVIState(*new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mfvi(
  learning_rate: ScalarOrSchedule,
  n_data: float,
  *,
  weight_decay: float = 1e-4,
  init_std: float = 1e-2,
  std_learning_rate: ScalarOrSchedule | None = None,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""Mean-field VI (Bayes by backprop): Adam steps on the mean μ and on λ = log σ.

  ``update(grads, state, params, log_std_grads=...)`` takes the gradient
  ``g = ∇ℓ(θ)`` at the sample ``θ = μ + σ z`` (from :func:`mfvi_sample`) as
  ``updates`` and its reparameterization product ``g ⊙ (θ − μ)`` as the
  keyword-only extra argument ``log_std_grads`` (both averaged over samples
  when there are several); it returns ``-α Adam(g + δ μ)`` and moves λ along
  ``-α_σ Adam(g ⊙ (θ − μ) + δ σ² − 1 / N)``::

    g_μ = g + δ μ                         # ∂/∂μ of E ℓ + KL / N (Eq. 52-53)
    g_λ = g ⊙ (θ − μ) + δ σ² − 1 / N      # ∂/∂log σ of the same
    μ ← μ − α Adam(g_μ),   λ ← λ − α_σ Adam(g_λ)

  It is :func:`scale_by_mfvi` chained with ``optax.scale_by_learning_rate``.
  The posterior ``N(μ, σ²)``, σ = exp(λ), is read by
  :func:`bsam_optax.posterior` and sampled by :func:`bsam_optax.sample_posterior`.

  Args:
    learning_rate: α, for the mean; a float or an optax schedule of the step count.
    n_data: N, the number of training examples (the KL term is divided by N;
      scaling N up tempers the posterior).
    weight_decay: δ > 0, the prior precision per example: the prior is
      ``N(0, 1 / (N δ))`` (as in :func:`bsam_optax.bsam`). It must be
      positive: with a flat prior σ grows without bound along flat directions.
    init_std: the initial σ of every parameter.
    std_learning_rate: α_σ, for λ = log σ; ``None`` uses ``learning_rate``.
    b1: Adam's decay of the first moments.
    b2: Adam's decay of the second moments.
    eps: Adam's ε.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state holds an :class:`MFVIState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> params = {"w": jnp.ones(3)}
    >>> tx = bo.mfvi(1e-2, n_data=100)
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(p["w"] ** 2)
    >>> theta = bo.mfvi_sample(jax.random.key(0), params, state)
    >>> g = jax.grad(loss)(theta)
    >>> log_std_grads = jax.tree.map(lambda g, t, w: g * (t - w), g, theta, params)
    >>> updates, state = tx.update(g, state, params, log_std_grads=log_std_grads)
    >>> params = optax.apply_updates(params, updates)
    >>> mean, std = bo.posterior(params, state)

  References:
    Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
    Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Alg. 1, Eq. 52).
  """
  check_nonnegative("learning_rate", learning_rate, schedule=True)
  return optax.chain(
    scale_by_mfvi(
      n_data,
      std_learning_rate=learning_rate if std_learning_rate is None else std_learning_rate,
      weight_decay=weight_decay,
      init_std=init_std,
      b1=b1,
      b2=b2,
      eps=eps,
    ),
    optax.scale_by_learning_rate(learning_rate),
  )


def find_mfvi_state(opt_state) -> MFVIState:
  """The one :class:`MFVIState` inside any optax state (chains, wrappers), by type."""
  return _posterior.find_state(opt_state, lambda x: isinstance(x, MFVIState), "MFVIState (the state of mfvi)")


def mfvi_sample(key: jax.Array, params: Params, opt_state, *, noise: str = "auto") -> Params:
  """Draws θ = μ + σ z, z ~ N(0, I): the point of MFVI's gradient (Alg. 1, step 2).

  Args:
    key: a PRNG key; the only source of randomness.
    params: μ, the posterior mean.
    opt_state: the state of a transformation containing one :func:`mfvi`.
    noise: ``"auto"`` (the library's generator) or ``"jax"``
      (``jax.random.normal``'s stream for ``key``).

  Returns:
    θ, with the structure and dtypes of ``params`` (masked leaves are μ).
  """
  return _posterior.gaussian_params(key, params, find_mfvi_state(opt_state), noise=noise)


def _log_std_grads(params, opt_state, x, g) -> dict:
  del opt_state
  return {"log_std_grads": jax.tree.map(lambda g, x, w: g * (x - w).astype(g.dtype), g, x, params)}


def mfvi_rule(*, noise: str = "auto") -> _step.PerturbationRule:
  """MFVI as a :class:`~bsam_optax.PerturbationRule`: one gradient at θ = μ + σ z, and ``log_std_grads=g ⊙ (θ − μ)``.

  Args:
    noise: the generator of z, see :func:`mfvi_sample`.
  """
  return _step.PerturbationRule(
    first_point=lambda key, params, opt_state: mfvi_sample(key, params, opt_state, noise=noise),
    update_args=_log_std_grads,
  )


def mfvi_step(loss_fn, tx: optax.GradientTransformation, *, noise: str = "auto", **options):
  """The compiled MFVI step: one reparameterization gradient per part, averaged over parts and devices.

  For each of the ``m`` parts of the batch (and of every device)::

    θ_i = μ + σ z_i                      # z_i from fold_in(key, part_index)
    g_i = ∇ loss_fn(θ_i, part_i)

  then ``tx.update(mean_i g_i, state, μ, log_std_grads=mean_i g_i ⊙ (θ_i − μ))``:
  ``m`` Monte-Carlo samples of the ELBO's gradient, one per part. ``tx`` may
  be any optax pipeline containing one :func:`mfvi`. It is
  :func:`~bsam_optax.make_perturbation_step` with :func:`mfvi_rule`.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: an optax transformation containing :func:`mfvi`.
    noise: the generator of z, see :func:`mfvi_sample`.
    **options: the fields of :class:`~bsam_optax.StepOptions` (``m``,
      ``axis_name``, ``mesh``, ``has_aux``, ``aux_from``, ``aux_reduce``,
      ``thread_aux``, ``split``, ``donate``).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``; ``info.loss`` and ``info.second_loss`` are both the mean loss at
    the samples θ_i.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.mfvi(1e-2, n_data=8)
    >>> step = bo.mfvi_step(loss_fn, tx, m=2)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))
    >>> mean, std = bo.posterior(params, state)
  """
  return _step.make_perturbation_step(loss_fn, tx, mfvi_rule(noise=noise), **options)
