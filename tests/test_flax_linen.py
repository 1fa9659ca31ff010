"""Tests of the linen path: TrainState, make_train_step and the BatchNorm policies."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh

import bsam_optax as bo
import bsam_optax.flax as bf
from bsam_optax.flax import TrainState
from bsam_optax.flax import make_train_step

N_DATA = 64
TRAIN = {"train": True}


class Net(nn.Module):
  """A tiny MLP with BatchNorm."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
    return nn.Dense(3)(nn.relu(x))


def _data(n=N_DATA):
  x = jax.random.normal(jax.random.key(0), (n, 4))
  y = jnp.argmax(x[:, :3] + 0.5 * x[:, 3:], axis=-1)
  return x, y


def _loss(logits, batch):
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()


TX = bo.bsam(0.1, n_data=N_DATA, rho=0.01, b1=0.5)
POLICIES = ("both", "perturbed", "noisy", "none")
# Built once so that tests share their compilations.
STEPS = {p: make_train_step(_loss, bn_update=p, apply_kwargs=TRAIN) for p in POLICIES}
STEP_M2 = make_train_step(_loss, m=2, apply_kwargs=TRAIN)


def _state(tx=TX):
  x, _ = _data()
  variables = Net().init(jax.random.key(1), x, train=False)
  return TrainState.create(
    apply_fn=Net().apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
  )


def _model_loss(params, batch, batch_stats):
  """The loss as make_train_step builds it, for manual reference steps."""
  variables = {"params": params, "batch_stats": batch_stats}
  logits, mutated = Net().apply(variables, batch[0], mutable=["batch_stats"], train=True)
  return _loss(logits, batch), mutated["batch_stats"]


def _assert_trees_equal(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or dict(rtol=1e-6, atol=1e-7)))


@jax.jit
def _manual_step(state, batch, key):
  value_and_grad = jax.value_and_grad(_model_loss, has_aux=True)
  _, g = value_and_grad(state.noisy_params(key), batch, state.batch_stats)
  (_, stats), g_eps = value_and_grad(state.perturbed_params(g), batch, state.batch_stats)
  new = state.apply_gradients(grads=g_eps, noisy_grads=g, batch_stats=stats)
  updates, opt_state = state.tx.update(g_eps, state.opt_state, state.params, noisy_grads=g)
  via_extra_args = state.apply_gradients(grads=g_eps, extra_args={"noisy_grads": g})
  return new, (optax.apply_updates(state.params, updates), opt_state, stats), via_extra_args, new.posterior()


def test_apply_gradients_forwards_noisy_grads_and_replaces_fields():
  state = _state()
  new, (params, opt_state, stats), via_extra_args, (mean, std) = _manual_step(state, _data(), jax.random.key(2))
  _assert_trees_equal(new.params, params)
  _assert_trees_equal(new.opt_state, opt_state)
  _assert_trees_equal(new.batch_stats, stats)
  _assert_trees_equal(via_extra_args.params, new.params)
  assert int(new.step) == 1
  assert int(bo.find_bsam_state(new.opt_state).count) == 1
  _assert_trees_equal(mean, new.params)
  assert all(float(jnp.min(x)) > 0 for x in jax.tree.leaves(std))
  with pytest.raises(ValueError, match="noisy_grads"):
    state.apply_gradients(grads=state.params)


@jax.jit
def _reference_steps(state, batch, key):
  """One bSAM step with m = 1 written out by hand, for every BatchNorm policy."""
  value_and_grad = jax.value_and_grad(_model_loss, has_aux=True)
  r = state.batch_stats
  theta = bo.noisy_params(jax.random.fold_in(key, 0), state.params, state.opt_state)
  (_, noisy_stats), g = value_and_grad(theta, batch, r)
  point = bo.perturbed_params(state.params, state.opt_state, g)
  (_, perturbed_stats), g_eps = value_and_grad(point, batch, r)
  (_, chained_stats), _ = value_and_grad(point, batch, noisy_stats)  # the authors' threading
  stats = {"both": chained_stats, "perturbed": perturbed_stats, "noisy": noisy_stats, "none": r}
  new = state.apply_gradients(grads=g_eps, noisy_grads=jax.tree.map(jnp.abs, g))
  return {p: new.replace(batch_stats=stats[p]) for p in POLICIES}


