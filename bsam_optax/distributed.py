"""bSAM across processes and hosts: one program per process, one global mesh.

JAX is already the distributed engine (multi-controller: every process runs the
same program on its own devices, and a compiled step spans all of them). This
module is the glue around :func:`~bsam_optax.bsam_step` with ``mesh=``::

  initialize(coordinator, num_processes, process_id)  # every process, first
  mesh  = data_mesh("data")                           # all devices, all processes
  step  = bsam_step(loss_fn, tx, m, "data", mesh=mesh)
  params, state = replicate((params, state), mesh)
  for t, local_batch in enumerate(this_process_share):
    batch = shard_batch(local_batch, mesh, "data", m=m)   # the global batch
    # or, if every process holds the whole global batch:
    # batch = shard_global_batch(global_batch, mesh, "data", m=m)
    params, state, out = step(params, state, batch, fold_in(key, t))
  params = to_host(params)

Part ``i`` of device ``d`` draws its noise with ``fold_in(key, d * m + i)``,
``d`` the device's position on the mesh axis, whatever process holds it: so
P processes × D devices × m parts give the parameters and scale of one
process with P·D devices, and of ``m = P·D·m`` on one device (up to the
floating-point order of ``lax.pmean``). The global batch is the processes'
local batches stacked in process order; each process feeds only its rows.

Failures are errors within a bounded time, not hangs: :func:`initialize`
checks that the coordinator is reachable, that every process agrees on the
number of processes, and bounds JAX's rendezvous, heartbeat and shutdown
timeouts; :func:`shard_batch` checks that the global batch splits into the
number of parts.
"""

import os
import socket
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

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

# The exit status of a process whose rendezvous did not complete in time.
INIT_TIMEOUT_EXIT_CODE = 75
# JAX's own rendezvous deadline, a little after ours, so that our message wins.
_JAX_GRACE_S = 10
_ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str, value):
  if value is not None or name not in os.environ:
    return value
  try:
    return int(os.environ[name])
  except ValueError as err:
    raise ValueError(f"environment variable {name}={os.environ[name]!r} is not an integer") from err


def _check_int(name: str, value, minimum: int) -> None:
  if value is None:
    return
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit():
    raise ValueError(f"coordinator_address must be 'host:port', got {address!r}")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float) -> None:
  """Polls a TCP connection to the coordinator until it accepts or the deadline passes."""
  host, port = _split_address(address)
  error = None
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return
    except OSError as err:
      error = err
    if time.monotonic() >= deadline:
      break
    time.sleep(0.2)
  raise ConnectionError(
    f"cannot reach the coordinator at {address} ({error}). Process 0 runs the coordinator: check that it "
    "was started, that this address and port are the ones it was given, and that this host can reach "
    "them (firewall, proxies)."
  )


def _watchdog(done: threading.Event, timeout_s: float, what: str) -> None:
  # JAX's rendezvous ends a late process with a C++ fatal error (SIGABRT) and a
  # terse DEADLINE_EXCEEDED; the call holds no GIL, so this thread can say why
  # first and exit with a status a launcher can recognize.
  if done.wait(timeout_s):
    return
  sys.stderr.write(
    f"bsam_optax.initialize: {what}: not all processes joined within {timeout_s:.3g} s. Check that every "
    "process was launched, that all were given the same num_processes, and that the process ids are "
    f"0 .. num_processes-1, each once. Exiting with status {INIT_TIMEOUT_EXIT_CODE}.\n"
  )
  sys.stderr.flush()
  os._exit(INIT_TIMEOUT_EXIT_CODE)


def _coordination_state():
  """JAX's distributed state: the processes' count and index as given, and the coordination service's client.

  Private to JAX: ``jax.distributed`` exports only ``initialize``, ``is_initialized`` and ``shutdown`` (JAX
  0.10), and the public ``jax.process_count()`` would start the backends, after which a mismatch can no longer be
  an error on every process in bounded time. ``None`` if this JAX lays it out otherwise: the check is then skipped.
  """
  try:
    from jax._src import distributed
  except ImportError:
    return None
  return getattr(distributed, "global_state", None)


