"""Cost of a bSAM step: time, memory and compile time against Adam, SAM-Adam,
``optax.contrib.sam`` and the authors' research-code approach, and how the cost
grows with m and with the model's size.

Everything here uses the public API (``import bsam_optax as bo``); the models
are defined below with Flax. Models: an MLP 784-500-300-10 (545,810
parameters) and a small 2-D CNN (three strided 5x5 convolutions with 32
channels, 28x28 inputs, 57,226 parameters); batch 128 of random data, float32.

Methods (one step each: from parameters and state to new parameters and state):

* ``adam``: ``optax.adam``, one gradient.
* ``sam_adam``: ``bo.sam_step`` with ``optax.adam`` (ε = ρ g/‖g‖ per part), on
  the same step machinery as bSAM.
* ``contrib_sam``: ``optax.contrib.sam(adam, normalize + sgd(ρ),
  opaque_mode=True)``, SAM as optax ships it; no m-sharpness, m = 1 only.
* ``authors``: a re-implementation of the approach of the authors' research
  code (github.com/team-approx-bayes/bayesian-sam, ``optim.py``): per-leaf
  ``jax.random.normal`` with keys split per leaf and per part, ``jax.vmap``
  over parts, ``jnp.mean`` over parts, the update divided by the *old* scale.
* ``bsam``: ``bo.bsam_step`` as a user calls it, with ``jax.random.key(seed)``
  (the library's generator, ``noise="auto"``, and the split ``split="auto"``
  picks, as for ``sam_adam``); ``bsam_hash``: the same with a
  ``bo.hash_prng_impl`` key; ``bsam_jax``: ``noise="jax"`` with
  ``jax.random.key(seed)``, i.e. ``jax.random.normal``'s threefry stream (the
  default before the library had its own generator).

Timing: every method runs ``--steps`` steps per round, ``--rounds`` rounds,
the order of the methods rotating each round, after two warm-up calls, all
blocked with ``block_until_ready``; per-step times are medians over rounds,
ratios are medians of the per-round ratios (robust to the load of a shared
machine drifting between rounds). ``--runs`` repeats the whole interleaved
block; the goal table quotes every run's ratio. Memory: optimizer-state bytes,
and the peak memory of one compiled step (arguments + outputs + temporaries −
aliased donated buffers, from ``Compiled.memory_analysis()``). Compile time:
``lower`` + ``compile`` of a fresh jitted step.

Usage::

  python benchmarks/cost.py --quick    # CI: MLP, few rounds, no growth; prints, writes nothing
  python benchmarks/cost.py --no-growth   # writes benchmarks/results/cost.md (~40 min on 2 loaded cores)
  python benchmarks/cost.py --only-growth --out benchmarks/results/cost_growth.md   # + cost_growth.png
  python benchmarks/cost.py --models mlp --m 1 8 --rounds 9 --steps 5 --no-growth --out /tmp/cost.md
"""

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

# The checkout's bsam_optax, not an installed copy: these numbers are for the code beside this script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bsam_optax as bo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH = 128
N_DATA = 60_000
LR = 1e-3
RHO = 0.05
SPLITS = ("vmap", "scan", "unroll")
# MLP widths for the growth table: ~0.1 M to ~10 M parameters.
GROWTH_WIDTHS = ((128, 64), (500, 300), (1024, 1024), (2048, 2048), (3072, 2048))
GROWTH_M = (1, 2, 4, 8, 16, 32)


# --- problems -----------------------------------------------------------------


class MLP(nn.Module):
  features: Sequence[int] = (500, 300)

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


class CNN(nn.Module):
  channels: Sequence[int] = (32, 32, 32)

  @nn.compact
  def __call__(self, x):
    x = x[..., None]
    for width in self.channels:
      x = nn.relu(nn.Conv(width, (5, 5), strides=(2, 2), padding="SAME")(x))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


class Problem(NamedTuple):
  name: str
  params: Any
  batch: dict
  loss_fn: Callable


def make_problem(name: str, features: Sequence[int] = (500, 300)) -> Problem:
  if name == "mlp":
    model, shape = MLP(features=tuple(features)), (BATCH, 784)
  elif name == "cnn":
    model, shape = CNN(), (BATCH, 28, 28)
  else:
    raise ValueError(f"unknown model {name!r}")
  x = jax.random.normal(jax.random.key(1), shape)
  y = jax.random.randint(jax.random.key(2), (BATCH,), 0, 10)
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  return Problem(name, params, {"x": x, "y": y}, loss_fn)


