"""Tests of bsam_step: stages, m-sharpness, devices (pmap / shard_map), errors."""

import contextlib
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import bsam_optax as bo

N_DEVICES = 8


def loss_fn(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = h @ params["w2"]
  return jnp.mean((pred[:, 0] - batch["y"]) ** 2)


def _problem(batch_size=16, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  params = {
    "w1": jax.random.normal(k[0], (5, 8)) * 0.5,
    "b1": jnp.zeros(8),
    "w2": jax.random.normal(k[1], (8, 1)) * 0.5,
  }
  batch = {"x": jax.random.normal(k[2], (batch_size, 5)), "y": jax.random.normal(k[3], (batch_size,))}
  return params, batch


def _tx():
  return bo.bsam(0.05, n_data=100, rho=0.1, weight_decay=1e-3)


def _manual_step(params, state, batch, key, tx, m, offset=0):
  """bSAM with m-sharpness written out with the public stages, part by part."""
  size = batch["y"].shape[0] // m
  g_eps_parts, abs_g_parts = [], []
  for i in range(m):
    part = jax.tree.map(lambda x, i=i: x[i * size : (i + 1) * size], batch)
    theta = bo.noisy_params(jax.random.fold_in(key, offset + i), params, state)
    g = jax.grad(loss_fn)(theta, part)
    g_eps = jax.grad(loss_fn)(bo.perturbed_params(params, state, g), part)
    g_eps_parts.append(g_eps)
    abs_g_parts.append(jax.tree.map(jnp.abs, g))
  mean = lambda trees: jax.tree.map(lambda *xs: sum(xs) / len(xs), *trees)  # noqa: E731
  updates, state = tx.update(mean(g_eps_parts), state, params, noisy_grads=mean(abs_g_parts))
  return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("m", [1, 2, 4])
def test_step_matches_the_stages_written_out(m):
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)
  key = jax.random.key(7)
  step = bo.bsam_step(loss_fn, tx, m=m)
  p_step, s_step, out = step(params, state, batch, key)
  p_ref, s_ref = _manual_step(params, state, batch, key, tx, m)
  chex.assert_trees_all_close(p_step, p_ref, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s_step, s_ref, rtol=1e-5, atol=1e-6)
  assert out["loss"].shape == () and out["perturbed_loss"].shape == ()


def test_parts_draw_independent_noise():
  params, _ = _problem()
  state = _tx().init(params)
  key = jax.random.key(0)
  thetas = [bo.noisy_params(jax.random.fold_in(key, i), params, state) for i in range(4)]
  flat = np.stack([np.concatenate([np.ravel(t[k] - params[k]) for k in sorted(params)]) for t in thetas])
  corr = np.corrcoef(flat)
  off_diag = corr[~np.eye(4, dtype=bool)]
  assert np.all(np.abs(off_diag) < 5 / np.sqrt(flat.shape[1]))
  # And the step really uses them: identical parts with shared noise would give
  # the m=1 result; independent noise gives something else.
  params, batch = _problem(batch_size=8)
  doubled = jax.tree.map(lambda x: jnp.concatenate([x, x]), batch)
  p1, _, _ = bo.bsam_step(loss_fn, _tx(), m=1)(params, state, batch, key)
  p2, _, _ = bo.bsam_step(loss_fn, _tx(), m=2)(params, state, doubled, key)
  assert not np.allclose(p1["w1"], p2["w1"], atol=1e-7)


def test_same_key_same_result_different_key_differs():
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)
  step = bo.bsam_step(loss_fn, tx, m=2)
  a = step(params, state, batch, jax.random.key(1))
  b = step(params, state, batch, jax.random.key(1))
  c = step(params, state, batch, jax.random.key(2))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a[0]["w1"], c[0]["w1"])


