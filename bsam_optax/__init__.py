"""bsam_optax: Bayesian Sharpness-Aware Minimization (bSAM) for JAX and optax."""

from bsam_optax._bsam import CURVATURES
from bsam_optax._bsam import BSAMState
from bsam_optax._bsam import bsam
from bsam_optax._bsam import bsam_no_noise_step
from bsam_optax._bsam import bsam_rule
from bsam_optax._bsam import bsam_step
from bsam_optax._bsam import find_bsam_state
from bsam_optax._bsam import noisy_params
from bsam_optax._bsam import perturbed_params
from bsam_optax._bsam import reparam_cv_hessian
from bsam_optax._bsam import reparam_hessian
from bsam_optax._bsam import scale_by_bsam
from bsam_optax._checkpoint import Checkpoint
from bsam_optax._checkpoint import restore_checkpoint
from bsam_optax._checkpoint import save_checkpoint
from bsam_optax._fisher_sam import fisher_sam_perturbed_params
from bsam_optax._fisher_sam import fisher_sam_rule
from bsam_optax._fisher_sam import fisher_sam_step
from bsam_optax._mfvi import MFVIState
from bsam_optax._mfvi import mfvi
from bsam_optax._mfvi import mfvi_rule
from bsam_optax._mfvi import mfvi_sample
from bsam_optax._mfvi import mfvi_step
from bsam_optax._mfvi import scale_by_mfvi
from bsam_optax._noise import hash_prng_impl
from bsam_optax._posterior import PosteriorSummary
from bsam_optax._posterior import choose_temperature
from bsam_optax._posterior import find_posterior_state
from bsam_optax._posterior import posterior
from bsam_optax._posterior import posterior_diagnostics
from bsam_optax._posterior import predictive
from bsam_optax._posterior import sample_posterior
from bsam_optax._posterior import select_temperature
from bsam_optax._posterior import tempered_nlls
from bsam_optax._sam import asam_perturbed_params
from bsam_optax._sam import asam_rule
from bsam_optax._sam import asam_step
from bsam_optax._sam import random_perturbed_params
from bsam_optax._sam import random_sam_rule
from bsam_optax._sam import random_sam_step
from bsam_optax._sam import sam_perturbed_params
from bsam_optax._sam import sam_rule
from bsam_optax._sam import sam_step
from bsam_optax._step import PerturbationRule
from bsam_optax._step import StepInfo
from bsam_optax._step import StepOptions
from bsam_optax._step import choose_split
from bsam_optax._step import make_perturbation_step
from bsam_optax._step import perturbation_gradients
from bsam_optax._vsam import VSAMState
from bsam_optax._vsam import scale_by_vsam
from bsam_optax._vsam import vsam
from bsam_optax._vsam import vsam_perturbation
from bsam_optax._vsam import vsam_perturbed_params
from bsam_optax._vsam import vsam_rule
from bsam_optax._vsam import vsam_step

__version__ = "0.1.0"

__all__ = [
  "BSAMState",
  "CURVATURES",
  "Checkpoint",
  "MFVIState",
  "PerturbationRule",
  "PosteriorSummary",
  "StepInfo",
  "StepOptions",
  "VSAMState",
  "asam_perturbed_params",
  "asam_rule",
  "asam_step",
  "bsam",
  "bsam_no_noise_step",
  "bsam_rule",
  "bsam_step",
  "choose_split",
  "choose_temperature",
  "find_bsam_state",
  "find_posterior_state",
  "fisher_sam_perturbed_params",
  "fisher_sam_rule",
  "fisher_sam_step",
  "hash_prng_impl",
  "make_perturbation_step",
  "mfvi",
  "mfvi_rule",
  "mfvi_sample",
  "mfvi_step",
  "noisy_params",
  "perturbation_gradients",
  "perturbed_params",
  "posterior",
  "posterior_diagnostics",
  "predictive",
  "random_perturbed_params",
  "random_sam_rule",
  "random_sam_step",
  "reparam_cv_hessian",
  "reparam_hessian",
  "restore_checkpoint",
  "sam_perturbed_params",
  "sam_rule",
  "sam_step",
  "sample_posterior",
  "save_checkpoint",
  "scale_by_bsam",
  "scale_by_mfvi",
  "scale_by_vsam",
  "select_temperature",
  "tempered_nlls",
  "vsam",
  "vsam_perturbation",
  "vsam_perturbed_params",
  "vsam_rule",
  "vsam_step",
]
