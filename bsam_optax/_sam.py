"""The SAM family, as rules for the step machinery.

Every method here is "gradient at a first point, gradient at a second point,
any optax update": a :class:`~bsam_optax.PerturbationRule` built by
``*_rule`` and turned into a compiled step by
:func:`~bsam_optax.make_perturbation_step`; only the rules differ (ω are the
parameters, g the first gradient, computed per m-sharpness part)::

  method              first point   second point          tx.update gets
  sam_step            ω             ω + ρ g / ‖g‖         g at the second point
  asam_step           ω             ω + ρ T² g / ‖T g‖    g at the second point
  random_sam_step     ω + σ z       (none)                g at the first point

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

import jax
import jax.numpy as jnp
import optax

from bsam_optax import _noise
from bsam_optax import _step
from bsam_optax._checks import check_nonnegative
from bsam_optax._checks import check_positive

Params = Any
Updates = Any

__all__ = [
  "asam_perturbed_params",
  "asam_rule",
  "asam_step",
  "random_perturbed_params",
  "random_sam_rule",
  "random_sam_step",
  "sam_perturbed_params",
  "sam_rule",
  "sam_step",
]


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


def random_perturbed_params(key: jax.Array, params: Params, *, sigma, noise: str = "auto") -> Params:
  """Draws ω + σ z, z ~ N(0, I): RandomSAM's point (Ujváry et al., Alg. 2).

  Args:
    key: a PRNG key; the only source of randomness.
    params: ω.
    sigma: σ, the fixed standard deviation of the perturbation.
    noise: ``"auto"`` (the library's generator) or ``"jax"``
      (``jax.random.normal``'s stream for ``key``).

  Returns:
    ω + σ z, with the structure and dtypes of ``params``.
  """
  z = _noise.normal_like(key, params, noise=noise)
  return _add(params, jax.tree.map(lambda z: sigma * z, z))


def sam_rule(*, rho, eps: float = 1e-12) -> _step.PerturbationRule:
  """SAM as a :class:`~bsam_optax.PerturbationRule`: the second point ω + ρ g / ‖g‖.

  Args:
    rho: ρ, the radius of the perturbation (``>= 0``), a float or a scalar array.
    eps: added to ‖g‖ in the denominator.
  """
  check_nonnegative("rho", rho)
  check_positive("eps", eps)
  return _step.PerturbationRule(
    second_point=lambda params, opt_state, grads: sam_perturbed_params(params, grads, rho=rho, eps=eps)
  )


def asam_rule(*, rho, eta=0.01, eps: float = 1e-12) -> _step.PerturbationRule:
  """ASAM as a :class:`~bsam_optax.PerturbationRule`: the second point ``ω + ρ T² g / ‖T g‖``, ``T = |ω| + η``.

  Args:
    rho: ρ, the radius in the scaled space (``>= 0``).
    eta: η, the offset of T (``>= 0``).
    eps: added to ‖T g‖ in the denominator.
  """
  check_nonnegative("rho", rho)
  check_nonnegative("eta", eta)
  check_positive("eps", eps)
  return _step.PerturbationRule(
    second_point=lambda params, opt_state, grads: asam_perturbed_params(params, grads, rho=rho, eta=eta, eps=eps)
  )


def random_sam_rule(*, sigma, noise: str = "auto") -> _step.PerturbationRule:
  """RandomSAM as a :class:`~bsam_optax.PerturbationRule`: one gradient, at ω + σ z.

  Args:
    sigma: σ, the standard deviation of the perturbation (``>= 0``).
    noise: the generator of z, see :func:`random_perturbed_params`.
  """
  check_nonnegative("sigma", sigma)
  return _step.PerturbationRule(
    first_point=lambda key, params, opt_state: random_perturbed_params(key, params, sigma=sigma, noise=noise)
  )


def sam_step(loss_fn, tx: optax.GradientTransformation, *, rho, eps: float = 1e-12, **options):
  """The compiled SAM step (Foret et al.) with any optax outer optimizer.

  For each of the ``m`` parts of the batch (and of every device)::

    g_i   = ∇ loss_fn(ω, part_i)
    ε_i   = ρ g_i / ‖g_i‖                # ‖·‖: global L2 norm over all leaves
    g_ε,i = ∇ loss_fn(ω + ε_i, part_i)

  then ``tx.update(mean_i g_ε,i, opt_state, ω)``. With ``tx = optax.sgd(...)``
  this is SAM-SGD, with ``optax.adam(...)`` SAM-Adam. Weight decay belongs in
  ``tx`` (``optax.add_decayed_weights``), so it is not perturbed. It is
  :func:`~bsam_optax.make_perturbation_step` with :func:`sam_rule`.

  Args:
    loss_fn: ``loss_fn(params, batch, *loss_args) -> loss`` (a mean over the
      batch), or ``-> (loss, aux)`` with ``has_aux=True``.
    tx: any optax transformation, applied to the averaged perturbed gradient.
    rho: ρ, the radius of the perturbation (``>= 0``; 0 gives plain ``tx``
      at twice the cost). A float or a scalar array.
    eps: added to ‖g‖ in the denominator.
    **options: the fields of :class:`~bsam_optax.StepOptions` (``m``,
      ``axis_name``, ``mesh``, ``has_aux``, ``aux_from``, ``aux_reduce``,
      ``thread_aux``, ``split``, ``donate``).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``; ``info.loss`` is the mean loss at ω, ``info.second_loss`` (also
    ``info["perturbed_loss"]``) at ω + ε_i. ``key`` is unused (SAM is
    deterministic) but kept so that all steps share one signature.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.adam(1e-2)  # SAM-Adam
    >>> step = bo.sam_step(loss_fn, tx, rho=0.05, m=2)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Foret et al., `Sharpness-Aware Minimization for Efficiently Improving
    Generalization <https://arxiv.org/abs/2010.01412>`_, ICLR 2021.
  """
  return _step.make_perturbation_step(loss_fn, tx, sam_rule(rho=rho, eps=eps), **options)


def asam_step(loss_fn, tx: optax.GradientTransformation, *, rho, eta=0.01, eps: float = 1e-12, **options):
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
    eps: added to ‖T g‖ in the denominator.
    **options: the fields of :class:`~bsam_optax.StepOptions`, as for :func:`sam_step`.

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)`` as for :func:`sam_step`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.ones(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.sgd(1e-2, momentum=0.9)
    >>> step = bo.asam_step(loss_fn, tx, rho=0.5, eta=0.01)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Kwon et al., `ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks <https://arxiv.org/abs/2102.11600>`_, ICML 2021.
  """
  return _step.make_perturbation_step(loss_fn, tx, asam_rule(rho=rho, eta=eta, eps=eps), **options)


def random_sam_step(loss_fn, tx: optax.GradientTransformation, *, sigma, noise: str = "auto", **options):
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
    noise: the generator of z, see :func:`random_perturbed_params`.
    **options: the fields of :class:`~bsam_optax.StepOptions`, as for
      :func:`sam_step` (``aux`` comes from the one pass at ω + σ z).

  Returns:
    ``step(params, opt_state, batch, key, *loss_args) -> (params, opt_state,
    info)``; ``info.loss`` and ``info.second_loss`` are both the mean loss at
    ω + σ z_i.

  Example:
    >>> import jax, jax.numpy as jnp, optax, bsam_optax as bo
    >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
    >>> params = {"w": jnp.zeros(3)}
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.ones(8)}
    >>> tx = optax.sgd(1e-2)
    >>> step = bo.random_sam_step(loss_fn, tx, sigma=0.01)
    >>> params, state, info = step(params, tx.init(params), batch, jax.random.key(0))

  References:
    Ujváry et al., `Rethinking Sharpness-Aware Minimization as Variational
    Inference <https://arxiv.org/abs/2210.10452>`_, 2022.
  """
  return _step.make_perturbation_step(loss_fn, tx, random_sam_rule(sigma=sigma, noise=noise), **options)