def _check_agreement(num_processes: int, process_id: int, timeout_s: float) -> None:
  """Every process publishes its num_processes and reads everyone's: a mismatch is an error on all."""
  client = getattr(_coordination_state(), "client", None)
  if client is None or not hasattr(client, "blocking_key_value_get"):
    return
  client.key_value_set(f"bsam_optax/num_processes/{process_id}", str(num_processes))
  for other in range(num_processes):
    try:
      value = int(client.blocking_key_value_get(f"bsam_optax/num_processes/{other}", int(timeout_s * 1000)))
    except Exception as err:  # the client raises a bare XlaRuntimeError
      raise RuntimeError(
        f"process {process_id} of {num_processes}: process {other} did not report within {timeout_s:.3g} s "
        f"({err}); check that all processes were given the same num_processes"
      ) from err
    if value != num_processes:
      raise ValueError(
        f"processes disagree on the number of processes: process {process_id} was given "
        f"num_processes={num_processes}, process {other} num_processes={value}. Launch every process with "
        "the same num_processes."
      )


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  local_device_ids: int | Sequence[int] | None = None,
  timeout_s: float = 300.0,
  heartbeat_timeout_s: int = 100,
  shutdown_timeout_s: int = 300,
) -> None:
  """Joins this process to a multi-process JAX run, with errors instead of hangs.

  Call it in every process before anything else touches JAX (even
  ``jax.devices()``). It wraps :func:`jax.distributed.initialize`: process 0
  runs the coordinator at ``coordinator_address``; every process connects to
  it. Arguments left ``None`` are read from ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, and if still unset JAX detects
  them from the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes).

  On CPU, cross-process collectives go through gloo
  (``jax_cpu_collectives_implementation``), unless another implementation was
  chosen. Failures are bounded in time:

  * coordinator unreachable (processes other than 0): :class:`ConnectionError`
    after ``timeout_s``;
  * not all processes join within ``timeout_s`` (fewer launched than
    ``num_processes``): a message on stderr and exit status
    :data:`INIT_TIMEOUT_EXIT_CODE` -- JAX would end the process with a fatal
    C++ error, never a Python exception. A repeated or out-of-range
    ``process_id`` ends the run within ``timeout_s`` too, some processes with
    that status, others with JAX's own fatal error (``ABORTED``, "Unexpected
    task registered");
  * processes given different ``num_processes``: :class:`ValueError` on all;
  * a process that dies later: the others fail after ``heartbeat_timeout_s``,
    and a process exiting early waits at most ``shutdown_timeout_s``.

  Args:
    coordinator_address: ``"host:port"`` of process 0, reachable by all.
    num_processes: the number of processes of the run.
    process_id: this process's index in ``0 .. num_processes - 1``.
    local_device_ids: restrict this process to these local devices (GPUs).
    timeout_s: the longest wait for the coordinator and all processes.
    heartbeat_timeout_s: after this many seconds without a heartbeat a
      process counts as dead and the run fails.
    shutdown_timeout_s: how long an exiting process waits for the others.

  Example (two processes, each with its own ``process_id``)::

    import bsam_optax.distributed as dist
    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=0)
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_ADDRESS) or None
  num_processes = _env_int(_ENV_NUM_PROCESSES, num_processes)
  process_id = _env_int(_ENV_PROCESS_ID, process_id)
  _check_int("num_processes", num_processes, 1)
  _check_int("process_id", process_id, 0)
  if num_processes is not None and process_id is not None and process_id >= num_processes:
    raise ValueError(f"process_id must be in 0 .. num_processes-1 = {num_processes - 1}, got {process_id}")
  if coordinator_address is not None:
    _split_address(coordinator_address)
  if not timeout_s > 0:
    raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
  if jax.distributed.is_initialized():
    raise RuntimeError("the JAX distributed system is already initialized in this process")

  deadline = time.monotonic() + timeout_s
  if coordinator_address is not None and process_id not in (None, 0):
    _wait_for_coordinator(coordinator_address, deadline)
  if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):  # type: ignore[attr-defined]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  who = f"process {process_id} of {num_processes} at {coordinator_address}"
  done = threading.Event()
  remaining = max(1.0, deadline - time.monotonic())
  watchdog = threading.Thread(target=_watchdog, args=(done, remaining, who), daemon=True)
  watchdog.start()
  try:
    jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      local_device_ids=local_device_ids,
      initialization_timeout=int(remaining) + _JAX_GRACE_S,
      heartbeat_timeout_seconds=int(heartbeat_timeout_s),
      shutdown_timeout_seconds=int(shutdown_timeout_s),
    )
  finally:
    done.set()
  state = _coordination_state()
  if state is not None:
    _check_agreement(state.num_processes, state.process_id, max(1.0, deadline - time.monotonic()))


def _slurm_tasks() -> int:
  for name in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"):
    if os.environ.get(name, "").isdigit():
      return int(os.environ[name])
  return 1


def add_launcher_arguments(parser) -> None:
  """Adds ``--coordinator``, ``--num-processes``, ``--process-id`` and ``--init-timeout`` to an argparse parser."""
  group = parser.add_argument_group(
    "multi-process runs (jax.distributed)",
    f"one process per host; unset flags are read from {_ENV_ADDRESS}, {_ENV_NUM_PROCESSES}, {_ENV_PROCESS_ID}, "
    "or detected under SLURM (srun with more than one task)",
  )
  group.add_argument("--coordinator", metavar="HOST:PORT", default=None, help="address of process 0's coordinator")
  group.add_argument("--num-processes", type=int, default=None, help="number of processes of the run")
  group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. num-processes-1")
  group.add_argument(
    "--init-timeout", type=float, default=300.0, help="seconds to wait for the coordinator and all processes"
  )


def initialize_from_args(args) -> bool:
  """Calls :func:`initialize` if the flags of :func:`add_launcher_arguments` or the environment ask for it.

  A multi-process run is asked for by any of the three flags, by any of the
  ``JAX_*`` variables, or by SLURM with more than one task. Returns whether
  it initialized; ``False`` means a plain single-process run.
  """
  given = (args.coordinator, args.num_processes, args.process_id)
  from_env = any(name in os.environ for name in (_ENV_ADDRESS, _ENV_NUM_PROCESSES, _ENV_PROCESS_ID))
  if all(v is None for v in given) and not from_env and _slurm_tasks() <= 1:
    return False
  initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.init_timeout)
  return True


def data_mesh(axis_name: str = "data", devices: Sequence[Any] | None = None) -> Mesh:
  """A one-axis mesh over all devices of all processes, each process's devices contiguous.

  Devices are ordered by (process, id), so that the global batch is the
  processes' local batches stacked in process order, and the mesh position of
  a device (the global part index of :func:`~bsam_optax.bsam_step`) does not
  depend on how many processes share the devices.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (axis_name,))