def num_params(tree) -> int:
  return sum(math.prod(jnp.shape(x)) for x in jax.tree.leaves(tree))


def tree_bytes(tree) -> int:
  return sum(
    np.asarray(x).nbytes if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 8
    for x in jax.tree.leaves(tree)
  )


# --- the authors' approach, re-implemented ------------------------------------


class AuthorsState(NamedTuple):
  w: Any  # the weights live in their optimizer state
  gm: Any
  s: Any
  key: jax.Array


def authors_init(params, key, s_init=1.0):
  return AuthorsState(
    params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda p: jnp.full_like(p, s_init), params), key
  )


def authors_step_fn(loss_fn, m, *, lr=LR, rho=RHO, b1=0.9, b2=0.999, wd=0.0, damping=0.1, n_data=N_DATA, donate=False):
  """One step of their bSAM, as their optim.py computes it (no haiku state); ``donate``: the state."""
  value_and_grad = jax.value_and_grad(loss_fn)

  def leafwise_normal(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves) + 1)  # keys[0] is left unused, as theirs
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys[1:], strict=True)])

  def one_part(state, x, y, key):
    noise = leafwise_normal(state.w, key)
    theta = jax.tree.map(lambda z, mu, s: mu + jnp.sqrt(1.0 / (n_data * s)) * z, noise, state.w, state.s)
    _, g = value_and_grad(theta, {"x": x, "y": y})
    perturbed = jax.tree.map(lambda p, g, s: p + rho * g / s, state.w, g, state.s)
    loss, g_eps = value_and_grad(perturbed, {"x": x, "y": y})
    gs = jax.tree.map(lambda g, s: jnp.sqrt(s * g**2.0), g, state.s)
    return gs, g_eps, loss

  @functools.partial(jax.jit, donate_argnums=(0,) if donate else ())
  def step(state, batch):
    keys = jax.random.split(state.key, m + 1)
    xs = batch["x"].reshape(m, -1, *batch["x"].shape[1:])
    ys = batch["y"].reshape(m, -1, *batch["y"].shape[1:])
    gs, g_eps, loss = jax.vmap(one_part, in_axes=(None, 0, 0, 0))(state, xs, ys, keys[:m])
    gs = jax.tree.map(lambda g: jnp.mean(g, axis=0), gs)
    g_eps = jax.tree.map(lambda g: jnp.mean(g, axis=0), g_eps)
    gm = jax.tree.map(lambda gm, g, w: b1 * gm + (1 - b1) * (g + wd * w), state.gm, g_eps, state.w)
    w = jax.tree.map(lambda p, gm, s: p - lr * gm / s, state.w, gm, state.s)  # the old s
    s = jax.tree.map(lambda s, gs: b2 * s + (1 - b2) * (gs + damping + wd), state.s, gs)
    return AuthorsState(w, gm, s, keys[-1]), jnp.mean(loss)

  return step


# --- methods: uniform runners -------------------------------------------------


class Method(NamedTuple):
  """``run(steps)`` advances the method's own state by ``steps`` steps and blocks."""

  run: Callable[[int], None]
  compiled: Any  # a jax.stages.Compiled of one step, for memory_analysis
  state_bytes: int  # optimizer state (without the weights)
  jitted: Any  # the jitted step (for _cache_size)
  compile_s: float = float("nan")  # seconds to lower and compile the step


KEY_KINDS = {"threefry": None, "hash": bo.hash_prng_impl}


def _keys(kind="threefry", n=16):
  impl = KEY_KINDS[kind]
  base = jax.random.key(3) if impl is None else jax.random.key(3, impl=impl)
  return [jax.random.fold_in(base, i) for i in range(n)]


