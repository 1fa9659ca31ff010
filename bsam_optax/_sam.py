"""The SAM family and bSAM's noise ablation, as steps on the bSAM machinery.

Every method here is "gradient at a first point, gradient at a second point,
any optax update" and is built by :func:`~bsam_optax.make_perturbation_step`
from its two point rules; only the rules differ (ω are the parameters, g the
first gradient, computed per m-sharpness part)::

  method              first point   second point          tx.update gets
  sam_step            ω             ω + ρ g / ‖g‖         g at the second point
  asam_step           ω             ω + ρ T² g / ‖T g‖    g at the second point
  random_sam_step     ω + σ z       (none)                g at the first point
  bsam_no_noise_step  ω             ω + ρ g / s           g at the second, noisy_grads=|g|

(T = |ω| + η elementwise; z ~ N(0, I); ‖·‖ the global L2 norm over all leaves
of one part's gradient; s bSAM's scale.) SAM-SGD is ``sam_step(loss, optax.sgd(...), rho=...)``,
SAM-Adam the same with ``optax.adam``; any optax pipeline works as the outer
optimizer. Under m-sharpness each part gets its own perturbation (its own ε,
or its own noise draw from ``fold_in(key, part_index)``), and ``D`` devices
with ``m=1`` give the result of ``m=D`` on one device, as for
:func:`~bsam_optax.bsam_step`.

In the notation of Ujváry et al. (their Table 1), SAM and ASAM take the
worst case in the ellipsoid ``εᵀ Σ⁻¹ ε ≤ ρ²`` to first order,
``ε = ρ Σ g / sqrt(gᵀ Σ g)``, with ``Σ = I`` (SAM) or ``Σ = T²`` (ASAM);
RandomSAM draws ``ε ~ N(0, σ² I)`` instead (MFVI with a fixed covariance;
they set ``σ = ρ / √p`` for ``p`` parameters so that ``‖ε‖ ≈ ρ``).

References:
  Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
  Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization
  <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
  Inference <https://arxiv.org/abs/2210.10452>`_, 2022.
  Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
  <https://arxiv.org/abs/2210.01620>`_, ICLR 2023 (Sec. F.5: bSAM without noise).
"""

from typing import Any
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from bsam_optax import _bsam
from bsam_optax import _noise
from bsam_optax import _step

Params = Any
Updates = Any

__all__ = [
  "asam_perturbed_params",
  "asam_step",
  "bsam_no_noise_step",
  "random_perturbed_params",
  "random_sam_step",
  "sam_perturbed_params",
  "sam_step",
]

_LOSS_NAMES = ("loss", "perturbed_loss")


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_nonnegative(name: str, value) -> None:
  # Python numbers are checked; arrays (e.g. traced hyper-parameters) pass through.
  if value is None or isinstance(value, (str, bool)) or callable(value):
    raise TypeError(f"{name} must be a number or a scalar array, got {type(value).__name__}")
  if _is_python_number(value) and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def _check_positive(name: str, value) -> None:
  _check_nonnegative(name, value)
  if _is_python_number(value) and value == 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def _global_norm(tree) -> jax.Array:
  # In f32 at least: a bf16 sum of squares over many entries loses too much.
  squares = [jnp.sum(jnp.square(x.astype(jnp.promote_types(x.dtype, jnp.float32)))) for x in jax.tree.leaves(tree)]
  return jnp.sqrt(sum(squares))


def _add(params, direction):
  return jax.tree.map(lambda w, d: (w + d).astype(jnp.result_type(w)), params, direction)


def sam_perturbed_params(params: Params, grads: Updates, *, rho, eps: float = 1e-12) -> Params:
  """Returns ω + ε with SAM's ε = ρ g / ‖g‖ (Foret et al., Eq. 2).

  Args:
    params: ω.
    grads: g, the gradient at ω (of one m-sharpness part).
    rho: ρ, the radius; ``‖ε‖ = ρ``.
    eps: added to ‖g‖ so that a zero gradient gives ε = 0.

  Returns:
    ω + ρ g / (‖g‖ + eps), with the structure and dtypes of ``params``.
  """
  scale = rho / (_global_norm(grads) + eps)
  return _add(params, jax.tree.map(lambda g: scale * g, grads))


