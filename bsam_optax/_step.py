"""The compiled bSAM step: noise → first gradient → perturbation → update.

``bsam_step(loss_fn, tx, m=k)`` splits the batch into ``k`` equal parts
(m-sharpness, paper App. E.4). Part ``i`` gets its own key
``fold_in(key, i)``, its own noise sample θ_i, gradient g_i, perturbation ε_i
and perturbed gradient; the update then uses ``mean_i g_ε,i`` and
``mean_i |g_i|``. Across devices (``axis_name``, under ``jax.pmap`` or
``jax.shard_map``) each device holds ``k`` parts whose index counts across
devices (``axis_index * k + i``) and results meet through ``lax.pmean``, so D
devices with ``m=1`` give the result of ``m=D`` on one device.

The same machinery serves any method whose step is "gradient at a first point,
gradient at a second point, optax update": :func:`make_perturbation_step`
takes the two point rules; :func:`bsam_step` plugs in
:func:`~bsam_optax.noisy_params` and :func:`~bsam_optax.perturbed_params`.
"""

import functools
import numbers
from collections.abc import Callable
from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from bsam_optax import _bsam

Params = Any
Batch = Any
LossFn = Callable[..., Any]
# (key, params, opt_state) -> the point of the first gradient
FirstPoint = Callable[[jax.Array, Params, Any], Params]
# (params, opt_state, first_grads) -> the point of the second gradient
SecondPoint = Callable[[Params, Any, Params], Params]

__all__ = ["bsam_step", "make_perturbation_step", "perturbation_gradients"]


def _check_m(m) -> None:
  if isinstance(m, bool) or not isinstance(m, numbers.Integral):
    raise TypeError(f"m must be an int (the number of m-sharpness parts), got {m!r}")
  if m < 1:
    raise ValueError(f"m must be >= 1, got {m}")


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must contain at least one array")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes:
    raise ValueError("every leaf of batch needs a leading batch axis; found a scalar")
  if len(sizes) != 1:
    raise ValueError(f"all leaves of batch must share the leading batch size, got sizes {sorted(sizes)}")
  return sizes.pop()