@pytest.fixture(scope="module")
def policy_steps():
  state, batch, key = _state(), _data(), jax.random.key(3)
  steps = {p: STEPS[p](state, batch, key) for p in POLICIES}
  return steps, _reference_steps(state, batch, key)


@pytest.mark.parametrize("bn_update", POLICIES)
def test_train_step_matches_hand_written_step_for_each_bn_policy(policy_steps, bn_update):
  steps, refs = policy_steps
  new, out = steps[bn_update]
  ref = refs[bn_update]
  _assert_trees_equal(new.params, ref.params, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(new.opt_state, ref.opt_state, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(new.batch_stats, ref.batch_stats, rtol=1e-5, atol=1e-6)
  assert isinstance(out, bo.StepInfo) and out.aux is None and out.loss.shape == () == out.second_loss.shape
  assert int(new.step) == 1


def test_bn_policies_change_only_the_statistics(policy_steps):
  results = {p: new for p, (new, _) in policy_steps[0].items()}
  for p in ("perturbed", "noisy", "none"):
    _assert_trees_equal(results[p].params, results["both"].params, rtol=1e-5, atol=1e-6)
  mean = {p: results[p].batch_stats["BatchNorm_0"]["mean"] for p in results}
  for a, b in [("both", "perturbed"), ("both", "noisy"), ("perturbed", "noisy"), ("none", "perturbed")]:
    assert not np.allclose(mean[a], mean[b]), (a, b)
  # "both" is two moving-average steps: μ² r + μ (1 − μ) b_θ + (1 − μ) b_ε, with μ = 0.8 and
  # b_θ, b_ε recovered from the one-step policies as (new − μ r) / (1 − μ).
  mu, r = 0.8, mean["none"]
  b_noisy, b_perturbed = (mean["noisy"] - mu * r) / (1 - mu), (mean["perturbed"] - mu * r) / (1 - mu)
  expected = mu**2 * r + mu * (1 - mu) * b_noisy + (1 - mu) * b_perturbed
  np.testing.assert_allclose(mean["both"], expected, rtol=1e-4, atol=1e-5)


@jax.jit
def _reference_parts(state, batch, key):
  """Per part i: its own θ_i (key fold_in(key, i)), its own ε_i, its half batch; chained statistics."""
  value_and_grad = jax.value_and_grad(_model_loss, has_aux=True)
  per_part = []
  for i in range(2):
    part = jax.tree.map(lambda x, i=i: x[i * 32 : (i + 1) * 32], batch)
    theta = bo.noisy_params(jax.random.fold_in(key, i), state.params, state.opt_state)
    (_, noisy_stats), g = value_and_grad(theta, part, state.batch_stats)
    (_, stats), _ = value_and_grad(bo.perturbed_params(state.params, state.opt_state, g), part, noisy_stats)
    per_part.append(stats)
  return jax.tree.map(lambda a, b: (a + b) / 2, *per_part)


@pytest.fixture(scope="module")
def m2_step():
  state, batch, key = _state(), _data(), jax.random.key(6)
  return state, batch, key, STEP_M2(state, batch, key)[0]


def test_m_sharpness_averages_statistics_over_parts(m2_step):
  state, batch, key, new = m2_step
  _assert_trees_equal(new.batch_stats, _reference_parts(state, batch, key), rtol=1e-5, atol=1e-6)


def test_pmap_and_mesh_match_m_parts_on_one_device(m2_step):
  state, batch, key, one = m2_step

  devices = jax.devices()[:2]
  step = jax.pmap(make_train_step(_loss, axis_name="d", apply_kwargs=TRAIN), axis_name="d", devices=devices)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
  sharded = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]), batch)
  pmapped, out = step(replicate(state), sharded, replicate(key))
  pmapped = jax.tree.map(lambda x: x[0], pmapped)
  _assert_trees_equal(pmapped.params, one.params, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(pmapped.batch_stats, one.batch_stats, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["loss"][0], out["loss"][1])

  mesh = Mesh(np.array(devices), ("d",))
  sharded_step = make_train_step(_loss, axis_name="d", mesh=mesh, apply_kwargs=TRAIN)
  meshed, _ = sharded_step(state, batch, key)
  _assert_trees_equal(meshed.params, one.params, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(meshed.batch_stats, one.batch_stats, rtol=1e-5, atol=1e-6)


def test_trains_a_batchnorm_model():
  state, batch, step = _state(), _data(), STEP_M2
  key = jax.random.key(7)
  losses = []
  for i in range(60):
    state, out = step(state, batch, jax.random.fold_in(key, i))
    losses.append(float(out["perturbed_loss"]))
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
  logits = Net().apply({"params": state.params, "batch_stats": state.batch_stats}, batch[0], train=False)
  assert float(jnp.mean(jnp.argmax(logits, -1) == batch[1])) > 0.7
  assert int(state.step) == 60


def test_model_without_batch_stats():
  x, y = _data()
  model = nn.Dense(3)
  state = TrainState.create(
    apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=bo.bsam(0.1, n_data=N_DATA)
  )
  assert state.batch_stats is None
  new, out = make_train_step(_loss, m=2)(state, (x, y), jax.random.key(1))
  assert new.batch_stats is None
  assert np.isfinite(float(out["loss"]))
  assert not np.allclose(new.params["kernel"], state.params["kernel"])


def test_bad_arguments():
  with pytest.raises(ValueError, match="bn_update"):
    make_train_step(_loss, bn_update="mean")
  with pytest.raises(ValueError, match="m must be"):
    make_train_step(_loss, m=0)
  with pytest.raises(TypeError, match="loss_fn"):
    make_train_step(None)
  step = make_train_step(_loss, m=3, apply_kwargs=TRAIN)
  with pytest.raises(ValueError, match="divisible"):
    step(_state(), _data(), jax.random.key(0))


def _aux_loss(logits, batch):
  return _loss(logits, batch), logits


def test_per_example_aux_is_concatenated_over_parts_and_devices():
  state, batch, key = _state(), _data(), jax.random.key(8)
  dict_batch = {"image": batch[0], "label": batch[1]}
  dict_loss = lambda logits, b: (_loss(logits, (b["image"], b["label"])), logits)  # noqa: E731
  one, info = make_train_step(dict_loss, m=4, has_aux=True, apply_kwargs=TRAIN)(state, dict_batch, key)
  assert info.aux.shape == (N_DATA, 3)
  # The statistics are those of the step without aux (averaged, not concatenated), and so are the params.
  plain, _ = make_train_step(_loss, m=4, apply_kwargs=TRAIN)(state, batch, key)
  _assert_trees_equal(one.batch_stats, plain.batch_stats, rtol=1e-6, atol=1e-7)
  _assert_trees_equal(one.params, plain.params, rtol=1e-6, atol=1e-7)
  # aux_reduce="mean" is the mean over the parts of the concatenated aux.
  _, mean = make_train_step(_aux_loss, m=4, has_aux=True, aux_reduce="mean", apply_kwargs=TRAIN)(state, batch, key)
  np.testing.assert_allclose(mean.aux, info.aux.reshape(4, -1, 3).mean(0), rtol=1e-5, atol=1e-6)
  devices = jax.devices()[:2]
  step = make_train_step(_aux_loss, m=2, has_aux=True, axis_name="d", apply_kwargs=TRAIN)
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)  # noqa: E731
  sharded = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]), batch)
  pmapped, out = jax.pmap(step, axis_name="d", devices=devices)(replicate(state), sharded, replicate(key))
  np.testing.assert_allclose(out.aux.reshape(N_DATA, 3), info.aux, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(jax.tree.map(lambda x: x[0], pmapped.batch_stats), one.batch_stats, rtol=1e-5, atol=1e-6)
  mesh = Mesh(np.array(devices), ("d",))
  meshed, out = make_train_step(_aux_loss, m=2, has_aux=True, axis_name="d", mesh=mesh, apply_kwargs=TRAIN)(
    state, batch, key
  )
  np.testing.assert_allclose(out.aux, info.aux, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(meshed.batch_stats, one.batch_stats, rtol=1e-5, atol=1e-6)


class DropNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(3)(nn.Dropout(0.5, deterministic=not train)(x))


def test_each_part_has_its_own_dropout_key():
  x, y = _data(32)
  x = jnp.concatenate([x[:16], x[:16]])  # two equal halves: only Dropout tells the parts apart
  params = DropNet().init(jax.random.key(0), x, train=False)["params"]
  tx = bo.bsam(0.1, n_data=1e12, rho=0.0)  # std ~ 1e-6, ρ = 0: both passes at ~ω
  state = TrainState.create(apply_fn=DropNet().apply, params=params, tx=tx)
  step = make_train_step(_aux_loss, m=2, has_aux=True, apply_kwargs=TRAIN)
  _, info = step(state, (x, y), jax.random.key(1))
  assert not np.allclose(info.aux[:16], info.aux[16:])
  np.testing.assert_array_equal(step(state, (x, y), jax.random.key(1))[1].aux, info.aux)
  replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a, a]), tree)  # noqa: E731
  pstep = make_train_step(_aux_loss, has_aux=True, axis_name="d", apply_kwargs=TRAIN)
  _, out = jax.pmap(pstep, axis_name="d", devices=jax.devices()[:2])(
    replicate(state), (x.reshape(2, 16, 4), y.reshape(2, 16)), replicate(jax.random.key(1))
  )
  np.testing.assert_allclose(out.aux.reshape(32, 3), info.aux, rtol=1e-5, atol=1e-6)


