"""A small decoder-only transformer trained with bSAM on the Python standard library's own source (issue 10).

A byte-level language model (vocabulary 256) in Flax NNX, trained on the
source files of the ``json``, ``email`` and ``asyncio`` packages of the Python
that runs it: no download. Files are split into train / validation / test by
their index in a fixed sorted list (every 10th file to test, every 10th + 5 to
validation). At equal steps the script compares

- AdamW (``optax.adamw``),
- SAM-AdamW (``bo.sam_step`` with ``optax.adamw``),
- bSAM (``bo.bsam_step``), after a small sweep of α and ρ chosen by
  validation NLL,

and reports perplexity (``exp`` of the per-byte NLL), bits per byte,
next-byte accuracy and calibration (NLL, ECE with 20 bins from
:mod:`bsam_optax.metrics`) of the posterior mean ω and of the model average
over S posterior samples (``bo.predictive``), plus step-time ratios measured
interleaved after warm-up. Two further sections:

- **sharding**: on a (data=4, model=2) mesh of 8 (simulated) devices, the
  model's attention and MLP kernels sharded along their feature axis over
  ``model`` (tensor parallel) and the batch over ``data``, one step of
  ``jax.jit(bo.bsam_step(loss_fn, tx, m=4))`` against one device (same key,
  same batch), and whether the outputs keep their shardings; also under
  explicit sharding (``AxisType.Explicit``) and on the ``mesh=`` path.
- **mixed precision**: bSAM with float32 everywhere, float32 master weights
  with bfloat16 compute (the parameters cast inside ``loss_fn``), bfloat16
  parameters with a float32 optimizer state (``bo.bsam(..., state_dtype=
  jnp.float32)``), and bfloat16 everything: final validation NLL and step time.

Commands::

  python benchmarks/transformer.py --quick   # ~75 s of CPU time; prints, writes nothing unless --out
  python benchmarks/transformer.py           # ~5 min of CPU time: results/transformer.md + .json

The script asks XLA for 8 host devices (before JAX is imported) so that the
sharding check can run; training itself runs on one device.
"""

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import email  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bsam_optax as bo  # noqa: E402
from bsam_optax import metrics  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PACKAGES = (json, email, asyncio)


@dataclasses.dataclass(frozen=True)
class Config:
  layers: int = 2
  d_model: int = 64
  heads: int = 4
  context: int = 64
  batch: int = 16
  steps: int = 400
  warmup: int = 20
  eval_windows: int = 256  # windows of `context` bytes from each of validation and test
  samples: int = 8  # S for the model average
  chunk: int = 2  # samples evaluated at once
  timing_rounds: int = 7
  timing_steps: int = 5
  adamw_lr: float = 3e-3
  adamw_wd: float = 0.01
  sam_rho: float = 0.05
  # bSAM: N = number of training bytes (one datum per predicted byte); α and ρ from this sweep.
  bsam_sweep: tuple = ((0.3, 0.05), (1.0, 0.05), (1.0, 0.2))  # (α, ρ) pairs
  bsam_damping: float = 1.0
  bsam_wd: float = 1e-4
  mp_steps: int | None = 200  # steps of the mixed-precision runs (None: `steps`)
  seed: int = 0


QUICK = Config(
  layers=1,
  d_model=32,
  heads=2,
  context=32,
  batch=16,
  steps=30,
  warmup=3,
  eval_windows=16,
  samples=4,
  chunk=2,
  timing_rounds=2,
  timing_steps=2,
  bsam_sweep=((1.0, 0.05),),
  mp_steps=5,
)


# --------------------------------------------------------------------------- data


def corpus_files() -> list[str]:
  """The fixed, sorted list of the ``.py`` files of ``json``, ``email`` and ``asyncio``."""
  files = []
  for package in PACKAGES:
    folder = os.path.dirname(package.__file__)
    files += [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".py")]
  return files


def load_corpus() -> dict[str, np.ndarray]:
  """Bytes of each split (files concatenated), as uint8 arrays; the split is by file index."""
  parts: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
  for i, path in enumerate(corpus_files()):
    split = "test" if i % 10 == 0 else "val" if i % 10 == 5 else "train"
    with open(path, "rb") as f:
      parts[split].append(f.read())
  return {k: np.frombuffer(b"\n\n".join(v), np.uint8) for k, v in parts.items()}


