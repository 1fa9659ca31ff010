"""Tests of save_checkpoint / restore_checkpoint: bitwise-identical resume, targets, errors.

``BSAM_RESUME_STEPS=2000 pytest tests/test_checkpoint.py -k resume`` runs the resume test
with 2000 steps (1000 + save/restore + 1000) instead of the default 200.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bsam_optax as bo
from bsam_optax.flax import TrainState

RESUME_STEPS = int(os.environ.get("BSAM_RESUME_STEPS", "200"))


def _mlp_params(key):
  k1, k2 = jax.random.split(key)
  return {
    "w1": jax.random.normal(k1, (4, 16)) / 2,
    "b1": jnp.zeros(16),
    "w2": jax.random.normal(k2, (16, 3)) / 4,
    "b2": jnp.zeros(3),
  }


def _loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"] + params["b2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def _data():
  x = jax.random.normal(jax.random.key(0), (64, 4))
  return {"x": x, "y": jnp.argmax(x[:, :3], axis=-1)}


TX = optax.chain(optax.clip_by_global_norm(10.0), bo.bsam(optax.cosine_decay_schedule(0.05, 4000), n_data=64))
STEP = bo.bsam_step(_loss, TX, m=2)
KEY = jax.random.key(42)


def _train(params, opt_state, start, stop):
  batch = _data()
  for i in range(start, stop):
    params, opt_state, _ = STEP(params, opt_state, batch, jax.random.fold_in(KEY, i))
  return params, opt_state


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_is_bitwise_identical(tmp_path):
  n = RESUME_STEPS
  params = _mlp_params(jax.random.key(1))
  opt_state = TX.init(params)
  straight = _train(params, opt_state, 0, n)

  half_params, half_state = _train(params, opt_state, 0, n // 2)
  path = bo.save_checkpoint(tmp_path / "ckpt", half_params, half_state, step=n // 2)
  # Fresh targets: only their structure, shapes and dtypes are used.
  restored = bo.restore_checkpoint(path, jax.eval_shape(lambda: params), jax.eval_shape(TX.init, params))
  assert restored.step == n // 2
  assert restored.extra is None
  _assert_bitwise_equal(restored.params, half_params)
  _assert_bitwise_equal(restored.opt_state, half_state)
  resumed = _train(restored.params, restored.opt_state, restored.step, n)

  _assert_bitwise_equal(resumed[0], straight[0])
  ours, theirs = bo.find_bsam_state(resumed[1]), bo.find_bsam_state(straight[1])
  assert int(ours.count) == int(theirs.count) == n
  _assert_bitwise_equal(ours.scale, theirs.scale)
  _assert_bitwise_equal(ours.momentum, theirs.momentum)
  _assert_bitwise_equal(resumed[1], straight[1])
  # It did train: the scale moved away from its initial value.
  assert not np.allclose(ours.scale["w1"], 1.0)


def test_linen_train_state_with_batch_stats_and_extra(tmp_path):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      return nn.Dense(2)(nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x)))

  x = jnp.ones((8, 3))
  variables = Net().init(jax.random.key(0), x, train=False)
  state = TrainState.create(
    apply_fn=Net().apply,
    params=variables["params"],
    batch_stats=jax.tree.map(lambda s: s + 0.5, variables["batch_stats"]),
    tx=bo.bsam(0.1, n_data=8),
  )
  state = state.replace(step=jnp.asarray(3))
  extra = {"batch_stats": state.batch_stats, "key": jax.random.key_data(KEY)}
  path = bo.save_checkpoint(str(tmp_path / "linen"), state.params, state.opt_state, step=state.step, extra=extra)
  fresh = TrainState.create(
    apply_fn=Net().apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=bo.bsam(0.1, n_data=8)
  )
  # With an extra target, and without one (then as saved).
  for target in (extra, None):
    params, opt_state, step, got = bo.restore_checkpoint(path, fresh.params, fresh.opt_state, extra=target)
    assert step == 3
    _assert_bitwise_equal(got["batch_stats"], state.batch_stats)
    assert jax.random.key_data(jax.random.wrap_key_data(got["key"])).tolist() == extra["key"].tolist()
  restored = fresh.replace(step=step, params=params, opt_state=opt_state, batch_stats=got["batch_stats"])
  _assert_bitwise_equal(restored.params, state.params)
  _assert_bitwise_equal(restored.opt_state, state.opt_state)


def test_nnx_model_and_optimizer(tmp_path):
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, bo.bsam(0.1, n_data=8), wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  opt_state = nnx.as_pure(optimizer.opt_state)
  opt_state = (opt_state[0]._replace(scale=jax.tree.map(lambda s: s * 3.0, opt_state[0].scale)),) + opt_state[1:]
  path = bo.save_checkpoint(tmp_path / "nnx", params, opt_state)
  other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
  other_optimizer = nnx.Optimizer(other, bo.bsam(0.1, n_data=8), wrt=nnx.Param)
  got = bo.restore_checkpoint(path, nnx.as_pure(nnx.state(other, nnx.Param)), nnx.as_pure(other_optimizer.opt_state))
  assert got.step is None
  nnx.update(other, got.params)
  nnx.update(other_optimizer.opt_state, nnx.state(got.opt_state))
  _assert_bitwise_equal(nnx.as_pure(nnx.state(other, nnx.Param)), params)
  _assert_bitwise_equal(nnx.as_pure(other_optimizer.opt_state), opt_state)


def test_dtypes_are_preserved(tmp_path):
  params = {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7, "b": jnp.ones(3, jnp.float16) / 3}
  opt_state = bo.bsam(0.1, n_data=8).init(params)
  path = bo.save_checkpoint(tmp_path / "dtypes", params, opt_state)
  got = bo.restore_checkpoint(path, params, opt_state)
  _assert_bitwise_equal(got.params, params)
  _assert_bitwise_equal(got.opt_state, opt_state)


def test_errors(tmp_path):
  params = {"w": jnp.ones(3)}
  opt_state = bo.bsam(0.1, n_data=8).init(params)
  path = bo.save_checkpoint(tmp_path / "c", params, opt_state)
  with pytest.raises(FileExistsError, match="overwrite"):
    bo.save_checkpoint(path, params, opt_state)
  new_params = {"w": jnp.full(3, 2.0)}
  bo.save_checkpoint(path, new_params, opt_state, step=1, overwrite=True)
  _assert_bitwise_equal(bo.restore_checkpoint(path, params, opt_state).params, new_params)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    bo.restore_checkpoint(tmp_path / "missing", params, opt_state)
  with pytest.raises(ValueError, match="no extra"):
    bo.restore_checkpoint(path, params, opt_state, extra={"a": jnp.ones(1)})
  with pytest.raises(TypeError, match="step"):
    bo.save_checkpoint(tmp_path / "d", params, opt_state, step="ten")