def test_flax_train_state_with_batch_stats_is_accepted():
  from typing import Any

  from flax.training import train_state

  class FlaxTrainState(train_state.TrainState):
    batch_stats: Any

  ours = _state()
  theirs = FlaxTrainState.create(apply_fn=ours.apply_fn, params=ours.params, batch_stats=ours.batch_stats, tx=TX)
  a, _ = STEPS["both"](ours, _data(), jax.random.key(3))
  b, _ = STEPS["both"](theirs, _data(), jax.random.key(3))
  assert isinstance(b, FlaxTrainState)
  _assert_trees_equal(a.params, b.params)
  _assert_trees_equal(a.batch_stats, b.batch_stats)
  # JAX compares these two states' tree structures as equal (while hashing them apart), so without the class in
  # the step's cache key a compilation for one class could now and then return the other class (this test was
  # flaky for that reason). Several classes with the same fields, alternating: each gets its own class back.
  classes = [
    type(f"FlaxTrainState{i}", (train_state.TrainState,), {"__annotations__": {"batch_stats": Any}}) for i in range(4)
  ]
  for cls in classes + [TrainState] + classes[::-1]:
    state = ours if cls is TrainState else cls.create(
      apply_fn=ours.apply_fn, params=ours.params, batch_stats=ours.batch_stats, tx=TX
    )  # fmt: skip
    assert type(STEPS["both"](state, _data(), jax.random.key(3))[0]) is cls