@pytest.mark.parametrize("split", ["scan", "unroll"])
@pytest.mark.parametrize("m", [2, 4])
def test_scan_equals_vmap(m, split):
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)
  key = jax.random.key(3)
  a = bo.bsam_step(loss_fn, tx, m=m, split="vmap")(params, state, batch, key)
  b = bo.bsam_step(loss_fn, tx, m=m, split=split)(params, state, batch, key)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_has_aux_is_averaged_over_parts():
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)

  def loss_with_aux(p, b):
    return loss_fn(p, b), {"batch_mean": jnp.mean(b["x"], axis=0), "perturbed": p["b1"]}

  for aux_from in ("noisy", "perturbed"):
    step = bo.bsam_step(loss_with_aux, tx, m=4, has_aux=True, aux_from=aux_from)
    _, _, out = step(params, state, batch, jax.random.key(0))
    np.testing.assert_allclose(out["aux"]["batch_mean"], jnp.mean(batch["x"], axis=0), rtol=1e-5, atol=1e-6)
  # The aux of the noisy pass sees θ, the perturbed pass sees ω + ε.
  theta0 = bo.noisy_params(jax.random.fold_in(jax.random.key(0), 0), params, state)
  _, _, out = bo.bsam_step(loss_with_aux, tx, m=1, has_aux=True, aux_from="noisy")(
    params, state, batch, jax.random.key(0)
  )
  np.testing.assert_allclose(out["aux"]["perturbed"], theta0["b1"], rtol=1e-6)


def test_loss_args_reach_every_part_unsplit():
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)
  step = bo.bsam_step(lambda p, b, scale: scale * loss_fn(p, b), tx, m=2)
  _, _, out1 = step(params, state, batch, jax.random.key(0), 1.0)
  _, _, out3 = step(params, state, batch, jax.random.key(0), 3.0)
  np.testing.assert_allclose(out3["loss"], 3 * out1["loss"], rtol=1e-6)


def test_no_recompilation_across_steps():
  params, batch = _problem()
  tx = optax.chain(optax.clip_by_global_norm(1.0), _tx())
  state = tx.init(params)
  step = bo.bsam_step(loss_fn, tx, m=2)
  for i in range(3):
    params, state, _ = step(params, state, batch, jax.random.fold_in(jax.random.key(0), i))
  assert step._cache_size() == 1


def test_donation_gives_the_same_result():
  params, batch = _problem()
  tx = _tx()
  state = tx.init(params)
  expected = bo.bsam_step(loss_fn, tx, m=2)(params, state, batch, jax.random.key(0))
  copy = jax.tree.map(jnp.array, (params, state))
  got = bo.bsam_step(loss_fn, tx, m=2, donate=True)(*copy, batch, jax.random.key(0))
  chex.assert_trees_all_equal(expected, got)


def test_training_reduces_the_loss():
  params, batch = _problem(batch_size=64)
  tx = bo.bsam(0.05, n_data=64, rho=0.01)
  state = tx.init(params)
  step = bo.bsam_step(loss_fn, tx, m=2)
  first = float(loss_fn(params, batch))
  for i in range(300):
    params, state, _ = step(params, state, batch, jax.random.fold_in(jax.random.key(0), i))
  assert float(loss_fn(params, batch)) < 0.5 * first


# -- devices ---------------------------------------------------------------


def _replicate(tree, n):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def _shard(batch, n):
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


def test_eight_simulated_devices_are_available():
  assert jax.device_count() >= N_DEVICES, "tests/conftest.py must set XLA_FLAGS before JAX is imported"


@pytest.mark.parametrize("devices,m_local", [(8, 1), (4, 2), (2, 4)])
def test_pmap_equals_vmap(devices, m_local):
  params, batch = _problem(batch_size=32)
  tx = _tx()
  state = tx.init(params)
  key = jax.random.key(11)
  p_ref, s_ref, out_ref = bo.bsam_step(loss_fn, tx, m=devices * m_local)(params, state, batch, key)
  step = jax.pmap(bo.bsam_step(loss_fn, tx, m=m_local, axis_name="d"), axis_name="d", devices=jax.devices()[:devices])
  p, s, out = step(
    _replicate(params, devices), _replicate(state, devices), _shard(batch, devices), _replicate(key, devices)
  )
  for i in range(devices):  # replicas stay identical ...
    chex.assert_trees_all_equal(jax.tree.map(lambda x, i=i: x[i], (p, s)), jax.tree.map(lambda x: x[0], (p, s)))
  # ... and equal the single-device m = devices * m_local step.
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[0], (p, s)), (p_ref, s_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out["loss"][0], out_ref["loss"], rtol=1e-5)