def train_batches(data: np.ndarray, cfg: Config, seed: int):
  """Random windows of ``context + 1`` bytes: (inputs, targets) of shape (batch, context), forever."""
  rng = np.random.default_rng(seed)
  offsets = np.arange(cfg.context + 1)
  while True:
    starts = rng.integers(0, len(data) - cfg.context - 1, size=cfg.batch)
    window = data[starts[:, None] + offsets].astype(np.int32)
    yield {"x": window[:, :-1], "y": window[:, 1:]}


def eval_windows(data: np.ndarray, cfg: Config) -> dict[str, np.ndarray]:
  """``eval_windows`` non-overlapping windows, evenly spaced over the split."""
  n = (len(data) - 1) // cfg.context
  idx = np.linspace(0, n - 1, min(cfg.eval_windows, n)).astype(int) * cfg.context
  window = data[idx[:, None] + np.arange(cfg.context + 1)].astype(np.int32)
  return {"x": window[:, :-1], "y": window[:, 1:]}


# --------------------------------------------------------------------------- model


class Block(nnx.Module):
  """Pre-LayerNorm block: causal multi-head self-attention and a 4x GELU MLP."""

  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.query = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.key = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.out = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x, out_sharding=None):
    b, t, d = x.shape
    h = self.ln1(x)
    q, k, v = (f(h).reshape(b, t, self.heads, d // self.heads) for f in (self.query, self.key, self.value))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(d // self.heads)
    logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e30)
    att = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    # out and down contract over the features split by a tensor-parallel layout: under explicit axes the
    # result's sharding must be given (the sum over model shards); None under Auto axes or one device.
    x = x + self.out(jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d), out_sharding=out_sharding)
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))), out_sharding=out_sharding)


def activation_sharding(tokens):
  """``P(batch axes, None, None)`` for activations under an explicit mesh (``jax.set_mesh``), else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return P(jax.typeof(tokens).sharding.spec[0], None, None)


class LM(nnx.Module):
  """Byte embedding + learned positions, ``layers`` blocks, final LayerNorm, a linear head to 256 logits."""

  def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, cfg.d_model, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.d_model)))
    self.blocks = nnx.List([Block(cfg.d_model, cfg.heads, rngs=rngs) for _ in range(cfg.layers)])
    self.ln_f = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, 256, rngs=rngs)

  def __call__(self, tokens):
    out_sharding = activation_sharding(tokens)
    x = self.embed(tokens, out_sharding=out_sharding)
    x = x + self.pos[...][: tokens.shape[1]].astype(self.embed.embedding.dtype)
    for block in self.blocks:
      x = block(x, out_sharding)
    return self.head(self.ln_f(x)).astype(jnp.float32)


def init_model(cfg: Config, seed: int = 0):
  """``(graphdef, params)``: the model's structure and its parameters as a plain nested dict of arrays."""
  graphdef, state = nnx.split(LM(cfg, rngs=nnx.Rngs(seed)))
  return graphdef, nnx.to_pure_dict(state)


def make_apply(graphdef, compute_dtype=None):
  """``apply(params, tokens) -> logits`` (float32); ``compute_dtype`` casts the parameters first."""

  def apply(params, tokens):
    if compute_dtype is not None:
      params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    return nnx.merge(graphdef, params)(tokens)

  return apply


def make_loss(apply):
  def loss_fn(params, batch):
    logits = apply(params, batch["x"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]))

  return loss_fn


def tensor_parallel_spec(path) -> P:
  """Megatron-style specs: q, k, v and the MLP's up kernel split by output feature, out and down by input."""
  names = [getattr(k, "key", None) for k in path]
  layer, leaf = (names[-2] if len(names) > 1 else None), names[-1]
  if layer in ("query", "key", "value", "up") and leaf == "kernel":
    return P(None, "model")
  if layer == "up" and leaf == "bias":
    return P("model")
  if layer in ("out", "down") and leaf == "kernel":
    return P("model", None)
  return P()


# --------------------------------------------------------------------------- methods


