"""Save and restore ω and the full optimizer state with orbax-checkpoint.

A bSAM checkpoint holds the posterior mean ``params`` (ω) and the whole
optimizer state, so the posterior ``N(ω, 1 / (N s))`` and the momentum
survive a restart: resuming gives the same numbers as never stopping, as
long as the per-step keys do not depend on the run (e.g. ``fold_in(key,
step)``). The files are orbax's (tensorstore arrays plus JSON metadata); no
pickle is involved.

One checkpoint is one directory; for keeping the last few of a run, use
``orbax.checkpoint.CheckpointManager`` with the same tree
``{"params", "opt_state", "step", "extra"}``.
"""

import os
from typing import Any
from typing import NamedTuple

import jax
import numpy as np

__all__ = ["Checkpoint", "restore_checkpoint", "save_checkpoint"]


class Checkpoint(NamedTuple):
  """What :func:`restore_checkpoint` returns."""

  params: Any  # ω, with the structure of the target
  opt_state: Any  # the optimizer state (e.g. with its BSAMState: count, momentum, scale)
  step: int | None  # the step saved with the checkpoint, or None
  extra: Any  # the extra tree saved with the checkpoint, or None


def _orbax():
  try:
    import orbax.checkpoint as ocp
  except ImportError as err:  # orbax is an optional dependency
    raise ImportError(
      "checkpointing needs orbax-checkpoint: pip install 'bsam_optax[flax]' (or orbax-checkpoint)"
    ) from err
  return ocp


def _abstract(tree):
  """Shapes, dtypes (and shardings, where known) of a target tree of arrays or ShapeDtypeStructs."""

  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return jax.tree.map(leaf, tree)


def _abstract_from_metadata(tree):
  return jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
    tree,
    is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
  )


def save_checkpoint(
  path: str | os.PathLike,
  params,
  opt_state,
  *,
  step: int | None = None,
  extra: Any = None,
  overwrite: bool = False,
) -> str:
  """Saves ``params`` and ``opt_state`` (all of it) to the directory ``path``.

  Args:
    path: the checkpoint's directory (made absolute; must not exist unless
      ``overwrite``).
    params: ω, a pytree of arrays.
    opt_state: the optimizer state, e.g. ``tx.init(params)`` for a ``tx``
      containing :func:`bsam_optax.bsam` (count, momentum, scale, ρ, N).
    step: the training step, saved as an integer.
    extra: any other pytree of arrays to keep with it (BatchNorm statistics,
      a data-order seed, ``jax.random.key_data(key)`` for a key).
    overwrite: replace an existing checkpoint at ``path``.

  Returns:
    The absolute path written.

  Example:
    >>> import os, tempfile, jax.numpy as jnp, bsam_optax as bo
    >>> params = {"w": jnp.ones(3)}
    >>> tx = bo.bsam(1e-2, n_data=10)
    >>> state = tx.init(params)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = bo.save_checkpoint(path, params, state, step=7)
    >>> params, state, step, extra = bo.restore_checkpoint(path, params, state)
    >>> step
    7
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
  if step is not None:
    value = np.asarray(jax.device_get(step))  # an int or a scalar array such as TrainState.step
    if isinstance(step, bool) or value.shape != () or not np.issubdtype(value.dtype, np.integer):
      raise TypeError(f"step must be an int or an integer scalar array, got {step!r}")
    step = int(value)
  tree = {"params": params, "opt_state": opt_state}
  if step is not None:
    tree["step"] = int(step)
  if extra is not None:
    tree["extra"] = extra
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, tree, force=overwrite)
  return path


def restore_checkpoint(
  path: str | os.PathLike,
  params,
  opt_state,
  *,
  extra: Any = None,
) -> Checkpoint:
  """Restores a checkpoint written by :func:`save_checkpoint`.

  The targets give the structure (e.g. the ``BSAMState`` named tuple inside
  an ``optax.chain`` state), shapes, dtypes and, for ``jax.Array`` leaves,
  the shardings of the result. They can be arrays or ``jax.ShapeDtypeStruct``
  trees, e.g. ``jax.eval_shape(tx.init, params)``; their values are not used.

  Args:
    path: the checkpoint's directory.
    params: target for ω.
    opt_state: target for the optimizer state.
    extra: target for the extra tree; ``None`` restores it as saved (nested
      dicts and lists of arrays).

  Returns:
    A :class:`Checkpoint` ``(params, opt_state, step, extra)``; ``step`` and
    ``extra`` are ``None`` if they were not saved.

  Raises:
    FileNotFoundError: ``path`` is not a directory.
    ValueError: naming ``path``, if it holds no readable checkpoint (other
      files, a truncated or garbled file) or one of other trees.
  """
  ocp = _orbax()
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}")
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      saved = checkpointer.metadata(path).item_metadata
    except Exception as err:  # orbax and tensorstore raise many kinds (JSONDecodeError, ValueError, ...)
      raise ValueError(f"cannot read the checkpoint at {path}: {_reason(err)}; {_NOT_OURS}") from err
    if saved is None or not isinstance(getattr(saved, "tree", None), dict) or "params" not in saved.tree:
      raise ValueError(f"cannot read the checkpoint at {path}: {_found(path)}; {_NOT_OURS}")
    saved = saved.tree
    target = {"params": _abstract(params), "opt_state": _abstract(opt_state)}
    if "step" in saved:
      target["step"] = _abstract_from_metadata(saved["step"])
    if "extra" in saved:
      target["extra"] = _abstract_from_metadata(saved["extra"]) if extra is None else _abstract(extra)
    elif extra is not None:
      raise ValueError(f"the checkpoint at {path} has no extra tree, but an extra target was given")
    try:
      restored = checkpointer.restore(path, target)
    except Exception as err:
      raise ValueError(
        f"cannot restore the checkpoint at {path} into the given targets: {_reason(err)}; it was saved from other "
        "params / opt_state / extra trees, or it is incomplete or corrupt"
      ) from err
  step = int(restored["step"]) if "step" in restored else None
  return Checkpoint(restored["params"], restored["opt_state"], step, restored.get("extra"))


_NOT_OURS = "it is not a checkpoint written by save_checkpoint, or it is incomplete or corrupt"


def _reason(err: Exception) -> str:
  lines = str(err).strip().splitlines()
  text = lines[0] if lines else ""
  return f"{type(err).__name__}: {text[:300]}" if text else type(err).__name__


def _found(path: str) -> str:
  names = sorted(os.listdir(path))
  if not names:
    return "the directory is empty"
  shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
  return f"its metadata is missing or unreadable (found {shown})"