@pytest.mark.parametrize("devices,m_local", [(8, 1), (4, 2)])
def test_shard_map_equals_vmap(devices, m_local):
  params, batch = _problem(batch_size=32)
  tx = _tx()
  state = tx.init(params)
  key = jax.random.key(11)
  p_ref, s_ref, _ = bo.bsam_step(loss_fn, tx, m=devices * m_local)(params, state, batch, key)
  mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
  step = bo.bsam_step(loss_fn, tx, m=m_local, axis_name="data", mesh=mesh)
  p, s, _ = step(params, state, batch, key)
  chex.assert_trees_all_close((p, s), (p_ref, s_ref), rtol=1e-5, atol=1e-6)
  # Placed on the mesh (replicated state, sharded batch), several steps compile once.
  replicated, sharded = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
  p, s = jax.device_put((params, state), replicated)
  batch = jax.device_put(batch, sharded)
  p, s, _ = step(p, s, batch, jax.device_put(key, replicated))
  compiled = step._cache_size()
  for i in range(2):
    p, s, _ = step(p, s, batch, jax.device_put(jax.random.fold_in(key, i), replicated))
  assert step._cache_size() == compiled
  assert p["w1"].sharding.is_fully_replicated


# -- bad input -------------------------------------------------------------


@pytest.mark.parametrize("m,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_m(m, error):
  with pytest.raises(error, match="m must"):
    bo.bsam_step(loss_fn, _tx(), m=m)


def test_batch_not_divisible_by_m_names_both_numbers():
  params, batch = _problem(batch_size=10)
  tx = _tx()
  step = bo.bsam_step(loss_fn, tx, m=4)
  with pytest.raises(ValueError, match=r"batch size 10 is not divisible by m=4"):
    step(params, tx.init(params), batch, jax.random.key(0))


def test_batch_leaves_with_different_sizes():
  params, batch = _problem(batch_size=8)
  batch["y"] = batch["y"][:6]
  tx = _tx()
  with pytest.raises(ValueError, match="leading batch size"):
    bo.bsam_step(loss_fn, tx)(params, tx.init(params), batch, jax.random.key(0))


def test_mesh_batch_not_divisible_by_devices():
  params, batch = _problem(batch_size=12)
  tx = _tx()
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  step = bo.bsam_step(loss_fn, tx, axis_name="data", mesh=mesh)
  with pytest.raises(ValueError, match=r"global batch size 12 .* 8 devices"):
    step(params, tx.init(params), batch, jax.random.key(0))


def test_mesh_axis_errors():
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  with pytest.raises(ValueError, match="axis_name"):
    bo.bsam_step(loss_fn, _tx(), mesh=mesh)
  with pytest.raises(ValueError, match="not an axis"):
    bo.bsam_step(loss_fn, _tx(), axis_name="model", mesh=mesh)


def test_axis_name_without_pmap_is_explained():
  params, batch = _problem()
  tx = _tx()
  step = jax.jit(bo.bsam_step(loss_fn, tx, axis_name="d"))
  with pytest.raises(ValueError, match="jax.pmap"):
    step(params, tx.init(params), batch, jax.random.key(0))


def test_bad_step_arguments():
  with pytest.raises(TypeError, match="loss_fn"):
    bo.bsam_step("not a function", _tx())
  with pytest.raises(TypeError, match="tx"):
    bo.bsam_step(loss_fn, lambda x: x)
  with pytest.raises(ValueError, match="aux_from"):
    bo.bsam_step(loss_fn, _tx(), aux_from="both")
  with pytest.raises(ValueError, match="split"):
    bo.bsam_step(loss_fn, _tx(), m=2, split="loop")


def test_step_without_bsam_in_tx():
  params, batch = _problem()
  tx = optax.adam(0.1)
  with pytest.raises(ValueError, match="BSAMState"):
    bo.bsam_step(loss_fn, tx)(params, tx.init(params), batch, jax.random.key(0))


# --- the builder: rules as values, typed results, one option list -------------------------------------------


def test_a_custom_rule_is_a_value_and_gets_the_builders_parts_and_update_args():
  params, batch = _problem()

  class Recorder(NamedTuple):
    count: jax.Array
    first_grads: dict

  def update_args(params, opt_state, x, g):
    return {"first_grads": g}

  def tx_update(updates, state, params=None, *, first_grads):
    return jax.tree.map(jnp.zeros_like, updates), Recorder(state.count + 1, first_grads)

  tx = optax.GradientTransformationExtraArgs(
    lambda p: Recorder(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, p)), tx_update
  )
  rule = bo.PerturbationRule(
    second_point=lambda p, s, g: jax.tree.map(lambda w, gi: w + 0.1 * gi, p, g), update_args=update_args
  )
  step = bo.make_perturbation_step(loss_fn, tx, rule, m=2)
  _, state, info = step(params, tx.init(params), batch, jax.random.key(0))
  half = jax.tree.map(lambda x: x[:8], batch), jax.tree.map(lambda x: x[8:], batch)
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *[jax.grad(loss_fn)(params, h) for h in half])
  chex.assert_trees_all_close(state.first_grads, expected, rtol=1e-5, atol=1e-6)
  assert int(state.count) == 1
  assert isinstance(info, bo.StepInfo)
  np.testing.assert_allclose(info.loss, loss_fn(params, batch), rtol=1e-6)