def schedule(cfg: Config, peak: float, steps: int):
  return optax.warmup_cosine_decay_schedule(0.0, peak, cfg.warmup, max(steps, cfg.warmup + 1), peak * 0.1)


def make_method(name: str, hp: dict, cfg: Config, loss_fn, n_data: int, steps: int, state_dtype=None):
  """``(tx, step)`` with ``step(params, state, batch, key) -> (params, state, info)``."""
  if name == "adamw":
    tx = optax.adamw(schedule(cfg, cfg.adamw_lr, steps), weight_decay=cfg.adamw_wd)
    return tx, bo.make_perturbation_step(loss_fn, tx, bo.PerturbationRule())
  if name == "sam_adamw":
    tx = optax.adamw(schedule(cfg, cfg.adamw_lr, steps), weight_decay=cfg.adamw_wd)
    return tx, bo.sam_step(loss_fn, tx, rho=cfg.sam_rho)
  if name == "bsam":
    tx = bo.bsam(
      schedule(cfg, hp["lr"], steps),
      n_data=n_data,
      rho=hp["rho"],
      weight_decay=cfg.bsam_wd,
      damping=cfg.bsam_damping,
      init_scale=cfg.bsam_damping + cfg.bsam_wd,  # s starts where γ + δ holds it
      state_dtype=state_dtype,
    )
    return tx, bo.bsam_step(loss_fn, tx)
  raise ValueError(f"unknown method {name!r}")


def train(step, params, state, cfg: Config, data, steps: int, seed: int):
  key = jax.random.key(seed)
  batches = train_batches(data, cfg, seed)
  losses = []
  for i in range(steps):
    params, state, info = step(params, state, next(batches), jax.random.fold_in(key, i))
    if i % 50 == 0 or i == steps - 1:
      losses.append(float(info.loss))
  return params, state, losses


# --------------------------------------------------------------------------- evaluation


@functools.cache
def _jitted_predictive(apply, samples, chunk):
  return jax.jit(lambda key, p, s, x: bo.predictive(apply, key, p, s, x, samples, chunk_size=chunk))


@functools.cache
def _jitted_probs(apply):
  return jax.jit(lambda p, x: jax.nn.softmax(apply(p, x), axis=-1))


def evaluate(apply, params, windows, *, state=None, samples=0, chunk=1, key=None, num_bins=20) -> dict:
  """Next-byte metrics over all positions of ``windows``: of ω, or of the model average when ``samples``."""
  xs = np.array_split(windows["x"], 4)  # bounded memory: S/chunk x (windows/4) x context x 256 at a time
  if samples:
    probs = jnp.concatenate([_jitted_predictive(apply, samples, chunk)(key, params, state, x) for x in xs])
  else:
    probs = jnp.concatenate([_jitted_probs(apply)(params, x) for x in xs])
  probs = probs.reshape(-1, 256)
  labels = jnp.asarray(windows["y"].reshape(-1))
  nll = float(metrics.nll(probs, labels))
  return {
    "nll": nll,
    "ppl": math.exp(nll),
    "bpb": nll / math.log(2),
    "acc": float(metrics.accuracy(probs, labels)),
    "ece": float(metrics.ece(probs, labels, num_bins)),
  }


def time_steps(named_steps: dict, cfg: Config) -> dict:
  """Median per-step ms and median per-round ratio to the first entry, rounds interleaved after warm-up."""
  per_round = {name: [] for name in named_steps}
  for _ in range(cfg.timing_rounds + 1):  # the first round is warm-up
    for name, (step, params, state, batch, key) in named_steps.items():
      jax.block_until_ready(step(params, state, batch, key))
      t0 = time.perf_counter()
      for _ in range(cfg.timing_steps):
        out = step(params, state, batch, key)
      jax.block_until_ready(out)
      per_round[name].append((time.perf_counter() - t0) / cfg.timing_steps * 1e3)
  first = next(iter(named_steps))
  return {
    name: {
      "ms": statistics.median(ts[1:]),
      "ratio": statistics.median(t / b for t, b in zip(ts[1:], per_round[first][1:], strict=True)),
    }
    for name, ts in per_round.items()
  }


