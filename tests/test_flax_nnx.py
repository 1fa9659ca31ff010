"""Tests of the NNX path: nnx.Optimizer with bsam and make_nnx_train_step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bsam_optax as bo
import bsam_optax.flax as bf
from bsam_optax.flax import make_nnx_train_step

N_DATA = 64


class Net(nnx.Module):
  """A tiny MLP with BatchNorm."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.dense(x))))


def _data(n=N_DATA):
  x = jax.random.normal(jax.random.key(0), (n, 4))
  y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=-1)
  return {"x": x, "y": y}


def _loss(model, batch):
  return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]), batch["y"]).mean()


def _tx():
  return bo.bsam(0.1, n_data=N_DATA, rho=0.01, b1=0.5)


def _model_and_optimizer():
  model = Net(nnx.Rngs(1))
  model.train()
  return model, nnx.Optimizer(model, _tx(), wrt=nnx.Param)


def _functional_step(model, batch, key, m, bn_update):
  """The same step with bsam_step on the pure nnx.State of the params."""
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  params, stats, rest = nnx.as_pure(params), nnx.as_pure(stats), nnx.as_pure(rest)
  tx = _tx()

  def loss(p, batch, batch_stats):
    merged = nnx.merge(graphdef, p, batch_stats, rest)
    return _loss(merged, batch), nnx.as_pure(nnx.state(merged, nnx.BatchStat))

  aux_from = "noisy" if bn_update == "noisy" else "perturbed"
  step = bo.bsam_step(loss, tx, m=m, has_aux=True, aux_from=aux_from, thread_aux=bn_update == "both")
  new_params, opt_state, out = step(params, tx.init(params), batch, key, stats)
  return new_params, opt_state, out["aux"], out


def _pure(model, which):
  return nnx.as_pure(nnx.state(model, which))


@pytest.mark.parametrize("m,bn_update", [(1, "both"), (2, "both")])
def test_one_step_equals_functional_bsam_step(m, bn_update):
  model, optimizer = _model_and_optimizer()
  batch, key = _data(), jax.random.key(3)
  params, opt_state, stats, ref_out = _functional_step(model, batch, key, m, bn_update)

  out = make_nnx_train_step(_loss, m=m, bn_update=bn_update)(model, optimizer, batch, key)
  for a, b in [
    (_pure(model, nnx.Param), params),
    (nnx.as_pure(optimizer.opt_state), opt_state),
    (_pure(model, nnx.BatchStat), stats),
  ]:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      np.testing.assert_array_equal(x, y)
  np.testing.assert_allclose(out["loss"], ref_out["loss"], rtol=1e-6)
  np.testing.assert_allclose(out["perturbed_loss"], ref_out["perturbed_loss"], rtol=1e-6)
  assert int(optimizer.step[...]) == 1
  assert int(bo.find_bsam_state(nnx.as_pure(optimizer.opt_state)).count) == 1


