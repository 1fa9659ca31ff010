"""Flax integration: linen ``TrainState`` and train step, NNX train step.

Both paths run the bSAM step of :func:`bsam_optax.bsam_step`::

  θ   ~ N(ω, 1 / (N s))          # forward + backward pass 1 (the "noisy" pass)
  g   = ∇ℓ(θ)
  g_ε = ∇ℓ(ω + ρ g / s)          # forward + backward pass 2 (the "perturbed" pass)
  tx.update(g_ε, state, ω, noisy_grads=|g|)

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

Only BatchNorm statistics are threaded through the step (linen's
``batch_stats`` collection, NNX's :class:`flax.nnx.BatchStat` variables);
other mutable state, such as dropout RNG counters, is not supported.
"""

import operator
from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax.training import train_state
from jax.sharding import Mesh

import bsam_optax as bo

__all__ = ["TrainState", "make_nnx_train_step", "make_train_step"]

BNUpdate = Literal["both", "second", "first", "none", "perturbed", "noisy"]
_BN_UPDATES = ("both", "second", "first", "none", "perturbed", "noisy")


def _bn_options(bn_update: BNUpdate) -> dict:
  """The aux options of the step machinery that implement a ``bn_update`` policy."""
  if bn_update not in _BN_UPDATES:
    raise ValueError(f"bn_update must be one of {_BN_UPDATES[:4]}, got {bn_update!r}")
  if bn_update == "none":
    return dict(has_aux=False)
  return dict(
    has_aux=True,
    aux_from="first" if bn_update in ("first", "noisy") else "second",
    thread_aux=bn_update == "both",
  )


class TrainState(train_state.TrainState):
  """A linen ``TrainState`` for bSAM, with BatchNorm statistics.

  Differs from :class:`flax.training.train_state.TrainState` in two ways:
  ``batch_stats`` is a field (``None`` for models without BatchNorm), and
  :meth:`apply_gradients` forwards ``noisy_grads=`` (and any other extra
  argument) to ``tx.update``, which linen's does not.

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
  """

  batch_stats: Any = None

  def apply_gradients(self, *, grads, noisy_grads=None, extra_args=None, **kwargs):
    """One ``tx`` update: ``params``, ``opt_state`` and ``step`` move on.

    Args:
      grads: the gradient at the perturbed point ω + ε (``g_ε``).
      noisy_grads: the gradient at the noisy sample θ (``g``), passed to
        ``tx.update(..., noisy_grads=noisy_grads)``; omitted if ``None``.
      extra_args: other keyword arguments for ``tx.update``.
      **kwargs: fields to ``replace`` (e.g. ``batch_stats=``), as in linen.

    Returns:
      The updated state.
    """
    extra = dict(extra_args or {})
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


def make_train_step(
  loss_fn: Callable[[Any, Any], jax.Array],
  inputs_fn: Callable[[Any], Any] = operator.itemgetter(0),
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  bn_update: BNUpdate = "both",
  apply_kwargs: dict | None = None,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
):
  """Builds a bSAM train step for a linen model held in a :class:`TrainState`.

  The model is called as ``state.apply_fn({"params": p, "batch_stats": bs},
  inputs_fn(batch), mutable=["batch_stats"], **apply_kwargs)`` and the loss
  is ``loss_fn(outputs, batch)``; the step is :func:`bsam_optax.bsam_step`
  with ``state.tx``, ``batch_stats`` as its loss_arg and the new statistics
  as its aux. Models without BatchNorm (``state.batch_stats is None``) are
  called with ``{"params": p}`` only.

  Args:
    loss_fn: ``loss_fn(outputs, batch) -> loss``, the mean loss over the
      batch (part) given the model's outputs.
    inputs_fn: picks the model's input from the batch; default ``batch[0]``.
    m: the number of m-sharpness parts (per device).
    axis_name: the device axis; the step is then meant for
      ``jax.pmap(step, axis_name=axis_name)`` (state and key replicated,
      batch sharded) unless ``mesh`` is given.
    mesh: a ``jax.sharding.Mesh`` to run the step with ``jax.shard_map``.
    bn_update: which forward passes update the BatchNorm running averages:
      ``"both"`` (the authors' behaviour), ``"second"``, ``"first"`` or
      ``"none"``; see :mod:`bsam_optax.flax`.
    apply_kwargs: keyword arguments for every training-mode call of the
      model, e.g. ``{"train": True}``.
    split: ``"vmap"``, ``"scan"`` or ``"unroll"`` over the m parts (see
      ``bsam_step``).
    donate: donate the state's buffers to the compiled step.

  Returns:
    ``step(state, batch, key) -> (state, info)`` with ``info`` a
    :class:`~bsam_optax.StepInfo`: ``info.loss`` (mean loss at the noisy
    samples) and ``info.second_loss`` (at ω + ε).
    Jitted unless ``axis_name`` is given without ``mesh``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, bsam_optax as bo
    >>> from bsam_optax.flax import TrainState, make_train_step
    >>> class Net(nn.Module):
    ...   @nn.compact
    ...   def __call__(self, x, train):
    ...     x = nn.BatchNorm(use_running_average=not train)(nn.Dense(8)(x))
    ...     return nn.Dense(2)(nn.relu(x))
    >>> x, y = jnp.ones((16, 3)), jnp.zeros(16, jnp.int32)
    >>> variables = Net().init(jax.random.key(0), x, train=False)
    >>> state = TrainState.create(apply_fn=Net().apply, params=variables["params"],
    ...                           batch_stats=variables["batch_stats"], tx=bo.bsam(1e-2, n_data=16))
    >>> loss = lambda logits, b: optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()
    >>> step = make_train_step(loss, m=2, apply_kwargs={"train": True})
    >>> state, out = step(state, (x, y), jax.random.key(1))
  """
  bn_options = _bn_options(bn_update)
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
  if not callable(inputs_fn):
    raise TypeError(f"inputs_fn must be callable, got {type(inputs_fn).__name__}")
  bo.StepOptions(m=m, axis_name=axis_name, mesh=mesh, split=split, donate=donate, **bn_options)
  apply_kwargs = dict(apply_kwargs or {})

  def step(state: TrainState, batch, key: jax.Array):
    if state.batch_stats is None:

      def loss(params, part):
        return loss_fn(state.apply_fn({"params": params}, inputs_fn(part), **apply_kwargs), part)

      options, loss_args = dict(has_aux=False), ()
    else:

      def loss(params, part, batch_stats):
        variables = {"params": params, "batch_stats": batch_stats}
        outputs, mutated = state.apply_fn(variables, inputs_fn(part), mutable=["batch_stats"], **apply_kwargs)
        value = loss_fn(outputs, part)
        return value if bn_update == "none" else (value, mutated["batch_stats"])

      options, loss_args = bn_options, (state.batch_stats,)
    inner = bo.bsam_step(loss, state.tx, m, axis_name, mesh=mesh, split=split, **options)
    params, opt_state, info = inner(state.params, state.opt_state, batch, key, *loss_args)
    batch_stats = state.batch_stats if info.aux is None else info.aux
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats)
    return new_state, info._replace(aux=None)

  if axis_name is not None and mesh is None:
    return step
  return jax.jit(step, donate_argnums=(0,) if donate else ())


