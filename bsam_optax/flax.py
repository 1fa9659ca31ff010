"""Flax integration: linen ``TrainState`` and train step, NNX train step, and the posterior of both.

Both paths run the bSAM step of :func:`bsam_optax.bsam_step`::

  θ   ~ N(ω, 1 / (N s))          # forward + backward pass 1 (the "noisy" pass)
  g   = ∇ℓ(θ)
  g_ε = ∇ℓ(ω + ρ g / s)          # forward + backward pass 2 (the "perturbed" pass)
  tx.update(g_ε, state, ω, noisy_grads=|g|)

**Switching a Flax example to bSAM.** The optimizer becomes ``bo.bsam(...)``
(see the hyper-parameter guide in the documentation: α behaves like an SGD
learning rate, not an Adam one) and the train step's gradient line changes:
``jax.value_and_grad(loss_fn, has_aux=True)(state.params)`` becomes
:func:`value_and_grad` ``(loss_fn, seed, has_aux=True)(state)`` with the
state a :class:`TrainState` (linen), ``nnx.value_and_grad(loss_fn, ...)``
becomes :func:`nnx_value_and_grad` ``(loss_fn, optimizer, seed, ...)`` with
the optimizer an :class:`Optimizer` (NNX). Both return ``(value, grads)``;
``grads`` is a :class:`Gradients` that ``apply_gradients`` / ``update`` turn
into ``tx.update(g_ε, ..., noisy_grads=|g|)``. Alternatively the whole
``train_step`` becomes :func:`make_train_step` (linen, with m-sharpness over
the user's loss of the outputs) or :func:`make_nnx_train_step` (NNX), which
return the loss's per-example ``aux`` (logits) concatenated over the
m-sharpness parts and the devices, so the metrics need no second forward
pass. Dict batches (``batch["image"]``), Dropout (a key per part) and
BatchNorm work; Flax's own ``TrainState`` (or a subclass with
``batch_stats``) is accepted by the linen step.

**BatchNorm statistics.** Two training-mode forward passes per step means two
candidate updates of the running statistics. In training mode BatchNorm
normalizes with the statistics of the current batch, so the gradients do not
depend on the choice; only the running averages used at evaluation do.
``bn_update`` picks which passes update them:

- ``"both"`` (default, **the authors' behaviour**): the first (noisy) pass updates the
  running averages, and the perturbed pass updates them again starting from
  the noisy pass's result, so the moving average takes two steps per bSAM
  step (first with the batch statistics at θ, then at ω + ε). This is what
  ``build_bsam_optimizer`` in the authors' JAX code (team-approx-bayes/
  bayesian-sam, ``optim.py``) does: it threads haiku's ``netstate`` from the
  noisy call into the perturbed call and keeps the perturbed call's output.
- ``"second"`` (alias ``"perturbed"``): only the second pass at ω + ε, whose
  gradient moves ω, updates the running averages (one moving-average step per
  bSAM step, from the statistics at ω + ε).
- ``"first"`` (alias ``"noisy"``): only the first pass at θ updates them.
- ``"none"``: the running averages are left unchanged (re-estimate them
  yourself, e.g. with a forward pass at ω over some training batches).

Under m-sharpness each part computes its own update from the same starting
statistics and the results are averaged over parts and, with ``axis_name``,
over devices (``lax.pmean``), so D devices with ``m=1`` match ``m=D`` on one
device. The authors' code keeps the statistics of the first part only; we
average, which uses all of the batch.

**Randomness.** Part ``i`` (counting across devices) draws its noise from
``fold_in(key, i)`` as in ``bsam_step``; its Dropout (any RNG stream of the
model) draws from ``fold_in(fold_in(fold_in(key, 2**31 - 1), i), j)`` for the
model's ``j``-th stream, the same key for both passes of the part (the two
gradients are of the same stochastic loss).

**BatchNorm and the model average.** A posterior sample θ_j ~ N(ω, 1/(N s))
evaluated with the running statistics collected at ω sees activations whose
mean and variance no longer match them; the model average is then much less
calibrated than ω itself. ``predictive(..., batch_stats="recompute",
bn_inputs=...)`` re-estimates the statistics for every sample on a few
training batches (as SWAG does), which restores it; see
:meth:`TrainState.predictive` and :func:`nnx_predictive`.
"""

import functools
import inspect
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh

import bsam_optax as bo

__all__ = [
  "Gradients",
  "Optimizer",
  "TrainState",
  "make_nnx_train_step",
  "make_train_step",
  "nnx_posterior",
  "nnx_predictive",
  "nnx_recompute_batch_stats",
  "nnx_sample_posterior",
  "nnx_value_and_grad",
  "value_and_grad",
]

BNUpdate = Literal["both", "second", "first", "none", "perturbed", "noisy"]
_BN_UPDATES = ("both", "second", "first", "none", "perturbed", "noisy")
_STREAM_SALT = 2**31 - 1  # fold_in(key, _STREAM_SALT): the root of the model's own RNG streams (Dropout)
_INPUT_KEYS = ("image", "x", "inputs", "input")


def _check_bn_update(bn_update) -> None:
  if bn_update not in _BN_UPDATES:
    raise ValueError(f"bn_update must be one of {_BN_UPDATES[:4]}, got {bn_update!r}")


def _check_aux_reduce(aux_reduce) -> None:
  if aux_reduce not in ("concat", "mean"):
    raise ValueError(f"aux_reduce must be 'concat' (per-example aux) or 'mean', got {aux_reduce!r}")


def _is_key(x) -> bool:
  if not isinstance(x, (jax.Array, np.ndarray)):
    return False
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return True
  return x.dtype == np.uint32 and x.shape[-1:] == (2,) and x.ndim <= 2  # a raw (legacy) key, or pmap-replicated


def _check_key_and_batch(batch, key, call: str) -> None:
  if _is_key(batch) and not _is_key(key):
    raise TypeError(f"batch is a PRNG key and key is not: were they swapped? Call {call}")
  if not _is_key(key) and not isinstance(key, jax.core.Tracer):
    raise TypeError(f"key must be a PRNG key (jax.random.key(...)), got {type(key).__name__}; call {call}")


def _check_n_data(opt_state, batch) -> None:
  """N smaller than one batch is a mistake (e.g. ``n_data=len(dataset)`` of a dict of arrays)."""
  try:
    n_data = getattr(bo.find_posterior_state(opt_state), "n_data", None)
  except ValueError:
    return
  leaves = jax.tree.leaves(batch)
  if n_data is None or not leaves or isinstance(n_data, jax.core.Tracer) or not jnp.ndim(leaves[0]):
    return
  n_data, size = float(np.ravel(np.asarray(n_data))[0]), jnp.shape(leaves[0])[0]
  if n_data < size:
    raise ValueError(
      f"n_data={n_data:g} is smaller than one batch ({size} examples): N is the number of training examples "
      f"(for a dict of arrays, len(ds['image']), not len(ds), which counts its keys)"
    )


