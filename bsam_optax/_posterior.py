"""The learned posterior: samples and model-averaged predictions.

bSAM's posterior is ``q(θ) = N(ω, 1 / (N s))`` (see :func:`bsam_optax.posterior`).
The paper predicts with the model average ``p(y | x) ≈ 1/S Σ_j p(y | x, θ_j)``,
``θ_j ~ q``, with S = 32 samples (Sec. 4; App. F.6 shows that more help).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bsam_optax import _bsam

__all__ = ["predictive", "sample_posterior"]


def _check_num_samples(num_samples) -> None:
  if isinstance(num_samples, bool) or not isinstance(num_samples, int):
    raise TypeError(f"num_samples must be an int, got {num_samples!r}")
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")


def sample_posterior(key: jax.Array, params, opt_state, num_samples: int):
  """Draws ``num_samples`` parameter sets θ_j ~ N(ω, 1 / (N s)).

  Sample ``j`` is :func:`bsam_optax.noisy_params` with ``fold_in(key, j)``, so
  samples can be regenerated one at a time or in chunks with the same result.

  Args:
    key: a PRNG key.
    params: ω, the posterior mean.
    opt_state: the state of a transformation containing one :func:`bsam`.
    num_samples: S, the number of samples.

  Returns:
    A pytree like ``params`` with a leading axis of size ``num_samples``.
  """
  _check_num_samples(num_samples)
  return _sample(key, params, opt_state, jnp.arange(num_samples))


def _sample(key, params, opt_state, indices):
  return jax.vmap(lambda i: _bsam.noisy_params(jax.random.fold_in(key, i), params, opt_state))(indices)


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
    opt_state: the state of a transformation containing one :func:`bsam`.
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
