"""The optimizers of the main job: one :class:`Optimizer` entry each in :data:`OPTIMIZERS`.

An entry says how to build the optax transformation, which method the step
runs (a :class:`bsam_optax.PerturbationRule`: ``bo.bsam_rule()``,
``bo.sam_rule(rho=...)``, or the empty rule ``bo.PerturbationRule()`` of a
plain gradient step; :mod:`bsam_optax.app.train` makes the step with
:func:`bsam_optax.flax.make_train_step`), which defaults fill the config's
``None`` fields, and whether the method learns a posterior. Adding an
optimizer is one entry.

Weight decay is an L2 term added to the gradient for every optimizer (for
bSAM it is δ, the prior precision per example), so all methods share a prior.
"""

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import optax

import bsam_optax as bo

__all__ = ["AXIS", "OPTIMIZERS", "Optimizer"]

# The mesh axis of data-parallel training.
AXIS = "data"


class Optimizer(NamedTuple):
  """An entry of :data:`OPTIMIZERS`, with these fields.

  - ``make_tx``: ``(config, learning_rate_schedule, n_data) -> tx``.
  - ``rule``: ``config -> rule``, the :class:`~bsam_optax.PerturbationRule` of the step.
  - ``bayesian``: whether ``opt_state`` holds a posterior (then the model average and the posterior std are
    reported).
  - ``defaults``: values for the config fields left ``None`` (``learning_rate``, ``weight_decay``, ``rho``,
    ``b1``, ``b2``).
  - ``m_sharpness``: whether the step splits the batch into ``config.m`` parts (else ``m`` is ignored and
    each device takes one part).
  """

  make_tx: Callable[[Any, optax.Schedule, float], optax.GradientTransformation]
  rule: Callable[[Any], bo.PerturbationRule]
  bayesian: bool
  defaults: Mapping[str, float]
  m_sharpness: bool = True


def parts_per_device(config, spec: Optimizer, devices: int = 1) -> int:
  """The step's m per device: ``config.m`` spread over the devices, or 1 for a method without m-sharpness."""
  return config.m // devices if spec.m_sharpness else 1


def _bsam_tx(config, schedule, n_data):
  return bo.bsam(
    schedule,
    n_data,
    rho=config.rho,
    b1=config.b1,
    b2=config.b2,
    weight_decay=config.weight_decay,
    damping=config.damping,
    init_scale=config.init_scale,
    curvature=config.curvature,
  )


def _with_l2(config, tx):
  return optax.chain(optax.add_decayed_weights(config.weight_decay), tx)


def _gradient(config):
  return bo.PerturbationRule()  # one gradient, at the params: m-sharpness does not apply


def _sam(config):
  return bo.sam_rule(rho=config.rho)


# Defaults picked by validation accuracy on MNIST-1D / CNN / 40 epochs / seed 0 from a few one-at-a-time runs, not
# a full grid (bSAM: α 0.2, 0.5, 1; β2 0.99, 0.999; γ 0.01, 0.1; ρ 0.02, 0.05; N x 1, 2, 4, 8 — α = 1 and γ = 0.01
# diverged; Adam: α 1e-3 to 3e-2, L2 1e-4 to 1e-2; SGD: α 0.1, 0.5). β2 = 0.99 lets bSAM's scale s adapt within
# the ~1k steps of the run. Seeds 1 and 2 of the bSAM default reach the same validation accuracy (0.96).
OPTIMIZERS: dict[str, Optimizer] = {
  "bsam": Optimizer(
    _bsam_tx,
    lambda c: bo.bsam_rule(),
    bayesian=True,
    defaults={"learning_rate": 0.5, "weight_decay": 1e-3, "rho": 0.02, "b1": 0.9, "b2": 0.99},
  ),
  "adam": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.adam(lr, b1=c.b1, b2=c.b2)),
    _gradient,
    bayesian=False,
    defaults={"learning_rate": 3e-2, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.999},
    m_sharpness=False,
  ),
  "sgd": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.sgd(lr, momentum=c.b1)),
    _gradient,
    bayesian=False,
    defaults={"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.0},
    m_sharpness=False,
  ),
  # SAM-SGD / SAM-Adam: the baselines' settings with SAM's ρ (not tuned further).
  "sam_sgd": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.sgd(lr, momentum=c.b1)),
    _sam,
    bayesian=False,
    defaults={"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.05, "b1": 0.9, "b2": 0.0},
  ),
  "sam_adam": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.adam(lr, b1=c.b1, b2=c.b2)),
    _sam,
    bayesian=False,
    defaults={"learning_rate": 3e-2, "weight_decay": 1e-3, "rho": 0.05, "b1": 0.9, "b2": 0.999},
  ),
  # The seed's variational family (benchmarks/uncertainty.py, MNIST-1D MLP pilots; not grid-selected here).
  # MFVI and VSAM carry the prior in their KL term (weight_decay = δ, prior precision N δ), as bSAM does.
  "mfvi": Optimizer(
    lambda c, lr, n: bo.mfvi(lr, n, weight_decay=c.weight_decay, b1=c.b1, b2=c.b2),
    lambda c: bo.mfvi_rule(),
    bayesian=True,
    defaults={"learning_rate": 3e-3, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.999},
  ),
  # VSAM with its σ bounded (max_std): unbounded, σ grows to the prior's and training fails (vsam_sigma.md).
  "vsam": Optimizer(
    lambda c, lr, n: bo.vsam(lr, n, weight_decay=c.weight_decay, max_std=3e-3, b1=c.b1, b2=c.b2),
    lambda c: bo.vsam_rule(),
    bayesian=True,
    defaults={"learning_rate": 1e-2, "weight_decay": 1e-3, "rho": 0.0, "b1": 0.9, "b2": 0.999},
  ),
  "fisher_sam_sgd": Optimizer(
    lambda c, lr, n: _with_l2(c, optax.sgd(lr, momentum=c.b1)),
    lambda c: bo.fisher_sam_rule(rho=c.rho, eta=1.0),
    bayesian=False,
    defaults={"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.05, "b1": 0.9, "b2": 0.0},
  ),
}