def default_inputs(batch):
  """The model's input in a batch: ``batch[0]`` of a tuple, ``batch["image"]`` (or ``"x"``, ``"inputs"``) of a dict."""
  if isinstance(batch, dict):
    for name in _INPUT_KEYS:
      if name in batch:
        return batch[name]
    raise KeyError(
      f"the batch is a dict with keys {sorted(batch)} and none of {list(_INPUT_KEYS)}: pass inputs_fn= "
      f"(e.g. inputs_fn=lambda batch: batch['{sorted(batch)[0]}'])"
    )
  if isinstance(batch, (tuple, list)):
    return batch[0]
  raise TypeError(f"the batch is a {type(batch).__name__}; pass inputs_fn= to say which part of it the model takes")


def _stream_keys(key, part_index, names):
  root = jax.random.fold_in(jax.random.fold_in(key, _STREAM_SALT), part_index)
  return {name: jax.random.fold_in(root, j) for j, name in enumerate(names)}


def _with_index(batch, axis_name, mesh):
  """``(batch, i)``: ``i`` the global index of every example, so a part knows its own index."""
  size = jnp.shape(jax.tree.leaves(batch)[0])[0]
  index = jnp.arange(size, dtype=jnp.int32)
  if axis_name is not None and mesh is None:  # under pmap: this device's rows of the global batch
    index = index + jax.lax.axis_index(axis_name) * size
  return batch, index


def _part_index(index):
  return index[0] // index.shape[0]


def _mean_parts(tree, axis_name, mesh):
  """The mean over the leading (parts) axis of concatenated per-part aux, and over devices under pmap."""
  tree = jax.tree.map(lambda x: jnp.mean(x.astype(jnp.promote_types(x.dtype, jnp.float32)), 0).astype(x.dtype), tree)
  if axis_name is not None and mesh is None:
    tree = jax.lax.pmean(tree, axis_name)
  return tree


class Gradients(NamedTuple):
  """What :func:`value_and_grad` and :func:`nnx_value_and_grad` return in place of a gradient.

  :meth:`TrainState.apply_gradients` and :meth:`Optimizer.update` take it
  where Flax passes ``grads`` and call ``tx.update(grads, state, params,
  **extra_args)``. A pytree, so ``jax.lax.pmean(grads, axis_name)`` (Flax's
  ImageNet step) works on it. With a plain ``nnx.Optimizer``, call
  ``optimizer.update(model, g.grads, **g.extra_args)``.
  """

  grads: Any  # g_ε, the gradient at the second point ω + ε: what moves ω
  extra_args: dict  # the rule's extra arguments of tx.update, e.g. {"noisy_grads": |g|} for bSAM


def _as_key(key) -> jax.Array:
  """A PRNG key from a key or an int seed (``jax.random.key(seed)``, as ``nnx.Rngs(seed)`` takes)."""
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    return jax.random.key(int(key))
  if _is_key(key) or isinstance(key, jax.core.Tracer):
    return key
  raise TypeError(f"key must be a PRNG key (jax.random.key(...)) or an int seed, got {type(key).__name__}")


class _Plan:
  """How the user's aux and the BatchNorm statistics travel through the step machinery.

  The loss seen by the machinery returns ``(loss, (stats, user_aux))`` and takes
  ``(stats, anything)`` as its first loss_arg (``thread_aux`` passes the first
  pass's pair on). BatchNorm statistics are averaged over parts; the user's aux is
  concatenated (``aux_reduce="concat"``) or averaged. The builder reduces all of the
  aux one way; when the two differ, the statistics travel with a leading axis of
  size 1 per part, are concatenated with the user's aux and averaged here.
  """

  def __init__(self, bn_update, has_aux, aux_reduce, with_stats):
    _check_bn_update(bn_update)
    _check_aux_reduce(aux_reduce)
    if not isinstance(has_aux, bool):
      raise TypeError(f"has_aux must be a bool, got {has_aux!r}")
    self.stats = with_stats and bn_update != "none"
    self.user_aux = has_aux
    self.split_stats = self.stats and has_aux and aux_reduce == "concat"
    reduce = "concat" if has_aux and aux_reduce == "concat" else "mean"
    self.options = dict(
      has_aux=self.stats or has_aux,
      aux_from="first" if bn_update in ("first", "noisy") else "second",
      aux_reduce=reduce,
      thread_aux=self.stats and bn_update == "both",
    )

  def carry(self, stats):
    """The first loss_arg for the initial statistics."""
    return (jax.tree.map(lambda x: x[None], stats) if self.split_stats else stats), None

  def stats_in(self, carry):
    stats = carry[0]
    return jax.tree.map(lambda x: x[0], stats) if self.split_stats else stats

  def loss_out(self, value, new_stats):
    """What the machinery's loss returns, from the user's ``loss_fn`` value and the mutated statistics."""
    loss, user_aux = value if self.user_aux else (value, None)
    if not self.options["has_aux"]:
      return loss
    if self.split_stats:
      new_stats = jax.tree.map(lambda x: x[None], new_stats)
    return loss, (new_stats if self.stats else None, user_aux)

  def results(self, info, axis_name, mesh):
    """``(new statistics or None, info with the user's aux)``."""
    if info.aux is None:
      return None, info
    stats, user_aux = info.aux
    if self.split_stats:
      stats = _mean_parts(stats, axis_name, mesh)
    return (stats if self.stats else None), info._replace(aux=user_aux)


