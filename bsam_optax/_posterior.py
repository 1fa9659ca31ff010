"""The learned posterior: samples and model-averaged predictions, for any method with a Gaussian posterior.

A method that learns a diagonal Gaussian ``q(θ) = N(mean, std²)`` keeps ``std``
in its optimizer state: its state class (a NamedTuple) defines a method
``posterior_std(self)`` returning a pytree of standard deviations shaped like
the parameters (``optax.MaskedNode`` where the method is masked out). That is
the whole protocol: :func:`find_posterior_state` finds such a state inside any
optax state, and :func:`posterior`, :func:`sample_posterior` and
:func:`predictive` work for every method that follows it (bSAM's
``N(ω, 1 / (N s))`` and the variational methods).

The paper predicts with the model average ``p(y | x) ≈ 1/S Σ_j p(y | x, θ_j)``,
``θ_j ~ q``, with S = 32 samples (Sec. 4; App. F.6 shows that more help).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _noise
from bsam_optax._checks import check_count

__all__ = ["find_posterior_state", "gaussian_params", "posterior", "predictive", "sample_posterior"]

Params = Any


def _is_posterior_state(x) -> bool:
  return isinstance(x, tuple) and callable(getattr(type(x), "posterior_std", None))


def find_state(opt_state, is_state: Callable[[Any], bool], what: str):
  """The one node of ``opt_state`` for which ``is_state`` holds, found by type, never by position.

  Works through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.masked`` and any other wrapper whose state is
  a pytree. Raises a ValueError naming ``what`` unless there is exactly one.
  """
  if is_state(opt_state):
    return opt_state
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(x)]
  if len(found) != 1:
    raise ValueError(
      f"opt_state must contain exactly one {what}, found {len(found)}; did you pass the state of "
      f"tx.init(params) for a tx that contains it?"
    )
  return found[0]


def find_posterior_state(opt_state):
  """The one Gaussian-posterior state (bSAM's, MFVI's, ...) inside any optax state.

  Raises:
    ValueError: if there is none, or more than one.
  """
  return find_state(opt_state, _is_posterior_state, "Gaussian-posterior state (a state with posterior_std())")


def _is_masked(x) -> bool:
  return isinstance(x, optax.MaskedNode)


def posterior(params: Params, opt_state) -> tuple[Params, Params]:
  """The learned diagonal Gaussian posterior ``N(mean, std**2)``.

  Args:
    params: the posterior mean (bSAM's ω).
    opt_state: the state of a transformation containing one method with a
      Gaussian posterior (:func:`~bsam_optax.bsam`: ``std = 1 / sqrt(N s)``).

  Returns:
    ``(mean, std)``. Leaves masked out of the method (``optax.masked``) have
    ``std`` 0: they are point estimates.
  """
  std = find_posterior_state(opt_state).posterior_std()
  std = jax.tree.map(
    lambda s, w: jnp.zeros_like(w) if _is_masked(s) else s.astype(jnp.result_type(w)), std, params, is_leaf=_is_masked
  )
  return params, std


def gaussian_params(key: jax.Array, params: Params, opt_state, *, temperature=1.0, noise: str = "auto") -> Params:
  """Draws θ ~ N(mean, T std²) from the posterior held in ``opt_state`` (one sample, T = ``temperature``).

  Leaves masked out of the method stay at the mean. Leaf ``j`` draws its
  standard normals from ``fold_in(key, j)``; see :mod:`bsam_optax._noise` for
  the generator (``noise``).
  """
  std = find_posterior_state(opt_state).posterior_std()
  z = _noise.normal_like(key, params, noise=noise)
  scale = jnp.sqrt(jnp.asarray(temperature, jnp.float32))
  if isinstance(temperature, (int, float)) and temperature == 1.0:
    scale = None
  return jax.tree.map(
    lambda s, w, z: w if _is_masked(s) else (w + z * (s if scale is None else scale * s)).astype(w.dtype),
    std,
    params,
    z,
    is_leaf=_is_masked,
  )


def _check_num_samples(num_samples) -> None:
  check_count("num_samples", num_samples)


def sample_posterior(key: jax.Array, params, opt_state, num_samples: int):
  """Draws ``num_samples`` parameter sets θ_j ~ N(ω, 1 / (N s)).

  Sample ``j`` is :func:`gaussian_params` (for bSAM: :func:`bsam_optax.noisy_params`) with ``fold_in(key, j)``, so
  samples can be regenerated one at a time or in chunks with the same result.

  Args:
    key: a PRNG key.
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    num_samples: S, the number of samples.

  Returns:
    A pytree like ``params`` with a leading axis of size ``num_samples``.
  """
  _check_num_samples(num_samples)
  return _sample(key, params, opt_state, jnp.arange(num_samples))


def _sample(key, params, opt_state, indices):
  return jax.vmap(lambda i: gaussian_params(jax.random.fold_in(key, i), params, opt_state))(indices)


def predictive(
  apply_fn: Callable[[Any, Any], jax.Array],
  key: jax.Array,
  params,
  opt_state,
  inputs,
  num_samples: int = 32,
  *,
  chunk_size: int | None = None,
  link: Callable[[jax.Array], jax.Array] | None = jax.nn.softmax,
) -> jax.Array:
  """The model-averaged predictive ``1/S Σ_j link(apply_fn(θ_j, inputs))``.

  Samples are evaluated ``chunk_size`` at a time (vmapped within a chunk,
  ``lax.map`` across chunks) so that memory stays bounded; the result does not
  depend on ``chunk_size``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> outputs`` (e.g. logits).
    key: a PRNG key; sample ``j`` uses ``fold_in(key, j)`` as in
      :func:`sample_posterior`.
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    inputs: what ``apply_fn`` takes.
    num_samples: S, the number of posterior samples averaged.
    chunk_size: how many samples to evaluate at once; ``None`` for all. Must
      divide ``num_samples``.
    link: applied to each sample's output before averaging (softmax turns
      logits into class probabilities); ``None`` for identity.

  Returns:
    The average over samples of ``link(apply_fn(θ_j, inputs))``.
  """
  _check_num_samples(num_samples)
  chunk_size = num_samples if chunk_size is None else chunk_size
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if num_samples % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must divide num_samples={num_samples}")
  link = (lambda x: x) if link is None else link

  def chunk_mean(indices):
    thetas = _sample(key, params, opt_state, indices)
    outputs = jax.vmap(lambda theta: link(apply_fn(theta, inputs)))(thetas)
    return jnp.mean(outputs, axis=0)

  chunks = jnp.arange(num_samples).reshape(num_samples // chunk_size, chunk_size)
  return jnp.mean(jax.lax.map(chunk_mean, chunks), axis=0)
