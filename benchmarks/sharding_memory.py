"""Per-device memory of a bSAM step with tensor-parallel parameters: 1, 2, 4, 8 model shards.

An MLP (``--width`` hidden units, ``--depth`` hidden layers) whose kernels are
sharded over a ``model`` mesh axis (column-parallel then row-parallel, as
Megatron does), the batch over a ``data`` axis, on ``8`` simulated CPU
devices (``data x model = 8``). For each number of model shards the table
gives, per device: the bytes of the parameters and of bSAM's state
(momentum + scale) that the device holds (from the arrays' shards), and the
compiled step's memory analysis (arguments, outputs, temporaries). The goal
is (params + state) per device ∝ 1 / shards.

    python benchmarks/sharding_memory.py            # ~1 min
    python benchmarks/sharding_memory.py --quick    # a few seconds, small width
"""

import argparse
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bsam_optax as bo  # noqa: E402

SHARDS = (1, 2, 4, 8)


def init_params(key, width, depth, d_in=256, d_out=10):
  sizes = [d_in] + [width] * depth + [d_out]
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"layer{i}": {
      "kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
      "bias": jnp.zeros(b),
    }
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
  }


def param_specs(params):
  """Alternating column- and row-parallel layers: no layer's kernel is whole on a device."""
  specs = {}
  names = sorted(params, key=lambda n: int(n[5:]))
  for i, name in enumerate(names):
    # The last layer is row-parallel if it follows a column-parallel one, else replicated (its output is 10 wide).
    column = i % 2 == 0 and i < len(names) - 1
    if i == len(names) - 1 and i % 2 == 0:
      specs[name] = {"kernel": P(), "bias": P()}
      continue
    specs[name] = {
      "kernel": P(None, "model") if column else P("model", None),
      "bias": P("model") if column else P(),
    }
  return specs


def loss_fn(params, batch):
  x = batch["x"]
  names = sorted(params, key=lambda n: int(n[5:]))
  for name in names[:-1]:
    x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  logits = x @ params[names[-1]]["kernel"] + params[names[-1]]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def place(mesh, tx, params, state, batch, specs):
  """Parameters and bSAM's state sharded by ``specs`` (state follows the params), the batch over 'data'."""
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  sharded_state = optax.tree_map_params(tx, put, state, specs, transform_non_params=lambda x: put(x, P()))
  return jax.tree.map(put, params, specs), sharded_state, jax.tree.map(lambda x: put(x, P("data")), batch)


def device_bytes(tree):
  """Bytes of ``tree`` held by device 0 (its shards)."""
  device = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)


def run(width, depth, batch_size, m):
  rows = []
  params = init_params(jax.random.key(0), width, depth)
  tx = bo.bsam(0.1, n_data=60_000)
  state = tx.init(params)
  batch = {"x": jax.random.normal(jax.random.key(1), (batch_size, 256)), "y": jnp.zeros(batch_size, jnp.int32)}
  num_params = sum(x.size for x in jax.tree.leaves(params))
  for shards in SHARDS:
    mesh = jax.make_mesh((8 // shards, shards), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    specs = param_specs(params)
    sp, ss, sb = place(mesh, tx, params, state, batch, specs)
    step = bo.bsam_step(loss_fn, tx, m=m, axis_name="data", mesh=mesh)
    compiled = step.lower(sp, ss, sb, jax.random.key(2)).compile()
    memory = compiled.memory_analysis()
    new_params, new_state, _ = step(sp, ss, sb, jax.random.key(2))
    bsam_state = bo.find_bsam_state(new_state)
    rows.append(
      {
        "model shards": shards,
        "data devices": 8 // shards,
        "params / device (MB)": device_bytes(new_params) / 1e6,
        "state / device (MB)": device_bytes((bsam_state.momentum, bsam_state.scale)) / 1e6,
        "compiled args (MB)": memory.argument_size_in_bytes / 1e6,
        "compiled temps (MB)": memory.temp_size_in_bytes / 1e6,
        "compiled outputs (MB)": memory.output_size_in_bytes / 1e6,
      }
    )
  return num_params, rows


def table(num_params, rows, args):
  head = list(rows[0])
  lines = [
    f"MLP 256-{'-'.join([str(args.width)] * args.depth)}-10 ({num_params / 1e6:.2f} M parameters), "
    f"global batch {args.batch_size}, m={args.m} parts per data device, 8 simulated CPU devices; "
    "bSAM step via `bo.bsam_step(..., axis_name='data', mesh=mesh)`.",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head) + " |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--width", type=int, default=2048)
  parser.add_argument("--depth", type=int, default=3)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--m", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="width 64, depth 1")
  parser.add_argument("--out", default=None, help="write the table here (markdown)")
  args = parser.parse_args()
  if args.quick:
    args.width, args.depth = 64, 1
  num_params, rows = run(args.width, args.depth, args.batch_size, args.m)
  text = table(num_params, rows, args)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return rows


if __name__ == "__main__":
  main()