def step_method(step, params, opt_state, batch, keys) -> Method:
  """A step with the signature ``step(params, opt_state, batch, key) -> (params, opt_state, out)``."""
  # Copies, so that a donating step cannot delete buffers other methods share.
  params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
  start = time.perf_counter()
  compiled = step.lower(params, opt_state, batch, keys[0]).compile()
  compile_s = time.perf_counter() - start
  params, opt_state, _ = step(params, opt_state, batch, keys[0])
  jax.block_until_ready(params)
  carry = [params, opt_state, 1]

  def run(steps):
    p, s, i = carry
    for _ in range(steps):
      p, s, _ = step(p, s, batch, keys[i % len(keys)])
      i += 1
    jax.block_until_ready(p)
    carry[:] = [p, s, i]

  return Method(run, compiled, tree_bytes(opt_state), step, compile_s)


def adam_method(prob: Problem, donate: bool = False) -> Method:
  tx = optax.adam(LR)

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(params, opt_state, batch, key):
    del key
    grads = jax.grad(prob.loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, None

  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys())


def _split_option(split: str) -> dict:
  # "auto" is the default: left implicit, as a user leaves it.
  return {} if split == "auto" else {"split": split}


def sam_adam_method(prob: Problem, m: int, split: str = "auto", donate: bool = False) -> Method:
  tx = optax.adam(LR)
  step = bo.sam_step(prob.loss_fn, tx, rho=RHO, m=m, donate=donate, **_split_option(split))
  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys())


def contrib_sam_method(prob: Problem) -> Method:
  tx = optax.contrib.sam(
    optax.adam(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), sync_period=2, opaque_mode=True
  )

  @jax.jit
  def step(params, opt_state, batch, key):
    del key
    grad_fn = jax.grad(prob.loss_fn)
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, grad_fn=lambda p, _: grad_fn(p, batch))
    return optax.apply_updates(params, updates), opt_state, None

  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys())


def authors_method(prob: Problem, m: int) -> Method:
  step = authors_step_fn(prob.loss_fn, m)
  carry = [authors_init(jax.tree.map(jnp.copy, prob.params), jax.random.key(3))]
  start = time.perf_counter()
  compiled = step.lower(carry[0], prob.batch).compile()
  compile_s = time.perf_counter() - start

  def run(steps):
    state = carry[0]
    for _ in range(steps):
      state, _ = step(state, prob.batch)
    jax.block_until_ready(state)
    carry[0] = state

  state_bytes = tree_bytes(carry[0].gm) + tree_bytes(carry[0].s) + 8
  return Method(run, compiled, state_bytes, step, compile_s)


def _noise_option(noise: str) -> dict:
  # The default is left implicit: the rows say what a user gets without choosing.
  return {} if noise == "auto" else {"noise": noise}


def bsam_method(prob: Problem, m: int, keys="threefry", noise="auto", split="auto", donate=False) -> Method:
  tx = bo.bsam(LR, N_DATA, rho=RHO)
  step = bo.bsam_step(prob.loss_fn, tx, m=m, donate=donate, **_noise_option(noise), **_split_option(split))
  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys(keys))


# --- timing -------------------------------------------------------------------


# "cpu": the process's CPU time (all of XLA's threads), which the load of a shared machine changes far less
# than the wall clock; "wall": time.perf_counter.
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def time_methods(methods: dict[str, Method], rounds: int, steps: int) -> dict[str, list[float]]:
  """Per-step milliseconds (of ``clock``) of every method in every round, interleaved."""
  for method in methods.values():
    method.run(2)  # warm-up: first dispatches
  names = list(methods)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      start = clock()
      methods[name].run(steps)
      times[name].append((clock() - start) / steps * 1e3)
  return times


def median_ratio(times, a: str, b: str) -> float:
  return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def peak_bytes(compiled) -> int:
  mem = compiled.memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def mib(x: float) -> str:
  return f"{x / 2**20:.2f}"


def spread(values: list[float]) -> str:
  return f"{statistics.median(values):.2f} [{min(values):.2f}, {max(values):.2f}]"


# --- sections -----------------------------------------------------------------

BSAM_VARIANTS = {"bsam": ("threefry", "auto"), "bsam_hash": ("hash", "auto"), "bsam_jax": ("threefry", "jax")}


