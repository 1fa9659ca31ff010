"""The step machinery: a gradient at a first point, a gradient at a second point, an optax update.

Every method of this library is a :class:`PerturbationRule`, a small value of
three functions; one builder, :func:`make_perturbation_step`, turns a rule, a
loss and an optax transformation into a compiled step. Per m-sharpness part
``i`` (key ``fold_in(key, i)``, ``i`` counting across devices)::

  x_i  = rule.first_point(key_i, params, opt_state)        # params if None
  g_i  = ∇ loss_fn(x_i, part_i)
  y_i  = rule.second_point(params, opt_state, g_i)         # skipped if None
  gy_i = ∇ loss_fn(y_i, part_i)                            # gy_i = g_i if skipped
  a_i  = rule.update_args(params, opt_state, x_i, g_i)     # {} if None
  b_i  = rule.second_update_args(params, opt_state, x_i, g_i, gy_i)   # {} if None

then ``tx.update(mean_i gy_i, opt_state, params, **mean_i a_i, **mean_i b_i)``.

The parts are evaluated side by side (``split="vmap"``), one after the other
(``"scan"``, gradient accumulation) or as ``m`` copies of one part's graph
(``"unroll"``); the default ``split="auto"`` picks one of the first two from the
problem when the step is traced (:func:`choose_split`). Across devices (``axis_name``, under ``jax.pmap`` or
``jax.shard_map``) each device holds ``m`` parts whose index counts across
devices (``axis_index * m + i``) and the means meet through ``lax.pmean``, so
D devices with ``m=1`` give the result of ``m=D`` on one device.

This module knows no method by name: bSAM's rule is in ``_bsam.py``, the SAM
family's in ``_sam.py``.
"""

import dataclasses
import functools
import logging
import math
from collections.abc import Callable
from typing import Any
from typing import Literal
from typing import NamedTuple
from typing import cast

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from bsam_optax._checks import check_count

Params = Any
Batch = Any
OptState = Any
LossFn = Callable[..., Any]

__all__ = [
  "PerturbationRule",
  "StepInfo",
  "StepOptions",
  "choose_split",
  "make_perturbation_step",
  "perturbation_gradients",
]

logger = logging.getLogger("bsam_optax")

SPLITS = ("auto", "vmap", "scan", "unroll")


class PerturbationRule(NamedTuple):
  """A method, as the step machinery sees it: where its two gradients are taken and what its update gets.

  Its fields:

  - ``first_point``: ``(key, params, opt_state) -> x``, the point of the first
    gradient (a noisy sample for bSAM, RandomSAM and MFVI); ``None`` for
    ``params`` itself (the key is then unused).
  - ``second_point``: ``(params, opt_state, g) -> y``, the point of the second
    gradient given the first gradient ``g`` (SAM's ``ω + ρ g / ‖g‖``);
    ``None`` for a one-gradient method, whose update gets ``g``.
  - ``update_args``: ``(params, opt_state, x, g) -> dict``, extra keyword
    arguments of ``tx.update`` computed from the first point and gradient
    (bSAM's ``noisy_grads=|g|``); each value is a pytree, averaged over
    parts and devices. ``None`` for none.
  - ``second_update_args``: ``(params, opt_state, x, g, gy) -> dict``, more
    keyword arguments of ``tx.update`` that also need the part's second
    gradient ``gy`` (bSAM's control-variate curvature ``(g − gy) · (x − ω)``);
    averaged like ``update_args``, and merged with them. ``None`` for none.

  Example (SAM with a fixed radius; the library's own is :func:`bsam_optax.sam_rule`)::

    rule = PerturbationRule(second_point=lambda params, state, g: bo.sam_perturbed_params(params, g, rho=0.05))
  """

  first_point: Callable[[jax.Array, Params, OptState], Params] | None = None
  second_point: Callable[[Params, OptState, Params], Params] | None = None
  update_args: Callable[[Params, OptState, Params, Params], dict] | None = None
  second_update_args: Callable[[Params, OptState, Params, Params, Params], dict] | None = None


