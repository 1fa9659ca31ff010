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

:func:`mfvi` is the update; :func:`mfvi_sample` draws the first point; and
:func:`bsam_optax.mfvi_step` is the whole compiled step (with m-sharpness-style
parts, each with its own draw, and devices). The posterior ``N(μ, σ²)`` works
with :func:`bsam_optax.posterior`, :func:`bsam_optax.sample_posterior` and
:func:`bsam_optax.predictive` through :meth:`MFVIState.posterior_std`.

References:
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Eq. 5-7, 52-53, Alg. 1).
  Blundell et al., `Weight Uncertainty in Neural Networks
  <https://arxiv.org/abs/1505.05424>`_, ICML 2015.
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _noise

Params = Any
Updates = Any
ScalarOrSchedule = optax.ScalarOrSchedule

__all__ = ["MFVIState", "mfvi", "mfvi_sample"]


class MFVIState(NamedTuple):
  """State of :func:`mfvi`: Adam moments of the mean μ and of λ = log σ, and λ itself."""

  count: jax.Array  # shape (), int32: number of updates so far
  mean_m: Updates  # Adam's first moment of g_μ
  mean_v: Updates  # Adam's second moment of g_μ
  log_std: Updates  # λ = log σ, the variational log standard deviation
  log_std_m: Updates  # Adam's first moment of g_λ
  log_std_v: Updates  # Adam's second moment of g_λ

  def posterior_std(self):
    """σ = exp(λ), the posterior standard deviation (``optax.MaskedNode`` where masked)."""
    return jax.tree.map(jnp.exp, self.log_std)


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_number(name, value, *, positive=False, nonnegative=False, unit=False, schedule=False) -> None:
  # Python numbers are checked; arrays (e.g. traced by inject_hyperparams) pass through.
  if value is None or isinstance(value, (str, bool)) or (callable(value) and not schedule):
    kind = "a number or a schedule" if schedule else "a number"
    raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
  if not _is_python_number(value):
    return
  if positive and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")
  if nonnegative and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")
  if unit and not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value}")


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


def _gaussian_adam_update(
  state,
  grads,
  log_std_grads,
  params,
  *,
  learning_rate,
  std_learning_rate,
  n_data,
  weight_decay,
  b1,
  b2,
  eps,
  max_std=None,
):
  """The shared Adam update of (μ, λ) for a diagonal Gaussian with prior N(0, 1 / (N δ)).

  Returns ``(updates, count, mean_m, mean_v, log_std, log_std_m, log_std_v)``;
  ``updates`` is ``-α Adam(g_μ)`` in the dtypes of ``params``.
  """
  count = optax.safe_increment(state.count)
  std = state.posterior_std()
  g_mean = jax.tree.map(lambda g, w: g.astype(_state_dtype(w)) + weight_decay * w, grads, params)
  g_log_std = jax.tree.map(
    lambda gs, s: gs.astype(s.dtype) + weight_decay * jnp.square(s) - 1.0 / n_data, log_std_grads, std
  )
  mean_m, mean_v = _adam_moments(state.mean_m, state.mean_v, g_mean, b1, b2)
  log_std_m, log_std_v = _adam_moments(state.log_std_m, state.log_std_v, g_log_std, b1, b2)
  lr = _value_at(learning_rate, state.count)
  lr_std = lr if std_learning_rate is None else _value_at(std_learning_rate, state.count)
  updates = jax.tree.map(
    lambda d, w: (-lr * d).astype(jnp.result_type(w)), _adam_direction(mean_m, mean_v, count, b1, b2, eps), params
  )
  log_std = jax.tree.map(
    lambda ls, d: ls - lr_std * d, state.log_std, _adam_direction(log_std_m, log_std_v, count, b1, b2, eps)
  )
  if max_std is not None:
    log_std = jax.tree.map(lambda ls: jnp.minimum(ls, jnp.log(max_std)), log_std)
  return updates, count, mean_m, mean_v, log_std, log_std_m, log_std_v


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
    An :class:`optax.GradientTransformationExtraArgs` with state :class:`MFVIState`.

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

  References:
    Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
    Inference <https://arxiv.org/abs/2210.10452>`_, 2022 (Alg. 1, Eq. 52).
  """
  _check_number("learning_rate", learning_rate, nonnegative=True, schedule=True)
  _check_number("n_data", n_data, positive=True)
  _check_number("weight_decay", weight_decay, positive=True)
  _check_number("init_std", init_std, positive=True)
  if std_learning_rate is not None:
    _check_number("std_learning_rate", std_learning_rate, nonnegative=True, schedule=True)
  _check_number("b1", b1, unit=True)
  _check_number("b2", b2, unit=True)
  _check_number("eps", eps, nonnegative=True)

  def init_fn(params):
    _check_params(params, "mfvi")
    zeros, log_std = _init_gaussian(params, init_std)
    return MFVIState(
      count=jnp.zeros([], jnp.int32),
      mean_m=zeros,
      mean_v=zeros,
      log_std=log_std,
      log_std_m=zeros,
      log_std_v=zeros,
    )

  def update_fn(updates, state, params=None, *, log_std_grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("mfvi needs params (the mean μ) in update(..., params)")
    if log_std_grads is None:
      raise ValueError(
        "mfvi's update needs log_std_grads=, the product g ⊙ (θ − μ) of the gradient at the sample "
        "θ = mfvi_sample(...) and θ − μ; call tx.update(grads, state, params, log_std_grads=...) or use mfvi_step"
      )
    new_updates, count, mean_m, mean_v, log_std, log_std_m, log_std_v = _gaussian_adam_update(
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
    )
    return new_updates, MFVIState(count, mean_m, mean_v, log_std, log_std_m, log_std_v)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_state(opt_state, state_type, method: str):
  """Finds the one ``state_type`` inside any optax state (chains, wrappers), by type."""
  if isinstance(opt_state, state_type):
    return opt_state
  found = [
    x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state_type)) if isinstance(x, state_type)
  ]
  if len(found) != 1:
    raise ValueError(
      f"opt_state must contain exactly one {state_type.__name__} (the state of bsam_optax.{method}), "
      f"found {len(found)}; did you pass the state of tx.init(params) for a tx that contains {method}?"
    )
  return found[0]


def _map_unmasked(fn, state_tree, *trees):
  """``jax.tree.map(fn, state_tree, *trees)``, returning ``trees[0]``'s leaf where optax.masked masked it."""
  return jax.tree.map(
    lambda s, *xs: xs[0] if isinstance(s, optax.MaskedNode) else fn(s, *xs),
    state_tree,
    *trees,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def mfvi_sample(key: jax.Array, params: Params, opt_state, *, noise: str = "auto") -> Params:
  """Draws θ = μ + σ z, z ~ N(0, I): the point of MFVI's gradient (Alg. 1, step 2).

  Args:
    key: a PRNG key; the only source of randomness.
    params: μ, the posterior mean.
    opt_state: the state of a transformation containing one :func:`mfvi`.
    noise: the generator, as in :func:`bsam_optax._noise.normal_like`.

  Returns:
    θ, with the structure and dtypes of ``params`` (masked leaves are μ).
  """
  state = find_state(opt_state, MFVIState, "mfvi")
  z = _noise.normal_like(key, params)
  del noise
  return _map_unmasked(lambda ls, w, z: (w + jnp.exp(ls) * z).astype(jnp.result_type(w)), state.log_std, params, z)