def test_mistakes_get_errors_that_say_what_to_do():
  state, batch, key = _state(), _data(), jax.random.key(0)
  step = make_train_step(_loss, apply_kwargs=TRAIN)
  with pytest.raises(TypeError, match="swapped"):
    step(state, key, batch)
  with pytest.raises(TypeError, match="TrainState"):
    step(state.params, batch, key)
  with pytest.raises(KeyError, match="inputs_fn"):
    step(state, {"pixels": batch[0], "label": batch[1]}, key)
  tiny = bo.bsam(0.1, n_data=2)  # n_data=len(ds) of a dict with two keys
  with pytest.raises(ValueError, match="smaller than one batch"):
    make_train_step(_loss, apply_kwargs=TRAIN)(state.replace(tx=tiny, opt_state=tiny.init(state.params)), batch, key)
  with pytest.raises(ValueError, match="aux_reduce"):
    make_train_step(_loss, has_aux=True, aux_reduce="sum")
  with pytest.raises(ValueError, match="bn_inputs"):
    state.predictive(key, batch[0], batch_stats="recompute")


def _batch_statistics(params, x):
  """BatchNorm's batch mean and (biased) variance after Net's Dense layer, by hand."""
  h = x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"]
  return h.mean(0), h.var(0)


def test_predictive_recomputes_batch_statistics_per_sample():
  state, (x, _) = _state(), _data()
  bn_inputs = x.reshape(4, 16, 4)
  kwargs = dict(apply_kwargs={"train": False}, train_kwargs=TRAIN, temperature=0.0)
  probs = state.predictive(jax.random.key(0), x, 2, batch_stats="recompute", bn_inputs=bn_inputs, **kwargs)
  stats = [_batch_statistics(state.params, b) for b in bn_inputs]
  mean, var = np.mean([s[0] for s in stats], 0), np.mean([s[1] for s in stats], 0)
  batch_stats = {"BatchNorm_0": {"mean": mean, "var": var}}
  logits = Net().apply({"params": state.params, "batch_stats": batch_stats}, x, train=False)
  np.testing.assert_allclose(probs, jax.nn.softmax(logits), rtol=1e-4, atol=1e-5)
  running = state.predictive(jax.random.key(0), x, 2, batch_stats="mean", **kwargs)
  logits = Net().apply({"params": state.params, "batch_stats": state.batch_stats}, x, train=False)
  np.testing.assert_allclose(running, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)
  samples = state.sample_posterior(jax.random.key(0), 3)
  assert jax.tree.leaves(samples)[0].shape[0] == 3


