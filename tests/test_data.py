"""Tests for bsam_optax.app.data and bsam_optax.app.models: offline data, splits, OOD sets, batching, models."""

import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bsam_optax.app import data as _data
from bsam_optax.app import models as _models


@pytest.fixture(scope="module", params=["mnist1d", "digits"])
def dataset(request):
  return _data.load_dataset(request.param)


def test_shapes_dtypes_and_disjoint_splits(dataset):
  shapes = {"mnist1d": ((3600, 40), 400, 1000), "digits": ((1259, 8, 8), 179, 359)}[dataset.name]
  assert dataset.train.x.shape == shapes[0]
  assert dataset.validation.x.shape[0] == shapes[1]
  assert dataset.test.x.shape[0] == shapes[2]
  assert dataset.ood.shape == dataset.test.x.shape
  assert dataset.input_shape == shapes[0][1:]
  for split in (dataset.train, dataset.validation, dataset.test):
    assert split.x.dtype == jnp.float32 and split.y.dtype == jnp.int32
    assert split.x.shape[0] == split.y.shape[0]
    assert set(np.unique(split.y)) == set(range(10))
  # No example is shared between train and test.
  train = {np.asarray(x).tobytes() for x in dataset.train.x}
  assert not any(np.asarray(x).tobytes() in train for x in dataset.test.x)
  assert dataset.ood_description


def test_ood_sets_are_what_the_docs_say(dataset):
  x, ood = np.asarray(dataset.test.x), np.asarray(dataset.ood)
  if dataset.name == "mnist1d":
    # The same values per sequence, in other positions.
    np.testing.assert_allclose(np.sort(x, axis=1), np.sort(ood, axis=1))
    assert not np.allclose(x, ood)
  else:
    np.testing.assert_allclose(ood, 1.0 - x)


def test_generation_is_deterministic_and_leaves_global_rngs_alone():
  np.random.seed(123)
  random.seed(123)
  expected_np, expected_py = np.random.rand(), random.random()
  np.random.seed(123)
  random.seed(123)
  _data._mnist1d_arrays.cache_clear()
  a = _data.load_dataset("mnist1d", num_samples=200)
  assert np.random.rand() == expected_np and random.random() == expected_py
  _data._mnist1d_arrays.cache_clear()
  b = _data.load_dataset("mnist1d", num_samples=200)
  np.testing.assert_array_equal(a.train.x, b.train.x)
  assert a.train.x.shape == (144, 40) and a.test.x.shape == (40, 40)


def test_load_errors():
  with pytest.raises(ValueError, match="unknown dataset"):
    _data.load_dataset("cifar10")
  with pytest.raises(ValueError, match="num_samples"):
    _data.load_dataset("mnist1d", num_samples=3)
  with pytest.raises(ValueError, match="mnist1d only"):
    _data.load_dataset("digits", num_samples=500)


def test_epoch_batches_is_a_keyed_permutation():
  split = _data.Split(jnp.arange(10.0)[:, None] * jnp.ones((1, 3)), jnp.arange(10, dtype=jnp.int32))
  batches = _data.epoch_batches(jax.random.key(0), split, 4)
  assert batches.x.shape == (2, 4, 3) and batches.y.shape == (2, 4)
  assert _data.num_batches(split, 4) == 2
  labels = np.asarray(batches.y).ravel()
  assert len(set(labels)) == 8  # without replacement; 2 dropped
  np.testing.assert_array_equal(batches.x[..., 0], batches.y)  # inputs stay with their labels
  again = _data.epoch_batches(jax.random.key(0), split, 4)
  np.testing.assert_array_equal(again.y, batches.y)
  other = _data.epoch_batches(jax.random.key(1), split, 4)
  assert not np.array_equal(other.y, batches.y)
  listed = list(_data.iterate_batches(jax.random.key(0), split, 4))
  assert len(listed) == 2
  np.testing.assert_array_equal(listed[1].y, batches.y[1])
  # Jit-able as a whole, with batch_size static.
  jitted = jax.jit(_data.epoch_batches, static_argnums=2)(jax.random.key(0), split, 4)
  np.testing.assert_array_equal(jitted.y, batches.y)


def test_epoch_batches_errors():
  split = _data.Split(jnp.zeros((5, 2)), jnp.zeros(5, jnp.int32))
  for bad in (0, -1, 2.0, True):
    with pytest.raises(ValueError, match="batch_size"):
      _data.epoch_batches(jax.random.key(0), split, bad)
  with pytest.raises(ValueError, match="exceeds"):
    _data.epoch_batches(jax.random.key(0), split, 6)


@pytest.mark.parametrize("name", _models.MODELS)
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("input_shape", [(40,), (8, 8)])
def test_models(name, batch_norm, input_shape):
  model = _models.make_model(name, num_classes=7, batch_norm=batch_norm)
  x = jnp.ones((3,) + input_shape)
  variables = model.init(jax.random.key(0), x)
  assert set(variables) == ({"params", "batch_stats"} if batch_norm else {"params"})
  assert model.apply(variables, x).shape == (3, 7)
  if batch_norm:
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (3, 7) and set(updates) == {"batch_stats"}
  assert _models.num_params(variables["params"]) > 0


def test_make_model_error():
  with pytest.raises(ValueError, match="unknown model"):
    _models.make_model("resnet")
