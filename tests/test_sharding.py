"""Sharded parameters (issue 10): a tensor-parallel transformer on a (data=4, model=2) mesh of 8 simulated devices.

The model is benchmarks/transformer.py's byte-level language model, shrunk
(1 layer, d_model 16, context 8). One step of ``jax.jit(bo.bsam_step(loss_fn,
tx, m=4))`` on parameters whose attention and MLP kernels are split over
``model`` and a batch split over ``data`` must equal the step on one device
(same key, same batch: params, momentum, scale and both losses within
1e-6 + 1e-5 |x|), and every output leaf must keep its input's sharding. The same
under explicit axes (``AxisType.Explicit``, ``jax.set_mesh``), m = 1 and m = 4.
"""

import importlib.util
import os

import jax
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _transformer():
  spec = importlib.util.spec_from_file_location("transformer", os.path.join(BENCHMARKS, "transformer.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def transformer():
  assert jax.device_count() >= 8, "tests/conftest.py must set XLA_FLAGS before JAX is imported"
  return _transformer()


def _small(t):
  return t.Config(layers=1, d_model=16, heads=2, context=8, batch=16)


def _check(path):
  assert "error" not in path, path.get("error")
  assert path["equal"], path["max_abs_diff"]
  assert path["specs_kept"], path["spec_changes"]


def test_tensor_parallel_jit_step_equals_one_device(transformer):
  result = transformer.sharding_check(_small(transformer), paths=("jit",))
  assert result["sharded_leaves"] == 7  # q, k, v, out, up kernel and bias, down kernel of the one block
  _check(result["jit"])
  assert result["jit"]["per_device_shape"] == "(16, 32)"  # the (16, 64) MLP kernel, half per model shard


@pytest.fixture(scope="module")
def explicit(transformer):
  return transformer.sharding_check(_small(transformer), paths=("explicit",))


def test_tensor_parallel_explicit_axes_m1_equals_one_device(explicit):
  _check(explicit["explicit_m1"])  # the model passes out_sharding= to its row-parallel matmuls and the embedding


def test_tensor_parallel_explicit_axes_m4_equals_one_device(explicit):
  _check(explicit["explicit"])