# --------------------------------------------------------------------------- sharding


SHARDING_CFG = Config(layers=2, d_model=32, heads=4, context=16, batch=16)


def _state_shardings(tx, state, param_shardings, replicated):
  return optax.tree_map_params(tx, lambda _, s: s, state, param_shardings, transform_non_params=lambda _: replicated)


def _spec_changes(out, ref) -> list[str]:
  """``path: in -> out`` for every leaf whose sharding changed (``P('model', None)`` is ``P('model')``)."""
  changes = []
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(out), strict=True):
    if not a.sharding.is_equivalent_to(b.sharding, a.ndim):
      changes.append(f"{jax.tree_util.keystr(path)}: {a.sharding.spec} -> {b.sharding.spec}")
  return changes


def _max_diff(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def sharding_check(
  cfg: Config = SHARDING_CFG,
  *,
  m: int = 4,
  rtol: float = 1e-5,
  atol: float = 1e-6,
  paths: tuple[str, ...] = ("jit", "explicit", "mesh_path"),
) -> dict:
  """One bSAM step on a (data=4, model=2) mesh, tensor-parallel kernels, against one device.

  Returns a dict: ``equal`` (params, momentum, scale, loss and second loss
  within ``atol + rtol |x|`` of one device), ``max_abs_diff`` per array
  group, ``specs_kept`` (every output leaf has its input's
  ``PartitionSpec``), ``sharded_leaves`` (how many parameter leaves are
  split over ``model``), and the outcome of the explicit-sharding and
  ``mesh=`` paths (``"ok"``, or the error).
  """
  if jax.device_count() < 8:
    return {"skipped": f"needs 8 devices, found {jax.device_count()} (set XLA_FLAGS before importing jax)"}
  devices = jax.devices()[:8]
  graphdef, params = init_model(cfg, seed=1)
  loss_fn = make_loss(make_apply(graphdef))
  data = load_corpus()["train"]
  batch = next(train_batches(data, cfg, seed=1))
  tx = bo.bsam(0.5, n_data=len(data), rho=0.05, weight_decay=1e-4, damping=1.0, init_scale=1.0)
  key = jax.random.key(3)
  # Give the scale some spread so that the noise and ε differ per entry.
  state = tx.init(params)
  bstate = bo.find_bsam_state(state)
  leaves = jax.tree.leaves(bstate.scale)
  scale = jax.tree.unflatten(
    jax.tree.structure(bstate.scale),
    [0.5 + jax.random.uniform(jax.random.key(i), s.shape) for i, s in enumerate(leaves)],
  )
  state = (bstate._replace(scale=scale),) + tuple(state[1:])

  step = jax.jit(bo.bsam_step(loss_fn, tx, m=m))
  one_device = jax.device_put((params, state, batch), devices[0])
  references = {m: step(*one_device, key)}

  result: dict = {"mesh": "data=4 x model=2", "m": m, "rtol": rtol, "atol": atol}
  auto = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
  spec_tree = jax.tree_util.tree_map_with_path(lambda path, _: tensor_parallel_spec(path), params)
  result["sharded_leaves"] = sum(spec != P() for spec in jax.tree.leaves(spec_tree, is_leaf=lambda x: isinstance(x, P)))
  result["param_leaves"] = len(jax.tree.leaves(params))

  def place(mesh):
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), spec_tree, is_leaf=lambda x: isinstance(x, P))
    replicated = NamedSharding(mesh, P())
    state_shardings = _state_shardings(tx, state, shardings, replicated)
    return (
      jax.device_put(params, shardings),
      jax.device_put(state, state_shardings),
      jax.device_put(batch, NamedSharding(mesh, P("data"))),
    )

  def compare(out_params, out_state, info, in_params, in_state, parts=m):
    if parts not in references:
      references[parts] = jax.jit(bo.bsam_step(loss_fn, tx, m=parts))(*one_device, key)
    ref_params, ref_state, ref_info = references[parts]
    out_b, ref_b = bo.find_bsam_state(out_state), bo.find_bsam_state(ref_state)
    groups = {
      "params": (out_params, ref_params),
      "momentum": (out_b.momentum, ref_b.momentum),
      "scale": (out_b.scale, ref_b.scale),
      "loss": ((info.loss, info.second_loss), (ref_info.loss, ref_info.second_loss)),
    }
    diffs = {k: _max_diff(*v) for k, v in groups.items()}
    equal = all(
      bool(np.allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol))
      for a, b in groups.values()
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    changes = _spec_changes(out_params, in_params) + _spec_changes(out_state, in_state)
    return {"equal": equal, "max_abs_diff": diffs, "specs_kept": not changes, "spec_changes": changes[:6]}

  # 1. jax.jit on sharded inputs (GSPMD), the mesh's axes Auto.
  s_params, s_state, s_batch = place(auto)
  if "jit" in paths:
    out_params, out_state, info = step(s_params, s_state, s_batch, key)
    result["jit"] = compare(out_params, out_state, info, s_params, s_state)
    up = out_params["blocks"][0]["up"]["kernel"]
    result["jit"]["example_spec"] = str(up.sharding.spec)
    result["jit"]["per_device_shape"] = str(up.addressable_shards[0].data.shape)

  # 2. The same under sharding in types (AxisType.Explicit) with jax.set_mesh.
  if "explicit" in paths:
    explicit_axes = (jax.sharding.AxisType.Explicit,) * 2
    explicit = jax.make_mesh((4, 2), ("data", "model"), axis_types=explicit_axes, devices=devices)
    references[1] = jax.jit(bo.bsam_step(loss_fn, tx, m=1))(*one_device, key)  # outside the mesh context
    for parts, name in ((1, "explicit_m1"), (m, "explicit")):
      try:
        with jax.set_mesh(explicit):
          e_params, e_state, e_batch = place(explicit)
          out = jax.jit(bo.bsam_step(loss_fn, tx, m=parts))(e_params, e_state, e_batch, key)
          result[name] = compare(*out, e_params, e_state, parts=parts)
      except Exception as e:  # noqa: BLE001 - reported, not hidden
        result[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}

  # 3. The mesh= path (shard_map over 'data'), m parts per data device: 4 devices x m / 4.
  if "mesh_path" in paths:
    try:
      mesh_step = bo.bsam_step(loss_fn, tx, m=m // 4, axis_name="data", mesh=auto)
      out = mesh_step(s_params, s_state, s_batch, key)
      result["mesh_path"] = compare(*out, s_params, s_state)
      result["mesh_path"]["example_spec"] = str(out[0]["blocks"][0]["up"]["kernel"].sharding.spec)
    except Exception as e:  # noqa: BLE001
      result["mesh_path"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
  return result


# --------------------------------------------------------------------------- main


LABELS = {"adamw": "AdamW", "sam_adamw": "SAM-AdamW", "bsam": "bSAM"}


def _fmt(x, digits=3):
  return f"{x:.{digits}f}"


def run(cfg: Config, *, sharding: bool = True, mixed: bool = True, log=print) -> dict:
  t_start = time.perf_counter()
  corpus = load_corpus()
  n_train = len(corpus["train"])
  val, test = eval_windows(corpus["val"], cfg), eval_windows(corpus["test"], cfg)
  graphdef, params0 = init_model(cfg, cfg.seed)
  apply = make_apply(graphdef)
  loss_fn = make_loss(apply)
  n_params = sum(x.size for x in jax.tree.leaves(params0))
  log(
    f"corpus: {', '.join(p.__name__ for p in PACKAGES)} from Python {platform.python_version()}; bytes "
    f"train/val/test {n_train}/{len(corpus['val'])}/{len(corpus['test'])}; model {n_params} parameters"
  )
  eval_key = jax.random.key(cfg.seed + 100)

  def fit(name, hp):
    tx, step = make_method(name, hp, cfg, loss_fn, n_train, cfg.steps)
    t0 = time.perf_counter()
    p, s, losses = train(step, params0, tx.init(params0), cfg, corpus["train"], cfg.steps, cfg.seed)
    jax.block_until_ready(p)
    return {"params": p, "state": s, "step": step, "losses": losses, "train_s": time.perf_counter() - t0}

  runs, sweep = {}, []
  for name in ("adamw", "sam_adamw"):
    runs[name] = fit(name, {})
    runs[name]["val"] = evaluate(apply, runs[name]["params"], val)
    log(f"{LABELS[name]}: val NLL {runs[name]['val']['nll']:.4f} ({runs[name]['train_s']:.0f} s)")
  best = None
  for lr, rho in cfg.bsam_sweep:
    hp = {"lr": lr, "rho": rho}
    r = fit("bsam", hp)
    r["val"] = evaluate(apply, r["params"], val)
    sweep.append({"lr": lr, "rho": rho, "val_nll": r["val"]["nll"], "train_s": r["train_s"]})
    log(f"bSAM α={lr} ρ={rho}: val NLL {r['val']['nll']:.4f} ({r['train_s']:.0f} s)")
    if best is None or r["val"]["nll"] < best[1]["val"]["nll"]:
      best = (hp, r)
  runs["bsam"] = best[1]
  bsam_hp = best[0]

  rows = {}
  for name, r in runs.items():
    rows[f"{LABELS[name]}"] = {"val": r["val"], "test": evaluate(apply, r["params"], test)}
  r = runs["bsam"]
  avg = dict(state=r["state"], samples=cfg.samples, chunk=cfg.chunk, key=eval_key)
  rows["bSAM (post. mean)"] = rows.pop("bSAM")
  rows[f"bSAM (model avg, S={cfg.samples})"] = {
    "val": evaluate(apply, r["params"], val, **avg),
    "test": evaluate(apply, r["params"], test, **avg),
  }
  std = bo.posterior(r["params"], r["state"])[1]
  std_leaves = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(std)])

  batch = next(train_batches(corpus["train"], cfg, cfg.seed + 7))
  key = jax.random.key(5)
  timing = time_steps({n: (runs[n]["step"], runs[n]["params"], runs[n]["state"], batch, key) for n in runs}, cfg)

  result = {
    "config": dataclasses.asdict(cfg),
    "corpus": {
      "packages": [p.__name__ for p in PACKAGES],
      "python": platform.python_version(),
      "train_bytes": n_train,
      "val_bytes": len(corpus["val"]),
      "test_bytes": len(corpus["test"]),
      "eval_tokens": int(val["y"].size),
    },
    "n_params": int(n_params),
    "bsam": {
      "chosen": bsam_hp,
      "sweep": sweep,
      "n_data": n_train,
      "damping": cfg.bsam_damping,
      "weight_decay": cfg.bsam_wd,
      "posterior_std": {"median": float(np.median(std_leaves)), "max": float(std_leaves.max())},
    },
    "rows": rows,
    "train_loss": {n: runs[n]["losses"] for n in runs},
    "train_s": {n: runs[n]["train_s"] for n in runs},
    "timing": {LABELS[n]: t for n, t in timing.items()},
  }

  if mixed:
    result["mixed_precision"] = mixed_precision(cfg, bsam_hp, graphdef, params0, corpus, val, runs["bsam"], log)
  if sharding:
    result["sharding"] = sharding_check()
    log(f"sharding: {json.dumps(result['sharding'])}")
  result["wall_s"] = time.perf_counter() - t_start
  return result


