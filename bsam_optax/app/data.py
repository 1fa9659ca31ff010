"""Small classification data sets that need no download, and minibatches.

Two data sets, each with train / validation / test splits and an
out-of-distribution (OOD) input set for OOD-detection AUROC:

* ``"mnist1d"`` — MNIST-1D (Greydanus & Kobak, 2020), *generated* offline by
  ``mnist1d.data.make_dataset`` with the package's default arguments (5000
  sequences of length 40, 10 classes; the package's download path is never
  used). Its 4000 training sequences are split 3600 train / 400 validation;
  the 1000 test sequences are the package's test split. OOD: the test
  sequences with their 40 positions permuted by one fixed permutation (the
  per-sequence value distribution is kept, the digit shape is destroyed — the
  ``shuffle_seq`` variant of MNIST-1D).
* ``"digits"`` — scikit-learn's 8x8 handwritten digits (1797 images, shipped
  with scikit-learn), scaled to [0, 1], shape ``(8, 8)``; split 1259 train /
  179 validation / 359 test. OOD: the test images inverted, ``1 − x``.

:func:`epoch_batches` shuffles a split into a stacked array of minibatches with
an explicit key (jit-able, e.g. inside ``lax.scan``); :func:`iterate_batches`
yields them one at a time for a Python loop.
"""

import dataclasses
import functools
import random
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "DATASETS",
  "Dataset",
  "Split",
  "epoch_batches",
  "iterate_batches",
  "load_dataset",
  "num_batches",
]

DATASETS = ("mnist1d", "digits")


class Split(NamedTuple):
  """Inputs and integer labels; a pytree, so a batch of it is a ``Split`` too."""

  x: jax.Array  # (n, ...) float32 inputs
  y: jax.Array  # (n,) int32 labels


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A classification data set with its splits and an OOD input set."""

  name: str
  train: Split
  validation: Split
  test: Split
  ood: jax.Array  # inputs shaped like test.x, drawn from another distribution
  num_classes: int
  ood_description: str

  @property
  def input_shape(self) -> tuple[int, ...]:
    return tuple(self.train.x.shape[1:])


def _split(x, y, start, stop) -> Split:
  return Split(jnp.asarray(x[start:stop], jnp.float32), jnp.asarray(y[start:stop], jnp.int32))


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int):
  from mnist1d.data import get_dataset_args
  from mnist1d.data import make_dataset

  args = get_dataset_args()
  args.num_samples = num_samples
  # make_dataset seeds NumPy's and Python's global generators; restore them.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return data["x"], data["y"], data["x_test"], data["y_test"]


def _mnist1d(num_samples: int) -> Dataset:
  x, y, x_test, y_test = _mnist1d_arrays(num_samples)
  n_val = len(x) // 10
  n_train = len(x) - n_val
  test = _split(x_test, y_test, 0, len(x_test))
  permutation = np.random.default_rng(0).permutation(x_test.shape[1])
  return Dataset(
    name="mnist1d",
    train=_split(x, y, 0, n_train),
    validation=_split(x, y, n_train, len(x)),
    test=test,
    ood=test.x[:, permutation],
    num_classes=10,
    ood_description="MNIST-1D test sequences with their positions permuted (fixed permutation)",
  )


@functools.lru_cache(maxsize=1)
def _digits_arrays():
  from sklearn.datasets import load_digits

  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  return digits.images[order] / 16.0, digits.target[order]


def _digits() -> Dataset:
  x, y = _digits_arrays()
  n_test = len(x) // 5
  n_val = len(x) // 10
  n_train = len(x) - n_val - n_test
  test = _split(x, y, n_train + n_val, len(x))
  return Dataset(
    name="digits",
    train=_split(x, y, 0, n_train),
    validation=_split(x, y, n_train, n_train + n_val),
    test=test,
    ood=1.0 - test.x,
    num_classes=10,
    ood_description="scikit-learn digits test images inverted (1 - x)",
  )


def load_dataset(name: str, *, num_samples: int | None = None) -> Dataset:
  """Loads (generates) a data set; nothing is downloaded.

  Args:
    name: ``"mnist1d"`` or ``"digits"``.
    num_samples: MNIST-1D only: the number of sequences to generate (train +
      test, 80/20), default 5000 as in the package.

  Returns:
    A :class:`Dataset`.

  Example:
    >>> from bsam_optax.app import load_dataset
    >>> data = load_dataset("digits")
    >>> data.train.x.shape, data.num_classes
    ((1259, 8, 8), 10)
  """
  if name == "mnist1d":
    num_samples = 5000 if num_samples is None else num_samples
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 100:
      raise ValueError(f"num_samples must be an int >= 100, got {num_samples!r}")
    return _mnist1d(num_samples)
  if name == "digits":
    if num_samples is not None:
      raise ValueError("num_samples applies to mnist1d only; digits has a fixed size of 1797")
    return _digits()
  raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")


def _num_examples(split) -> int:
  return jax.tree.leaves(split)[0].shape[0]


def num_batches(split: Split, batch_size: int) -> int:
  """The number of full minibatches per epoch (the remainder is dropped)."""
  return _num_examples(split) // batch_size


def _check_batch_size(split: Split, batch_size) -> None:
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  if batch_size > _num_examples(split):
    raise ValueError(f"batch_size={batch_size} exceeds the number of examples {_num_examples(split)}")


@functools.partial(jax.jit, static_argnames="batch_size")
def _epoch_batches(key, split, batch_size):
  n = num_batches(split, batch_size)
  order = jax.random.permutation(key, _num_examples(split))[: n * batch_size]
  return jax.tree.map(lambda a: a[order].reshape((n, batch_size) + a.shape[1:]), split)


def epoch_batches(key: jax.Array, split: Split, batch_size: int) -> Split:
  """One epoch of shuffled minibatches, stacked: leaves get shape ``(B, batch_size, ...)``.

  The examples are shuffled by ``jax.random.permutation(key, n)``; the last
  ``n mod batch_size`` examples of the shuffle are dropped, so every batch
  has the same size (one compilation). Jit-able with ``batch_size`` static;
  scan over the result's leading axis.

  Args:
    key: a PRNG key, e.g. ``fold_in(key, epoch)``.
    split: the :class:`Split` (or any pytree of arrays with a shared leading
      axis) to batch.
    batch_size: examples per batch.

  Returns:
    A pytree like ``split`` with two leading axes ``(num_batches, batch_size)``.
  """
  _check_batch_size(split, batch_size)
  return _epoch_batches(key, split, batch_size)


def iterate_batches(key: jax.Array, split: Split, batch_size: int) -> Iterator[Split]:
  """Yields the minibatches of :func:`epoch_batches` one at a time."""
  batches = epoch_batches(key, split, batch_size)
  for i in range(num_batches(split, batch_size)):
    yield jax.tree.map(lambda a, i=i: a[i], batches)
