"""bSAM across devices, processes and hosts (``import bsam_optax.distributed as dist``).

The public face of :mod:`bsam_optax._distributed`: join a multi-process run
with :func:`initialize`, build one mesh over every device with
:func:`data_mesh`, place the state with :func:`replicate` and the batch with
:func:`shard_batch` (each process its rows) or :func:`shard_global_batch`
(every process the whole batch), and read results back with :func:`to_host`.
``bsam-optax train`` takes the same launch through
:func:`add_launcher_arguments` / :func:`initialize_from_args`.
"""

from bsam_optax._distributed import INIT_TIMEOUT_EXIT_CODE
from bsam_optax._distributed import add_launcher_arguments
from bsam_optax._distributed import data_mesh
from bsam_optax._distributed import initialize
from bsam_optax._distributed import initialize_from_args
from bsam_optax._distributed import replicate
from bsam_optax._distributed import shard_batch
from bsam_optax._distributed import shard_global_batch
from bsam_optax._distributed import to_host

__all__ = [
  "INIT_TIMEOUT_EXIT_CODE",
  "add_launcher_arguments",
  "data_mesh",
  "initialize",
  "initialize_from_args",
  "replicate",
  "shard_batch",
  "shard_global_batch",
  "to_host",
]