def test_rule_makes_that_methods_step():
  # rule= gives another method's step with the same model call: SAM's is bo.sam_step's, the empty rule's a plain
  # gradient step; the default stays bSAM.
  x, y = _data()
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), x)["params"]
  tx = optax.sgd(0.1, momentum=0.9)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  loss = lambda p, batch: _loss(model.apply({"params": p}, batch[0]), batch)
  for rule, reference in (
    (bo.sam_rule(rho=0.05), bo.sam_step(loss, tx, rho=0.05, m=2)),
    (bo.PerturbationRule(), bo.make_perturbation_step(loss, tx, bo.PerturbationRule(), m=2)),
  ):
    new, info = make_train_step(_loss, m=2, rule=rule)(state, (x, y), jax.random.key(1))
    expected, _, expected_info = reference(params, tx.init(params), (x, y), jax.random.key(1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new.params, expected)
    assert float(info.loss) == pytest.approx(float(expected_info.loss), rel=1e-6)
  with pytest.raises(TypeError, match="rule must be a bsam_optax.PerturbationRule"):
    make_train_step(_loss, rule="sam")


def _closure_step(key, axis_name=None):
  """Flax's train step (loss_fn(params) closing over the batch and batch_stats) with bf.value_and_grad."""

  def train_step(state, batch):
    def loss_fn(params):
      variables = {"params": params, "batch_stats": state.batch_stats}
      logits, updates = state.apply_fn(variables, batch[0], train=True, mutable=["batch_stats"])
      return _loss(logits, batch), (logits, updates)

    (loss, (logits, updates)), grads = bf.value_and_grad(loss_fn, key, has_aux=True, axis_name=axis_name)(state)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)  # Flax's ImageNet line, kept: a no-op on averaged Gradients
      updates = jax.lax.pmean(updates, axis_name)
    return state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"]), (loss, logits)

  return train_step