def mixed_precision(cfg, hp, graphdef, params0, corpus, val, f32_run, log) -> dict:
  """bSAM at the chosen α, ρ in four precisions: final validation NLL (ω, evaluated in float32) and step time."""
  steps = cfg.mp_steps or cfg.steps
  n_train = len(corpus["train"])
  bf16 = jnp.bfloat16
  apply32 = make_apply(graphdef)
  params_bf16 = jax.tree.map(lambda p: p.astype(bf16), params0)
  variants = {
    "float32 params, state and compute": (make_loss(apply32), params0, None),
    "float32 master params and state, bfloat16 compute": (make_loss(make_apply(graphdef, bf16)), params0, None),
    "bfloat16 params and compute, float32 state": (make_loss(apply32), params_bf16, jnp.float32),
    "bfloat16 params, state and compute": (make_loss(apply32), params_bf16, None),
  }
  out, timed = {}, {}
  for label, (loss, params, state_dtype) in variants.items():
    if state_dtype is None and params is params0 and label.startswith("float32 params") and steps == cfg.steps:
      r = f32_run
    else:
      # state_dtype=float32 under bfloat16 params is bit for bit tx.init on a float32 copy of the params.
      tx, step = make_method("bsam", hp, cfg, loss, n_train, steps, state_dtype=state_dtype)
      t0 = time.perf_counter()
      p, s, _ = train(step, params, tx.init(params), cfg, corpus["train"], steps, cfg.seed)
      jax.block_until_ready(p)
      r = {"params": p, "state": s, "step": step, "train_s": time.perf_counter() - t0}
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), r["params"])
    ev = evaluate(apply32, p32, val)
    state_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(bo.find_bsam_state(r["state"]).scale)})
    param_dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(r["params"])})
    out[label] = {"val_nll": ev["nll"], "val_ppl": ev["ppl"], "param_dtype": param_dtypes, "state_dtype": state_dtypes}
    log(f"{label}: val NLL {ev['nll']:.4f}")
    timed[label] = (r["step"], r["params"], r["state"])
  batch = next(train_batches(corpus["train"], cfg, cfg.seed + 7))
  key = jax.random.key(5)
  timing = time_steps({k: (*v, batch, key) for k, v in timed.items()}, cfg)
  for label in out:
    out[label].update(timing[label])
  return {"steps": steps, "rows": out}