def _split(batch, m: int):
  size = _batch_size(batch)
  if size % m:
    raise ValueError(f"batch size {size} is not divisible by m={m}: m-sharpness splits the batch into m equal parts")
  return jax.tree.map(lambda x: x.reshape((m, size // m) + x.shape[1:]), batch)


def _part_offset(axis_name: str | None, m: int):
  if axis_name is None:
    return 0
  try:
    return jax.lax.axis_index(axis_name) * m
  except NameError as err:
    raise ValueError(
      f"this step was built with axis_name={axis_name!r}; run it under "
      f"jax.pmap(..., axis_name={axis_name!r}) or jax.shard_map over a mesh with "
      f"that axis, or pass mesh= to build the sharded step for you"
    ) from err


def _mean_over_leading_axis(x):
  # A pairwise sum of slices, not jnp.mean(x, axis=0): XLA:CPU lowers a reduce
  # over the leading axis of a (m, ...) array to a slow reduction kernel (28 ms
  # vs 0.3 ms for m=8 and a 784x500 leaf, see benchmarks/results/cost.md),
  # while slices and adds fuse into one elementwise loop on every backend.
  # Low-precision leaves are summed in float32, as jnp.mean does.
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return jnp.mean(x, axis=0)
  m = x.shape[0]
  total = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  while total.shape[0] > 1:
    half = total.shape[0] // 2
    pairs = total[:half] + total[half : 2 * half]
    if total.shape[0] % 2:
      pairs = jnp.concatenate([pairs[:1] + total[2 * half :], pairs[1:]])
    total = pairs
  return (total[0] / m).astype(x.dtype)


def _as_varying(tree, axis_name: str | None):
  """Marks replicated leaves as varying over ``axis_name`` before a gradient is taken.

  Under ``jax.shard_map`` the gradient with respect to a replicated (device-
  invariant) input is summed over the devices; a point that does not depend
  on the device (e.g. SAM's first point, ω itself) must be made varying so
  that each device gets the gradient of its own part. A no-op under pmap.
  """
  if axis_name is None:
    return tree

  def cast(x):
    try:
      return jax.lax.pcast(x, axis_name, to="varying")
    except ValueError:  # already varying (e.g. it depends on the part's gradient)
      return x

  return jax.tree.map(cast, tree)


def _mean_over_parts(tree):
  return jax.tree.map(_mean_over_leading_axis, tree)


def _mean_of_list(*xs):
  # _mean_over_leading_axis for m separate arrays, pairing them in the same order.
  dtype = jnp.result_type(xs[0])
  if not jnp.issubdtype(dtype, jnp.floating):
    return jnp.mean(jnp.stack(xs), axis=0)
  total = [x.astype(jnp.promote_types(dtype, jnp.float32)) for x in xs]
  while len(total) > 1:
    half = len(total) // 2
    pairs = [a + b for a, b in zip(total[:half], total[half : 2 * half], strict=True)]
    if len(total) % 2:
      pairs[0] = pairs[0] + total[-1]
    total = pairs
  return (total[0] / len(xs)).astype(dtype)


def _check_options(loss_fn, aux_from, thread_aux, has_aux, split, m) -> None:
  _check_m(m)
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
  if aux_from not in ("first", "second"):
    raise ValueError(f"aux_from must be 'first' or 'second', got {aux_from!r}")
  if thread_aux and not has_aux:
    raise ValueError("thread_aux=True needs has_aux=True: the first pass's aux becomes the second pass's loss_args[0]")
  if split not in ("vmap", "scan", "unroll"):
    raise ValueError(f"split must be 'vmap', 'scan' or 'unroll', got {split!r}")


def _check_mesh(mesh: Mesh, axis_name: str | None) -> None:
  if axis_name is None:
    raise ValueError("mesh= needs axis_name=, the mesh axis the batch is sharded along")
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")


def _on_mesh(fn, mesh: Mesh, axis_name: str, m: int, donate_argnums=()):
  """``jax.jit(jax.shard_map(fn))``: the batch (3rd argument) sharded along ``axis_name``, all else replicated."""
  _check_mesh(mesh, axis_name)
  num_devices = mesh.shape[axis_name]
  replicated = PartitionSpec()

  @functools.partial(jax.jit, donate_argnums=donate_argnums)
  def sharded(params, opt_state, batch, key, *loss_args):
    size = _batch_size(batch)
    if size % (num_devices * m):
      raise ValueError(
        f"global batch size {size} is not divisible by the number of parts: {num_devices} devices on "
        f"mesh axis {axis_name!r} x m={m} = {num_devices * m}"
      )
    in_specs = (replicated, replicated, PartitionSpec(axis_name), replicated) + (replicated,) * len(loss_args)
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=replicated)(
      params, opt_state, batch, key, *loss_args
    )

  return sharded


def perturbation_gradients(
  loss_fn: LossFn,
  first_point: FirstPoint | None,
  second_point: SecondPoint | None,
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["first", "second"] = "second",
  thread_aux: bool = False,
  noisy_grads: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  loss_names: tuple[str, str] = ("loss", "second_loss"),
):
  """The gradients of :func:`make_perturbation_step`, averaged over parts and devices, without the update.

  For training loops that apply the update themselves (e.g. ``nnx.Optimizer``).
  The arguments are those of :func:`make_perturbation_step`.

  Returns:
    ``gradients(params, opt_state, batch, key, *loss_args) -> result``, a dict
    with the two mean losses (``loss_names``), ``"grads"`` (the mean second
    gradient), ``"abs_grads"`` (the mean ``|g_i|``, with ``noisy_grads``) and
    ``"aux"`` (with ``has_aux``). With ``mesh`` it is a jitted
    ``jax.shard_map`` over the global batch; otherwise a plain function (for
    ``jax.pmap`` when ``axis_name`` is given).

  Example (bSAM's gradients; ``tx.update(out["grads"], state, params,
  noisy_grads=out["abs_grads"])`` would complete the step):

    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = bo.bsam(1e-2, n_data=8).init(params)
    >>> gradients = bo.perturbation_gradients(loss_fn, bo.noisy_params, bo.perturbed_params, m=2, noisy_grads=True)
    >>> out = gradients(params, state, {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}, jax.random.key(0))
    >>> sorted(out)
    ['abs_grads', 'grads', 'loss', 'second_loss']
  """
  _check_options(loss_fn, aux_from, thread_aux, has_aux, split, m)
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def evaluate(x, part, loss_args):
    x = _as_varying(x, axis_name)
    if has_aux:
      (loss, aux), grads = value_and_grad(x, part, *loss_args)
    else:
      (loss, grads), aux = value_and_grad(x, part, *loss_args), None
    return loss, aux, grads

  def one_part(params, opt_state, key, index, part, loss_args):
    x = params if first_point is None else first_point(jax.random.fold_in(key, index), params, opt_state)
    loss, aux, g = evaluate(x, part, loss_args)
    if second_point is None:
      second_loss, second_aux, g_second = loss, aux, g
    else:
      y = second_point(params, opt_state, g)
      second_args = (aux,) + tuple(loss_args[1:]) if thread_aux else loss_args
      second_loss, second_aux, g_second = evaluate(y, part, second_args)
    result = {loss_names[0]: loss, loss_names[1]: second_loss, "grads": g_second}
    if noisy_grads:
      result["abs_grads"] = jax.tree.map(jnp.abs, g)
    if has_aux:
      result["aux"] = aux if aux_from == "first" else second_aux
    return result

  def gradients(params, opt_state, batch, key, *loss_args):
    if thread_aux and not loss_args:
      raise ValueError("thread_aux=True needs a loss_arg to thread (the step's first loss_arg, e.g. batch_stats)")
    offset = _part_offset(axis_name, m)
    parts = _split(batch, m)
    if m == 1:
      one = jax.tree.map(lambda x: x[0], parts)
      result = one_part(params, opt_state, key, offset, one, loss_args)
    elif split == "vmap":
      indices = offset + jnp.arange(m)
      result = jax.vmap(one_part, in_axes=(None, None, None, 0, 0, None))(
        params, opt_state, key, indices, parts, loss_args
      )
      result = _mean_over_parts(result)
    elif split == "unroll":
      results = [
        one_part(params, opt_state, key, offset + i, jax.tree.map(lambda x, i=i: x[i], parts), loss_args)
        for i in range(m)
      ]
      result = jax.tree.map(_mean_of_list, *results)
    else:

      def body(total, xs):
        index, part = xs
        r = one_part(params, opt_state, key, index, part, loss_args)
        return jax.tree.map(lambda t, v: t + v / m, total, r), None

      init = jax.eval_shape(
        lambda: one_part(params, opt_state, key, offset, jax.tree.map(lambda x: x[0], parts), loss_args)
      )
      init = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), init)
      result, _ = jax.lax.scan(body, init, (offset + jnp.arange(m), parts))
    if axis_name is not None:
      result = jax.lax.pmean(result, axis_name)
    return result

  return gradients if mesh is None else _on_mesh(gradients, mesh, axis_name, m)