def _local_rows(mesh: Mesh, axis_name: str) -> tuple[int, int]:
  """(number of positions on axis_name held by this process, size of the axis)."""
  if axis_name not in mesh.axis_names:
    raise ValueError(f"axis_name={axis_name!r} is not an axis of the mesh {mesh.axis_names}")
  axis = mesh.axis_names.index(axis_name)
  positions = {
    index[axis] for index, device in np.ndenumerate(mesh.devices) if device.process_index == jax.process_index()
  }
  return len(positions), mesh.shape[axis_name]


def shard_batch(local_batch, mesh: Mesh, axis_name: str = "data", *, m: int = 1):
  """Builds the global batch from this process's rows, sharded along ``axis_name``.

  Each process passes its own share (equal sizes on all processes); the
  global batch is the shares stacked in process order, split over the devices
  of the axis. With ``m`` parts per device, the global batch must split into
  ``axis size * m`` equal parts.

  Args:
    local_batch: a pytree of arrays with a leading batch axis (this process's rows).
    mesh: the mesh of the step (e.g. :func:`data_mesh`).
    axis_name: the mesh axis the batch is sharded along.
    m: the step's m-sharpness parts per device, to check divisibility.

  Returns:
    The global batch: a pytree of ``jax.Array`` sharded along ``axis_name``.
  """
  leaves = jax.tree.leaves(local_batch)
  if not leaves:
    raise ValueError("local_batch must contain at least one array")
  sizes: set[Any] = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"every leaf of local_batch needs the same leading batch size, got {sizes}")
  local_size = sizes.pop()
  local_positions, axis_size = _local_rows(mesh, axis_name)
  if local_positions == 0:
    raise ValueError(f"this process ({jax.process_index()}) has no device on mesh axis {axis_name!r}")
  global_size = local_size * axis_size // local_positions
  if local_size % local_positions or global_size % (axis_size * m):
    raise ValueError(
      f"global batch size {global_size} ({local_size} rows on each of {axis_size // local_positions} "
      f"processes) is not divisible by the number of parts: {axis_size} devices on mesh axis {axis_name!r} "
      f"x m={m} = {axis_size * m}; choose a per-process batch divisible by {local_positions * m}"
    )
  sharding = NamedSharding(mesh, PartitionSpec(axis_name))
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), (global_size,) + np.shape(x)[1:]),
    local_batch,
  )