class TrainState(train_state.TrainState):
  """A linen ``TrainState`` for bSAM, with BatchNorm statistics and the posterior.

  Differs from :class:`flax.training.train_state.TrainState` in three ways:
  ``batch_stats`` is a field (``None`` for models without BatchNorm),
  :meth:`apply_gradients` forwards ``noisy_grads=`` (and any other extra
  argument) to ``tx.update``, which linen's does not, and it has the learned
  posterior (:meth:`posterior`, :meth:`sample_posterior`,
  :meth:`predictive`). A subclass that adds fields must give them defaults
  (``field: Any = None``), since ``batch_stats`` has one. :func:`make_train_step`
  also accepts Flax's own ``TrainState`` and subclasses of it with a
  ``batch_stats`` field (as in Flax's ImageNet example).

  Example:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, bsam_optax as bo
    >>> from bsam_optax.flax import TrainState
    >>> model = nn.Dense(2)
    >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    >>> state = TrainState.create(apply_fn=model.apply, params=params, tx=bo.bsam(1e-2, n_data=100))
    >>> loss = lambda p: jnp.sum(model.apply({"params": p}, jnp.ones((1, 3))) ** 2)
    >>> theta = state.noisy_params(jax.random.key(1))
    >>> g = jax.grad(loss)(theta)
    >>> g_eps = jax.grad(loss)(state.perturbed_params(g))
    >>> state = state.apply_gradients(grads=g_eps, noisy_grads=g)
    >>> state.predictive(jax.random.key(2), jnp.ones((5, 3)), num_samples=4).shape
    (5, 2)
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads, noisy_grads=None, extra_args=None, **kwargs):
    """One ``tx`` update: ``params``, ``opt_state`` and ``step`` move on.

    Args:
      grads: the gradient at the perturbed point ω + ε (``g_ε``), or the
        :class:`Gradients` of :func:`value_and_grad` (its ``extra_args`` then
        go to ``tx.update`` too).
      noisy_grads: the gradient at the noisy sample θ (``g``), passed to
        ``tx.update(..., noisy_grads=noisy_grads)``; omitted if ``None``.
      extra_args: other keyword arguments for ``tx.update``.
      **kwargs: fields to ``replace`` (e.g. ``batch_stats=``), as in linen.

    Returns:
      The updated state.
    """
    extra = dict(extra_args or {})
    if isinstance(grads, Gradients):
      extra = {**grads.extra_args, **extra}
      grads = grads.grads
    if noisy_grads is not None:
      extra["noisy_grads"] = noisy_grads
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state, **kwargs)

  def noisy_params(self, key: jax.Array):
    """θ ~ N(ω, 1 / (N s)); see :func:`bsam_optax.noisy_params`."""
    return bo.noisy_params(key, self.params, self.opt_state)

  def perturbed_params(self, noisy_grads):
    """ω + ρ g / s; see :func:`bsam_optax.perturbed_params`."""
    return bo.perturbed_params(self.params, self.opt_state, noisy_grads)

  def posterior(self):
    """``(mean, std)`` of the learned posterior; see :func:`bsam_optax.posterior`."""
    return bo.posterior(self.params, self.opt_state)

  def sample_posterior(self, key: jax.Array, num_samples: int, **kwargs):
    """``num_samples`` parameter sets θ_j ~ N(ω, 1/(N s)); see :func:`bsam_optax.sample_posterior`."""
    return bo.sample_posterior(key, self.params, self.opt_state, num_samples, **kwargs)

  def recompute_batch_stats(self, bn_inputs, *, train_kwargs: dict | None = None):
    """A copy with ``batch_stats`` re-estimated at ω on training inputs (as SWA's ``update_bn``).

    The running averages collected during training trail the moving
    weights (and, with bSAM, were taken at the perturbed points); the
    posterior mean evaluated with statistics recomputed at ω is often much
    better (``docs/hyperparameters.md``). The statistics are the average over
    the ``K`` batches of the training-mode batch mean and variance.

    Args:
      bn_inputs: training inputs: one batch ``(B, ...)`` (e.g.
        ``train_ds["image"][:512]``) or a list of batches.
      train_kwargs: keyword arguments of the training-mode call;
        ``{"train": True}`` (Flax's convention) by default.

    Returns:
      The state with the new ``batch_stats`` (unchanged without BatchNorm).
    """
    if self.batch_stats is None:
      return self
    bn_inputs = _stacked_batches(bn_inputs)
    stats = _linen_batch_stats(self.apply_fn, self.params, self.batch_stats, bn_inputs, train_kwargs or {"train": True})
    return self.replace(batch_stats=stats)

  def predictive(
    self,
    key: jax.Array,
    inputs,
    num_samples: int = 32,
    *,
    apply_kwargs: dict | None = None,
    batch_stats: Literal["mean", "recompute"] | None = None,
    bn_inputs=None,
    train_kwargs: dict | None = None,
    **kwargs,
  ) -> jax.Array:
    """The model average ``1/S Σ_j softmax(f(θ_j, inputs))``, θ_j ~ N(ω, 1/(N s)).

    Args:
      key: a PRNG key; sample ``j`` uses ``fold_in(key, j)``.
      inputs: the model's inputs.
      num_samples: S.
      apply_kwargs: keyword arguments of the evaluation call, e.g.
        ``{"train": False}``.
      batch_stats: BatchNorm statistics of each sample: ``"mean"`` uses the
        running statistics of ω (``self.batch_stats``); ``"recompute"``
        re-estimates them for every θ_j as the average of the batch
        statistics of the training-mode model on ``bn_inputs`` (as SWAG does),
        which keeps the model average calibrated (see the module notes).
        ``None``: ``"recompute"`` when ``bn_inputs`` is given, else ``"mean"``.
      bn_inputs: with ``"recompute"``, some training inputs: one batch
        shaped like ``inputs`` (e.g. ``train_ds["image"][:512]``) or several
        stacked as ``(K, B, ...)``, whose statistics are averaged.
      train_kwargs: keyword arguments of the training-mode call used to
        recompute the statistics; by default ``apply_kwargs`` with
        ``train=True`` when it has ``train`` (Flax's convention).
      **kwargs: passed to :func:`bsam_optax.predictive` (``chunk_size``,
        ``link``, ``temperature``).

    Returns:
      The averaged probabilities (or ``link`` outputs).
    """
    batch_stats, bn_inputs = _bn_option(batch_stats, bn_inputs, inputs)
    apply = _linen_apply(self.apply_fn, self.batch_stats, batch_stats, bn_inputs, apply_kwargs, train_kwargs)
    return bo.predictive(apply, key, self.params, self.opt_state, inputs, num_samples, **kwargs)


def _stacked_batches(bn_inputs):
  """``(K, B, ...)`` from one batch ``(B, ...)`` (K = 1) or a list of K batches."""
  if isinstance(bn_inputs, (list, tuple)):
    if not bn_inputs:
      raise ValueError("bn_inputs is an empty list; pass one batch of training inputs or a list of batches")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *bn_inputs)
  if not jax.tree.leaves(bn_inputs) or jnp.ndim(jax.tree.leaves(bn_inputs)[0]) < 1:
    raise ValueError("bn_inputs must be one batch of training inputs (B, ...) or a list of batches")
  return jax.tree.map(lambda x: x[None], bn_inputs)


def _bn_option(batch_stats, bn_inputs, inputs):
  """``(batch_stats, bn_inputs)`` checked: ``None`` is ``"recompute"`` with ``bn_inputs``, else ``"mean"``;
  ``bn_inputs`` shaped like ``inputs`` (one batch) gets a leading axis of 1."""
  if batch_stats is None:
    batch_stats = "mean" if bn_inputs is None else "recompute"
  if batch_stats not in ("mean", "recompute"):
    raise ValueError(f"batch_stats must be 'mean' or 'recompute', got {batch_stats!r}")
  if batch_stats == "mean":
    return batch_stats, None
  if bn_inputs is None:
    raise ValueError(
      "batch_stats='recompute' needs bn_inputs=, some training inputs: one batch (B, ...) or several stacked as "
      "(K, B, ...)"
    )
  ndim, like = jnp.ndim(jax.tree.leaves(bn_inputs)[0]), jnp.ndim(jax.tree.leaves(inputs)[0])
  if ndim == like:
    bn_inputs = jax.tree.map(lambda x: x[None], bn_inputs)
  elif ndim != like + 1:
    raise ValueError(
      f"bn_inputs must be training inputs shaped like inputs ({like} axes) or batches of them stacked as "
      f"(K, B, ...) ({like + 1} axes), got {ndim} axes"
    )
  return batch_stats, bn_inputs


def _recomputed(run, like):
  """The batch statistics of one training-mode pass, from two passes that start at 0 and at 1.

  A running average moves as ``r ← μ r + (1 − μ) b``; from ``r = 0`` it gives
  ``(1 − μ) b`` and from ``r = 1`` it gives ``μ + (1 − μ) b``, so ``μ`` and the
  batch statistics ``b`` follow for any momentum, whatever the layer.
  """
  from_zero = run(jax.tree.map(jnp.zeros_like, like))
  from_one = run(jax.tree.map(jnp.ones_like, like))
  return jax.tree.map(lambda a, b: a / (1 - (b - a)), from_zero, from_one)


def _average_over_batches(stats_of, bn_inputs):
  stats = jax.lax.map(stats_of, bn_inputs)
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stats)


def _linen_apply(apply_fn, running_stats, batch_stats, bn_inputs, apply_kwargs, train_kwargs):
  apply_kwargs = dict(apply_kwargs or {})
  if train_kwargs is None and batch_stats == "recompute" and running_stats is not None:
    if "train" not in apply_kwargs:
      raise ValueError(
        "batch_stats='recompute' needs train_kwargs=, the keyword arguments of the model's training-mode call "
        "(e.g. {'train': True}), unless apply_kwargs has 'train'"
      )
    train_kwargs = {**apply_kwargs, "train": True}
  train_kwargs = dict(train_kwargs or {})

  def variables(params, stats):
    return {"params": params} if stats is None else {"params": params, "batch_stats": stats}

  if batch_stats == "mean" or running_stats is None:
    return lambda params, x: apply_fn(variables(params, running_stats), x, **apply_kwargs)

  def apply(params, x):
    stats = _linen_batch_stats(apply_fn, params, running_stats, bn_inputs, train_kwargs)
    return apply_fn(variables(params, stats), x, **apply_kwargs)

  return apply


def _linen_batch_stats(apply_fn, params, running_stats, bn_inputs, train_kwargs):
  """The training-mode batch statistics of ``params``, averaged over the stacked batches ``bn_inputs``."""

  def stats_of(inputs):
    def run(start):
      variables = {"params": params, "batch_stats": start}
      _, mutated = apply_fn(variables, inputs, mutable=["batch_stats"], **train_kwargs)
      return mutated["batch_stats"]

    return _recomputed(run, running_stats)

  return _average_over_batches(stats_of, bn_inputs)


def _state_fields(state):
  for name in ("params", "opt_state", "tx", "apply_fn"):
    if not hasattr(state, name):
      raise TypeError(
        f"state must be a TrainState (bsam_optax.flax.TrainState, or Flax's with the bsam tx), got "
        f"{type(state).__name__} without .{name}; call step(state, batch, key)"
      )


def make_train_step(
  loss_fn: Callable[[Any, Any], Any],
  inputs_fn: Callable[[Any], Any] = default_inputs,
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_reduce: Literal["concat", "mean"] = "concat",
  bn_update: BNUpdate = "both",
  apply_kwargs: dict | None = None,
  rng_streams: Sequence[str] = ("dropout",),
  split: Literal["auto", "vmap", "scan", "unroll"] = "auto",
  donate: bool = False,
  rule: bo.PerturbationRule | None = None,
):
  """Builds a bSAM train step for a linen model held in a :class:`TrainState`.

  The model is called as ``state.apply_fn({"params": p, "batch_stats": bs},
  inputs_fn(batch), mutable=["batch_stats"], rngs={"dropout": k_i},
  **apply_kwargs)`` and the loss is ``loss_fn(outputs, batch)``; the step is
  :func:`bsam_optax.bsam_step` with ``state.tx``, ``batch_stats`` as its
  loss_arg and the new statistics as its aux. Models without BatchNorm
  (``state.batch_stats`` ``None`` or absent) are called with ``{"params": p}``.
  With ``rule``, the step is that method's instead
  (:func:`bsam_optax.make_perturbation_step`), e.g. ``bo.sam_rule(rho=0.05)``
  for SAM or ``bo.PerturbationRule()`` for a plain gradient step, with the
  same model call and BatchNorm policy.

  Args:
    loss_fn: ``loss_fn(outputs, batch) -> loss``, the mean loss over the
      batch (part) given the model's outputs; ``-> (loss, aux)`` with
      ``has_aux=True``.
    inputs_fn: picks the model's input from the batch; by default
      ``batch[0]`` of a tuple and ``batch["image"]`` (or ``"x"``,
      ``"inputs"``) of a dict.
    m: the number of m-sharpness parts (per device).
    axis_name: the device axis; the step is then meant for
      ``jax.pmap(step, axis_name=axis_name)`` (state and key replicated,
      batch sharded) unless ``mesh`` is given.
    mesh: a ``jax.sharding.Mesh`` to run the step with ``jax.shard_map``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_reduce: ``"concat"`` (default): ``aux`` is per-example (e.g. the
      logits, with a leading batch axis) and comes back for the whole batch,
      the parts (and, with ``mesh``, the devices) concatenated in batch order;
      ``"mean"``: averaged over parts and devices.
    bn_update: which forward passes update the BatchNorm running averages:
      ``"both"`` (the authors' behaviour), ``"second"``, ``"first"`` or
      ``"none"``; see :mod:`bsam_optax.flax`. ``aux`` comes from the second
      pass (at ω + ε) unless ``bn_update="first"``.
    apply_kwargs: keyword arguments for every training-mode call of the
      model, e.g. ``{"train": True}``.
    rng_streams: the RNG collections the model draws from in training; each
      part gets its own key for each (see :mod:`bsam_optax.flax`).
    split: ``"auto"`` (the step's choice, see :func:`bsam_optax.choose_split`),
      ``"vmap"``, ``"scan"`` or ``"unroll"`` over the m parts.
    donate: donate the state's buffers to the compiled step.
    rule: a :class:`~bsam_optax.PerturbationRule`; ``None`` for
      ``bo.bsam_rule()``, bSAM.

  Returns:
    ``step(state, batch, key) -> (state, info)`` with ``info`` a
    :class:`~bsam_optax.StepInfo`: ``info.loss`` (mean loss at the noisy
    samples), ``info.second_loss`` (at ω + ε) and ``info.aux`` (the reduced
    ``aux`` of ``loss_fn``, or ``None``).
    Jitted unless ``axis_name`` is given without ``mesh``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, bsam_optax as bo
    >>> from bsam_optax.flax import TrainState, make_train_step
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(2)(nn.relu(x))
    >>> batch = {"image": jnp.ones((16, 3)), "label": jnp.zeros(16, jnp.int32)}
    >>> variables = Net().init(jax.random.key(0), batch["image"], train=False)
    >>> state = TrainState.create(apply_fn=Net().apply, params=variables["params"],
    ...                           batch_stats=variables["batch_stats"], tx=bo.bsam(0.5, n_data=1000))
    >>> def loss_fn(logits, batch):
    ...   return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), logits
    >>> step = make_train_step(loss_fn, m=2, has_aux=True, apply_kwargs={"train": True})
    >>> state, info = step(state, batch, jax.random.key(1))
    >>> info.aux.shape
    (16, 2)
  """
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
  if not callable(inputs_fn):
    raise TypeError(f"inputs_fn must be callable, got {type(inputs_fn).__name__}")
  if isinstance(rng_streams, str) or not all(isinstance(s, str) for s in rng_streams):
    raise TypeError(f"rng_streams must be a sequence of collection names, got {rng_streams!r}")
  rng_streams = tuple(rng_streams)
  _check_bn_update(bn_update)
  plans = {with_stats: _Plan(bn_update, has_aux, aux_reduce, with_stats) for with_stats in (False, True)}
  for plan in plans.values():
    bo.StepOptions(m=m, axis_name=axis_name, mesh=mesh, split=split, donate=donate, **plan.options)
  if rule is None:
    rule = bo.bsam_rule()
  elif not isinstance(rule, bo.PerturbationRule):
    raise TypeError(f"rule must be a bsam_optax.PerturbationRule, got {type(rule).__name__}")
  apply_kwargs = dict(apply_kwargs or {})

  def step(state, batch, key: jax.Array):
    _state_fields(state)
    running = getattr(state, "batch_stats", None)
    plan = plans[running is not None]

    def loss(params, wrapped, carry=(None, None)):
      part, index = wrapped
      kwargs = dict(apply_kwargs)
      if rng_streams:
        kwargs["rngs"] = _stream_keys(key, _part_index(index), rng_streams)
      stats = plan.stats_in(carry)
      if stats is None:
        outputs, new_stats = state.apply_fn({"params": params}, inputs_fn(part), **kwargs), None
      else:
        variables = {"params": params, "batch_stats": stats}
        outputs, mutated = state.apply_fn(variables, inputs_fn(part), mutable=["batch_stats"], **kwargs)
        new_stats = mutated["batch_stats"]
      return plan.loss_out(loss_fn(outputs, part), new_stats)

    loss_args = () if running is None else (plan.carry(running),)
    inner = bo.make_perturbation_step(
      loss, state.tx, rule, m=m, axis_name=axis_name, mesh=mesh, split=split, **plan.options
    )
    params, opt_state, info = inner(state.params, state.opt_state, _with_index(batch, axis_name, mesh), key, *loss_args)
    new_stats, info = plan.results(info, axis_name, mesh)
    replace = dict(step=state.step + 1, params=params, opt_state=opt_state)
    if running is not None:
      replace["batch_stats"] = running if new_stats is None else new_stats
    return state.replace(**replace), info

  def typed_step(state, batch, key, state_type):
    del state_type  # only a part of the compilation cache's key, see below
    return step(state, batch, key)

  # JAX compares the tree structures of two states whose classes have the same fields (ours and a Flax TrainState
  # subclass with batch_stats, say) as equal while hashing them apart, so jit's cache could hand one class's
  # compilation, and with it its output class, to the other now and then. The class as a static argument keeps
  # them apart.
  if axis_name is not None and mesh is None:
    compiled = typed_step
  else:
    compiled = jax.jit(typed_step, static_argnums=(3,), donate_argnums=(0,) if donate else ())
  checked: list[bool] = []

  @functools.wraps(step)
  def checked_step(state, batch, key):
    _state_fields(state)
    _check_key_and_batch(batch, key, "step(state, batch, key)")
    if not checked:
      _check_n_data(state.opt_state, batch)
      checked.append(True)
    return compiled(state, batch, key, type(state))

  return checked_step


def value_and_grad(
  fun: Callable[[Any], Any],
  key,
  *,
  has_aux: bool = False,
  axis_name: str | None = None,
  rule: bo.PerturbationRule | None = None,
):
  """bSAM's two passes in place of ``jax.value_and_grad(fun, has_aux)(state.params)`` in a linen train step.

  For a Flax train step that builds ``loss_fn(params)`` itself (closing over
  the batch and ``state.batch_stats``, as Flax's MNIST and ImageNet examples
  do); only that line changes, and ``state`` must be a :class:`TrainState`
  (or a subclass) so that ``apply_gradients`` passes the extra arguments on.
  With ``t = state.step``::

    θ          ~ N(ω, 1/(N s))           # key fold_in(fold_in(key, t), d), d = device index
    g          = ∇fun(θ)
    value, g_ε = value_and_grad(fun)(ω + ρ g / s)

  and ``grads = Gradients(g_ε, {"noisy_grads": |g|})``. ``value`` and the
  aux (e.g. the new ``batch_stats`` and the logits) are those of the second
  pass, whose gradient moves ω, so BatchNorm statistics follow
  ``bn_update="second"`` of :func:`make_train_step`. ``fun`` sees the whole
  (per-device) batch, so this is m = 1 per device; for m-sharpness, Dropout
  keys per part and the size check of ``n_data``, use
  :func:`make_train_step`, which takes the loss of the outputs instead.

  Args:
    fun: ``fun(params) -> loss`` or ``-> (loss, aux)`` with ``has_aux``.
    key: a PRNG key or an int seed; step ``t`` draws from ``fold_in(key, t)``.
    has_aux: whether ``fun`` returns ``(loss, aux)``.
    axis_name: the ``jax.pmap`` axis: each device draws its own noise (the
      device index folded in, as :func:`bsam_optax.bsam_step` does) and the
      gradients and losses are averaged over devices (``lax.pmean``).
    rule: a :class:`~bsam_optax.PerturbationRule`; ``None`` for bSAM's.

  Returns:
    ``value_and_grad_fn(state) -> (value, grads)`` with ``grads`` a
    :class:`Gradients` for ``state.apply_gradients(grads=grads)``.

  Example (Flax's linen step, with its ``jax.value_and_grad`` line changed):
    >>> import jax, jax.numpy as jnp, flax.linen as nn, bsam_optax as bo
    >>> import bsam_optax.flax as bf
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 2))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> state = bf.TrainState.create(apply_fn=model.apply, params=params, tx=bo.bsam(0.1, n_data=100))
    >>> @jax.jit
    ... def train_step(state):
    ...   def loss_fn(params):
    ...     return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    ...   loss, grads = bf.value_and_grad(loss_fn, 0)(state)
    ...   return state.apply_gradients(grads=grads), loss
    >>> state, loss = train_step(state)
    >>> int(state.step)
    1
  """
  if not callable(fun):
    raise TypeError(f"fun must be callable, got {type(fun).__name__}")
  key = _as_key(key)
  if rule is None:
    rule = bo.bsam_rule()
  elif not isinstance(rule, bo.PerturbationRule):
    raise TypeError(f"rule must be a bsam_optax.PerturbationRule, got {type(rule).__name__}")
  # The batch is inside fun; the machinery gets a one-row placeholder, one part per device.
  gradients = bo.perturbation_gradients(
    lambda params, _: fun(params), rule, has_aux=has_aux, aux_reduce="concat", axis_name=axis_name
  )

  def value_and_grad_fn(state):
    _state_fields(state)
    if not hasattr(state, "step"):
      raise TypeError(f"state must be a TrainState with a step, got {type(state).__name__}")
    if type(state).apply_gradients is train_state.TrainState.apply_gradients:
      raise TypeError(
        f"{type(state).__name__}.apply_gradients is Flax's, which drops the Gradients' noisy_grads; subclass "
        "bsam_optax.flax.TrainState instead of flax.training.train_state.TrainState"
      )
    grads, args, info = gradients(state.params, state.opt_state, jnp.zeros((1,)), jax.random.fold_in(key, state.step))
    value = (info.second_loss, info.aux) if has_aux else info.second_loss
    return value, Gradients(grads, args)

  return value_and_grad_fn


def _as_variables(like, values):
  """Puts the arrays of the pure state ``values`` into the Variables of ``like``."""
  return jax.tree.map(lambda v, x: v.replace(x), like, values, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _stream_names(model) -> tuple[str, ...]:
  """The RNG streams a model draws from after construction (all but ``params``), in a fixed order."""
  names = {node.key.tag for _, node in nnx.iter_graph(model) if isinstance(node, nnx.RngStream)}
  return tuple(sorted(names - {"params"}))


def _check_optimizer(optimizer) -> None:
  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      f"optimizer must be an nnx.Optimizer(model, bo.bsam(...), wrt=nnx.Param), got {type(optimizer).__name__}"
    )


def make_nnx_train_step(
  loss_fn: Callable[[nnx.Module, Any], Any],
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_reduce: Literal["concat", "mean"] = "concat",
  bn_update: BNUpdate = "both",
  split: Literal["auto", "vmap", "scan", "unroll"] = "auto",
  jit: bool = True,
):
  """Builds a bSAM train step for an NNX model and its :class:`nnx.Optimizer`.

  Per part ``i`` of the batch, with ``P`` the ``nnx.State`` of the
  optimizer's ``wrt`` variables (as arrays)::

    θ_i   = noisy_params(fold_in(key, i), P, optimizer.opt_state)
    g_i   = ∇ loss_fn(merge(graphdef, θ_i, ...), part_i)
    g_ε,i = ∇ loss_fn(merge(graphdef, P + ρ g_i / s, ...), part_i)

  then ``optimizer.update(model, mean_i g_ε,i, noisy_grads=mean_i |g_i|)``,
  which updates the model in place. The parts are evaluated by the machinery
  of :func:`bsam_optax.bsam_step` (the same keys, splits and devices), so the
  numbers are those of ``bsam_step`` on the same state and key. BatchNorm
  statistics (``nnx.BatchStat``) follow ``bn_update`` (see
  :mod:`bsam_optax.flax`); the model's RNG streams (Dropout) are reseeded per
  part from ``key``, so the model's own ``nnx.Rngs`` need not be threaded. Put
  the model in training mode (``model.train()``) before training.

  Args:
    loss_fn: ``loss_fn(model, batch) -> loss``, the mean loss over the batch;
      ``-> (loss, aux)`` with ``has_aux=True`` (Flax's NNX examples return
      ``(loss, logits)``).
    m: the number of m-sharpness parts (per device with ``mesh``).
    axis_name: the mesh axis the batch is sharded along (with ``mesh``).
    mesh: a ``jax.sharding.Mesh``: the step takes the global batch, sharded
      along ``axis_name``, and evaluates ``m`` parts on every device with
      ``jax.shard_map`` (D devices with ``m=1`` give ``m=D`` on one device).
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_reduce: ``"concat"`` (per-example ``aux``, concatenated over parts and
      devices in batch order) or ``"mean"``.
    bn_update: ``"both"`` (the authors' behaviour), ``"second"``,
      ``"first"`` or ``"none"``.
    split: ``"auto"`` (the step's choice, see :func:`bsam_optax.choose_split`),
      ``"vmap"``, ``"scan"`` or ``"unroll"`` over the m parts.
    jit: wrap the step in ``nnx.jit``.

  Returns:
    ``step(model, optimizer, batch, key) -> info``, updating ``model`` and
    ``optimizer`` in place; ``info`` is a :class:`~bsam_optax.StepInfo`
    (``info.loss``, ``info.second_loss``, ``info.aux``).

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> from flax import nnx
    >>> from bsam_optax.flax import make_nnx_train_step
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, bo.bsam(1e-2, n_data=8), wrt=nnx.Param)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones((8, 1))}
    >>> def loss_fn(mdl, b):
    ...   pred = mdl(b["x"])
    ...   return jnp.mean((pred - b["y"]) ** 2), pred
    >>> step = make_nnx_train_step(loss_fn, m=2, has_aux=True)
    >>> step(model, optimizer, batch, jax.random.key(0)).aux.shape
    (8, 1)
  """
  _check_nnx_options(loss_fn, axis_name, mesh)
  gradients = _nnx_gradients(
    loss_fn, bo.bsam_rule(), _Plan(bn_update, has_aux, aux_reduce, True), m, axis_name, mesh, split
  )

  def step(model, optimizer: nnx.Optimizer, batch, key: jax.Array):
    grads, args, info = gradients(model, optimizer, batch, key)
    optimizer.update(model, grads, **args)
    return info

  compiled = nnx.jit(step) if jit else step
  checked: list[bool] = []

  @functools.wraps(step)
  def checked_step(model, optimizer, batch, key):
    if not isinstance(model, nnx.Module):
      raise TypeError(
        f"model must be an nnx.Module, got {type(model).__name__}; call step(model, optimizer, batch, key)"
      )
    _check_optimizer(optimizer)
    _check_key_and_batch(batch, key, "step(model, optimizer, batch, key)")
    if not checked:
      _check_n_data(nnx.as_pure(optimizer.opt_state), batch)
      checked.append(True)
    return compiled(model, optimizer, batch, key)

  return checked_step


def _check_nnx_options(loss_fn, axis_name, mesh) -> None:
  if axis_name is not None and mesh is None:
    raise ValueError("axis_name= needs mesh=: the NNX step runs on several devices through jax.shard_map over a mesh")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def _nnx_gradients(loss_fn, rule, plan, m, axis_name, mesh, split):
  """``gradients(model, optimizer, batch, key) -> (grads as Variables, update args, info)``; BatchNorm updated."""
  options = dict(plan.options, m=m, axis_name=axis_name, mesh=mesh, split=split)
  bo.StepOptions(**options)

  def gradients(model, optimizer, batch, key):
    graphdef, param_vars, stats, rest = nnx.split(model, optimizer.wrt, nnx.BatchStat, ...)
    params = nnx.as_pure(param_vars)
    stats = nnx.as_pure(stats)
    rest = nnx.as_pure(rest)  # RNG streams are reseeded per part; other mutable state is not carried over
    opt_state = nnx.as_pure(optimizer.opt_state)
    streams = _stream_names(model)

    def loss(p, wrapped, carry):
      part, index = wrapped
      model = nnx.merge(graphdef, p, plan.stats_in(carry), rest)
      if streams:
        nnx.reseed(model, **_stream_keys(key, _part_index(index), streams))
      value = loss_fn(model, part)
      return plan.loss_out(value, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

    run = bo.perturbation_gradients(loss, rule, **options)
    grads, args, info = run(params, opt_state, _with_index(batch, axis_name, mesh), key, plan.carry(stats))
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
    new_stats, info = plan.results(info, axis_name, mesh)
    if new_stats is not None:
      nnx.update(model, new_stats)
    return _as_variables(param_vars, grads), args, info

  return gradients


class Optimizer(nnx.Optimizer):
  """An ``nnx.Optimizer`` whose :meth:`update` also takes the :class:`Gradients` of :func:`nnx_value_and_grad`.

  Built as ``nnx.Optimizer(model, tx, wrt=...)``; everything else is
  ``nnx.Optimizer``'s.
  """

  def update(self, model, grads, /, **kwargs):
    """``tx.update(grads, ...)`` and the new params written into ``model``; ``Gradients`` pass their extra args."""
    if isinstance(grads, Gradients):
      kwargs = {**grads.extra_args, **kwargs}
      grads = grads.grads
    return super().update(model, grads, **kwargs)


def nnx_value_and_grad(
  loss_fn: Callable[[nnx.Module, Any], Any],
  optimizer: nnx.Optimizer,
  key,
  *,
  has_aux: bool = False,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  aux_reduce: Literal["concat", "mean"] = "concat",
  bn_update: BNUpdate = "both",
  split: Literal["auto", "vmap", "scan", "unroll"] = "auto",
  rule: bo.PerturbationRule | None = None,
):
  """bSAM's two passes in place of ``nnx.value_and_grad(loss_fn, has_aux)`` in an NNX train step.

  Only that line changes (and ``nnx.Optimizer`` becomes :class:`Optimizer`,
  whose ``update`` passes the extra arguments on). With ``t =
  optimizer.step`` and ``P`` the optimizer's ``wrt`` parameters, per part
  ``i`` of the batch (counting across devices)::

    θ_i   = noisy_params(fold_in(fold_in(key, t), i), P, optimizer.opt_state)
    g_i   = ∇ loss_fn(model at θ_i, part_i)
    g_ε,i = ∇ loss_fn(model at P + ρ g_i / s, part_i)

  and ``grads = Gradients(mean_i g_ε,i, {"noisy_grads": mean_i |g_i|})``, as
  :func:`make_nnx_train_step` computes them (the same Dropout keys per part
  and BatchNorm policy ``bn_update``; the model's BatchNorm statistics are
  updated in place, as ``nnx.value_and_grad`` would). ``value`` is the
  second pass's: ``loss`` (mean over parts) and ``aux`` (per example,
  concatenated over parts in batch order).

  Args:
    loss_fn: ``loss_fn(model, batch) -> loss``, or ``-> (loss, aux)`` with
      ``has_aux`` (Flax's NNX examples return ``(loss, logits)``).
    optimizer: the ``nnx.Optimizer`` (or :class:`Optimizer`) holding the
      bSAM state.
    key: a PRNG key or an int seed; step ``t`` draws from ``fold_in(key, t)``.
    has_aux, m, axis_name, mesh, aux_reduce, bn_update, split: as in
      :func:`make_nnx_train_step`.
    rule: a :class:`~bsam_optax.PerturbationRule`; ``None`` for bSAM's.

  Returns:
    ``grad_fn(model, batch) -> (value, grads)`` with ``grads`` a
    :class:`Gradients` for ``optimizer.update(model, grads)``.

  Example (Flax's NNX step, with its ``nnx.value_and_grad`` line changed):
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> import bsam_optax.flax as bf
    >>> from flax import nnx
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = bf.Optimizer(model, bo.bsam(1e-2, n_data=8), wrt=nnx.Param)
    >>> def loss_fn(model, batch):
    ...   pred = model(batch["x"])
    ...   return jnp.mean((pred - batch["y"]) ** 2), pred
    >>> @nnx.jit
    ... def train_step(model, optimizer, batch):
    ...   grad_fn = bf.nnx_value_and_grad(loss_fn, optimizer, 0, has_aux=True, m=2)
    ...   (loss, pred), grads = grad_fn(model, batch)
    ...   optimizer.update(model, grads)
    ...   return pred
    >>> train_step(model, optimizer, {"x": jnp.ones((8, 3)), "y": jnp.ones((8, 1))}).shape
    (8, 1)
  """
  _check_nnx_options(loss_fn, axis_name, mesh)
  _check_optimizer(optimizer)
  key = _as_key(key)
  if rule is None:
    rule = bo.bsam_rule()
  elif not isinstance(rule, bo.PerturbationRule):
    raise TypeError(f"rule must be a bsam_optax.PerturbationRule, got {type(rule).__name__}")
  gradients = _nnx_gradients(loss_fn, rule, _Plan(bn_update, has_aux, aux_reduce, True), m, axis_name, mesh, split)

  def grad_fn(model, batch):
    if not isinstance(model, nnx.Module):
      raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}; call grad_fn(model, batch)")
    _check_n_data(nnx.as_pure(optimizer.opt_state), batch)  # skipped under nnx.jit, where N is traced
    grads, args, info = gradients(model, optimizer, batch, jax.random.fold_in(key, optimizer.step[...]))
    value = (info.second_loss, info.aux) if has_aux else info.second_loss
    return value, Gradients(grads, args)

  return grad_fn


def _nnx_parts(model, optimizer):
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  _check_optimizer(optimizer)
  graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
  return graphdef, nnx.as_pure(params), nnx.as_pure(rest), nnx.as_pure(optimizer.opt_state)


def nnx_posterior(model: nnx.Module, optimizer: nnx.Optimizer):
  """``(mean, std)`` of the learned posterior of an NNX model, as pure ``nnx.State`` s of the ``wrt`` params.

  :func:`bsam_optax.posterior` on ``nnx.as_pure(nnx.state(model, optimizer.wrt))`` and
  ``nnx.as_pure(optimizer.opt_state)``; ``std = 1 / sqrt(N s)`` for bSAM.

  Example:
    >>> import jax.numpy as jnp, bsam_optax as bo
    >>> from flax import nnx
    >>> from bsam_optax.flax import nnx_posterior
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, bo.bsam(1e-2, n_data=100), wrt=nnx.Param)
    >>> mean, std = nnx_posterior(model, optimizer)
    >>> round(float(std["kernel"][0, 0]), 6)  # 1 / sqrt(N s) with s = init_scale = 1
    0.1
  """
  _, params, _, opt_state = _nnx_parts(model, optimizer)
  return bo.posterior(params, opt_state)


def nnx_sample_posterior(model: nnx.Module, optimizer: nnx.Optimizer, key: jax.Array, num_samples: int, **kwargs):
  """``num_samples`` draws θ_j ~ N(ω, 1/(N s)) of an NNX model's params (a pure ``nnx.State``, leading axis S).

  Sample ``j`` is that of :func:`bsam_optax.sample_posterior` (``fold_in(key, j)``);
  ``nnx.merge(graphdef, jax.tree.map(lambda x: x[j], samples), rest)`` rebuilds model ``j``.
  ``**kwargs`` go to :func:`bsam_optax.sample_posterior` (e.g. ``temperature``).
  """
  _, params, _, opt_state = _nnx_parts(model, optimizer)
  return bo.sample_posterior(key, params, opt_state, num_samples, **kwargs)


def _nnx_builder(graphdef, rest):
  """``build(params, stats=None)``: the NNX model of ``graphdef`` with ``params``, ``rest`` and BatchNorm ``stats``."""

  def build(params, stats=None):
    model = nnx.merge(graphdef, params, rest)
    if stats is not None:
      nnx.update(model, stats)
    return model

  return build


def _nnx_apply(graphdef, rest, batch_stats, bn_inputs):
  build = _nnx_builder(graphdef, rest)
  if batch_stats == "mean":

    def apply(params, x):
      model = build(params)
      model.eval()
      return model(x)

    return apply

  def apply(params, x):
    model = build(params, _nnx_batch_stats(build, params, bn_inputs))
    model.eval()
    return model(x)

  return apply


def _nnx_batch_stats(build, params, bn_inputs):
  """The training-mode batch statistics of ``params``, averaged over the stacked batches ``bn_inputs``."""
  running = nnx.as_pure(nnx.state(build(params), nnx.BatchStat))

  def stats_of(inputs):
    def run(start):
      model = build(params, start)
      model.train()
      model(inputs)
      return nnx.as_pure(nnx.state(model, nnx.BatchStat))

    return _recomputed(run, running)

  return _average_over_batches(stats_of, bn_inputs)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _nnx_recomputed_stats(graphdef, params, rest, bn_inputs):
  return _nnx_batch_stats(_nnx_builder(graphdef, rest), params, bn_inputs)


def nnx_recompute_batch_stats(model: nnx.Module, bn_inputs) -> None:
  """Re-estimates the model's BatchNorm statistics at its current parameters, in place (as SWA's ``update_bn``).

  The running averages collected during training trail the moving weights
  (and, with bSAM, were taken at the perturbed points); the posterior mean
  evaluated with statistics recomputed at ω is often much better
  (``docs/hyperparameters.md``). The new statistics are the average over the
  batches of the training-mode batch mean and variance.

  Args:
    model: the trained NNX model; its ``nnx.BatchStat`` variables are replaced.
    bn_inputs: training inputs: one batch ``(B, ...)`` or a list of batches.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"model must be an nnx.Module, got {type(model).__name__}")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
  stats = _nnx_recomputed_stats(graphdef, nnx.as_pure(params), nnx.as_pure(rest), _stacked_batches(bn_inputs))
  nnx.update(model, stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "batch_stats", "kwargs"))
