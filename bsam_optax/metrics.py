"""Calibration and uncertainty metrics of predictive probabilities (``import bsam_optax.metrics``).

Pure ``jax.numpy``, jit-able, no Python loops over bins: accuracy, NLL, Brier
score, ECE with its reliability bins, and AUROCs for misclassification and
out-of-distribution detection. The implementations live in
:mod:`bsam_optax._metrics`; they are checked against scikit-learn and NumPy.
"""

from bsam_optax._metrics import ReliabilityBins
from bsam_optax._metrics import accuracy
from bsam_optax._metrics import auroc
from bsam_optax._metrics import brier
from bsam_optax._metrics import classification_metrics
from bsam_optax._metrics import ece
from bsam_optax._metrics import misclassification_auroc
from bsam_optax._metrics import nll
from bsam_optax._metrics import ood_auroc
from bsam_optax._metrics import predictive_entropy
from bsam_optax._metrics import reliability_bins

__all__ = [
  "ReliabilityBins",
  "accuracy",
  "auroc",
  "brier",
  "classification_metrics",
  "ece",
  "misclassification_auroc",
  "nll",
  "ood_auroc",
  "predictive_entropy",
  "reliability_bins",
]
