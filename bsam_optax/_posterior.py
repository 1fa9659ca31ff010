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

A tempered posterior ``q_T(θ) = N(mean, T std²)`` scales the variance by the
temperature T: ``θ_j = mean + √T std z_j`` with the same ``z_j`` for every T,
so T = 1 is ``q`` and T = 0 is the mean (a point estimate). Training with N
scaled up (the paper's App. G) tempers at training time;
:func:`select_temperature` picks T after training, on held-out data.
"""

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bsam_optax import _noise
from bsam_optax._checks import check_count

__all__ = [
  "PosteriorSummary",
  "choose_temperature",
  "find_posterior_state",
  "gaussian_params",
  "posterior",
  "posterior_diagnostics",
  "predictive",
  "sample_posterior",
  "select_temperature",
  "tempered_nlls",
]

Params = Any

# 0 (the posterior mean), then 2^-10 ... 2^2: a factor 2 apart, 1 included.
DEFAULT_TEMPERATURES = (0.0,) + tuple(2.0**k for k in range(-10, 3))


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
  scale: jax.Array | None = jnp.sqrt(jnp.asarray(temperature, jnp.float32))
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


def _check_temperature(temperature, name: str = "temperature") -> None:
  # Python numbers and concrete arrays are checked; traced values go through.
  if isinstance(temperature, bool) or temperature is None or isinstance(temperature, (str, bytes)):
    raise TypeError(f"{name} must be a number, got {temperature!r}")
  if isinstance(temperature, (int, float)):
    value = float(temperature)
  elif isinstance(temperature, (jax.Array, np.ndarray, np.generic)):
    if jnp.ndim(temperature) != 0:
      raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(temperature)}")
    dtype = jnp.result_type(temperature)
    if not jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.complexfloating):
      raise TypeError(f"{name} must be a real number, got dtype {dtype}")
    if isinstance(temperature, jax.core.Tracer):
      return
    value = float(temperature)
  else:
    raise TypeError(f"{name} must be a number, got {type(temperature).__name__}")
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def _is_zero(temperature) -> bool:
  return isinstance(temperature, (int, float)) and temperature == 0


def sample_posterior(key: jax.Array, params, opt_state, num_samples: int, *, temperature=1.0):
  """Draws ``num_samples`` parameter sets θ_j ~ N(ω, T / (N s)) (T = ``temperature``).

  Sample ``j`` is :func:`gaussian_params` (for bSAM at T = 1:
  :func:`bsam_optax.noisy_params`) with ``fold_in(key, j)``, so samples can be
  regenerated one at a time or in chunks with the same result, and every
  temperature uses the same standard normals ``z_j``: ``θ_j = ω + √T σ z_j``.

  Args:
    key: a PRNG key.
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    num_samples: S, the number of samples.
    temperature: T >= 0, a number (or a scalar array); the variance is
      multiplied by T. ``T = 0`` returns ω itself for every sample.

  Returns:
    A pytree like ``params`` with a leading axis of size ``num_samples``.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.zeros(3)}
    >>> state = bo.bsam(0.1, n_data=100).init(params)
    >>> bo.sample_posterior(jax.random.key(0), params, state, 4, temperature=0.5)["w"].shape
    (4, 3)
  """
  _check_num_samples(num_samples)
  _check_temperature(temperature)
  return _sample(key, params, opt_state, jnp.arange(num_samples), temperature)


def _sample(key, params, opt_state, indices, temperature=1.0):
  if _is_zero(temperature):
    return jax.tree.map(lambda w: jnp.broadcast_to(w, indices.shape + jnp.shape(w)), params)
  return jax.vmap(lambda i: gaussian_params(jax.random.fold_in(key, i), params, opt_state, temperature=temperature))(
    indices
  )


def _check_chunk_size(chunk_size, num_samples: int) -> int:
  chunk_size = num_samples if chunk_size is None else chunk_size
  if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  if num_samples % chunk_size:
    raise ValueError(f"chunk_size={chunk_size} must divide num_samples={num_samples}")
  return chunk_size


def _over_chunks(fn, num_samples: int, chunk_size: int):
  """``lax.map(fn, chunks of sample indices)``: bounded memory, the same result for every chunk size."""
  chunks = jnp.arange(num_samples).reshape(num_samples // chunk_size, chunk_size)
  return jax.lax.map(fn, chunks)


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
  temperature=1.0,
) -> jax.Array:
  """The model-averaged predictive ``1/S Σ_j link(apply_fn(θ_j, inputs))``, θ_j ~ N(ω, T / (N s)).

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
    temperature: T >= 0, the posterior's temperature (see
      :func:`sample_posterior`). A Python ``0`` returns exactly
      ``link(apply_fn(params, inputs))``, the posterior mean's prediction.

  Returns:
    The average over samples of ``link(apply_fn(θ_j, inputs))``.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.ones((2, 3))}
    >>> state = bo.bsam(0.1, n_data=100).init(params)
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> probs = bo.predictive(apply_fn, jax.random.key(0), params, state, jnp.ones((5, 2)), 8, temperature=0.1)
    >>> probs.shape
    (5, 3)
  """
  _check_num_samples(num_samples)
  _check_temperature(temperature)
  chunk_size = _check_chunk_size(chunk_size, num_samples)
  link = (lambda x: x) if link is None else link
  if _is_zero(temperature):
    return link(apply_fn(params, inputs))

  def chunk_mean(indices):
    thetas = _sample(key, params, opt_state, indices, temperature)
    outputs = jax.vmap(lambda theta: link(apply_fn(theta, inputs)))(thetas)
    return jnp.mean(outputs, axis=0)

  return jnp.mean(_over_chunks(chunk_mean, num_samples, chunk_size), axis=0)


def _check_inputs_labels(inputs, labels) -> jax.Array:
  # Shapes and dtypes only, so that it also checks tracers (tempered_nlls under jit or vmap).
  leaves = jax.tree.leaves(inputs)
  if not leaves:
    raise ValueError("inputs must hold at least one array, got an empty pytree")
  if labels is None or isinstance(labels, (str, bytes)):
    raise TypeError(f"labels must be an array of integer class indices, got {labels!r}")
  labels = labels if isinstance(labels, jax.Array) else np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D (n,), got shape {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integer class indices, got dtype {labels.dtype}")
  if labels.shape[0] == 0:
    raise ValueError("labels must not be empty: choosing a temperature needs held-out examples")
  for leaf in leaves:
    if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != labels.shape[0]:
      raise ValueError(
        f"inputs and labels must have the same number of examples (leading axis), "
        f"got inputs shape {jnp.shape(leaf)} and labels shape {labels.shape}"
      )
  return jnp.asarray(labels)


def _candidates(temperatures) -> tuple[float, ...]:
  if temperatures is None:
    return DEFAULT_TEMPERATURES
  if isinstance(temperatures, (int, float, str, bytes)) or not isinstance(
    temperatures, Sequence | np.ndarray | jax.Array
  ):
    raise TypeError(f"temperatures must be a sequence of numbers, got {temperatures!r}")
  for t in temperatures:
    _check_temperature(t, "temperatures")
  return (0.0, *sorted({float(t) for t in temperatures} - {0.0}))


def _check_rule(rule) -> None:
  if rule not in ("one_se", "min"):
    raise ValueError(f"rule must be 'one_se' or 'min', got {rule!r}")


def _check_table_args(apply_fn, params, inputs, labels, temperatures, num_samples, chunk_size):
  """``(candidates, chunk_size, labels)`` after checking the arguments of :func:`tempered_nlls`."""
  _check_num_samples(num_samples)
  chunk_size = _check_chunk_size(chunk_size, num_samples)
  labels = _check_inputs_labels(inputs, labels)
  candidates = _candidates(temperatures)
  logits_shape = jax.eval_shape(apply_fn, params, inputs).shape
  if len(logits_shape) != 2 or logits_shape[0] != labels.shape[0]:
    raise ValueError(
      f"apply_fn must return logits of shape (n, num_classes) = ({labels.shape[0]}, k), got {logits_shape}"
    )
  num_classes = logits_shape[1]
  if not isinstance(labels, jax.core.Tracer):  # concrete (also inside a trace, as a constant): check on the host
    low, high = int(np.min(np.asarray(labels))), int(np.max(np.asarray(labels)))
    if low < 0 or high >= num_classes:
      raise ValueError(f"labels must be in [0, {num_classes}), got values in [{low}, {high}]")
  return candidates, chunk_size, labels


def tempered_nlls(
  apply_fn: Callable[[Any, Any], jax.Array],
  key: jax.Array,
  params,
  opt_state,
  inputs,
  labels,
  *,
  temperatures: Sequence[float] | None = None,
  num_samples: int = 32,
  chunk_size: int | None = None,
) -> tuple[tuple[float, ...], jax.Array]:
  """The model average's per-example NLL at every candidate temperature: what :func:`select_temperature` compares.

  Row ``k`` holds ``-log p_T(y_i | x_i)`` for ``T = candidates[k]``, with
  ``p_T(y | x) = 1/S Σ_j softmax(apply_fn(ω + √T σ z_j, x))`` and the *same*
  ``z_j`` (those of :func:`predictive` with ``key``) for every T; row 0 is
  T = 0, the posterior mean's own prediction. Nothing here syncs with the
  host: ``params``, ``opt_state``, ``inputs``, ``labels`` and ``key`` may be
  traced, so it runs inside ``jax.jit`` and ``jax.vmap`` (e.g. over the runs
  of a hyper-parameter grid); the candidates are static. With
  :func:`choose_temperature` it is :func:`select_temperature` on device.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``, shape ``(n, num_classes)``.
    key: a PRNG key; use the same one for :func:`predictive` to reuse the samples.
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    inputs: the held-out inputs (any pytree whose leaves have a leading axis n).
    labels: integer class indices in ``[0, num_classes)``, shape ``(n,)``
      (their range is checked when they are concrete).
    temperatures: the candidates, numbers >= 0 (0 is added if missing);
      ``None`` for 0 and the powers of two ``2^-10 ... 2^2``.
    num_samples: S, the samples per temperature.
    chunk_size: how many samples to evaluate at once (as in :func:`predictive`).

  Returns:
    ``(candidates, nlls)``: the temperatures in increasing order, 0 first,
    and the per-example NLLs, shape ``(len(candidates), n)``.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]])}
    >>> state = bo.bsam(0.1, n_data=10).init(params)
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]), jnp.array([0, 1, 1])
    >>> apply_fn = lambda p, x: x @ p["w"]
    >>> candidates, nlls = bo.tempered_nlls(apply_fn, jax.random.key(0), params, state, x, y, temperatures=[0.5, 1])
    >>> candidates, nlls.shape
    ((0.0, 0.5, 1.0), (3, 3))
    >>> float(bo.choose_temperature(candidates, nlls)) in candidates
    True
  """
  candidates, chunk_size, labels = _check_table_args(
    apply_fn, params, inputs, labels, temperatures, num_samples, chunk_size
  )

  def nll(log_probs):  # per example
    return -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]

  def at(t):
    def chunk_logsumexp(indices):
      thetas = _sample(key, params, opt_state, indices, t)
      log_probs = jax.vmap(lambda theta: jax.nn.log_softmax(apply_fn(theta, inputs)))(thetas)
      return jax.nn.logsumexp(log_probs, axis=0)

    per_chunk = _over_chunks(chunk_logsumexp, num_samples, chunk_size)
    return nll(jax.nn.logsumexp(per_chunk, axis=0) - math.log(num_samples))

  rows = [nll(jax.nn.log_softmax(apply_fn(params, inputs)))[None]]
  if len(candidates) > 1:
    rows.append(jax.lax.map(at, jnp.asarray(candidates[1:], jnp.float32)))
  return candidates, jnp.concatenate(rows)


def choose_temperature(candidates: Sequence[float], nlls: jax.Array, *, rule: str = "one_se") -> jax.Array:
  """:func:`select_temperature`'s rule on a table of per-example NLLs; traceable (``jit``, ``vmap``).

  ``best`` is the candidate with the lowest mean NLL (ties: the smaller T).
  With ``rule="min"`` it wins; with ``rule="one_se"`` (Breiman's
  one-standard-error rule) the smallest T whose paired differences
  ``d_i = nlls[k, i] − nlls[best, i]`` have ``mean(d) <= std(d) / √n`` wins.
  Candidates whose mean NLL is not finite are never chosen; if none is finite,
  T = 0.

  Args:
    candidates: the temperatures, increasing (as :func:`tempered_nlls` returns them).
    nlls: per-example NLLs, shape ``(len(candidates), n)``.
    rule: ``"one_se"`` or ``"min"``.

  Returns:
    The chosen T, a float32 scalar array.
  """
  _check_rule(rule)
  temps = np.asarray(candidates, np.float32)
  if temps.ndim != 1 or jnp.ndim(nlls) != 2 or jnp.shape(nlls)[0] != temps.shape[0]:
    raise ValueError(f"nlls must have shape (len(candidates), n) = ({temps.shape[0]}, n), got {jnp.shape(nlls)}")
  if np.any(np.diff(temps) <= 0):
    raise ValueError(f"candidates must be increasing, got {tuple(candidates)}")
  return jnp.asarray(temps)[_choice(nlls, rule)]


def _choice(nlls: jax.Array, rule: str) -> jax.Array:
  # The index choose_temperature picks (0 when no candidate's mean NLL is finite).
  means = jnp.mean(nlls, axis=1)
  finite = jnp.isfinite(means)
  best = jnp.argmin(jnp.where(finite, means, jnp.inf))
  if rule == "one_se":
    d = nlls - nlls[best]
    within = finite & (jnp.mean(d, axis=1) <= jnp.std(d, axis=1) / math.sqrt(jnp.shape(nlls)[1]))
    best = jnp.where(jnp.any(within), jnp.argmax(within), best)
  return jnp.where(jnp.any(finite), best, 0)


def select_temperature(
  apply_fn: Callable[[Any, Any], jax.Array],
  key: jax.Array,
  params,
  opt_state,
  inputs,
  labels,
  *,
  temperatures: Sequence[float] | None = None,
  num_samples: int = 32,
  chunk_size: int | None = None,
  rule: str = "one_se",
) -> tuple[float, dict[float, float]]:
  """Picks the posterior temperature T by the model average's NLL on held-out data.

  For every candidate T the model average ``p_T(y | x) = 1/S Σ_j
  softmax(apply_fn(ω + √T σ z_j, x))`` is evaluated with the *same* ``z_j``
  (those of :func:`predictive` with ``key``), so the comparison between
  temperatures is not blurred by sampling noise. With ``rule="min"`` the T
  with the smallest ``NLL_T = -1/n Σ_i log p_T(y_i | x_i)`` wins (ties: the
  smaller T). With ``rule="one_se"`` (the default; Breiman's one-standard-error
  rule) the smallest T whose NLL is within one standard error of the best's
  wins, the error being that of the mean paired difference
  ``d_i = nll_T(i) − nll_best(i)`` over the n examples: a gain smaller than
  the held-out set's own noise does not move T away from the posterior mean.
  T = 0, the posterior mean's prediction, is always a candidate: a posterior
  whose samples do not help on held-out data is reported as such, not hidden.

  Call it after training, with a validation split, then predict with
  ``predictive(..., temperature=T)``. It syncs with the host (it returns
  Python numbers); :func:`tempered_nlls` and :func:`choose_temperature` are
  the same computation for use inside ``jit`` or ``vmap``.

  Args:
    apply_fn: ``apply_fn(params, inputs) -> logits``, shape ``(n, num_classes)``.
    key: a PRNG key; use the same one for :func:`predictive` to reuse the samples.
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    inputs: the held-out inputs (any pytree whose leaves have a leading axis n).
    labels: integer class indices in ``[0, num_classes)``, shape ``(n,)``.
    temperatures: the candidates, numbers >= 0 (0 is added if missing);
      ``None`` for 0 and the powers of two ``2^-10 ... 2^2``.
    num_samples: S, the samples per temperature.
    chunk_size: how many samples to evaluate at once (as in :func:`predictive`).
    rule: ``"one_se"`` or ``"min"``, see above.

  Returns:
    ``(T, table)``: the selected temperature and ``{T: NLL_T}`` for every candidate.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.array([[1.0, -1.0], [-1.0, 1.0]])}
    >>> state = bo.bsam(0.1, n_data=10).init(params)
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]), jnp.array([0, 1, 1])
    >>> T, table = bo.select_temperature(lambda p, x: x @ p["w"], jax.random.key(0), params, state, x, y)
    >>> T in table and 0.0 in table
    True

  References:
    Wenzel et al., `How Good is the Bayes Posterior in Deep Neural Networks
    Really? <https://arxiv.org/abs/2002.02405>`_, ICML 2020 (tempered posteriors).
  """
  _check_rule(rule)
  candidates, chunk_size, labels = _check_table_args(
    apply_fn, params, inputs, labels, temperatures, num_samples, chunk_size
  )

  @jax.jit
  def choose(key, params, opt_state, inputs, labels):
    _, nlls = tempered_nlls(
      apply_fn, key, params, opt_state, inputs, labels, temperatures=candidates, num_samples=num_samples,
      chunk_size=chunk_size,
    )  # fmt: skip
    return _choice(nlls, rule), jnp.mean(nlls, axis=1)

  index, means = choose(key, params, opt_state, inputs, labels)
  return candidates[int(index)], {t: float(m) for t, m in zip(candidates, np.asarray(means), strict=True)}


class PosteriorSummary(NamedTuple):
  """What :func:`posterior_diagnostics` reports, for one leaf or for all parameters.

  Every field is a scalar array (computed on device; no host sync).
  """

  size: jax.Array  # number of entries with a posterior (masked leaves: 0)
  damping_fraction: jax.Array  # fraction whose data term is below `threshold` x (δ + γ)
  log_std_mean: jax.Array  # mean of log σ
  log_std_spread: jax.Array  # standard deviation of log σ over the entries (0: isotropic)
  std_min: jax.Array
  std_max: jax.Array


def posterior_diagnostics(params, opt_state, *, threshold: float = 0.1) -> tuple[PosteriorSummary, dict]:
  """What the learned posterior ``N(ω, 1 / (N s))`` is: data-shaped or set by the damping.

  bSAM's scale is an exponential average that, step by step, adds ``(1 − β2)``
  times a data term (Alg. 1: ``√s · |g|``) plus ``δ + γ``. Its state keeps the
  scale's two parts that are not data, ``s = init_part + damping_part +
  data_part`` with ``init_part = β2^t s₀`` and ``damping_part = (1 − β2^t)(δ
  + γ)`` (scalars), so the data term's average over the steps is ``data_part /
  (1 − β2^t)``. An entry is *damping-dominated* when that average is below
  ``threshold × (δ + γ)``, i.e. ``data_part < threshold × damping_part``: its
  std is within a few percent of ``1 / sqrt(N (δ + γ))`` (or of the initial
  one) whatever the data. A posterior that is damping-dominated almost
  everywhere is an isotropic Gaussian whose only knob is N, and its model
  average is the posterior mean plus isotropic noise.

  Any Gaussian-posterior state works (see :func:`find_posterior_state`); the
  damping fractions need its optional method ``damping_dominated(threshold)``
  (a pytree of booleans), and are NaN without it.

  Args:
    params: ω, the posterior mean.
    opt_state: an optax state holding one Gaussian posterior (e.g. of :func:`~bsam_optax.bsam`).
    threshold: the data term's share of ``δ + γ`` below which an entry counts as
      damping-dominated.

  Returns:
    ``(overall, per_leaf)``: a :class:`PosteriorSummary` over all entries, and
    ``{leaf path: PosteriorSummary}`` for every leaf with a posterior.

  Example:
    >>> import jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.ones(3)}
    >>> tx = bo.bsam(0.1, n_data=100)
    >>> state = tx.init(params)
    >>> _, state = tx.update(params, state, params, noisy_grads={"w": jnp.array([0.0, 0.001, 1.0])})
    >>> overall, per_leaf = bo.posterior_diagnostics(params, state)
    >>> print(f"{float(overall.damping_fraction):.3f}", list(per_leaf))
    0.667 ["['w']"]
  """
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
    raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
  state = find_posterior_state(opt_state)
  std = state.posterior_std()
  dominated_fn = getattr(state, "damping_dominated", None)
  dominated = dominated_fn(threshold) if callable(dominated_fn) else jax.tree.map(lambda s: s, std, is_leaf=_is_masked)
  paths = jax.tree_util.tree_flatten_with_path(std, is_leaf=_is_masked)[0]
  per_leaf = {}
  for (path, sigma), flags in zip(paths, jax.tree.leaves(dominated, is_leaf=_is_masked), strict=True):
    if _is_masked(sigma):
      continue
    log_std = jnp.log(sigma.astype(jnp.float32))
    fraction = jnp.mean(flags.astype(jnp.float32)) if callable(dominated_fn) else jnp.asarray(jnp.nan, jnp.float32)
    per_leaf[jax.tree_util.keystr(path)] = PosteriorSummary(
      size=jnp.asarray(sigma.size, jnp.float32),
      damping_fraction=fraction,
      log_std_mean=jnp.mean(log_std),
      log_std_spread=jnp.std(log_std),
      std_min=jnp.min(sigma).astype(jnp.float32),
      std_max=jnp.max(sigma).astype(jnp.float32),
    )
  if not per_leaf:
    nan = jnp.asarray(jnp.nan, jnp.float32)
    return PosteriorSummary(jnp.zeros([], jnp.float32), nan, nan, nan, nan, nan), per_leaf
  leaves = list(per_leaf.values())
  sizes = jnp.stack([x.size for x in leaves])
  weights = sizes / jnp.sum(sizes)

  def weighted(field):
    return jnp.sum(weights * jnp.stack([getattr(x, field) for x in leaves]))

  mean = weighted("log_std_mean")
  # The pooled variance: within-leaf variances plus the leaf means' spread around the overall mean.
  variance = jnp.sum(weights * jnp.stack([x.log_std_spread**2 + (x.log_std_mean - mean) ** 2 for x in leaves]))
  overall = PosteriorSummary(
    size=jnp.sum(sizes),
    damping_fraction=weighted("damping_fraction"),
    log_std_mean=mean,
    log_std_spread=jnp.sqrt(variance),
    std_min=jnp.min(jnp.stack([x.std_min for x in leaves])),
    std_max=jnp.max(jnp.stack([x.std_max for x in leaves])),
  )
  return overall, per_leaf