def test_step_info_is_typed_and_answers_the_earlier_keys():
  params, batch = _problem()
  tx = _tx()
  _, _, info = bo.bsam_step(loss_fn, tx, m=2)(params, tx.init(params), batch, jax.random.key(0))
  assert info.aux is None
  assert info["loss"] is info.loss and info["perturbed_loss"] is info.second_loss
  loss, second_loss, aux = info
  with pytest.raises(KeyError, match="second_loss"):
    info["grads"]


def _per_example_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  pred = (h @ params["w2"])[:, 0]
  return jnp.mean((pred - batch["y"]) ** 2), pred


@pytest.mark.parametrize("split", ["vmap", "scan", "unroll"])
def test_aux_concat_returns_per_example_outputs_in_batch_order(split):
  params, batch = _problem()
  tx = optax.sgd(0.0)
  step = bo.sam_step(
    _per_example_loss, tx, rho=0.0, m=4, has_aux=True, aux_from="first", aux_reduce="concat", split=split
  )
  _, _, info = step(params, tx.init(params), batch, jax.random.key(0))
  assert info.aux.shape == (16,)
  np.testing.assert_allclose(info.aux, _per_example_loss(params, batch)[1], rtol=1e-5, atol=1e-6)


def test_aux_concat_across_devices_on_a_mesh():
  params, batch = _problem()
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  tx = optax.sgd(0.0)
  step = bo.sam_step(
    _per_example_loss,
    tx,
    rho=0.0,
    m=2,
    axis_name="data",
    mesh=mesh,
    has_aux=True,
    aux_from="first",
    aux_reduce="concat",
  )
  _, _, info = step(params, tx.init(params), batch, jax.random.key(0))
  np.testing.assert_allclose(info.aux, _per_example_loss(params, batch)[1], rtol=1e-5, atol=1e-6)


def test_options_are_checked_in_one_place_and_name_the_argument():
  params, _ = _problem()
  with pytest.raises(TypeError, match="unexpected keyword argument 'mm'"):
    bo.bsam_step(loss_fn, _tx(), mm=2)
  with pytest.raises(TypeError, match="rule must be a bsam_optax.PerturbationRule"):
    bo.make_perturbation_step(loss_fn, _tx(), lambda *a: a)
  with pytest.raises(ValueError, match="aux_reduce"):
    bo.sam_step(loss_fn, optax.sgd(0.1), rho=0.1, aux_reduce="sum")
  with pytest.raises(TypeError, match="has_aux must be a bool"):
    bo.sam_step(loss_fn, optax.sgd(0.1), rho=0.1, has_aux=1)
  with pytest.raises(TypeError, match="donate="):
    bo.perturbation_gradients(loss_fn, bo.bsam_rule(), donate=True)


# --- sharded parameters (tensor parallel over a 'model' axis, the batch over 'data') ---------------------------

PARAM_SPECS = {"w1": PartitionSpec(None, "model"), "b1": PartitionSpec("model"), "w2": PartitionSpec("model", None)}


def _tp_loss(params, batch):
  # An explicit-sharding-friendly MLP: the contraction over the sharded hidden axis is a sum (one all-reduce).
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean((jnp.sum(h * params["w2"][:, 0], axis=-1) - batch["y"]) ** 2)