def test_value_and_grad_is_the_hand_written_step_with_second_pass_statistics():
  # Step t draws from fold_in(key, t): the hand-written m = 1 step with that key, statistics of the second pass.
  state, batch, key = _state(), _data(), jax.random.key(3)
  state = state.replace(step=jnp.asarray(5, jnp.int32))
  new, (loss, logits) = jax.jit(_closure_step(key))(state, batch)
  ref = _reference_steps(state, batch, jax.random.fold_in(key, 5))["perturbed"]
  _assert_trees_equal(new.params, ref.params, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(new.opt_state, ref.opt_state, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(new.batch_stats, ref.batch_stats, rtol=1e-5, atol=1e-6)
  assert int(new.step) == 6 and logits.shape == (N_DATA, 3)
  # the value is the second pass's: the loss at ω + ε
  point = bo.perturbed_params(state.params, state.opt_state, _first_gradient(state, batch, jax.random.fold_in(key, 5)))
  assert float(loss) == pytest.approx(float(_model_loss(point, batch, state.batch_stats)[0]), rel=1e-5)
  # an int seed is jax.random.key(seed)
  seeded, _ = jax.jit(_closure_step(0))(state, batch)
  keyed, _ = jax.jit(_closure_step(jax.random.key(0)))(state, batch)
  _assert_trees_equal(seeded.params, keyed.params, rtol=0, atol=0)


def _first_gradient(state, batch, key):
  theta = bo.noisy_params(jax.random.fold_in(key, 0), state.params, state.opt_state)
  return jax.grad(lambda p: _model_loss(p, batch, state.batch_stats)[0])(theta)


def test_value_and_grad_under_pmap_is_one_part_per_device():
  # D devices with one part each give make_train_step's m = D on one device (bn_update="second").
  state, batch, key = _state(), _data(), jax.random.key(4)
  devices = jax.devices()[:2]
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x, x]), tree)
  sharded = jax.tree.map(lambda x: x.reshape((2, -1) + x.shape[1:]), batch)
  step = jax.pmap(_closure_step(key, axis_name="d"), axis_name="d", devices=devices)
  pmapped, (loss, logits) = step(replicate(state), sharded)
  step_key = jax.random.fold_in(key, 0)  # step 0
  one, info = make_train_step(_loss, m=2, bn_update="second", apply_kwargs=TRAIN)(state, batch, step_key)
  pmapped = jax.tree.map(lambda x: x[0], pmapped)
  _assert_trees_equal(pmapped.params, one.params, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(pmapped.opt_state, one.opt_state, rtol=1e-5, atol=1e-6)
  _assert_trees_equal(pmapped.batch_stats, one.batch_stats, rtol=1e-5, atol=1e-6)
  assert float(loss[0]) == pytest.approx(float(info.second_loss), rel=1e-5)
  assert logits.shape == (2, N_DATA // 2, 3)  # per device, as Flax's step computes its metrics


def test_value_and_grad_errors():
  state = _state()
  with pytest.raises(TypeError, match="fun must be callable"):
    bf.value_and_grad(None, 0)
  with pytest.raises(TypeError, match="int seed"):
    bf.value_and_grad(lambda p: 0.0, "0")
  with pytest.raises(TypeError, match="PerturbationRule"):
    bf.value_and_grad(lambda p: 0.0, 0, rule="sam")
  flax_state = flax_train_state.TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=state.tx)
  loss = lambda p: jnp.sum(jax.tree.leaves(p)[0])
  with pytest.raises(TypeError, match="subclass bsam_optax.flax.TrainState"):
    bf.value_and_grad(loss, 0)(flax_state)
  with pytest.raises(TypeError, match="TrainState"):
    bf.value_and_grad(loss, 0)(state.params)


def test_predictive_defaults_for_flax_models():
  # bn_inputs alone means "recompute"; one batch shaped like the inputs is K = 1; train_kwargs is apply_kwargs with
  # train=True.
  state, (x, _) = _state(), _data()
  key, ev = jax.random.key(0), {"train": False}
  explicit = state.predictive(
    key, x, 2, apply_kwargs=ev, batch_stats="recompute", bn_inputs=x[None], train_kwargs=TRAIN
  )
  np.testing.assert_allclose(state.predictive(key, x, 2, apply_kwargs=ev, bn_inputs=x), explicit, rtol=1e-6)
  running = state.predictive(key, x, 2, apply_kwargs=ev, batch_stats="mean")
  np.testing.assert_allclose(state.predictive(key, x, 2, apply_kwargs=ev), running, rtol=1e-6)
  with pytest.raises(ValueError, match="train_kwargs"):
    state.predictive(key, x, 2, apply_kwargs={}, bn_inputs=x)
  with pytest.raises(ValueError, match="axes"):
    state.predictive(key, x, 2, apply_kwargs=ev, bn_inputs=x[None, None])


def test_recompute_batch_stats_at_the_mean():
  state, (x, _) = _state(), _data()
  new = state.recompute_batch_stats(x)
  mean, var = _batch_statistics(state.params, x)
  np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["mean"], mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new.batch_stats["BatchNorm_0"]["var"], var, rtol=1e-4, atol=1e-5)
  halves = state.recompute_batch_stats([x[:32], x[32:]])  # a list of batches: the mean of their statistics
  stats = [_batch_statistics(state.params, b) for b in (x[:32], x[32:])]
  np.testing.assert_allclose(halves.batch_stats["BatchNorm_0"]["var"], np.mean([s[1] for s in stats], 0), rtol=1e-4)
  _assert_trees_equal(new.params, state.params, rtol=0, atol=0)
  with pytest.raises(ValueError, match="empty"):
    state.recompute_batch_stats([])
