"""The main job (``bsam-optax train``), an application built on the library's public API.

Train a small Flax classifier on a data set that needs no download with bSAM
or a baseline, and measure its accuracy and uncertainty::

  from bsam_optax.app import TrainConfig, train
  result = train(TrainConfig(dataset="digits", model="mlp", epochs=5))
  result.metrics["model_average"]["ece"]

Modules: :mod:`~bsam_optax.app.config` (what to train, its checks and
flags), :mod:`~bsam_optax.app.optimizers` (the optimizer registry),
:mod:`~bsam_optax.app.data` (data sets and minibatches),
:mod:`~bsam_optax.app.models` (models and loss),
:mod:`~bsam_optax.app.train` (the loop), :mod:`~bsam_optax.app.checkpoint`
(per-epoch checkpoints), :mod:`~bsam_optax.app.evaluate` (test metrics),
:mod:`~bsam_optax.app.report` (printing, figures, files) and
:mod:`~bsam_optax.app.cli` (the command). Needs the ``examples`` extra
(flax, orbax-checkpoint, mnist1d, scikit-learn, matplotlib, tqdm).
"""

from bsam_optax.app.checkpoint import CheckpointError
from bsam_optax.app.config import ConfigError
from bsam_optax.app.config import TrainConfig
from bsam_optax.app.config import check_config
from bsam_optax.app.data import DATASETS as DATASETS
from bsam_optax.app.data import Dataset
from bsam_optax.app.data import Split
from bsam_optax.app.data import epoch_batches
from bsam_optax.app.data import iterate_batches
from bsam_optax.app.data import load_dataset
from bsam_optax.app.data import num_batches
from bsam_optax.app.evaluate import evaluate
from bsam_optax.app.models import MODELS as MODELS
from bsam_optax.app.models import make_model
from bsam_optax.app.optimizers import OPTIMIZERS as OPTIMIZERS
from bsam_optax.app.optimizers import Optimizer
from bsam_optax.app.train import TrainingDiverged
from bsam_optax.app.train import TrainingInterrupted
from bsam_optax.app.train import TrainResult
from bsam_optax.app.train import train

__all__ = [
  "CheckpointError",
  "ConfigError",
  "Dataset",
  "Optimizer",
  "Split",
  "TrainConfig",
  "TrainResult",
  "TrainingDiverged",
  "TrainingInterrupted",
  "check_config",
  "epoch_batches",
  "evaluate",
  "iterate_batches",
  "load_dataset",
  "make_model",
  "num_batches",
  "train",
]
