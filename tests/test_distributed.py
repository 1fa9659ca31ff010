"""Tests for bsam_optax.distributed: bSAM across real processes (jax.distributed, gloo on CPU).

The multi-process tests launch ``tests/_distributed_worker.py`` as child
processes, each with 2 simulated CPU devices and its own environment (this
test process has 8, see conftest.py), joined through a coordinator on
127.0.0.1. Every child runs under a timeout and is killed on failure.
"""

import argparse
import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import time

import _distributed_worker as worker
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

import bsam_optax as bo
import bsam_optax.distributed as dist
from bsam_optax import app

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")
# float32; the processes' pmean sums the devices' gradients in another order
RTOL = ATOL = 1e-6
RUN_TIMEOUT_S = 300  # seconds; 20-40 s on an idle 2-core machine, several minutes when it is shared


def _gloo_available() -> bool:
  from jax._src.lib import _jax

  return hasattr(_jax, "make_gloo_tcp_collectives")


pytestmark = pytest.mark.skipif(
  not _gloo_available(), reason="this jaxlib has no gloo CPU collectives: processes cannot meet on CPU"
)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _child_env() -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_"))}
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _run(tmp_path, commands, timeout_s, program=(sys.executable, WORKER)):
  """Runs ``program`` with each of the commands side by side; returns [(returncode, output)], killing all on timeout."""
  procs, logs = [], []
  try:
    for i, args in enumerate(commands):
      log = open(tmp_path / f"process_{i}.log", "w+")
      logs.append(log)
      procs.append(subprocess.Popen([*program, *args], env=_child_env(), stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout_s
    for proc in procs:
      proc.wait(timeout=max(0.1, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    pytest.fail(f"processes still running after {timeout_s} s: {_outputs(procs, logs)}")
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  results = list(zip([p.returncode for p in procs], _outputs(procs, logs), strict=True))
  for log in logs:
    log.close()
  return results


def _outputs(procs, logs):
  outs = []
  for log in logs:
    log.flush()
    log.seek(0)
    # drop the C++ stack frames of a fatal error; keep the messages
    outs.append("\n".join(line for line in log.read().splitlines() if not line.startswith("    @ ")))
  return outs


def _args(mode, port, num_processes, process_id, *extra):
  return [mode, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes)] + [
    "--process-id",
    str(process_id),
    *extra,
  ]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes x 2 devices train worker.problem() over a 4-device mesh, m=1; checkpoint included."""
  out = tmp_path_factory.mktemp("two_processes")
  port = _free_port()
  start = time.monotonic()
  results = _run(out, [_args("train", port, 2, i, "--out", str(out)) for i in range(2)], RUN_TIMEOUT_S)
  elapsed = time.monotonic() - start
  for i, (code, text) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{text[-4000:]}"
    assert f"process {i}: done" in text
  print(f"two-process run: {elapsed:.1f} s")
  return out, dict(np.load(out / "result.npz")), dict(np.load(out / "random_sam.npz"))


@functools.cache
def _problem():
  return worker.problem()


@functools.cache
def _step(m, num_devices=None):
  loss_fn, tx, _, _ = _problem()
  if num_devices is None:
    return bo.bsam_step(loss_fn, tx, m=m)
  return bo.bsam_step(loss_fn, tx, m=m, axis_name="data", mesh=dist.data_mesh("data", jax.devices()[:num_devices]))


def _train_here(m, num_devices=None, batches=None):
  _, tx, params, key = _problem()
  state = tx.init(params)
  step = _step(m, num_devices)
  for t, batch in enumerate(worker.global_batches() if batches is None else batches):
    params, state, _ = step(params, state, batch, jax.random.fold_in(key, t))
  return params, state


def _assert_close(result, reference):
  assert result.keys() == reference.keys()
  diffs = {name: float(np.max(np.abs(result[name] - reference[name]))) for name in result}
  print("max abs diff:", max(diffs.values()), diffs)
  for name in result:
    np.testing.assert_allclose(result[name], reference[name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_two_processes_equal_one_process_with_four_devices(two_process_run):
  _, result, _ = two_process_run
  params, state = _train_here(1, num_devices=4)
  _assert_close(result, worker.result_arrays(dist.to_host(params), dist.to_host(state)))
  assert int(result["count"]) == worker.STEPS


def test_two_processes_with_sharded_parameters_equal_one_device(tmp_path):
  """2 processes x 2 devices on a (data=2, model=2) mesh, parameters and state sharded over 'model'.

  The worker checks that every leaf stays sharded (each device holds half of it) and that an orbax
  checkpoint of the sharded state restores into the same layout and into a replicated one, bit for bit.
  """
  port = _free_port()
  results = _run(tmp_path, [_args("sharded", port, 2, i, "--out", str(tmp_path)) for i in range(2)], RUN_TIMEOUT_S)
  for i, (code, text) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{text[-4000:]}"
    assert f"process {i}: sharded done" in text
  result = dict(np.load(tmp_path / "sharded.npz"))
  _assert_close(result, worker.result_arrays(*dist.to_host(_train_here(2))))


def test_two_processes_equal_m4_on_one_device(two_process_run):
  _, result, _ = two_process_run
  reference = worker.result_arrays(*dist.to_host(_train_here(4)))
  _assert_close(result, reference)
  # the comparison can see a wrong part order: the processes' rows swapped move the result far more than the tolerance
  half = worker.GLOBAL_BATCH // 2
  swapped = [jax.tree.map(lambda x: np.concatenate([x[half:], x[:half]]), b) for b in worker.global_batches()]
  other = worker.result_arrays(*dist.to_host(_train_here(4, batches=swapped)))
  sensitivity = max(np.max(np.abs(result[k] - other[k])) for k in result)
  print("max abs diff with the processes' rows swapped:", sensitivity)
  assert sensitivity > 1e3 * ATOL


def test_baseline_step_across_processes(two_process_run):
  # random_sam_step shares the step machinery and the per-part keys with bsam_step
  _, _, result = two_process_run
  loss_fn, _, params0, key = _problem()
  for kwargs in ({"m": 1, "axis_name": "data", "mesh": dist.data_mesh("data", jax.devices()[:4])}, {"m": 4}):
    tx, step = worker.random_sam(loss_fn, **kwargs)
    params, state = params0, tx.init(params0)
    for t, batch in enumerate(worker.global_batches()):
      params, state, _ = step(params, state, batch, jax.random.fold_in(key, t))
    _assert_close(result, dist.to_host(params))


def test_checkpoint_from_two_processes_restores_into_one(two_process_run):
  out, result, _ = two_process_run
  _, tx, params, key = _problem()
  target = {"params": params, "opt_state": tx.init(params)}
  mesh = dist.data_mesh("data", jax.devices()[:4])
  replicated = NamedSharding(mesh, PartitionSpec())
  checkpointer = ocp.StandardCheckpointer()
  one_device = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  on_mesh = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), one_device)
  for abstract in (one_device, on_mesh):
    restored = checkpointer.restore(out / "checkpoint", abstract)
    assert isinstance(bo.find_bsam_state(restored["opt_state"]), bo.BSAMState)
    host = worker.result_arrays(dist.to_host(restored["params"]), dist.to_host(restored["opt_state"]))
    for name in result:
      np.testing.assert_array_equal(host[name], result[name], err_msg=name)
  # and training goes on from it in this process
  batch = worker.global_batches()[0]
  _, s, out_ = _step(1, 4)(restored["params"], restored["opt_state"], batch, jax.random.fold_in(key, worker.STEPS))
  assert int(bo.find_bsam_state(s).count) == worker.STEPS + 1 and np.isfinite(float(out_["loss"]))


# The main job, small: 2 epochs of bSAM on digits, m=4 (one part per device of the 2 x 2).
MAIN_JOB = app.TrainConfig(
  dataset="digits", model="mlp", epochs=2, batch_size=64, m=4, width=8, eval_samples=4, progress=False
)


def test_main_job_two_processes_equal_one_device(tmp_path):
  # `bsam-optax train` launched as 2 processes x 2 devices (the launcher flags) against train() here with m=4
  # on one device: the printed and written metrics and the posterior std summary agree, and only process 0 writes.
  c = MAIN_JOB
  flags = ["train", "--dataset", c.dataset, "--model", c.model, "--epochs", str(c.epochs)]
  flags += ["--batch-size", str(c.batch_size), "--m", str(c.m), "--width", str(c.width)]
  flags += ["--eval-samples", str(c.eval_samples), "--no-progress", "--init-timeout", "60"]
  port = _free_port()
  commands = [
    flags
    + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
    + ["--out", str(tmp_path / f"out_{i}"), "--checkpoint-dir", str(tmp_path / "checkpoints")]
    for i in range(2)
  ]
  start = time.monotonic()
  results = _run(tmp_path, commands, RUN_TIMEOUT_S, program=(sys.executable, "-m", "bsam_optax"))
  print(f"two-process main job: {time.monotonic() - start:.1f} s")
  for i, (code, text) in enumerate(results):
    assert code == 0, f"process {i} exited with {code}:\n{text[-4000:]}"
  assert "data parallel over 4 cpu devices in 2 process(es)" in results[0][1]
  assert "model average (S=4)" in results[0][1] and "test metrics" not in results[1][1]
  assert not (tmp_path / "out_1" / "metrics.json").exists()
  written = json.loads((tmp_path / "out_0" / "metrics.json").read_text())
  assert written["config"]["data_parallel"] is True

  reference = app.train(c)
  for name, metrics in reference.metrics.items():
    for key, value in metrics.items():
      assert written["metrics"][name][key] == pytest.approx(value, abs=1e-5), (name, key)
  for leaf, summary in reference.posterior_std.items():
    for key, value in summary.items():
      assert written["posterior_std"][leaf][key] == pytest.approx(value, rel=1e-5), (leaf, key)
  losses = [h["loss"] for h in written["history"]]
  assert losses == pytest.approx([h["loss"] for h in reference.history], rel=1e-5)

  # The 2 processes' per-epoch checkpoints resume here, in one process on one device: the run is complete, so
  # nothing is trained, and the restored state gives the same metrics.
  resumed = app.train(dataclasses.replace(c, checkpoint_dir=str(tmp_path / "checkpoints")))
  assert resumed.history == written["history"]
  for name, metrics in written["metrics"].items():
    for key, value in metrics.items():
      assert resumed.metrics[name][key] == pytest.approx(value, abs=1e-6), (name, key)


def test_main_job_without_a_coordinator_says_which_flag(tmp_path):
  # In a fresh process (this one's JAX backend is already up, too late to join a run).
  flags = ["train", "--num-processes", "2", "--process-id", "1", "--init-timeout", "5", "--out", str(tmp_path)]
  [(code, text)] = _run(tmp_path, [flags], 60, program=(sys.executable, "-m", "bsam_optax"))
  assert code == 2, text
  assert "give --coordinator HOST:PORT" in text, text


def test_unreachable_coordinator_is_an_error_in_bounded_time(tmp_path):
  start = time.monotonic()
  [(code, text)] = _run(tmp_path, [_args("init", _free_port(), 2, 1, "--timeout", "2")], 60)
  assert code != 0 and "ConnectionError: cannot reach the coordinator" in text, text[-3000:]
  assert time.monotonic() - start < 45


def test_missing_process_exits_with_a_message(tmp_path):
  [(code, text)] = _run(tmp_path, [_args("init", _free_port(), 2, 0, "--timeout", "2")], 60)
  assert code == dist.INIT_TIMEOUT_EXIT_CODE, text[-3000:]
  assert "not all processes joined within" in text


def test_mismatched_number_of_processes_is_an_error_on_all(tmp_path):
  port = _free_port()
  results = _run(
    tmp_path, [_args("init", port, 2, 0, "--timeout", "20"), _args("init", port, 3, 1, "--timeout", "20")], 60
  )
  for code, text in results:
    assert code != 0 and "ValueError: processes disagree on the number of processes" in text, text[-3000:]


def test_shard_batch_checks_divisibility():
  mesh = dist.data_mesh("data")  # this process's 8 devices
  with pytest.raises(ValueError, match="not divisible by the number of parts: 8 devices"):
    dist.shard_batch({"x": np.zeros((12, 3))}, mesh, "data")
  with pytest.raises(ValueError, match=r"x m=2 = 16"):
    dist.shard_batch({"x": np.zeros((8, 3))}, mesh, "data", m=2)
  with pytest.raises(ValueError, match="not an axis of the mesh"):
    dist.shard_batch({"x": np.zeros((8, 3))}, mesh, "batch")
  batch = dist.shard_batch({"x": np.arange(16.0).reshape(8, 2)}, mesh, "data")
  assert batch["x"].sharding == NamedSharding(mesh, PartitionSpec("data"))
  np.testing.assert_array_equal(dist.to_host(batch)["x"], np.arange(16.0).reshape(8, 2))


def test_shard_global_batch_keeps_rows_in_order():
  mesh = dist.data_mesh("data")
  stacked = {"x": np.arange(3 * 16 * 2.0).reshape(3, 16, 2), "y": np.arange(48).reshape(3, 16)}
  sharded = dist.shard_global_batch(stacked, mesh, "data", m=2, batch_axis=1)
  assert sharded["x"].sharding == NamedSharding(mesh, PartitionSpec(None, "data"))
  assert sharded["x"].addressable_shards[1].data.shape == (3, 2, 2)
  np.testing.assert_array_equal(dist.to_host(sharded)["y"], stacked["y"])
  with pytest.raises(ValueError, match="not divisible by the number of parts: 8 devices .* x m=4 = 32"):
    dist.shard_global_batch(stacked, mesh, "data", m=4, batch_axis=1)
  with pytest.raises(ValueError, match="needs an axis 2"):
    dist.shard_global_batch(stacked, mesh, "data", batch_axis=2)


def test_replicate_and_to_host_round_trip():
  mesh = dist.data_mesh("data", jax.devices()[:4])
  tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "key": jax.random.key(3)}
  placed = dist.replicate(tree, mesh)
  assert placed["w"].sharding.is_fully_replicated and len(placed["w"].sharding.device_set) == 4
  assert jax.dtypes.issubdtype(placed["key"].dtype, jax.dtypes.prng_key)
  back = dist.to_host(placed)
  np.testing.assert_array_equal(back["w"], tree["w"])
  np.testing.assert_array_equal(back["key"], jax.random.key_data(tree["key"]))


def test_data_mesh_orders_devices_by_process():
  mesh = dist.data_mesh("data", list(reversed(jax.devices())))
  assert [d.id for d in mesh.devices] == sorted(d.id for d in jax.devices())
  assert mesh.axis_names == ("data",)


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    ({"coordinator_address": "nohostport", "num_processes": 2, "process_id": 0}, ValueError, "host:port"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, ValueError, "process_id must be in"),
    ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, ValueError, "num_processes must be >= 1"),
    ({"coordinator_address": "h:1", "num_processes": 2.0, "process_id": 0}, TypeError, "must be an int"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "timeout_s": 0}, ValueError, "timeout_s"),
  ],
)
def test_initialize_rejects_bad_arguments_before_connecting(kwargs, error, match):
  with pytest.raises(error, match=match):
    dist.initialize(**kwargs)


def test_initialize_reads_the_environment(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "5")
  with pytest.raises(ValueError, match="process_id must be in 0 .. num_processes-1 = 1, got 5"):
    dist.initialize()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' is not an integer"):
    dist.initialize()


def test_launcher_arguments_initialize_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(dist, "initialize", lambda *a, **k: calls.append((a, k)))
  monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  parser = argparse.ArgumentParser()
  dist.add_launcher_arguments(parser)
  assert not dist.initialize_from_args(parser.parse_args([]))
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not dist.initialize_from_args(parser.parse_args([]))
  argv = ["--coordinator", "10.0.0.1:1234", "--num-processes", "2", "--process-id", "1", "--init-timeout", "5"]
  assert dist.initialize_from_args(parser.parse_args(argv))
  assert calls[-1] == (("10.0.0.1:1234", 2, 1), {"timeout_s": 5.0})
  monkeypatch.setenv("SLURM_NTASKS", "4")  # srun with 4 tasks: JAX detects the rest
  assert dist.initialize_from_args(parser.parse_args([]))
  assert calls[-1] == ((None, None, None), {"timeout_s": 300.0})
