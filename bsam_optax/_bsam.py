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
elementwise. :func:`bsam` is the last three lines; :func:`noisy_params` and
:func:`perturbed_params` are the first stages, and
:func:`bsam_optax.bsam_step` fuses all of them into one compiled step.

Deviation from the authors' research code: their mean update divides by the
*old* scale ``s`` (computed before the scale update). We follow the seed
equations above and the paper's Alg. 1 ordering, dividing by the *new* ``s``.
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from bsam_optax import _noise

Params = Any
Updates = Any
ScalarOrSchedule = optax.ScalarOrSchedule

__all__ = [
  "BSAMState",
  "bsam",
  "find_bsam_state",
  "noisy_params",
  "perturbed_params",
  "posterior",
]


class BSAMState(NamedTuple):
  """State of :func:`bsam`.

  The posterior is ``N(params, 1 / (n_data * scale))``; ``rho`` and ``n_data``
  live here (as scalars) so that the stages :func:`noisy_params` and
  :func:`perturbed_params` need nothing but the optimizer state.
  """

  count: jax.Array  # shape (), int32: number of updates so far
  momentum: Updates  # g_m, the EMA of perturbed gradients (+ δω)
  scale: Updates  # s, the diagonal precision; variance is 1 / (N s)
  rho: jax.Array  # shape (), ρ for the next step (schedules evaluated at count)
  n_data: jax.Array  # shape (), N, the (possibly tempered) dataset size


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_hyperparameters(learning_rate, n_data, rho, b1, b2, weight_decay, damping, init_scale) -> None:
  # Only Python scalars are checked: schedules and (traced) arrays, as passed by
  # `optax.inject_hyperparams`, go through unchecked.
  if _is_python_number(learning_rate) and learning_rate < 0:
    raise ValueError(f"learning_rate must be >= 0, got {learning_rate}")
  if _is_python_number(n_data) and n_data <= 0:
    raise ValueError(f"n_data must be > 0 (the dataset size N), got {n_data}")
  if _is_python_number(rho) and rho < 0:
    raise ValueError(f"rho must be >= 0, got {rho}")
  for name, value in (("b1", b1), ("b2", b2)):
    if _is_python_number(value) and not 0.0 <= value < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {value}")
  if _is_python_number(weight_decay) and weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
  if _is_python_number(damping) and damping < 0:
    raise ValueError(f"damping must be >= 0, got {damping}")
  if _is_python_number(init_scale) and init_scale <= 0:
    raise ValueError(f"init_scale must be > 0, got {init_scale}")
  for name, value in (
    ("n_data", n_data),
    ("b1", b1),
    ("b2", b2),
    ("weight_decay", weight_decay),
    ("damping", damping),
    ("init_scale", init_scale),
  ):
    if callable(value) or isinstance(value, (str, bool)) or value is None:
      raise TypeError(f"{name} must be a number, got {type(value).__name__}")


def _check_params(params) -> None:
  for leaf in jax.tree.leaves(params):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(
        f"params must have floating-point dtypes (bSAM samples Gaussian noise around them), got a leaf of dtype {dtype}"
      )