def shard_global_batch(global_batch, mesh: Mesh, axis_name: str = "data", *, m: int = 1, batch_axis: int = 0):
  """Shards a batch that every process holds whole, materializing only this process's rows.

  For data every host has in memory (small, offline data sets; keyed
  shuffles that every process computes alike): each process passes the same
  global batch and keeps only the rows of its own devices. ``batch_axis=1``
  shards a stack of batches ``(steps, batch, ...)`` for a ``lax.scan`` over
  steps.

  Args:
    global_batch: a pytree of arrays, the same on every process.
    mesh: the mesh of the step.
    axis_name: the mesh axis the batch is sharded along.
    m: the step's m-sharpness parts per device, to check divisibility.
    batch_axis: the batch axis of the leaves.

  Returns:
    A pytree of ``jax.Array`` sharded along ``axis_name`` on ``batch_axis``.
  """
  leaves = jax.tree.leaves(global_batch)
  if not leaves:
    raise ValueError("global_batch must contain at least one array")
  if any(np.ndim(x) <= batch_axis for x in leaves):
    raise ValueError(f"every leaf of global_batch needs an axis {batch_axis} (batch_axis)")
  sizes = {np.shape(x)[batch_axis] for x in leaves}
  if len(sizes) != 1:
    raise ValueError(f"all leaves of global_batch must share the batch size, got {sorted(sizes)}")
  size = sizes.pop()
  _, axis_size = _local_rows(mesh, axis_name)
  if size % (axis_size * m):
    raise ValueError(
      f"global batch size {size} is not divisible by the number of parts: {axis_size} devices on mesh axis "
      f"{axis_name!r} x m={m} = {axis_size * m}"
    )
  sharding = NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), axis_name))

  def place(x):
    return jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x[index]))

  return jax.tree.map(place, global_batch)


def _replicate_leaf(x, sharding):
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = _replicate_leaf(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  value = to_host(x)
  return jax.make_array_from_callback(np.shape(value), sharding, lambda index: value[index])


def replicate(tree, mesh: Mesh):
  """Places a pytree (params, optimizer state, a key) on every device of ``mesh``.

  Every process must pass the same values (e.g. from the same seed).
  """
  sharding = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda x: _replicate_leaf(x, sharding), tree)


def _leaf_to_host(x):
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def to_host(tree):
  """Copies a pytree of (possibly multi-process) arrays to this process as numpy.

  Replicated arrays (params and state after a step) are read from a local
  device; sharded ones are gathered from all processes (a collective: call it
  on every process).
  """
  return jax.tree.map(_leaf_to_host, tree)