def _sharded_problem(mesh, tx):
  params, batch = _problem(batch_size=32)
  state = tx.init(params)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  sharded_params = jax.tree.map(put, params, PARAM_SPECS)
  sharded_state = optax.tree_map_params(
    tx, put, state, PARAM_SPECS, transform_non_params=lambda x: put(x, PartitionSpec())
  )
  sharded_batch = jax.tree.map(lambda x: put(x, PartitionSpec("data")), batch)
  return (params, state, batch), (sharded_params, sharded_state, sharded_batch)


def _specs(tree):
  return jax.tree.map(lambda x: tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec)), tree)


@pytest.mark.parametrize("path", ["jit", "mesh"])
def test_the_sam_family_keeps_sharded_parameters_sharded_too(path):
  mesh = jax.make_mesh((4, 2), ("data", "model"), devices=jax.devices()[:8])
  tx = optax.adam(1e-2)
  (params, state, batch), (sp, ss, sb) = _sharded_problem(mesh, tx)
  ref_params, ref_state, _ = bo.sam_step(_tp_loss, tx, rho=0.1, m=4)(params, state, batch, jax.random.key(0))
  if path == "jit":
    step = jax.jit(bo.sam_step(_tp_loss, tx, rho=0.1, m=4))
  else:
    step = bo.sam_step(_tp_loss, tx, rho=0.1, m=1, axis_name="data", mesh=mesh)
  with jax.set_mesh(mesh):
    new_params, new_state, _ = step(sp, ss, sb, jax.random.key(0))
  chex.assert_trees_all_close(new_params, ref_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5, atol=1e-6)
  assert _specs(new_params) == _specs(sp)
  assert _specs(new_state[0].mu) == _specs(new_state[0].nu) == _specs(sp)


@pytest.mark.parametrize("path", ["jit", "mesh"])
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_parameters_stay_sharded_and_equal_one_device(path, axis_type):
  from jax.sharding import AxisType

  kind = AxisType.Auto if axis_type == "auto" else AxisType.Explicit
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind), devices=jax.devices()[:8])
  tx = bo.bsam(0.05, n_data=100, rho=0.1, weight_decay=1e-3)
  (params, state, batch), (sp, ss, sb) = _sharded_problem(mesh, tx)
  key = jax.random.key(3)
  ref_params, ref_state, ref_info = bo.bsam_step(_tp_loss, tx, m=4)(params, state, batch, key)
  if path == "jit":
    step = jax.jit(bo.bsam_step(_tp_loss, tx, m=4))
  else:
    step = bo.bsam_step(_tp_loss, tx, m=1, axis_name="data", mesh=mesh)  # 4 devices x 1 part = m=4
  with jax.set_mesh(mesh) if axis_type == "explicit" else contextlib.nullcontext():
    new_params, new_state, info = step(sp, ss, sb, key)
    hlo = step.lower(sp, ss, sb, key).compile().as_text()
  chex.assert_trees_all_close(new_params, ref_params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new_state, ref_state, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(info.loss, ref_info.loss, rtol=1e-5)
  # Every leaf keeps the layout it came in: no device holds a whole sharded leaf.
  assert _specs(new_params) == _specs(sp)
  bsam_in, bsam_out = bo.find_bsam_state(ss), bo.find_bsam_state(new_state)
  assert _specs(bsam_out.scale) == _specs(bsam_in.scale) == _specs(sp)
  assert _specs(bsam_out.momentum) == _specs(sp)
  assert "all-gather" not in hlo  # the noise is drawn, and the parameters used, where the shards live


def test_split_one_part_at_a_time_under_explicit_sharding_is_a_clear_error():
  from jax.sharding import AxisType

  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2, devices=jax.devices()[:8])
  tx = bo.bsam(0.05, n_data=100)
  _, (sp, ss, sb) = _sharded_problem(mesh, tx)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="split='scan' takes the parts one at a time"):
    jax.jit(bo.bsam_step(_tp_loss, tx, m=4, split="scan"))(sp, ss, sb, jax.random.key(0))


# --- split="auto": the step picks the split from the problem ------------------------------------------------


def _mlp_loss(params, batch):
  h = batch["x"]
  for w, b in params[:-1]:
    h = jax.nn.relu(h @ w + b)
  w, b = params[-1]
  return optax.softmax_cross_entropy_with_integer_labels(h @ w + b, batch["y"]).mean()


