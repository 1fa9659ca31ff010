"""Moved to :mod:`bsam_optax.app.models`; kept only until ``benchmarks/cost.py`` imports the models from there."""

from bsam_optax.app.models import CNN
from bsam_optax.app.models import MLP

__all__ = ["CNN", "MLP"]