def _value_at(value: ScalarOrSchedule, count) -> jax.Array:
  return value(count) if callable(value) else value


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

  The posterior over the parameters is ``N(ω, 1 / (N s))``; see
  :func:`posterior`. Use :func:`noisy_params` and :func:`perturbed_params` to
  build the two points at which the gradients are taken, or
  :func:`bsam_optax.bsam_step` for the whole compiled step.

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
  _check_hyperparameters(learning_rate, n_data, rho, b1, b2, weight_decay, damping, init_scale)

  def init_fn(params):
    _check_params(params)
    count = jnp.zeros([], jnp.int32)
    return BSAMState(
      count=count,
      momentum=otu.zeros_like(params),
      scale=otu.full_like(params, init_scale),
      rho=jnp.asarray(_value_at(rho, count), jnp.float32),
      n_data=jnp.asarray(n_data, jnp.float32),
    )

  def update_fn(updates, state, params=None, *, noisy_grads=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("bsam needs params (ω) in update(..., params)")
    if noisy_grads is None:
      raise ValueError(
        "bsam's update needs noisy_grads=, the gradient at θ drawn by "
        "noisy_params; call tx.update(perturbed_grads, state, params, "
        "noisy_grads=noisy_grads) or use bsam_step"
      )
    momentum = jax.tree.map(
      lambda m, g_eps, w: b1 * m + (1 - b1) * (g_eps + weight_decay * w),
      state.momentum,
      updates,
      params,
    )
    scale = jax.tree.map(
      lambda s, g: b2 * s + (1 - b2) * (jnp.sqrt(s) * jnp.abs(g) + weight_decay + damping),
      state.scale,
      noisy_grads,
    )
    lr = _value_at(learning_rate, state.count)
    new_updates = jax.tree.map(lambda m, s, w: (-lr * m / s).astype(jnp.result_type(w)), momentum, scale, params)
    count = optax.safe_increment(state.count)
    new_state = BSAMState(
      count=count,
      momentum=momentum,
      scale=scale,
      rho=jnp.asarray(_value_at(rho, count), state.rho.dtype),
      n_data=jnp.asarray(n_data, state.n_data.dtype),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_bsam_state(opt_state) -> BSAMState:
  """Finds the one :class:`BSAMState` inside any optax state.

  Works through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.masked`` and any other wrapper whose state is
  a pytree, by type rather than by position.

  Raises:
    ValueError: if ``opt_state`` holds no bsam state, or more than one.
  """
  if isinstance(opt_state, BSAMState):
    return opt_state
  found = [
    x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, BSAMState)) if isinstance(x, BSAMState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"opt_state must contain exactly one BSAMState (the state of "
      f"bsam_optax.bsam), found {len(found)}; did you pass the state of "
      f"tx.init(params) for a tx that contains bsam?"
    )
  return found[0]


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def _map_unmasked(fn, scale, *trees):
  """``jax.tree.map(fn, scale, *trees)``, leaving leaves masked by optax.masked."""
  return jax.tree.map(
    lambda s, *xs: xs[0] if _is_masked(s) else fn(s, *xs),
    scale,
    *trees,
    is_leaf=_is_masked,
  )


def noisy_params(key: jax.Array, params: Params, opt_state) -> Params:
  """Draws θ ~ N(ω, 1 / (N s)) for the first gradient of a bSAM step.

  Each leaf gets its own standard-normal draw from ``fold_in(key, leaf
  index)`` (see :mod:`bsam_optax._noise`); the generator is the one of
  ``key``'s implementation: threefry for ``jax.random.key(seed)``, or the
  several times faster ``jax.random.key(seed, impl=bsam_optax.hash_prng_impl)``.

  Args:
    key: a PRNG key; the only source of randomness.
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.

  Returns:
    θ, with the structure and dtypes of ``params``.
  """
  state = find_bsam_state(opt_state)
  noise = _noise.normal_like(key, params)
  return _map_unmasked(
    lambda s, w, z: (w + z * jax.lax.rsqrt(state.n_data * s)).astype(w.dtype),
    state.scale,
    params,
    noise,
  )


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


def posterior(params: Params, opt_state) -> tuple[Params, Params]:
  """The learned diagonal Gaussian posterior ``N(mean, std**2)``.

  Args:
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.

  Returns:
    ``(mean, std)`` with ``std = 1 / sqrt(N s)`` per leaf. Leaves masked out of
    bsam (``optax.masked``) have ``std`` 0: they are point estimates.
  """
  state = find_bsam_state(opt_state)
  std = _map_unmasked(
    lambda s, w: jax.lax.rsqrt(state.n_data * s).astype(w.dtype),
    state.scale,
    jax.tree.map(jnp.zeros_like, params),
  )
  return params, std