def test_none_keeps_the_statistics_and_noisy_moves_them_with_the_same_params():
  batch, key = _data(), jax.random.key(4)
  results = {}
  for bn_update in ("none", "noisy"):
    model, optimizer = _model_and_optimizer()
    before = _pure(model, nnx.BatchStat)
    make_nnx_train_step(_loss, bn_update=bn_update)(model, optimizer, batch, key)
    results[bn_update] = (_pure(model, nnx.Param), _pure(model, nnx.BatchStat), before)
  for x, y in zip(jax.tree.leaves(results["none"][0]), jax.tree.leaves(results["noisy"][0]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  for x, y in zip(jax.tree.leaves(results["none"][1]), jax.tree.leaves(results["none"][2]), strict=True):
    np.testing.assert_array_equal(x, y)
  assert not np.allclose(results["noisy"][1]["norm"]["mean"], results["none"][1]["norm"]["mean"])


def test_trains_a_batchnorm_model():
  model, optimizer = _model_and_optimizer()
  batch, key = _data(), jax.random.key(5)
  step = make_nnx_train_step(_loss, m=2)
  losses = [float(step(model, optimizer, batch, jax.random.fold_in(key, i))["perturbed_loss"]) for i in range(60)]
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
  model.eval()
  assert float(jnp.mean(jnp.argmax(model(batch["x"]), -1) == batch["y"])) > 0.7
  assert int(optimizer.step[...]) == 60
  # The posterior of the nnx.State of params, and the model-averaged predictive through nnx.merge.
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, opt_state = nnx.as_pure(params), nnx.as_pure(optimizer.opt_state)
  _, std = bo.posterior(params, opt_state)
  assert all(float(jnp.min(s)) > 0 for s in jax.tree.leaves(std))
  apply = lambda p, x: nnx.merge(graphdef, p, rest)(x)
  predictive = jax.jit(lambda k, p, s, x: bo.predictive(apply, k, p, s, x, num_samples=4))
  probs = predictive(jax.random.key(6), params, opt_state, batch["x"])
  np.testing.assert_allclose(jnp.sum(probs, -1), 1.0, rtol=1e-5)


def _run_steps(steps=2, **kwargs):
  model, optimizer = _model_and_optimizer()
  step = make_nnx_train_step(_loss, **kwargs)
  batch, key = _data(), jax.random.key(7)
  outs = [step(model, optimizer, batch, jax.random.fold_in(key, t)) for t in range(steps)]
  return _pure(model, nnx.Param), nnx.as_pure(optimizer.opt_state), _pure(model, nnx.BatchStat), outs


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_splits_and_devices_give_the_same_steps():
  # conftest.py gives this process 8 CPU devices: 4 devices x m=1 and 2 devices x m=2 are m=4 on one device.
  reference = _run_steps(m=4)
  for split in ("scan", "unroll"):
    _assert_trees_close(_run_steps(m=4, split=split)[:3], reference[:3])
  for devices, m in ((4, 1), (2, 2)):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("data",))
    result = _run_steps(m=m, axis_name="data", mesh=mesh)
    _assert_trees_close(result[:3], reference[:3])
    np.testing.assert_allclose(result[3][-1]["loss"], reference[3][-1]["loss"], rtol=1e-5)


def test_bad_arguments():
  with pytest.raises(ValueError, match="bn_update"):
    make_nnx_train_step(_loss, bn_update="mean")
  with pytest.raises(ValueError, match="m must be"):
    make_nnx_train_step(_loss, m=0)
  with pytest.raises(ValueError, match="split must be"):
    make_nnx_train_step(_loss, split="pmap")
  with pytest.raises(ValueError, match="axis_name= needs mesh="):
    make_nnx_train_step(_loss, axis_name="data")
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    make_nnx_train_step("loss")
  model, optimizer = _model_and_optimizer()
  with pytest.raises(ValueError, match="divisible"):
    make_nnx_train_step(_loss, m=3, jit=False)(model, optimizer, _data(), jax.random.key(0))


class DropNet(nnx.Module):
  """BatchNorm and Dropout, built with one nnx.Rngs as in Flax's NNX examples."""

  def __init__(self, rngs: nnx.Rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.norm = nnx.BatchNorm(8, momentum=0.8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.drop(nnx.relu(self.norm(self.dense(x)))))


def _aux_loss(model, batch):
  logits = model(batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean(), logits


def test_aux_dropout_and_devices():
  batch = _data()
  batch = {"x": jnp.concatenate([batch["x"][:32]] * 2), "y": jnp.concatenate([batch["y"][:32]] * 2)}
  results = {}
  for name, kwargs in {
    "m=2": dict(m=2),
    "2 devices": dict(axis_name="data", mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))),
  }.items():
    model = DropNet(nnx.Rngs(0))
    model.train()
    optimizer = nnx.Optimizer(model, bo.bsam(0.1, n_data=N_DATA, rho=0.01), wrt=nnx.Param)
    info = make_nnx_train_step(_aux_loss, has_aux=True, **kwargs)(model, optimizer, batch, jax.random.key(1))
    results[name] = (info.aux, _pure(model, nnx.BatchStat), _pure(model, nnx.Param))
  aux = results["m=2"][0]
  assert aux.shape == (N_DATA, 3)
  assert not np.allclose(aux[:32], aux[32:])  # equal halves, their own noise and Dropout masks
  for a, b in zip(jax.tree.leaves(results["m=2"]), jax.tree.leaves(results["2 devices"]), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_step_inside_nnx_jit_with_metrics():
  model, optimizer = _model_and_optimizer()
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  bsam_step = make_nnx_train_step(_aux_loss, m=2, has_aux=True, jit=False)

  @nnx.jit
  def train_step(model, optimizer, metrics, batch, key):
    info = bsam_step(model, optimizer, batch, key)
    metrics.update(loss=info.loss, logits=info.aux, labels=batch["y"])

  train_step(model, optimizer, metrics, _data(), jax.random.key(0))
  assert 0 <= float(metrics.compute()["accuracy"]) <= 1
  assert int(optimizer.step[...]) == 1


def test_posterior_and_predictive_of_an_nnx_model():
  from bsam_optax.flax import nnx_posterior
  from bsam_optax.flax import nnx_predictive
  from bsam_optax.flax import nnx_sample_posterior

  model, optimizer = _model_and_optimizer()
  make_nnx_train_step(_loss)(model, optimizer, _data(), jax.random.key(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest, opt_state = nnx.as_pure(params), nnx.as_pure(rest), nnx.as_pure(optimizer.opt_state)
  mean, std = nnx_posterior(model, optimizer)
  _assert_trees_close(std, bo.posterior(params, opt_state)[1], rtol=0, atol=0)
  samples = nnx_sample_posterior(model, optimizer, jax.random.key(1), 3, temperature=0.5)
  _assert_trees_close(samples, bo.sample_posterior(jax.random.key(1), params, opt_state, 3, temperature=0.5))

  def apply(p, x):
    m = nnx.merge(graphdef, p, rest)
    m.eval()
    return m(x)

  x = _data()["x"]
  expected = bo.predictive(apply, jax.random.key(2), params, opt_state, x, 4)
  np.testing.assert_allclose(nnx_predictive(model, optimizer, jax.random.key(2), x, 4), expected, rtol=1e-5, atol=1e-6)
  # Recomputed statistics at T = 0: those of ω, the mean over the batches of the batch mean and variance.
  bn_inputs = x.reshape(4, 16, 4)
  probs = nnx_predictive(
    model, optimizer, jax.random.key(2), x, 2, batch_stats="recompute", bn_inputs=bn_inputs, temperature=0.0
  )
  hidden = [b @ params["dense"]["kernel"] + params["dense"]["bias"] for b in bn_inputs]
  check = nnx.merge(graphdef, params, rest)
  check.norm.mean[...] = np.mean([h.mean(0) for h in hidden], 0)
  check.norm.var[...] = np.mean([h.var(0) for h in hidden], 0)
  check.eval()
  np.testing.assert_allclose(probs, jax.nn.softmax(check(x)), rtol=1e-4, atol=1e-5)
  assert model.norm.use_running_average is False  # the model passed in is left in training mode
  with pytest.raises(TypeError, match="nnx.Optimizer"):
    nnx_posterior(model, optimizer.opt_state)


def test_mistakes_get_errors_that_say_what_to_do():
  model, optimizer = _model_and_optimizer()
  step = make_nnx_train_step(_loss, jit=False)
  with pytest.raises(TypeError, match="swapped"):
    step(model, optimizer, jax.random.key(0), _data())
  with pytest.raises(TypeError, match="nnx.Optimizer"):
    step(model, optax.sgd(0.1), _data(), jax.random.key(0))
  tiny = nnx.Optimizer(model, bo.bsam(0.1, n_data=2), wrt=nnx.Param)
  with pytest.raises(ValueError, match="smaller than one batch"):
    step(model, tiny, _data(), jax.random.key(0))


def _value_and_grad_step(key, **kwargs):
  """Flax's NNX train step with its nnx.value_and_grad line switched to bf.nnx_value_and_grad."""

  @nnx.jit
  def train_step(model, optimizer, batch):
    grad_fn = bf.nnx_value_and_grad(_aux_loss, optimizer, key, has_aux=True, **kwargs)
    (loss, logits), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    return loss, logits

  return train_step


def _drop_net_and_optimizer(optimizer_type=bf.Optimizer):
  model = DropNet(nnx.Rngs(0))
  model.train()
  return model, optimizer_type(model, bo.bsam(0.1, n_data=N_DATA, rho=0.01), wrt=nnx.Param)


def test_nnx_value_and_grad_is_the_nnx_train_step():
  # Step t draws from fold_in(key, t); everything else is make_nnx_train_step's (parts, Dropout keys, BatchNorm).
  batch, key = _data(), jax.random.key(2)
  model, optimizer = _drop_net_and_optimizer()
  step = _value_and_grad_step(key, m=2)
  for _ in range(2):
    loss, logits = step(model, optimizer, batch)
  ref_model, ref_optimizer = _drop_net_and_optimizer(nnx.Optimizer)
  ref_step = make_nnx_train_step(_aux_loss, m=2, has_aux=True)
  for t in range(2):
    info = ref_step(ref_model, ref_optimizer, batch, jax.random.fold_in(key, t))
  for which in (nnx.Param, nnx.BatchStat):
    _assert_trees_close(_pure(model, which), _pure(ref_model, which))
  _assert_trees_close(nnx.as_pure(optimizer.opt_state), nnx.as_pure(ref_optimizer.opt_state))
  np.testing.assert_allclose(logits, info.aux, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, info.second_loss, rtol=1e-5)  # the value is the second pass's
  assert logits.shape == (N_DATA, 3) and int(optimizer.step[...]) == 2


def test_gradients_with_a_plain_nnx_optimizer_and_plain_grads_with_bf_optimizer():
  batch = _data()
  model, optimizer = _drop_net_and_optimizer()
  _value_and_grad_step(0)(model, optimizer, batch)
  plain_model, plain = _drop_net_and_optimizer(nnx.Optimizer)

  @nnx.jit
  def plain_step(model, optimizer, batch):
    _, grads = bf.nnx_value_and_grad(_aux_loss, optimizer, 0, has_aux=True)(model, batch)
    optimizer.update(model, grads.grads, **grads.extra_args)

  plain_step(plain_model, plain, batch)
  _assert_trees_close(_pure(model, nnx.Param), _pure(plain_model, nnx.Param))
  # bf.Optimizer with ordinary gradients is nnx.Optimizer
  sgd_model = Net(nnx.Rngs(1))
  sgd = bf.Optimizer(sgd_model, optax.sgd(0.1), wrt=nnx.Param)
  grads = nnx.grad(_loss)(sgd_model, batch)
  assert isinstance(sgd, nnx.Optimizer)
  updates = sgd.update(sgd_model, grads)
  _assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, nnx.as_pure(nnx.state(grads, nnx.Param))))


def test_nnx_value_and_grad_errors():
  model, optimizer = _drop_net_and_optimizer()
  with pytest.raises(TypeError, match="nnx.Optimizer"):
    bf.nnx_value_and_grad(_aux_loss, optax.sgd(0.1), 0)
  with pytest.raises(TypeError, match="int seed"):
    bf.nnx_value_and_grad(_aux_loss, optimizer, None)
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    bf.nnx_value_and_grad(None, optimizer, 0)
  with pytest.raises(TypeError, match="nnx.Module"):
    bf.nnx_value_and_grad(_aux_loss, optimizer, 0)(optimizer, _data())
  tiny = nnx.Optimizer(model, bo.bsam(0.1, n_data=2), wrt=nnx.Param)
  with pytest.raises(ValueError, match="smaller than one batch"):  # checked outside nnx.jit
    bf.nnx_value_and_grad(_aux_loss, tiny, 0, has_aux=True)(model, _data())


def test_nnx_predictive_defaults():
  # bn_inputs alone means "recompute"; one batch shaped like the inputs is K = 1.
  model, optimizer = _model_and_optimizer()
  x, key = _data()["x"], jax.random.key(3)
  explicit = bf.nnx_predictive(model, optimizer, key, x, 2, batch_stats="recompute", bn_inputs=x[None])
  np.testing.assert_allclose(bf.nnx_predictive(model, optimizer, key, x, 2, bn_inputs=x), explicit, rtol=1e-6)
  running = bf.nnx_predictive(model, optimizer, key, x, 2, batch_stats="mean")
  np.testing.assert_allclose(bf.nnx_predictive(model, optimizer, key, x, 2), running, rtol=1e-6)


def test_nnx_recompute_batch_stats_in_place():
  model, _ = _model_and_optimizer()
  x = _data()["x"]
  params = _pure(model, nnx.Param)
  bf.nnx_recompute_batch_stats(model, x)
  hidden = x @ params["dense"]["kernel"] + params["dense"]["bias"]
  np.testing.assert_allclose(model.norm.mean[...], hidden.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(model.norm.var[...], hidden.var(0), rtol=1e-4, atol=1e-5)
  _assert_trees_close(_pure(model, nnx.Param), params, rtol=0, atol=0)
  with pytest.raises(TypeError, match="nnx.Module"):
    bf.nnx_recompute_batch_stats(params, x)