def _nnx_predictive(graphdef, params, rest, opt_state, key, inputs, bn_inputs, num_samples, batch_stats, kwargs):
  apply = _nnx_apply(graphdef, rest, batch_stats, bn_inputs)
  return bo.predictive(apply, key, params, opt_state, inputs, num_samples, **dict(kwargs))


def nnx_predictive(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  key: jax.Array,
  inputs,
  num_samples: int = 32,
  *,
  batch_stats: Literal["mean", "recompute"] | None = None,
  bn_inputs=None,
  **kwargs,
) -> jax.Array:
  """The model average ``1/S Σ_j softmax(model_θ_j(inputs))`` of an NNX model, θ_j ~ N(ω, 1/(N s)), compiled.

  Each sample is the model rebuilt with ``nnx.merge`` from its parameters and
  the model's other state, in evaluation mode (``model.eval()``); the model
  passed in is not changed.

  Args:
    model: the trained model (ω).
    optimizer: its ``nnx.Optimizer`` holding :func:`bsam_optax.bsam`'s state.
    key: a PRNG key; sample ``j`` uses ``fold_in(key, j)``.
    inputs: what the model takes.
    num_samples: S.
    batch_stats: BatchNorm statistics of each sample: ``"mean"``, the running
      statistics of ω; ``"recompute"``, re-estimated for every θ_j as the
      average of the training-mode batch statistics on ``bn_inputs`` (as SWAG
      does), which keeps the model average calibrated. ``None``:
      ``"recompute"`` when ``bn_inputs`` is given, else ``"mean"``.
    bn_inputs: with ``"recompute"``, some training inputs: one batch shaped
      like ``inputs`` or several stacked as ``(K, B, ...)``.
    **kwargs: passed to :func:`bsam_optax.predictive` (``chunk_size``,
      ``link``, ``temperature``).

  Returns:
    The averaged probabilities (or ``link`` outputs).

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> from flax import nnx
    >>> from bsam_optax.flax import nnx_predictive
    >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, bo.bsam(1e-2, n_data=100), wrt=nnx.Param)
    >>> nnx_predictive(model, optimizer, jax.random.key(0), jnp.ones((5, 3)), num_samples=4).shape
    (5, 2)
  """
  batch_stats, bn_inputs = _bn_option(batch_stats, bn_inputs, inputs)
  graphdef, params, rest, opt_state = _nnx_parts(model, optimizer)
  for name, value in kwargs.items():
    if name not in inspect.signature(bo.predictive).parameters:
      raise TypeError(f"nnx_predictive got an unexpected keyword argument {name!r}")
    try:
      hash(value)
    except TypeError as err:
      raise TypeError(f"{name}= must be hashable (a number or a function), got {type(value).__name__}") from err
  return _nnx_predictive(
    graphdef,
    params,
    rest,
    opt_state,
    key,
    inputs,
    bn_inputs,
    num_samples=num_samples,
    batch_stats=batch_stats,
    kwargs=tuple(sorted(kwargs.items())),
  )
