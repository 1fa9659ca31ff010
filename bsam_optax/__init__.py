"""bsam_optax: Bayesian Sharpness-Aware Minimization (bSAM) for JAX and optax."""

from bsam_optax._bsam import BSAMState
from bsam_optax._bsam import bsam
from bsam_optax._bsam import find_bsam_state
from bsam_optax._bsam import noisy_params
from bsam_optax._bsam import perturbed_params
from bsam_optax._bsam import posterior
from bsam_optax._data import Dataset
from bsam_optax._data import Split
from bsam_optax._data import epoch_batches
from bsam_optax._data import iterate_batches
from bsam_optax._data import load_dataset
from bsam_optax._posterior import predictive
from bsam_optax._posterior import sample_posterior
from bsam_optax._step import bsam_step
from bsam_optax._step import make_perturbation_step

__version__ = "0.1.0"

__all__ = [
  "BSAMState",
  "Dataset",
  "Split",
  "bsam",
  "bsam_step",
  "epoch_batches",
  "find_bsam_state",
  "iterate_batches",
  "load_dataset",
  "make_perturbation_step",
  "noisy_params",
  "perturbed_params",
  "posterior",
  "predictive",
  "sample_posterior",
]