def asam_perturbed_params(params: Params, grads: Updates, *, rho, eta, eps: float = 1e-12) -> Params:
  """Returns ω + ε with ASAM's ε = ρ T² g / ‖T g‖, T = ``|ω| + η`` (Kwon et al., Eq. 12).

  The worst case in the ellipsoid ``‖T⁻¹ ε‖ ≤ ρ`` to first order; scale
  invariant for η = 0 (rescaling a layer's weights rescales its ε alike).

  Args:
    params: ω.
    grads: g, the gradient at ω (of one m-sharpness part).
    rho: ρ, the radius in the T-scaled space; ``‖T⁻¹ ε‖ = ρ``.
    eta: η, added to ``|ω|`` so that zero weights are perturbed too.
    eps: added to ‖T g‖ so that a zero gradient gives ε = 0.

  Returns:
    ω + ρ T² g / (‖T g‖ + eps), with the structure and dtypes of ``params``.
  """
  t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
  t_grads = jax.tree.map(lambda t, g: t * g, t, grads)
  scale = rho / (_global_norm(t_grads) + eps)
  return _add(params, jax.tree.map(lambda t, tg: scale * t * tg, t, t_grads))


def random_perturbed_params(key: jax.Array, params: Params, *, sigma) -> Params:
  """Draws ω + σ z, z ~ N(0, I): RandomSAM's point (Ujváry et al., Alg. 2).

  Args:
    key: a PRNG key; the only source of randomness.
    params: ω.
    sigma: σ, the fixed standard deviation of the perturbation.

  Returns:
    ω + σ z, with the structure and dtypes of ``params``.
  """
  noise = _noise.normal_like(key, params)
  return _add(params, jax.tree.map(lambda z: sigma * z, noise))


def _build(loss_fn, tx, first_point, second_point, *, noisy_grads=False, aux_from="second", **kwargs):
  if aux_from not in ("first", "second"):
    raise ValueError(f"aux_from must be 'first' or 'second', got {aux_from!r}")
  return _step.make_perturbation_step(
    loss_fn,
    tx,
    first_point,
    second_point,
    noisy_grads=noisy_grads,
    aux_from=aux_from,
    loss_names=_LOSS_NAMES,
    **kwargs,
  )