def _mlp_problem(widths=(256, 512, 256, 10), batch_size=64):
  keys = jax.random.split(jax.random.key(5), len(widths))
  params = [
    (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
    for k, a, b in zip(keys[:-1], widths[:-1], widths[1:], strict=True)
  ]
  batch = {
    "x": jax.random.normal(keys[-1], (batch_size, widths[0])),
    "y": jnp.arange(batch_size) % widths[-1],
  }
  return params, batch


def _conv_loss(params, batch):
  h = jax.lax.conv_general_dilated(batch["x"], params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean((jnp.mean(jnp.tanh(h), axis=(1, 2, 3)) - batch["y"]) ** 2)


def _conv_problem(batch_size=16):
  k = jax.random.split(jax.random.key(6), 3)
  params = {"k": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3}
  batch = {"x": jax.random.normal(k[1], (batch_size, 6, 6, 2)), "y": jax.random.normal(k[2], (batch_size,))}
  return params, batch


def test_auto_is_the_default_and_picks_scan_for_a_large_mlp_and_vmap_for_convolutions_and_small_problems():
  assert bo.StepOptions().split == "auto"
  params, batch = _mlp_problem()
  assert bo.choose_split(_mlp_loss, params, batch, m=8) == "scan"
  assert bo.choose_split(_mlp_loss, params, batch, m=1) == "vmap"
  conv_params, conv_batch = _conv_problem()
  assert bo.choose_split(_conv_loss, conv_params, conv_batch, m=4) == "vmap"
  # A convolution inside a nested jit and remat is found too.
  nested = jax.jit(jax.checkpoint(lambda p, b: _conv_loss(p, b) + 0.0 * _mlp_loss(params, batch)))
  assert bo.choose_split(nested, conv_params, conv_batch, m=4) == "vmap"
  small_params, small_batch = _problem()
  assert bo.choose_split(loss_fn, small_params, small_batch, m=4) == "vmap"
  # Shapes are enough.
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert bo.choose_split(_mlp_loss, shapes, batch, m=8) == "scan"


def test_auto_says_what_it_picked(caplog):
  params, batch = _mlp_problem()
  tx = _tx()
  with caplog.at_level("INFO", logger="bsam_optax"):
    bo.bsam_step(_mlp_loss, tx, m=8).lower(params, tx.init(params), batch, jax.random.key(0))
  assert "split='auto' picked split='scan' for m=8" in caplog.text


@pytest.mark.parametrize("problem", ["mlp", "conv"])
def test_auto_equals_the_split_it_picks(problem):
  loss, (params, batch), picked = {
    "mlp": (_mlp_loss, _mlp_problem(), "scan"),
    "conv": (_conv_loss, _conv_problem(), "vmap"),
  }[problem]
  tx = _tx()
  state = tx.init(params)
  key = jax.random.key(4)
  a = bo.bsam_step(loss, tx, m=8)(params, state, batch, key)
  b = bo.bsam_step(loss, tx, m=8, split=picked)(params, state, batch, key)
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
  other = "vmap" if picked == "scan" else "scan"
  c = bo.bsam_step(loss, tx, m=8, split=other)(params, state, batch, key)
  chex.assert_trees_all_close(a, c, rtol=1e-4, atol=1e-5)


def _peak_bytes(compiled):
  mem = compiled.memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def test_default_step_peak_memory_at_m8_is_within_adam_plus_one_parameter_buffer_per_part():
  params, batch = _mlp_problem()
  p_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  adam = optax.adam(1e-3)

  def adam_step(p, s, b):
    updates, s = adam.update(jax.grad(_mlp_loss)(p, b), s, p)
    return optax.apply_updates(p, updates), s

  adam_peak = _peak_bytes(jax.jit(adam_step, donate_argnums=(0, 1)).lower(params, adam.init(params), batch).compile())
  tx = _tx()
  key = jax.random.key(0)
  step = bo.bsam_step(_mlp_loss, tx, m=8, donate=True)
  peak = _peak_bytes(step.lower(params, tx.init(params), batch, key).compile())
  assert peak <= adam_peak + 8 * p_bytes, (peak - adam_peak) / p_bytes
  vmap_peak = _peak_bytes(
    bo.bsam_step(_mlp_loss, tx, m=8, donate=True, split="vmap").lower(params, tx.init(params), batch, key).compile()
  )
  assert peak < vmap_peak