def compare(prob: Problem, ms, rounds, steps, runs, log) -> tuple[list[str], list[str], list[str]]:
  """Rows of the time table and of the goal table for one model, and notes (jit cache sizes)."""
  time_rows, goal_rows, notes = [], [], []
  for m in ms:
    tag = f"[{prob.name} m={m}]"
    log(f"{tag} compiling")
    notes.append(
      f"- {prob.name}, m={m}: the default `split='auto'` picks "
      f"`{bo.choose_split(prob.loss_fn, prob.params, prob.batch, m=m)}` (for SAM-Adam and bSAM alike)."
    )
    methods = {"adam": adam_method(prob), "sam_adam": sam_adam_method(prob, m)}
    if m == 1:
      methods["contrib_sam"] = contrib_sam_method(prob)
    methods["authors"] = authors_method(prob, m)
    for name, (keys, noise) in BSAM_VARIANTS.items():
      methods[name] = bsam_method(prob, m, keys=keys, noise=noise)
    tx = bo.bsam(LR, N_DATA, rho=RHO)
    no_noise = bo.bsam_no_noise_step(prob.loss_fn, tx, m=m)
    methods["bsam_no_noise"] = step_method(no_noise, prob.params, tx.init(prob.params), prob.batch, _keys())
    per_run = []
    for run in range(runs):
      log(f"{tag} timing run {run + 1}/{runs}: {list(methods)}")
      per_run.append(time_methods(methods, rounds, steps))
    pooled = {k: [t for times in per_run for t in times[k]] for k in methods}
    med = {k: statistics.median(v) for k, v in pooled.items()}
    cells = [
      f"{med[k]:.2f}" if k in med else "—" for k in ("adam", "sam_adam", "contrib_sam", "authors", "bsam", "bsam_hash")
    ]
    ratios = []
    for b in ("bsam", "bsam_hash"):
      for a in ("adam", "sam_adam", "contrib_sam", "authors"):
        ratios.append(f"{median_ratio(pooled, b, a):.2f}" if a in pooled else "—")
    time_rows.append(f"| {prob.name} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    log(time_rows[-1])
    for name in (*BSAM_VARIANTS, "bsam_no_noise"):
      vs_sam = [median_ratio(times, name, "sam_adam") for times in per_run]
      vs_adam = [median_ratio(times, name, "adam") for times in per_run]
      goal = 1.2 if m == 1 else 1.5 if m == 8 else None
      verdict = "—" if goal is None or name != "bsam" else ("yes" if max(vs_sam) <= goal else "no")
      goal_rows.append(
        f"| {prob.name} | {m} | {name} | {med[name]:.2f} | {med['sam_adam']:.2f} | {spread(vs_sam)} | "
        f"{spread(vs_adam)} | {goal or '—'} | {verdict} |"
      )
      log(goal_rows[-1])
    notes.append(
      f"- {prob.name}, m={m}: jit cache entries per step after all timed calls: "
      f"{ {name: method.jitted._cache_size() for name, method in methods.items()} }."
    )
  return time_rows, goal_rows, notes


def memory_rows(prob: Problem, ms, quick: bool = False) -> list[str]:
  """Optimizer-state bytes and compiled peak memory (no run needed), against Adam's donated step.

  ``quick``: only bSAM with the default key, vmap and scan, donated (CI).
  """
  p_bytes = tree_bytes(prob.params)
  adam_tx, bsam_tx = optax.adam(LR), bo.bsam(LR, N_DATA, rho=RHO)
  adam_state, bsam_state = adam_tx.init(prob.params), bsam_tx.init(prob.params)
  key = jax.random.key(0)

  def adam_step(params, opt_state, batch, key):
    del key
    updates, opt_state = adam_tx.update(jax.grad(prob.loss_fn)(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, None

  def peak(step, state):
    return peak_bytes(step.lower(prob.params, state, prob.batch, key).compile())

  adam_donated = peak(jax.jit(adam_step, donate_argnums=(0, 1)), adam_state)
  rows = []
  for m in ms:
    auto = bo.choose_split(prob.loss_fn, prob.params, prob.batch, m=m)
    entries = [
      ("adam", "—", False, tree_bytes(adam_state), peak(jax.jit(adam_step), adam_state)),
      ("adam", "—", True, tree_bytes(adam_state), adam_donated),
    ]
    if not quick:
      for donate in (False, True):
        step = bo.sam_step(prob.loss_fn, adam_tx, rho=RHO, m=m, donate=donate)
        entries.append(("sam_adam", f"auto: {auto}", donate, tree_bytes(adam_state), peak(step, adam_state)))
      authors = authors_init(prob.params, key)
      authors_peak = peak_bytes(authors_step_fn(prob.loss_fn, m).lower(authors, prob.batch).compile())
      entries.append(("authors", "vmap", False, tree_bytes(authors.gm) + tree_bytes(authors.s), authors_peak))
    splits = ("auto", *SPLITS) if m > 1 else ("auto",)
    for split in splits[:3] if quick else splits:
      for noise in ("auto",) if quick else ("auto", "jax"):
        for donate in (True,) if quick else (False, True):
          step = bo.bsam_step(prob.loss_fn, bsam_tx, m=m, donate=donate, **_noise_option(noise), **_split_option(split))
          name = "bsam" if noise == "auto" else "bsam_jax"
          label = f"auto: {auto}" if split == "auto" else split
          entries.append((name, label, donate, tree_bytes(bsam_state), peak(step, bsam_state)))
    for name, split, donate, state, peak_ in entries:
      rows.append(
        f"| {prob.name} | {m} | {name} | {split} | {'yes' if donate else 'no'} | {mib(state)} | "
        f"{state / p_bytes:.2f} | {mib(peak_)} | {(peak_ - adam_donated) / p_bytes:+.1f} | {m} |"
      )
  return rows


def compile_times(prob: Problem, m: int, repeats: int = 2) -> list[str]:
  """Lower + compile seconds of fresh steps (each a new jit object: no in-memory cache hit)."""
  rows = []
  builders = {
    "adam": lambda: adam_method(prob),
    "sam_adam": lambda: sam_adam_method(prob, m),
    "authors": lambda: authors_method(prob, m),
    "bsam_jax (default split)": lambda: bsam_method(prob, m, noise="jax"),
    f"bsam (default: auto = {bo.choose_split(prob.loss_fn, prob.params, prob.batch, m=m)})": lambda: bsam_method(
      prob, m
    ),
  }
  for split in SPLITS:
    builders[f"bsam ({split})"] = functools.partial(bsam_method, prob, m, split=split)
  for name, build in builders.items():
    secs = [build().compile_s for _ in range(repeats)]
    rows.append(f"| {prob.name} | {m} | {name} | {statistics.median(secs):.2f} |")
  return rows


def split_rows(prob: Problem, m: int, rounds: int, steps: int, log) -> list[str]:
  """The m-split choice for bSAM (default key): time against SAM-Adam with the default split, peak, compile time."""
  log(f"[{prob.name} m={m}] splits")
  adam_peak = peak_bytes(
    jax.jit(
      lambda p, s, b: optax.apply_updates(p, optax.adam(LR).update(jax.grad(prob.loss_fn)(p, b), s, p)[0]),
      donate_argnums=(0, 1),
    )
    .lower(prob.params, optax.adam(LR).init(prob.params), prob.batch)
    .compile()
  )
  p_bytes = tree_bytes(prob.params)
  methods = {}
  for split in SPLITS:
    methods[f"sam_adam ({split})"] = sam_adam_method(prob, m, split)
    methods[f"bsam ({split})"] = bsam_method(prob, m, split=split)
  times = time_methods(methods, rounds, steps)
  # The default (split="auto") is the split it picks for this problem.
  times["sam_adam"] = times[f"sam_adam ({bo.choose_split(prob.loss_fn, prob.params, prob.batch, m=m)})"]
  rows = []
  for split in SPLITS:
    for kind in ("sam_adam", "bsam"):
      name = f"{kind} ({split})"
      method = methods[name]
      peak = peak_bytes(method.compiled)
      rows.append(
        f"| {prob.name} | {m} | {kind} | {split} | {statistics.median(times[name]):.2f} | "
        f"{median_ratio(times, name, 'sam_adam'):.2f} | {mib(peak)} | {(peak - adam_peak) / p_bytes:+.1f} | "
        f"{method.compile_s:.2f} |"
      )
      log(rows[-1])
  return rows


def growth(rounds: int, steps: int, log, ms=GROWTH_M, widths_list=GROWTH_WIDTHS) -> tuple[list[str], list[dict]]:
  """bSAM / SAM-Adam (same m, same split) and compile times against m and against the MLP's size."""
  rows, records = [], []
  configs = [("m", (500, 300), m) for m in ms] + [("size", widths, 8) for widths in widths_list]
  for sweep, widths, m in configs:
    prob = make_problem("mlp", widths)
    p_count = num_params(prob.params)
    for split in ("vmap", "scan"):
      log(f"[growth {sweep}] mlp {widths} ({p_count:,} params), m={m}, split={split}")
      methods = {"sam_adam": sam_adam_method(prob, m, split), "bsam": bsam_method(prob, m, split=split)}
      times = time_methods(methods, rounds, steps)
      record = {
        "sweep": sweep,
        "params": p_count,
        "m": m,
        "split": split,
        "sam_ms": statistics.median(times["sam_adam"]),
        "bsam_ms": statistics.median(times["bsam"]),
        "ratio": median_ratio(times, "bsam", "sam_adam"),
        "sam_compile": methods["sam_adam"].compile_s,
        "bsam_compile": methods["bsam"].compile_s,
        "bsam_peak": peak_bytes(methods["bsam"].compiled) / tree_bytes(prob.params),
      }
      records.append(record)
      rows.append(
        f"| {sweep} | {p_count:,} | {m} | {split} | {record['sam_ms']:.2f} | {record['bsam_ms']:.2f} | "
        f"{record['ratio']:.2f} | {record['sam_compile']:.2f} | {record['bsam_compile']:.2f} | "
        f"{record['bsam_peak']:.1f} |"
      )
      log(rows[-1])
  return rows, records


def plot_growth(records: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  for col, (sweep, x_key, x_label) in enumerate((("m", "m", "m (parts)"), ("size", "params", "parameters (m = 8)"))):
    for split, style in (("vmap", "o-"), ("scan", "s--")):
      rs = [r for r in records if r["sweep"] == sweep and r["split"] == split]
      x = [r[x_key] for r in rs]
      axes[0, col].plot(x, [r["ratio"] for r in rs], style, label=f"bSAM / SAM-Adam, split={split}")
      axes[1, col].plot(x, [r["bsam_compile"] for r in rs], style, label=f"bSAM, split={split}")
      axes[1, col].plot(x, [r["sam_compile"] for r in rs], style, alpha=0.4, label=f"SAM-Adam, split={split}")
    for row in range(2):
      axes[row, col].set_xscale("log", base=2 if sweep == "m" else 10)
      axes[row, col].set_xlabel(x_label)
      axes[row, col].legend(fontsize=7)
    axes[0, col].axhline(1.0, color="gray", lw=0.5)
    axes[0, col].set_ylabel("step time ratio")
    axes[1, col].set_ylabel("compile seconds")
  fig.suptitle("bSAM (jax.random.key(seed), the library's generator) vs SAM-Adam, MLP, batch 128, CPU")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def noise_kernels(rounds: int, log) -> list[str]:
  """``bo.noisy_params`` alone on the MLP's parameters: every kind of key, both noise settings."""
  prob = make_problem("mlp")
  tx = bo.bsam(LR, N_DATA, rho=RHO)
  state = tx.init(prob.params)
  p_count = num_params(prob.params)
  keys = {
    "jax.random.key(seed)": jax.random.key(0),
    "rbg": jax.random.key(0, impl="rbg"),
    "unsafe_rbg": jax.random.key(0, impl="unsafe_rbg"),
    "bo.hash_prng_impl": jax.random.key(0, impl=bo.hash_prng_impl),
  }
  methods = {}
  for key_name, key in keys.items():
    for noise in ("auto", "jax"):
      fn = jax.jit(lambda k, noise=noise: bo.noisy_params(k, prob.params, state, **_noise_option(noise)))
      jax.block_until_ready(fn(key))

      def run(steps, fn=fn, key=key):
        for _ in range(steps):
          out = fn(key)
        jax.block_until_ready(out)

      methods[f"{key_name}, noise={noise!r}"] = Method(run, None, 0, fn)
  log("[noise kernels] timing")
  times = time_methods(methods, rounds, 10)
  return [
    f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) * 1e6 / p_count:.1f} |" for name, t in times.items()
  ]


# --- report ---------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="CI mode: MLP only, 3 rounds of 2 steps, no growth, no file")
  parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "cnn"])
  parser.add_argument("--m", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="steps per method per round")
  parser.add_argument("--runs", type=int, default=None, help="interleaved blocks of rounds (spread of the ratios)")
  parser.add_argument(
    "--clock", default="cpu", choices=list(CLOCKS), help="cpu: process CPU time (default; robust to load), wall"
  )
  parser.add_argument("--growth", action=argparse.BooleanOptionalAction, default=None, help="m and size sweeps")
  parser.add_argument(
    "--sections",
    nargs="+",
    default=["compare", "memory", "compile", "splits", "noise"],
    choices=["compare", "memory", "compile", "splits", "noise"],
    help="which sections to run for the models (growth: --growth)",
  )
  parser.add_argument("--only-growth", action="store_true", help="just the m and size sweeps (and the plot)")
  parser.add_argument("--growth-m", nargs="+", type=int, default=list(GROWTH_M), help="m values of the m sweep")
  parser.add_argument(
    "--growth-widths", nargs="+", default=[f"{a}x{b}" for a, b in GROWTH_WIDTHS], help="MLP widths, e.g. 500x300"
  )
  parser.add_argument(
    "--out", default=None, help="markdown output (default: benchmarks/results/cost.md unless --quick)"
  )
  args = parser.parse_args(argv)
  global clock
  clock = CLOCKS[args.clock]
  models = args.models or (["mlp"] if args.quick else ["mlp", "cnn"])
  rounds = args.rounds or (3 if args.quick else 9)
  steps = args.steps or (2 if args.quick else 5)
  runs = args.runs or (1 if args.quick else 2)
  do_growth = args.growth if args.growth is not None else not args.quick
  out = args.out or (None if args.quick else os.path.join(RESULTS, "cost.md"))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  command = "python benchmarks/cost.py " + " ".join(argv if argv is not None else sys.argv[1:])

  header = [
    "# Cost of a bSAM step",
    "",
    f"Command: `{command.strip()}` — {runs} run(s) x {rounds} rounds x {steps} steps per method, interleaved; "
    "medians over rounds (ratios: medians of per-round ratios). Clock: "
    + (
      "the process's CPU time per step (all of XLA's threads; the wall clock of a machine this loaded varies "
      "several-fold between rounds)."
      if args.clock == "cpu"
      else "wall time per step."
    ),
    f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), {jax.devices()[0].platform}; "
    f"jax {jax.__version__}, optax {optax.__version__}, Python {platform.python_version()}; "
    f"load average at the start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
    "",
  ]
  goal_table = [
    "## What a user gets: bSAM against SAM-Adam and Adam",
    "",
    "`bsam` = `bo.bsam_step` called with `jax.random.key(seed)` and nothing else chosen (the library's generator); "
    '`bsam_hash` = with a `bo.hash_prng_impl` key; `bsam_jax` = `noise="jax"` (jax.random.normal\'s threefry '
    "stream, the default before); `bsam_no_noise` = `bo.bsam_no_noise_step` (bSAM without its noise: what "
    "the rest of the step costs). Ratios: median over runs [min, max over runs] of each run's median per-round "
    "ratio. Goal (issue 15): `bsam` ≤ 1.2x SAM-Adam at m = 1, ≤ 1.5x at m = 8.",
    "",
    "| model | m | method | ms | sam_adam ms | / sam_adam | / adam | goal | met (every run) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  time_table = [
    "## Step time (ms) and ratios",
    "",
    "All runs pooled. `authors` = the authors' research-code approach (per-leaf threefry draws, vmap over parts, "
    "jnp.mean); `contrib_sam` has no m-sharpness (m = 1 only).",
    "",
    "| model | m | adam | sam_adam | contrib_sam | authors | bsam | bsam_hash | bsam/adam | bsam/sam_adam | "
    "bsam/contrib_sam | bsam/authors | hash/adam | hash/sam_adam | hash/contrib_sam | hash/authors |",
    "|---|---|" + "---|" * 14,
  ]
  mem_table = [
    "## Memory",
    "",
    "State: optimizer state without the weights (MiB; and in parameter-sized buffers P: Adam's μ, ν = 2). "
    "Peak: one compiled step's arguments + outputs + temporaries − donated (aliased) buffers, MiB. "
    "`vs adam` = (peak − Adam's donated step peak) / P; the bound is one P per part (= m).",
    "",
    "| model | m | method | split | donate | state MiB | state / P | step peak MiB | vs adam (P) | bound (P) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  notes, compile_rows, split_table = [], [], []
  if args.only_growth:
    models, do_growth = [], True
  sections = set(args.sections)
  for name in models:
    prob = make_problem(name)
    notes.append(
      f"- {name}: {num_params(prob.params):,} parameters ({mib(tree_bytes(prob.params))} MiB), batch {BATCH}."
    )
    if "compare" in sections:
      rows, goals, cache_notes = compare(prob, args.m, rounds, steps, runs, log)
      time_table += rows
      goal_table += goals
      notes += cache_notes
    if "memory" in sections:
      log(f"[{name}] memory")
      mem_table += memory_rows(prob, args.m, quick=args.quick)
    if not args.quick:
      m_c = max(args.m)
      if "compile" in sections:
        log(f"[{name}] compile times, m={m_c}")
        compile_rows += compile_times(prob, m_c)
      if "splits" in sections:
        split_table += split_rows(prob, m_c, rounds, steps, log)

  report = header
  if models:
    report += ["Problems:", *notes, ""]
    if "compare" in sections:
      report += goal_table + [""] + time_table + [""]
    if "memory" in sections:
      report += mem_table + [""]
  if compile_rows:
    report += [
      "## Compile time (s): lower + compile of a fresh step, mean of 2",
      "",
      "| model | m | method | seconds |",
      "|---|---|---|---|",
      *compile_rows,
      "",
    ]
  if split_table:
    report += [
      "## The m-split: vmap, scan, unroll",
      "",
      "bSAM with the default key, and SAM-Adam, at each split; one interleaved block. `/ sam_adam` = time / "
      "SAM-Adam's with the default split (`auto`, the split it picks). Peak vs Adam in P as in the memory table "
      "(Adam donated; these steps are not donated). Compile: lower + compile of that step, once.",
      "",
      "| model | m | method | split | ms | / sam_adam (default) | step peak MiB | vs adam (P) | compile s |",
      "|---|---|---|---|---|---|---|---|---|",
      *split_table,
      "",
    ]
  if not args.quick and models and "noise" in sections:
    report += [
      "## The noise alone",
      "",
      "`bo.noisy_params(key, params, state)` (θ = ω + z / sqrt(N s)) for the MLP's 545,810 parameters, jitted, "
      "10 calls per round: what each kind of key costs with the library's generator (`noise='auto'`, the "
      "default) and with `noise='jax'`.",
      "",
      "| key, noise | ms | ns per parameter |",
      "|---|---|---|",
      *noise_kernels(rounds, log),
      "",
    ]
  if do_growth:
    widths_list = [tuple(int(w) for w in spec.split("x")) for spec in args.growth_widths]
    growth_rows, records = growth(max(3, rounds // 2), max(2, steps // 2), log, args.growth_m, widths_list)
    plot = os.path.join(os.path.dirname(out) if out else RESULTS, "cost_growth.png")
    if out:
      plot_growth(records, plot)
    report += [
      "## How the cost grows",
      "",
      "MLP 784-h1-h2-10, batch 128, bSAM with `jax.random.key(seed)` against SAM-Adam with the same m and split, "
      "one interleaved block per row. Sweep `m`: the 545,810-parameter MLP, m = 1 ... 32 (parts of 128 / m "
      "examples); sweep `size`: m = 8, widths "
      + ", ".join(f"{a}-{b}" for a, b in widths_list)
      + ". Peak in P (parameter-sized buffers) of the non-donated bSAM step. Plot: "
      "[cost_growth.png](cost_growth.png).",
      "",
      "| sweep | params | m | split | sam_adam ms | bsam ms | bsam / sam_adam | sam_adam compile s | "
      "bsam compile s | bsam peak (P) |",
      "|---|---|---|---|---|---|---|---|---|---|",
      *growth_rows,
      "",
    ]
  text = "\n".join(report)
  print(text)
  if out:
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
    log(f"wrote {out}")


if __name__ == "__main__":
  main()
