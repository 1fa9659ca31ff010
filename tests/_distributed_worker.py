"""One process of the multi-process tests in test_distributed.py (run as a script).

``python _distributed_worker.py train --coordinator H:P --num-processes 2 --process-id I --out DIR``
joins the run, trains :func:`problem` for a few bSAM steps over a global mesh
(m=1 per device), saves params and optimizer state with orbax (all processes
write their share of one checkpoint), restores it onto the same mesh and checks
it, and (process 0) writes the final arrays to ``DIR/result.npz``; then the
same for the baseline :func:`random_sam` (``DIR/random_sam.npz``, no checkpoint).
``... sharded ...`` trains the same on a (data=2, model=2) mesh with the
parameters and bSAM's state sharded over ``model`` (tensor parallel), checks
that every leaf stays sharded, saves the sharded state with orbax and restores
it into the same layout and into a replicated one, and (process 0) writes
``DIR/sharded.npz``. ``... init ...`` only joins the run (for the error tests).

The test imports :func:`problem` and :func:`global_batches` for its
single-process references, so both sides train the same thing.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

STEPS = 3
GLOBAL_BATCH = 16
N_DATA = 64
SEED = 0


def problem():
  """A tiny tanh MLP regression: (loss_fn, tx, params, key)."""
  import bsam_optax as bo

  def loss_fn(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)

  k_w1, k_w2 = jax.random.split(jax.random.key(SEED + 1))
  params = {
    "w1": 0.5 * jax.random.normal(k_w1, (5, 8)),
    "b1": jnp.zeros(8),
    "w2": 0.5 * jax.random.normal(k_w2, (8, 1)),
  }
  tx = bo.bsam(0.05, n_data=N_DATA, rho=0.05)
  return loss_fn, tx, params, jax.random.key(SEED)


def random_sam(loss_fn, **step_kwargs):
  """A baseline through the same machinery: RandomSAM (noise from the per-part keys) with SGD."""
  import optax

  import bsam_optax as bo

  tx = optax.sgd(0.1)
  return tx, bo.random_sam_step(loss_fn, tx, sigma=0.05, **step_kwargs)


def global_batches():
  """The same STEPS global batches in every process (numpy, no device)."""
  rng = np.random.default_rng(SEED)
  x = rng.normal(size=(STEPS, GLOBAL_BATCH, 5)).astype(np.float32)
  y = np.sin(x.sum(-1, keepdims=True)).astype(np.float32)
  return [{"x": x[t], "y": y[t]} for t in range(STEPS)]


def result_arrays(params, state):
  """The arrays the test compares, as a flat dict of numpy arrays."""
  import bsam_optax as bo

  bsam_state = bo.find_bsam_state(state)
  out = {"count": np.asarray(bsam_state.count)}
  for name in params:
    out[f"params/{name}"] = np.asarray(params[name])
    out[f"scale/{name}"] = np.asarray(bsam_state.scale[name])
    out[f"momentum/{name}"] = np.asarray(bsam_state.momentum[name])
  return out


def _train(args) -> None:
  import orbax.checkpoint as ocp

  import bsam_optax as bo
  import bsam_optax.distributed as dist

  mesh = dist.data_mesh("data")
  pid, nproc = jax.process_index(), jax.process_count()
  assert nproc == args.num_processes and mesh.size == 4, (nproc, mesh)
  loss_fn, tx, params, key = problem()
  params, state = dist.replicate((params, tx.init(params)), mesh)
  step = bo.bsam_step(loss_fn, tx, m=1, axis_name="data", mesh=mesh)
  rows = GLOBAL_BATCH // nproc
  for t, batch in enumerate(global_batches()):
    local = jax.tree.map(lambda x: x[pid * rows : (pid + 1) * rows], batch)
    sharded = dist.shard_batch(local, mesh, "data")
    if t == 0:  # the global batch held whole by every process shards the same way
      other = dist.shard_global_batch(batch, mesh, "data")
      for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(other), strict=True):
        assert a.sharding == b.sharding and np.array_equal(dist.to_host(a), dist.to_host(b))
    params, state, _ = step(params, state, sharded, jax.random.fold_in(key, t))

  # every process writes its share of one checkpoint; orbax syncs the processes
  path = os.path.join(os.path.abspath(args.out), "checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  restored = checkpointer.restore(path, abstract)
  expected = {"params": params, "opt_state": state}
  same = jax.tree.map(lambda a, b: bool(np.array_equal(dist.to_host(a), dist.to_host(b))), restored, expected)
  assert all(jax.tree.leaves(same)), same
  assert jax.tree.structure(restored) == jax.tree.structure(expected), jax.tree.structure(restored)
  assert all(
    r.sharding == e.sharding for r, e in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), strict=True)
  )

  host = result_arrays(dist.to_host(params), dist.to_host(state))
  if pid == 0:
    np.savez(os.path.join(args.out, "result.npz"), **host)

  _, _, params, _ = problem()
  tx, step = random_sam(loss_fn, m=1, axis_name="data", mesh=mesh)
  params, state = dist.replicate((params, tx.init(params)), mesh)
  for t, batch in enumerate(global_batches()):
    local = jax.tree.map(lambda x: x[pid * rows : (pid + 1) * rows], batch)
    params, state, _ = step(params, state, dist.shard_batch(local, mesh, "data"), jax.random.fold_in(key, t))
  if pid == 0:
    np.savez(os.path.join(args.out, "random_sam.npz"), **dist.to_host(params))
  print(f"process {pid}: done", flush=True)


def param_specs():
  """Tensor parallel over 'model': no device holds a whole leaf."""
  from jax.sharding import PartitionSpec

  return {"w1": PartitionSpec(None, "model"), "b1": PartitionSpec("model"), "w2": PartitionSpec("model", None)}


def _put(host, sharding):
  """A global array from a host value every process holds (each process places its devices' shards)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _sharded(args) -> None:
  import optax
  import orbax.checkpoint as ocp
  from jax.sharding import AxisType
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec

  import bsam_optax as bo
  import bsam_optax.distributed as dist

  mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
  pid = jax.process_index()
  loss_fn, tx, params, key = problem()
  specs = param_specs()
  place = lambda x, spec: _put(x, NamedSharding(mesh, spec))  # noqa: E731
  state = optax.tree_map_params(
    tx, place, tx.init(params), specs, transform_non_params=lambda x: place(x, PartitionSpec())
  )
  params = jax.tree.map(place, params, specs)
  step = bo.bsam_step(loss_fn, tx, m=1, axis_name="data", mesh=mesh)  # 2 data devices x m=1 = 2 parts
  for t, batch in enumerate(global_batches()):
    params, state, _ = step(params, state, dist.shard_global_batch(batch, mesh, "data"), jax.random.fold_in(key, t))

  bsam_state = bo.find_bsam_state(state)
  for tree in (params, bsam_state.momentum, bsam_state.scale):
    for name, x in tree.items():
      assert x.sharding.is_equivalent_to(NamedSharding(mesh, specs[name]), x.ndim), (name, x.sharding)
      # each device holds half of the hidden axis of every leaf
      assert all(s.data.size * 2 == x.size for s in x.addressable_shards), (name, x.shape)

  path = os.path.join(os.path.abspath(args.out), "sharded_checkpoint")
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  expected = dist.to_host({"params": params, "opt_state": state})
  same_layout = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": params, "opt_state": state})
  replicated = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, PartitionSpec())), same_layout
  )
  for target in (same_layout, replicated):
    restored = checkpointer.restore(path, target)
    assert all(
      r.sharding == t.sharding for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target), strict=True)
    )
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), dist.to_host(restored), expected)
    assert all(jax.tree.leaves(same)), same

  host = result_arrays(dist.to_host(params), dist.to_host(state))
  if pid == 0:
    np.savez(os.path.join(args.out, "sharded.npz"), **host)
  print(f"process {pid}: sharded done", flush=True)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "sharded", "init"])
  parser.add_argument("--coordinator", required=True)
  parser.add_argument("--num-processes", type=int, required=True)
  parser.add_argument("--process-id", type=int, required=True)
  parser.add_argument("--timeout", type=float, default=30.0)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)

  import bsam_optax.distributed as dist

  dist.initialize(
    args.coordinator,
    args.num_processes,
    args.process_id,
    timeout_s=args.timeout,
    heartbeat_timeout_s=10,
    shutdown_timeout_s=10,
  )
  if args.mode == "init":
    print(f"process {args.process_id}: joined, {jax.process_count()} processes", flush=True)
    return
  if args.mode == "sharded":
    _sharded(args)
    return
  _train(args)


if __name__ == "__main__":
  sys.exit(main())