_LEGACY_KEYS = {"loss": "loss", "second_loss": "second_loss", "perturbed_loss": "second_loss", "aux": "aux"}


class StepInfo(NamedTuple):
  """What a step reports besides the new parameters and state.

  ``info["loss"]``, ``info["perturbed_loss"]`` (= ``second_loss``) and
  ``info["aux"]`` work too, for code written against the earlier dict.
  """

  loss: jax.Array  # shape (): the mean loss at the first points
  second_loss: jax.Array  # shape (): the mean loss at the second points (= loss without a second point)
  aux: Any = None  # the chosen pass's aux, reduced over parts and devices (None without has_aux)

  def __getitem__(self, key):
    if isinstance(key, str):
      if key not in _LEGACY_KEYS:
        raise KeyError(f"{key!r}; StepInfo has loss, second_loss (alias perturbed_loss) and aux")
      return getattr(self, _LEGACY_KEYS[key])
    return tuple.__getitem__(self, key)


def _check_flag(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """How a step is evaluated; the keyword options of every ``*_step`` builder, checked in one place.

  Its fields:

  - ``m``: the number of m-sharpness parts per device the batch is split into,
    each with its own key (and so its own noise or perturbation).
  - ``axis_name``: the device axis, for ``jax.pmap`` / ``jax.shard_map``. Without
    ``mesh`` the step is then not jitted: wrap it in
    ``jax.pmap(step, axis_name=axis_name)`` (params, state and key
    replicated, the batch sharded).
  - ``mesh``: a ``jax.sharding.Mesh``: the step is a jitted ``jax.shard_map`` over
    it that takes the *global* batch, sharded along ``axis_name``.
  - ``has_aux``: whether ``loss_fn`` returns ``(loss, aux)``.
  - ``aux_from``: which pass's ``aux`` the step returns: ``"first"`` or
    ``"second"``.
  - ``aux_reduce``: ``"mean"`` averages ``aux`` over parts and devices (BatchNorm
    statistics); ``"concat"`` concatenates it along the leading axis in
    batch order (per-example outputs such as logits).
  - ``thread_aux``: pass the first pass's ``aux`` to the second pass in place of
    the first loss_arg (mutable state, e.g. BatchNorm statistics, updated by
    both passes in turn). Needs ``has_aux`` and a loss_arg.
  - ``split``: ``"auto"`` (the default: ``"scan"`` or ``"vmap"``, picked from
    the problem when the step is traced, see :func:`choose_split`),
    ``"vmap"`` (parts side by side), ``"scan"`` (one after another:
    gradient accumulation with the activations of one part) or
    ``"unroll"`` (``m`` copies of one part's graph in one program: on
    XLA:CPU a small CNN's m=8 step runs 1.5-1.8x faster than with vmap's
    grouped convolutions, at ~3x the compile time). All give the same
    result up to floating-point rounding.
  - ``donate``: donate ``params`` and ``opt_state`` to the compiled step.
  """

  m: int = 1
  axis_name: str | None = None
  mesh: Mesh | None = None
  has_aux: bool = False
  aux_from: Literal["first", "second"] = "second"
  aux_reduce: Literal["mean", "concat"] = "mean"
  thread_aux: bool = False
  split: Literal["auto", "vmap", "scan", "unroll"] = "auto"
  donate: bool = False

  def __post_init__(self):
    check_count("m", self.m)
    if self.aux_from not in ("first", "second"):
      raise ValueError(f"aux_from must be 'first' or 'second', got {self.aux_from!r}")
    if self.aux_reduce not in ("mean", "concat"):
      raise ValueError(f"aux_reduce must be 'mean' or 'concat', got {self.aux_reduce!r}")
    for name in ("has_aux", "thread_aux", "donate"):
      _check_flag(name, getattr(self, name))
    if self.thread_aux and not self.has_aux:
      raise ValueError("thread_aux=True needs has_aux=True: the first pass's aux becomes the second pass's loss_arg")
    if self.split not in SPLITS:
      raise ValueError(f"split must be 'auto', 'vmap', 'scan' or 'unroll', got {self.split!r}")
    if self.axis_name is not None and not isinstance(self.axis_name, str):
      raise TypeError(f"axis_name must be a str or None, got {self.axis_name!r}")
    if self.mesh is not None:
      if not isinstance(self.mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
      if self.axis_name is None:
        raise ValueError("mesh= needs axis_name=, the mesh axis the batch is sharded along")
      if self.axis_name not in self.mesh.axis_names:
        raise ValueError(f"axis_name={self.axis_name!r} is not an axis of the mesh {self.mesh.axis_names}")


def _batch_size(batch) -> int:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("batch must contain at least one array")
  sizes: set[Any] = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes:
    raise ValueError(
      "every leaf of batch needs a leading batch axis; found a scalar (is the batch passed as the "
      "third argument and the key as the fourth: step(params, opt_state, batch, key)?)"
    )
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


def _pairwise_mean(xs):
  """The mean of a list of arrays, summed pairwise in float32 at least.

  Used instead of ``jnp.mean(x, axis=0)`` over a stacked ``(m, ...)`` array:
  XLA:CPU lowers a reduce over the leading axis to a slow reduction kernel
  (28 ms vs 0.3 ms for m=8 and a 784x500 leaf, benchmarks/results/cost.md),
  while slices and adds fuse into one elementwise loop on every backend.
  """
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


def _mean_over_leading_axis(x):
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec and spec[0] is not None:
    # Parts sharded over a mesh axis (explicit sharding): slices of a sharded
    # axis are not expressible, a reduction is (one all-reduce).
    dtype = jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
    return jnp.mean(x.astype(dtype), axis=0).astype(x.dtype)
  return _pairwise_mean([x[i] for i in range(x.shape[0])])


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


def _check_loss_fn(loss_fn) -> None:
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")


def _check_rule(rule) -> None:
  if not isinstance(rule, PerturbationRule):
    raise TypeError(
      f"rule must be a bsam_optax.PerturbationRule (e.g. bo.bsam_rule(), bo.sam_rule(rho=0.05)), "
      f"got {type(rule).__name__}"
    )


def _parts_axis_spec(parts):
  """The mesh axis the parts axis is sharded over in the arrays' types (explicit sharding), or None."""
  sharding = getattr(jax.typeof(jax.tree.leaves(parts)[0]), "sharding", None)
  spec = getattr(sharding, "spec", None)
  return (spec[0], sharding.mesh) if spec and spec[0] is not None else (None, None)


def _sharded_like_parts(indices, parts):
  """``indices`` with the sharding of the parts' leading axis, as ``jax.vmap`` needs under explicit sharding.

  When the batch is sharded over a mesh axis with sharding in types
  (``jax.make_mesh`` makes ``Explicit`` axes), splitting it into ``(m, size
  / m, ...)`` keeps the sharding on the parts axis; the part indices mapped
  beside the parts must carry the same sharding.
  """
  axis, mesh = _parts_axis_spec(parts)
  if axis is None:
    return indices
  return jax.sharding.reshard(indices, NamedSharding(mesh, PartitionSpec(axis)))


def _concat_parts(x):
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _explicit(mesh: Mesh, axis_name: str) -> bool:
  return mesh.axis_types[mesh.axis_names.index(axis_name)] == jax.sharding.AxisType.Explicit


def _on_mesh(build, options: StepOptions, with_state: bool):
  """The jitted step over ``options.mesh``, taking the global batch sharded along ``options.axis_name``.

  ``build(options)`` makes the per-device function, which returns ``(a, b,
  StepInfo)``. Parameters and optimizer state keep the shardings they come
  with over the mesh's other axes (tensor parallelism over a 'model' axis).

  * Auto axes: ``jax.shard_map`` manual over ``axis_name`` only, each device
    evaluating ``m`` parts whose index counts across devices (``lax.pmean``
    joins them); every other axis stays automatic.
  * Explicit axes (sharding in types, ``jax.make_mesh``'s default): one
    program over all ``devices x m`` parts, the parts axis sharded along
    ``axis_name``; XLA places each part on the device that holds its rows.

  Both give the parts the same indices, so the same result.
  """
  # StepOptions checked that mesh= comes with axis_name=.
  mesh, axis_name, m = cast(Mesh, options.mesh), cast(str, options.axis_name), options.m
  num_devices = mesh.shape[axis_name]
  replicated = PartitionSpec()
  donate_argnums = (0, 1) if options.donate and with_state else ()
  # One program over all parts under explicit sharding, and for a data axis of size 1 (where a shard_map
  # manual over that axis alone trips XLA's partitioner: "Cross-partition allreduce must be in manual mode").
  explicit = _explicit(mesh, axis_name) or num_devices == 1
  if explicit:
    fn = build(dataclasses.replace(options, mesh=None, axis_name=None, m=m * num_devices))
  else:
    fn = build(dataclasses.replace(options, mesh=None))

  @functools.partial(jax.jit, donate_argnums=donate_argnums)
  def sharded(params, opt_state, batch, key, *loss_args):
    size = _batch_size(batch)
    if size % (num_devices * m):
      raise ValueError(
        f"global batch size {size} is not divisible by the number of parts: {num_devices} devices on "
        f"mesh axis {axis_name!r} x m={m} = {num_devices * m}"
      )
    if explicit:
      sharding = NamedSharding(mesh, PartitionSpec(axis_name))
      if _explicit(mesh, axis_name):
        batch = jax.sharding.reshard(batch, sharding)
      else:
        batch = jax.lax.with_sharding_constraint(batch, sharding)
      return fn(params, opt_state, batch, key, *loss_args)
    in_specs = (replicated, replicated, PartitionSpec(axis_name), replicated) + (replicated,) * len(loss_args)
    aux_spec = PartitionSpec(axis_name) if options.aux_reduce == "concat" else replicated
    out_specs = (replicated, replicated, StepInfo(replicated, replicated, aux_spec))
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={axis_name})(
      params, opt_state, batch, key, *loss_args
    )

  return sharded


# vmap's extra memory over scan is about one parameter-sized buffer per extra part (the MLP of
# benchmarks/results/cost.md at m = 8: +13.4 P against +3.9 P); below this many bytes of it the choice
# does not matter for memory and vmap stays.
_SMALL_VMAP_BYTES = 4 * 2**20


def _has_convolution(jaxpr) -> bool:
  """Whether a jaxpr, or one nested in it (jit, remat, custom_vjp, scan, cond ...), holds a convolution."""
  stack = [jaxpr]
  while stack:
    item = stack.pop()
    if isinstance(item, (list, tuple)):
      stack.extend(item)
      continue
    inner = getattr(item, "jaxpr", None)
    if inner is not None and not hasattr(item, "eqns"):  # a ClosedJaxpr
      stack.append(inner)
      continue
    for eqn in getattr(item, "eqns", ()):
      if eqn.primitive.name == "conv_general_dilated":
        return True
      stack.extend(
        v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr") or isinstance(v, (list, tuple))
      )
  return False


def _pick_split(loss_fn, params, parts, loss_args, m: int) -> tuple[str, str]:
  """``split="auto"``: the split and why, from the problem split into parts (see :func:`choose_split`)."""
  if m == 1:
    return "vmap", "m=1: one part, nothing to split"
  if _parts_axis_spec(parts)[0] is not None:
    return "vmap", "the parts axis is sharded over a mesh axis (explicit sharding): the parts stay side by side"
  extra = (m - 1) * sum(math.prod(jnp.shape(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
  if extra <= _SMALL_VMAP_BYTES:
    return "vmap", f"vmap's extra memory, ~(m - 1) P = {extra / 2**20:.2f} MiB, is small"
  part = jax.tree.map(lambda x: x[0], parts)
  if _has_convolution(jax.make_jaxpr(loss_fn)(params, part, *loss_args)):
    return "vmap", "the loss holds a convolution (XLA:CPU runs convolutions ~5x slower inside scan's loop)"
  return "scan", f"vmap would hold ~(m - 1) P = {extra / 2**20:.1f} MiB more than scan"


def choose_split(loss_fn: LossFn, params: Params, batch: Batch, *loss_args, m: int = 1) -> str:
  """The m-split ``split="auto"`` (the default) picks for this problem: ``"scan"`` or ``"vmap"``.

  The step makes this choice when it is traced, from the shapes and the
  loss's jaxpr, and logs it (``logging.getLogger("bsam_optax")``, level
  INFO). The rule, measured on XLA:CPU (``benchmarks/results/cost.md``):

  1. ``m = 1``: nothing to split (``"vmap"``, which then is one part).
  2. The batch's leading axis sharded over a mesh axis in its type (explicit
     sharding): ``"vmap"``, the parts stay on the devices that hold them.
  3. vmap's extra memory, about ``(m - 1) P`` bytes for ``P`` bytes of
     parameters, at most 4 MiB: ``"vmap"``.
  4. The loss holds a convolution (``lax.conv_general_dilated``, also inside
     nested jits or remat): ``"vmap"``; XLA:CPU runs a small CNN's
     convolutions ~5x slower inside ``scan``'s loop.
  5. Otherwise ``"scan"``: peak memory within Adam's plus one ``P`` per part
     (the 545,810-parameter MLP at ``m = 8``: +3.9 ``P`` donated, vmap
     +13.4 ``P``), a step no slower than vmap's and a compile time about
     vmap's on that MLP.

  The rule is measured on a CPU; on a GPU ``scan`` runs the parts one after
  another, so a small model that does not fill the device may run faster
  with ``split="vmap"`` (pass it explicitly).

  Args:
    loss_fn: the step's ``loss_fn(params, batch, *loss_args)``.
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    batch: the batch a step receives (all ``m`` parts).
    *loss_args: the step's extra loss arguments.
    m: the number of m-sharpness parts.

  Returns:
    ``"scan"`` or ``"vmap"``.

  Example:
    >>> import jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"]) ** 2)
    >>> batch = {"x": jnp.ones((8, 1000))}
    >>> bo.choose_split(loss_fn, {"w": jnp.zeros((1000, 1000))}, batch, m=4)
    'scan'
    >>> bo.choose_split(loss_fn, {"w": jnp.zeros((1000, 10))}, batch, m=4)
    'vmap'
  """
  check_count("m", m)
  return _pick_split(loss_fn, params, _split(batch, m), loss_args, m)[0]


def perturbation_gradients(loss_fn: LossFn, rule: PerturbationRule, **options):
  """The averaged gradients and update arguments of a rule's step, without the update.

  For training loops that apply the update themselves (e.g. ``nnx.Optimizer``).

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    rule: the method's :class:`PerturbationRule`.
    **options: the fields of :class:`StepOptions` except ``donate``.

  Returns:
    ``gradients(params, opt_state, batch, key, *loss_args) -> (grads,
    update_args, info)``: the mean second gradient, the mean of the rule's
    ``update_args`` (a dict, the extra arguments of ``tx.update``) and a
    :class:`StepInfo`. With ``mesh`` a jitted ``jax.shard_map`` over the
    global batch; otherwise a plain function (for ``jax.pmap`` when
    ``axis_name`` is given).

  Example (bSAM's gradients; ``tx.update(grads, state, params, **args)``
  would complete the step):

    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> state = bo.bsam(1e-2, n_data=8).init(params)
    >>> gradients = bo.perturbation_gradients(loss_fn, bo.bsam_rule(), m=2)
    >>> grads, args, info = gradients(params, state, {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}, jax.random.key(0))
    >>> sorted(args)
    ['noisy_grads']
  """
  if "donate" in options:
    raise TypeError(
      "perturbation_gradients takes no donate= (it does not own the buffers); make_perturbation_step does"
    )
  step_options = StepOptions(**options)
  if step_options.mesh is None:
    return _gradients(loss_fn, rule, step_options)
  return _on_mesh(lambda local: _gradients(loss_fn, rule, local), step_options, with_state=False)


def _gradients(loss_fn: LossFn, rule: PerturbationRule, options: StepOptions):
  _check_loss_fn(loss_fn)
  _check_rule(rule)
  m, axis_name, has_aux = options.m, options.axis_name, options.has_aux
  concat = options.aux_reduce == "concat"
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def evaluate(x, part, loss_args):
    x = _as_varying(x, axis_name)
    if has_aux:
      (loss, aux), grads = value_and_grad(x, part, *loss_args)
    else:
      (loss, grads), aux = value_and_grad(x, part, *loss_args), None
    return loss, aux, grads

  def one_part(params, opt_state, key, index, part, loss_args):
    if rule.first_point is None:
      x = params
    else:
      x = rule.first_point(jax.random.fold_in(key, index), params, opt_state)
    loss, aux, g = evaluate(x, part, loss_args)
    if rule.second_point is None:
      second_loss, second_aux, g_second = loss, aux, g
    else:
      y = rule.second_point(params, opt_state, g)
      second_args = (aux,) + tuple(loss_args[1:]) if options.thread_aux else loss_args
      second_loss, second_aux, g_second = evaluate(y, part, second_args)
    args = {} if rule.update_args is None else dict(rule.update_args(params, opt_state, x, g))
    if rule.second_update_args is not None:
      args.update(rule.second_update_args(params, opt_state, x, g, g_second))
    aux = aux if options.aux_from == "first" else second_aux
    return {"loss": loss, "second_loss": second_loss, "grads": g_second, "args": args}, aux

  def gradients(params, opt_state, batch, key, *loss_args):
    if options.thread_aux and not loss_args:
      raise ValueError("thread_aux=True needs a loss_arg to thread (the step's first loss_arg, e.g. batch_stats)")
    offset = _part_offset(axis_name, m)
    parts = _split(batch, m)
    part_at = lambda i: jax.tree.map(lambda x: x[i], parts)  # noqa: E731
    split = options.split
    if split == "auto":
      split, reason = _pick_split(loss_fn, params, parts, loss_args, m)
      logger.info("split='auto' picked split=%r for m=%d: %s", split, m, reason)
    if m > 1 and split != "vmap" and _parts_axis_spec(parts)[0] is not None:
      raise ValueError(
        f"split={split!r} takes the parts one at a time, but the batch is sharded over mesh axis "
        f"{_parts_axis_spec(parts)[0]!r} in its type (explicit sharding), so each part lives on other devices; "
        "use split='vmap' (the parts side by side, each on the devices that hold its rows)"
      )
    if m == 1:
      result, aux = one_part(params, opt_state, key, offset, part_at(0), loss_args)
    elif split == "vmap":
      indices = _sharded_like_parts(offset + jnp.arange(m), parts)
      result, aux = jax.vmap(one_part, in_axes=(None, None, None, 0, 0, None))(
        params, opt_state, key, indices, parts, loss_args
      )
      result = jax.tree.map(_mean_over_leading_axis, result)
      aux = jax.tree.map(_concat_parts if concat else _mean_over_leading_axis, aux)
    elif split == "unroll":
      outs = [one_part(params, opt_state, key, offset + i, part_at(i), loss_args) for i in range(m)]
      results, auxs = [r for r, _ in outs], [a for _, a in outs]
      result = jax.tree.map(lambda *xs: _pairwise_mean(list(xs)), *results)
      aux = jax.tree.map((lambda *xs: jnp.concatenate(xs)) if concat else (lambda *xs: _pairwise_mean(list(xs))), *auxs)
    else:
      first = jax.eval_shape(lambda: one_part(params, opt_state, key, offset, part_at(0), loss_args))
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), first)

      def body(total, xs):
        index, part = xs
        r, a = one_part(params, opt_state, key, index, part, loss_args)
        r_total, a_total = total
        r_total = jax.tree.map(lambda t, v: t + v / m, r_total, r)
        if concat:
          return (r_total, a_total), a
        return (r_total, jax.tree.map(lambda t, v: t + v / m, a_total, a)), None

      (result, aux_mean), aux_parts = jax.lax.scan(body, zeros, (offset + jnp.arange(m), parts))
      dtypes = jax.tree.map(lambda s: s.dtype, first)
      result = jax.tree.map(lambda x, d: x.astype(d), result, dtypes[0])
      aux = (
        jax.tree.map(_concat_parts, aux_parts)
        if concat
        else jax.tree.map(lambda x, d: x.astype(d), aux_mean, dtypes[1])
      )
    if axis_name is not None:
      result = jax.lax.pmean(result, axis_name)
      if not concat:
        aux = jax.lax.pmean(aux, axis_name)
    info = StepInfo(result["loss"], result["second_loss"], aux if has_aux else None)
    return result["grads"], result["args"], info

  return gradients


def make_perturbation_step(loss_fn: LossFn, tx: optax.GradientTransformation, rule: PerturbationRule, **options):
  """Builds the compiled step of a :class:`PerturbationRule` with m-sharpness, on one device or many.

  Per part ``i`` of the batch (key ``fold_in(key, part_index)``)::

    x_i  = rule.first_point(key_i, params, opt_state)    # params if None
    g_i  = ∇ loss_fn(x_i, part_i)
    y_i  = rule.second_point(params, opt_state, g_i)     # skipped if None (gy_i = g_i)
    gy_i = ∇ loss_fn(y_i, part_i)

  then ``tx.update(mean_i gy_i, opt_state, params, **mean_i
  rule.update_args(params, opt_state, x_i, g_i))`` and
  ``optax.apply_updates``. Every method's ``*_step`` is this builder with its
  rule (``bo.bsam_step(loss_fn, tx)`` is ``make_perturbation_step(loss_fn,
  tx, bo.bsam_rule())``).

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``. ``loss_args`` are
      passed unsplit to every part (e.g. BatchNorm statistics).
    tx: the optax transformation applied to the averaged second gradients.
    rule: the method's :class:`PerturbationRule`.
    **options: the fields of :class:`StepOptions`: ``m``, ``axis_name``,
      ``mesh``, ``has_aux``, ``aux_from``, ``aux_reduce``, ``thread_aux``,
      ``split``, ``donate``.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)`` with ``info`` a :class:`StepInfo`. Jitted unless ``axis_name`` is
    given without ``mesh`` (then it is meant for ``jax.pmap``).

  Example (plain gradient descent is the empty rule):

    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params, tx = {"w": jnp.zeros(3)}, optax.sgd(0.1)
    >>> step = bo.make_perturbation_step(loss_fn, tx, bo.PerturbationRule(), m=2)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))
    >>> float(info.loss)
    1.0
  """
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    raise TypeError(f"tx must be an optax.GradientTransformation (or MultiSteps), got {type(tx).__name__}")
  step_options = StepOptions(**options)

  def build(options):
    gradients = _gradients(loss_fn, rule, options)

    def local_step(params, opt_state, batch, key, *loss_args):
      grads, args, info = gradients(params, opt_state, batch, key, *loss_args)
      grads = jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)), grads, params)
      updates, opt_state = tx.update(grads, opt_state, params, **args)
      return optax.apply_updates(params, updates), opt_state, info

    return local_step

  if step_options.mesh is not None:
    return _on_mesh(build, step_options, with_state=True)
  if step_options.axis_name is not None:
    return build(step_options)
  return jax.jit(build(step_options), donate_argnums=(0, 1) if step_options.donate else ())