def to_markdown(result: dict, command: str) -> str:
  cfg = result["config"]
  c = result["corpus"]
  b = result["bsam"]
  lines = [
    "# Transformer language model: bSAM vs AdamW and SAM-AdamW",
    "",
    f"`{command}` — wall time {result['wall_s'] / 60:.1f} min on {platform.machine()} "
    f"({os.cpu_count()} CPUs visible, shared), jax {jax.__version__}.",
    "",
    f"Byte-level decoder-only transformer (Flax NNX): {cfg['layers']} layers, d_model {cfg['d_model']}, "
    f"{cfg['heads']} heads, context {cfg['context']}, {result['n_params']:,} parameters. Corpus: the `.py` files of "
    f"{', '.join('`' + p + '`' for p in c['packages'])} from Python {c['python']} (split by file: "
    f"{c['train_bytes']:,} / {c['val_bytes']:,} / {c['test_bytes']:,} bytes train / val / test). "
    f"{cfg['steps']} steps of batch {cfg['batch']} for every method (the same batches), warm-up + cosine "
    f"schedule. Metrics over {c['eval_tokens']:,} next-byte predictions of each split: perplexity "
    f"(exp NLL per byte), bits per byte, accuracy, ECE (20 bins).",
    "",
    f"AdamW: lr {cfg['adamw_lr']}, weight decay {cfg['adamw_wd']}. SAM-AdamW: the same, ρ = {cfg['sam_rho']}. "
    f"bSAM: N = {b['n_data']:,} (training bytes), δ = {b['weight_decay']}, γ = {b['damping']}, s₀ = γ + δ, "
    f"m = 1; α and ρ chosen by validation NLL from the sweep below: **α = {b['chosen']['lr']}, "
    f"ρ = {b['chosen']['rho']}**. Posterior std 1/√(N s) after training: median "
    f"{b['posterior_std']['median']:.2e}, max {b['posterior_std']['max']:.2e}.",
    "",
    "## Test set",
    "",
    "| method | perplexity | bits/byte | accuracy (%) | NLL | ECE | val NLL |",
    "|---|---|---|---|---|---|---|",
  ]
  for label, row in result["rows"].items():
    t = row["test"]
    lines.append(
      f"| {label} | {_fmt(t['ppl'])} | {_fmt(t['bpb'])} | {100 * t['acc']:.2f} | {_fmt(t['nll'], 4)} | "
      f"{_fmt(t['ece'], 4)} | {_fmt(row['val']['nll'], 4)} |"
    )
  lines += [
    "",
    "## Step time (interleaved rounds after warm-up, one device)",
    "",
    "| method | ms / step | ratio to AdamW |",
    "|---|---|---|",
  ]
  for label, t in result["timing"].items():
    lines.append(f"| {label} | {t['ms']:.1f} | {t['ratio']:.2f} |")
  lines += ["", "## bSAM sweep (validation NLL of ω)", "", "| α | ρ | val NLL | train s |", "|---|---|---|---|"]
  for s in b["sweep"]:
    lines.append(f"| {s['lr']} | {s['rho']} | {_fmt(s['val_nll'], 4)} | {s['train_s']:.0f} |")
  if "mixed_precision" in result:
    mp = result["mixed_precision"]
    lines += [
      "",
      f"## Mixed precision (bSAM, α = {b['chosen']['lr']}, ρ = {b['chosen']['rho']}, {mp['steps']} steps)",
      "",
      "Validation NLL of ω evaluated in float32; step time interleaved, ratio to the float32 row.",
      "",
      "| variant | param dtype | state dtype | val NLL | ms / step | ratio |",
      "|---|---|---|---|---|---|",
    ]
    for label, row in mp["rows"].items():
      lines.append(
        f"| {label} | {', '.join(row['param_dtype'])} | {', '.join(row['state_dtype'])} | "
        f"{_fmt(row['val_nll'], 4)} | {row['ms']:.1f} | {row['ratio']:.2f} |"
      )
  if "sharding" in result:
    s = result["sharding"]
    lines += ["", "## Sharded parameters (8 simulated devices)", ""]
    if "skipped" in s:
      lines.append(f"Skipped: {s['skipped']}.")
    else:
      lines += [
        f"Mesh {s['mesh']}; {s['sharded_leaves']} of {s['param_leaves']} parameter leaves split over `model` "
        f"(q, k, v, MLP-up kernels by output feature, out and MLP-down by input feature), the batch over "
        f"`data`; one step of `jax.jit(bo.bsam_step(loss_fn, tx, m={s['m']}))` with the same key and batch "
        f"as on one device. Equal means every entry of the params, momentum, scale and both losses within "
        f"atol {s['atol']} + rtol {s['rtol']}.",
        "",
        "| path | equal to one device | max abs diff params / momentum / scale / loss | output specs kept |",
        "|---|---|---|---|",
      ]
      for path, label in (
        ("jit", f"`jax.jit`, Auto axes, m = {s['m']}"),
        ("explicit_m1", "`jax.jit`, Explicit axes, m = 1"),
        ("explicit", f"`jax.jit`, Explicit axes, m = {s['m']}"),
        ("mesh_path", f"`mesh=` (shard_map over data), m = {s['m'] // 4} per device"),
      ):
        r = s.get(path)
        if r is None:
          continue
        if "error" in r:
          lines.append(f"| {label} | error: `{r['error']}` | | |")
        else:
          d = r["max_abs_diff"]
          lines.append(
            f"| {label} | {r['equal']} | {d['params']:.1e} / {d['momentum']:.1e} / {d['scale']:.1e} / "
            f"{d['loss']:.1e} | {r['specs_kept']}"
            + (f" (e.g. MLP-up kernel {r['example_spec']})" if "example_spec" in r else "")
            + ("" if r["specs_kept"] else f"; changed: {'; '.join(r['spec_changes'][:2])}")
            + " |"
          )
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="CI mode: a tiny model, 30 steps, no sharding check")
  parser.add_argument("--steps", type=int, help="training steps of every method")
  parser.add_argument("--no-sharding", action="store_true", help="skip the 8-device sharding check (--quick does)")
  parser.add_argument("--no-mixed", action="store_true", help="skip the mixed-precision runs")
  parser.add_argument(
    "--out", help="markdown output (a .json beside it); default results/transformer.md, none in --quick mode"
  )
  args = parser.parse_args(argv)
  cfg = QUICK if args.quick else Config()
  if args.steps:
    cfg = dataclasses.replace(cfg, steps=args.steps)
  result = run(cfg, sharding=not (args.no_sharding or args.quick), mixed=not args.no_mixed)
  command = "python benchmarks/transformer.py" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
  text = to_markdown(result, command)
  print(text)
  out = args.out or (None if args.quick else os.path.join(RESULTS, "transformer.md"))
  if out:
    with open(out, "w") as f:
      f.write(text)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
      json.dump(result, f, indent=1, default=str)
  return result


if __name__ == "__main__":
  main()