def _as_variables(like, values):
  """Puts the arrays of the pure state ``values`` into the Variables of ``like``."""
  return jax.tree.map(lambda v, x: v.replace(x), like, values, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_nnx_train_step(
  loss_fn: Callable[[nnx.Module, Any], jax.Array],
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  bn_update: BNUpdate = "both",
  split: Literal["vmap", "scan", "unroll"] = "vmap",
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
  :mod:`bsam_optax.flax`); put the model in training mode (``model.train()``)
  before training.

  Args:
    loss_fn: ``loss_fn(model, batch) -> loss``, the mean loss over the batch.
    m: the number of m-sharpness parts (per device with ``mesh``).
    axis_name: the mesh axis the batch is sharded along (with ``mesh``).
    mesh: a ``jax.sharding.Mesh``: the step takes the global batch, sharded
      along ``axis_name``, and evaluates ``m`` parts on every device with
      ``jax.shard_map`` (D devices with ``m=1`` give ``m=D`` on one device).
    bn_update: ``"both"`` (the authors' behaviour), ``"second"``,
      ``"first"`` or ``"none"``.
    split: ``"vmap"``, ``"scan"`` or ``"unroll"`` over the m parts (see
      :func:`bsam_optax.bsam_step`).
    jit: wrap the step in ``nnx.jit``.

  Returns:
    ``step(model, optimizer, batch, key) -> info``, updating ``model`` and
    ``optimizer`` in place; ``info`` is a :class:`~bsam_optax.StepInfo`
    (``info.loss``, ``info.second_loss``).

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> from flax import nnx
    >>> from bsam_optax.flax import make_nnx_train_step
    >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(model, bo.bsam(1e-2, n_data=8), wrt=nnx.Param)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones((8, 1))}
    >>> step = make_nnx_train_step(lambda mdl, b: jnp.mean((mdl(b["x"]) - b["y"]) ** 2), m=2)
    >>> out = step(model, optimizer, batch, jax.random.key(0))
  """
  options = _bn_options(bn_update)
  if axis_name is not None and mesh is None:
    raise ValueError("axis_name= needs mesh=: the NNX step runs on several devices through jax.shard_map over a mesh")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
  options = dict(options, m=m, axis_name=axis_name, mesh=mesh, split=split)
  bo.StepOptions(**options)

  def step(model, optimizer: nnx.Optimizer, batch, key: jax.Array):
    graphdef, param_vars, stats, rest = nnx.split(model, optimizer.wrt, nnx.BatchStat, ...)
    params = nnx.as_pure(param_vars)
    stats = nnx.as_pure(stats)
    rest = nnx.as_pure(rest)  # other mutable state (e.g. RNG counters) is not carried over
    opt_state = nnx.as_pure(optimizer.opt_state)

    def loss(p, part, batch_stats):
      model = nnx.merge(graphdef, p, batch_stats, rest)
      value = loss_fn(model, part)
      return value if bn_update == "none" else (value, nnx.as_pure(nnx.state(model, nnx.BatchStat)))

    gradients = bo.perturbation_gradients(loss, bo.bsam_rule(), **options)
    grads, args, info = gradients(params, opt_state, batch, key, stats)
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
    optimizer.update(model, _as_variables(param_vars, grads), **args)
    if info.aux is not None:
      nnx.update(model, info.aux)
    return info._replace(aux=None)

  return nnx.jit(step) if jit else step