def sam_step(
  loss_fn,
  tx: optax.GradientTransformation,
  *,
  rho,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["first", "second"] = "second",
  thread_aux: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
  eps: float = 1e-12,
):
  """The compiled SAM step (Foret et al.) with any optax outer optimizer.

  For each of the ``m`` parts of the batch (and of every device)::

    g_i   = ∇ loss_fn(ω, part_i)
    ε_i   = ρ g_i / ‖g_i‖                # ‖·‖: global L2 norm over all leaves
    g_ε,i = ∇ loss_fn(ω + ε_i, part_i)

  then ``tx.update(mean_i g_ε,i, opt_state, ω)``. With ``tx = optax.sgd(...)``
  this is SAM-SGD, with ``optax.adam(...)`` SAM-Adam. Weight decay belongs in
  ``tx`` (``optax.add_decayed_weights``), so it is not perturbed.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: any optax transformation, applied to the averaged perturbed gradient.
    rho: ρ, the radius of the perturbation (``>= 0``; 0 gives plain ``tx``
      at twice the cost). A float or a scalar array.
    m: the number of m-sharpness parts (per device), each with its own ε.
    axis_name: the device axis, for ``jax.pmap`` / ``jax.shard_map``; see
      :func:`~bsam_optax.bsam_step`.
    mesh: a ``jax.sharding.Mesh``; returns a jitted ``jax.shard_map`` step.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    aux_from: the pass whose ``aux`` is returned: ``"first"`` (at ω) or
      ``"second"`` (at ω + ε).
    thread_aux: feed the first pass's ``aux`` to the second pass as its first
      loss_arg (BatchNorm statistics updated by both passes).
    split: ``"vmap"``, ``"scan"`` or ``"unroll"`` over the parts; see
      :func:`~bsam_optax.make_perturbation_step`.
    donate: donate ``params`` and ``opt_state`` to the step.
    eps: added to ‖g‖ in the denominator.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)``; ``out["loss"]`` is the mean loss at ω, ``out["perturbed_loss"]``
    at ω + ε_i. ``key`` is unused (SAM is deterministic) but kept so that
    all steps share one signature.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.adam(1e-2)  # SAM-Adam
    >>> step = bo.sam_step(loss_fn, tx, rho=0.05, m=2)
    >>> params, state, out = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  _check_nonnegative("rho", rho)
  _check_positive("eps", eps)

  def second_point(params, opt_state, grads):
    del opt_state
    return sam_perturbed_params(params, grads, rho=rho, eps=eps)

  return _build(
    loss_fn,
    tx,
    None,
    second_point,
    m=m,
    axis_name=axis_name,
    mesh=mesh,
    has_aux=has_aux,
    aux_from=aux_from,
    thread_aux=thread_aux,
    split=split,
    donate=donate,
  )


def asam_step(
  loss_fn,
  tx: optax.GradientTransformation,
  *,
  rho,
  eta=0.01,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["first", "second"] = "second",
  thread_aux: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
  eps: float = 1e-12,
):
  """The compiled adaptive SAM (ASAM) step (Kwon et al.) with any optax outer optimizer.

  For each of the ``m`` parts of the batch (and of every device)::

    g_i   = ∇ loss_fn(ω, part_i)
    T     = |ω| + η                         # elementwise
    ε_i   = ρ T² g_i / ‖T g_i‖
    g_ε,i = ∇ loss_fn(ω + ε_i, part_i)

  then ``tx.update(mean_i g_ε,i, opt_state, ω)``. This is SAM with the
  ellipsoid ``Σ = T²`` of Ujváry et al.'s Table 1; Kwon et al. use
  ρ = 0.5, η = 0.01 on CIFAR-10 (ρ is larger than SAM's because it is
  measured in the T-scaled space).

  Args:
    loss_fn: as for :func:`sam_step`.
    tx: any optax transformation.
    rho: ρ, the radius in the scaled space (``>= 0``).
    eta: η, the offset of T (``>= 0``).
    m, axis_name, mesh, has_aux, aux_from, thread_aux, split, donate: as for
      :func:`sam_step`.
    eps: added to ‖T g‖ in the denominator.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)`` as for :func:`sam_step`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.ones(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.sgd(1e-2, momentum=0.9)
    >>> step = bo.asam_step(loss_fn, tx, rho=0.5, eta=0.01)
    >>> params, state, out = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  _check_nonnegative("rho", rho)
  _check_nonnegative("eta", eta)
  _check_positive("eps", eps)

  def second_point(params, opt_state, grads):
    del opt_state
    return asam_perturbed_params(params, grads, rho=rho, eta=eta, eps=eps)

  return _build(
    loss_fn,
    tx,
    None,
    second_point,
    m=m,
    axis_name=axis_name,
    mesh=mesh,
    has_aux=has_aux,
    aux_from=aux_from,
    thread_aux=thread_aux,
    split=split,
    donate=donate,
  )


def random_sam_step(
  loss_fn,
  tx: optax.GradientTransformation,
  *,
  sigma,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
):
  """The compiled RandomSAM step (Ujváry et al., Alg. 2): one gradient at a Gaussian perturbation.

  For each of the ``m`` parts of the batch (and of every device)::

    z_i ~ N(0, I)                        # from fold_in(key, part_index)
    g_i = ∇ loss_fn(ω + σ z_i, part_i)

  then ``tx.update(mean_i g_i, opt_state, ω)``: MFVI with the fixed
  covariance ``σ² I`` (and the KL term left to ``tx``'s weight decay). One
  gradient per step, half the cost of SAM. Ujváry et al. set ``σ = ρ / √p``
  (``p`` parameters) so that ``‖σ z‖ ≈ ρ`` matches SAM's radius.

  Args:
    loss_fn: as for :func:`sam_step`.
    tx: any optax transformation.
    sigma: σ, the standard deviation of the perturbation (``>= 0``).
    m: the number of parts (per device), each with its own noise draw.
    axis_name, mesh, has_aux, split, donate: as for :func:`sam_step`
      (``aux`` comes from the one pass at ω + σ z).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)``; ``out["loss"]`` and ``out["perturbed_loss"]`` are both the mean
    loss at ω + σ z_i.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.sgd(1e-2)
    >>> step = bo.random_sam_step(loss_fn, tx, sigma=0.01)
    >>> params, state, out = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
    Inference <https://arxiv.org/abs/2210.10452>`_, 2022.
  """
  _check_nonnegative("sigma", sigma)

  def first_point(key, params, opt_state):
    del opt_state
    return random_perturbed_params(key, params, sigma=sigma)

  return _build(
    loss_fn,
    tx,
    first_point,
    None,
    m=m,
    axis_name=axis_name,
    mesh=mesh,
    has_aux=has_aux,
    aux_from="first",
    split=split,
    donate=donate,
  )


def bsam_no_noise_step(
  loss_fn,
  tx: optax.GradientTransformation,
  *,
  m: int = 1,
  axis_name: str | None = None,
  mesh: Mesh | None = None,
  has_aux: bool = False,
  aux_from: Literal["first", "second"] = "second",
  thread_aux: bool = False,
  split: Literal["vmap", "scan", "unroll"] = "vmap",
  donate: bool = False,
):
  """bSAM without noise, the ablation of the paper's Sec. F.5 / Table 3.

  Alg. 1 with line 3 (θ ~ N(ω, 1/(N s))) removed: the first gradient is
  taken at the mean ω instead of at a sample θ. For each part::

    g_i   = ∇ loss_fn(ω, part_i)                  # bSAM: at θ_i ~ N(ω, 1/(N s))
    g_ε,i = ∇ loss_fn(ω + ρ g_i / s, part_i)

  then ``tx.update(mean_i g_ε,i, state, ω, noisy_grads=mean_i |g_i|)``, so
  the scale update also sees the gradient at ω. Everything else is
  :func:`~bsam_optax.bsam_step`; ``tx`` must contain one
  :func:`~bsam_optax.bsam` and the learned posterior is still
  ``N(ω, 1/(N s))``.

  Args:
    loss_fn: as for :func:`~bsam_optax.bsam_step`.
    tx: an optax transformation containing :func:`~bsam_optax.bsam`.
    m, axis_name, mesh, has_aux, thread_aux, split, donate: as for
      :func:`~bsam_optax.bsam_step`.
    aux_from: ``"first"`` (at ω) or ``"second"`` (at ω + ε).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    out)``; ``out["loss"]`` is the mean loss at ω, ``out["perturbed_loss"]``
    at ω + ε_i. ``key`` is unused.

  Example:
    >>> import jax, jax.numpy as jnp, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = bo.bsam(1e-2, n_data=8)
    >>> step = bo.bsam_no_noise_step(loss_fn, tx, m=2)
    >>> params, state, out = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Möllenhoff & Khan, `SAM as an Optimal Relaxation of Bayes
    <https://arxiv.org/abs/2210.01620>`_, ICLR 2023, Sec. F.5.
  """
  return _build(
    loss_fn,
    tx,
    None,
    _bsam.perturbed_params,
    noisy_grads=True,
    m=m,
    axis_name=axis_name,
    mesh=mesh,
    has_aux=has_aux,
    aux_from=aux_from,
    thread_aux=thread_aux,
    split=split,
    donate=donate,
  )