def make_perturbation_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  first_point: FirstPoint | None,
  second_point: SecondPoint | None,
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["first", "second"] = "second",
  thread_aux: bool = False,
  noisy_grads: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
  loss_names: tuple[str, str] = ("loss", "second_loss"),
):
  """Builds a compiled "two gradients, one update" step with m-sharpness.

  Per part ``i`` (key ``fold_in(key, part_index)``)::

    x_i  = first_point(key_i, params, opt_state)    # identity if None
    g_i  = ∇ loss_fn(x_i, part_i)
    y_i  = second_point(params, opt_state, g_i)     # skipped if None (y_i = x_i)
    gy_i = ∇ loss_fn(y_i, part_i)

  then ``tx.update(mean_i gy_i, opt_state, params[, noisy_grads=mean_i |g_i|])``.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: the optax transformation applied to the averaged second gradients.
    first_point: rule for the first gradient's point, or None for ``params``.
    second_point: rule for the second gradient's point, or None for a
      one-gradient method.
    m: number of parts per device the batch is split into.
    axis_name: the device axis for ``jax.pmap`` / ``jax.shard_map``.
    mesh: if given, return the step already wrapped in ``jax.shard_map`` over
      ``mesh`` (batch sharded along ``axis_name``, everything else replicated)
      and jitted.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_from: which gradient's pass provides ``aux`` ("first" or "second").
      ``aux`` is averaged over parts and devices (e.g. BatchNorm statistics).
    thread_aux: pass the first pass's ``aux`` to the second pass in place of
      the first of ``loss_args`` (mutable state, such as BatchNorm
      statistics, updated by both passes in turn). Needs ``has_aux`` and at
      least one loss_arg.
    noisy_grads: pass ``mean_i |g_i|`` to ``tx.update`` as ``noisy_grads=``.
    split: evaluate the m parts side by side (``"vmap"``), one after the
      other (``"scan"``: gradient accumulation, the memory of one part), or as
      ``m`` copies of the per-part graph in one program (``"unroll"``: each
      part's layers are ordinary ops rather than ops batched over per-part
      weights; on XLA:CPU a small CNN's m=8 step then runs 1.5-1.8x faster
      than with vmap's grouped convolutions, at ~3x the compile time).
      All give the same result up to floating-point rounding.
    donate: donate ``params`` and ``opt_state`` to the compiled step.
    loss_names: the keys of ``out`` for the mean loss at the first and at the
      second points.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)`` where ``out`` has the two mean losses (see ``loss_names``) and
    ``aux`` if ``has_aux``. Jitted unless ``axis_name`` is given without ``mesh`` (then it
    is meant to be wrapped in ``jax.pmap`` by the caller).
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"tx must be an optax.GradientTransformation (or MultiSteps), got {type(tx).__name__}")
  gradients = perturbation_gradients(
    loss_fn,
    first_point,
    second_point,
    m=m,
    axis_name=axis_name,
    has_aux=has_aux,
    aux_from=aux_from,
    thread_aux=thread_aux,
    noisy_grads=noisy_grads,
    split=split,
    loss_names=loss_names,
  )

  def local_step(params, opt_state, batch, key, *loss_args):
    result = gradients(params, opt_state, batch, key, *loss_args)
    extra = {"noisy_grads": result.pop("abs_grads")} if noisy_grads else {}
    grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), result.pop("grads"), params)
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    params = optax.apply_updates(params, updates)
    return params, opt_state, result

  donate_argnums = (0, 1) if donate else ()
  if mesh is None:
    if axis_name is not None:
      return local_step
    return jax.jit(local_step, donate_argnums=donate_argnums)
  return _on_mesh(local_step, mesh, axis_name, m, donate_argnums)


def _bsam_rules(aux_from: Literal["noisy", "perturbed"] = "perturbed") -> dict:
  """The arguments that make :func:`make_perturbation_step` (or :func:`perturbation_gradients`) bSAM.

  ``aux_from`` in bSAM's names for the passes ("noisy" at θ, "perturbed" at
  ω + ε), translated to the machinery's ("first", "second").
  """
  if aux_from not in ("noisy", "perturbed"):
    raise ValueError(f"aux_from must be 'noisy' or 'perturbed', got {aux_from!r}")
  return dict(
    first_point=_bsam.noisy_params,
    second_point=_bsam.perturbed_params,
    aux_from="first" if aux_from == "noisy" else "second",
    noisy_grads=True,
    loss_names=("loss", "perturbed_loss"),
  )


def bsam_step(
  loss_fn: LossFn,
  tx: optax.GradientTransformation,
  m: int = 1,
  axis_name: str | None = None,
  *,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["noisy", "perturbed"] = "perturbed",
  thread_aux: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
):
  """The fused, compiled bSAM step with m-sharpness.

  For each of the ``m`` parts of the batch (and of every device)::

    θ_i   = noisy_params(fold_in(key, i), ω, state)     # θ_i ~ N(ω, 1/(N s))
    g_i   = ∇ loss_fn(θ_i, part_i)
    g_ε,i = ∇ loss_fn(ω + ρ g_i / s, part_i)

  then ``tx.update(mean_i g_ε,i, state, ω, noisy_grads=mean_i |g_i|)``, which
  for :func:`~bsam_optax.bsam` makes the scale update use the mean over parts
  of ``√s |g_i|``. ``tx`` may be any optax pipeline containing one ``bsam``
  (``optax.chain`` with clipping, ``inject_hyperparams``, ``MultiSteps``).

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``. ``loss_args`` are
      passed unsplit to every part (e.g. BatchNorm statistics).
    tx: an optax transformation containing :func:`~bsam_optax.bsam`.
    m: the number of m-sharpness parts (per device).
    axis_name: the device axis; the returned step is then meant for
      ``jax.pmap(step, axis_name=axis_name)`` with params, state and key
      replicated and the batch sharded, unless ``mesh`` is given.
    mesh: a ``jax.sharding.Mesh``; returns a jitted ``jax.shard_map`` step over
      it that takes the *global* batch, sharded along ``axis_name``.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_from: which pass's ``aux`` to return, averaged over parts and devices:
      ``"noisy"`` (at θ) or ``"perturbed"`` (at ω + ε).
    thread_aux: feed the noisy pass's ``aux`` to the perturbed pass as its
      first loss_arg, so that mutable state (BatchNorm statistics) is updated
      by both passes in turn, as in the authors' code.
    split: ``"vmap"`` (parts side by side), ``"scan"`` (one after another:
      gradient accumulation with the peak memory of one part) or
      ``"unroll"`` (``m`` copies of the part's graph; faster for CNNs on CPU,
      slower to compile); see :func:`make_perturbation_step`.
    donate: donate ``params`` and ``opt_state`` buffers to the step.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)``; ``out["loss"]`` is the mean loss at the noisy samples θ_i,
    ``out["perturbed_loss"]`` at ω + ε_i, ``out["aux"]`` the averaged aux.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.bsam(1e-2, n_data=8)
    >>> state = tx.init(params)
    >>> step = bo.bsam_step(loss_fn, tx, m=2)
    >>> params, state, out = step(params, state, batch, jax.random.key(0))
  """
  return make_perturbation_step(
    loss_fn,
    tx,
    m=m,
    axis_name=axis_name,
    mesh=mesh,
    has_aux=has_aux,
    thread_aux=thread_aux,
    split=split,
    donate=donate,
    **_bsam_rules(aux_from),
  )
