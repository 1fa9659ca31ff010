"""Cost of a bSAM step: time, memory and compile time against Adam, SAM-Adam,
``optax.contrib.sam`` and the authors' research-code approach.

Models: an MLP 784-500-300-10 (545k parameters) and a small 2-D CNN (the
project's ``CNN``: three strided 5x5 convolutions with 32 channels, 28x28
inputs, 57k parameters); batch 128 of random data, float32, m = 1 and 8.

Methods (one step each: from parameters and state to new parameters and state):

* ``adam``: ``optax.adam``, one gradient.
* ``sam_adam``: :func:`bsam_optax.sam_step` with ``optax.adam`` (ε = ρ g/‖g‖
  per part), on the same step machinery as bSAM.
* ``contrib_sam``: ``optax.contrib.sam(adam, normalize + sgd(ρ),
  opaque_mode=True)``, SAM as optax ships it; it has no m-sharpness, so it
  is timed at m = 1 only.
* ``authors``: a re-implementation of the approach of the authors' research
  code (github.com/team-approx-bayes/bayesian-sam, ``optim.py``): per-leaf
  ``jax.random.normal`` with keys split per leaf and per part, the batch
  reshaped to ``(m, B/m, ...)`` and ``jax.vmap`` over parts computing noise,
  gradient, perturbation and perturbed gradient, ``jnp.mean`` over parts,
  and the mean update divided by the *old* scale.
* ``bsam``: :func:`bsam_optax.bsam_step` with a default (threefry) key, and
  ``bsam_hash`` with a ``bsam_optax.hash_prng_impl`` key.

The full run times this comparison twice: as the methods are usually called
(no donation), and with every method donating its parameters and state.

Timing: every method runs ``--steps`` steps per round, ``--rounds`` rounds,
the order of the methods rotating each round, after two warm-up calls;
per-step times are medians over rounds, and ratios are medians of the
per-round ratios (robust to the load of a shared machine drifting between
rounds). Memory: optimizer-state bytes, and the peak memory of one compiled
step (arguments + outputs + temporaries − aliased donated buffers, from
``Compiled.memory_analysis()``).

The lever section (``--levers``) times each performance choice of the bSAM
step against the alternative it replaced or was tried against, in the same
process, side by side with SAM-Adam.

Usage::

  python benchmarks/cost.py --quick    # CI: MLP, few rounds, no levers; prints, writes nothing
  python benchmarks/cost.py            # full run: writes benchmarks/results/cost.md
  python benchmarks/cost.py --models mlp --m 1 8 --rounds 9 --steps 5 --levers --out /tmp/cost.md
"""

import argparse
import contextlib
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bsam_optax as bo
from bsam_optax import _models
from bsam_optax import _noise
from bsam_optax import _step

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BATCH = 128
N_DATA = 60_000
LR = 1e-3
RHO = 0.05


# --- problems -----------------------------------------------------------------


class Problem(NamedTuple):
  name: str
  params: Any
  batch: dict
  loss_fn: Callable


def make_problem(name: str) -> Problem:
  if name == "mlp":
    model, shape = _models.MLP(features=(500, 300)), (BATCH, 784)
  elif name == "cnn":
    model, shape = _models.CNN(channels=(32, 32, 32), kernel_size=5), (BATCH, 28, 28)
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


def _keys(impl, n=16):
  base = jax.random.key(3) if impl is None else jax.random.key(3, impl=impl)
  return [jax.random.fold_in(base, i) for i in range(n)]


def step_method(step, params, opt_state, batch, keys, context=contextlib.nullcontext) -> Method:
  """A step with the signature ``step(params, opt_state, batch, key) -> (params, opt_state, out)``.

  ``context`` (e.g. ``lambda: jax.threefry_partitionable(False)``) is entered
  around every call: JAX configuration is part of the jit cache key, so a
  step traced under it must also be called under it.
  """
  # Copies, so that a donating step cannot delete buffers other methods share.
  params, opt_state = jax.tree.map(jnp.copy, (params, opt_state))
  with context():
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, batch, keys[0]).compile()
    compile_s = time.perf_counter() - start
    # The first call traces and compiles now, inside any `patched` context of the caller.
    params, opt_state, _ = step(params, opt_state, batch, keys[0])
  jax.block_until_ready(params)
  carry = [params, opt_state, 1]

  def run(steps):
    p, s, i = carry
    with context():
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

  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys(None))


def sam_adam_method(prob: Problem, m: int, donate: bool = False) -> Method:
  tx = optax.adam(LR)
  step = bo.sam_step(prob.loss_fn, tx, rho=RHO, m=m, donate=donate)
  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys(None))


def contrib_sam_method(prob: Problem, donate: bool = False) -> Method:
  tx = optax.contrib.sam(
    optax.adam(LR), optax.chain(optax.contrib.normalize(), optax.sgd(RHO)), sync_period=2, opaque_mode=True
  )

  @functools.partial(jax.jit, donate_argnums=(0, 1) if donate else ())
  def step(params, opt_state, batch, key):
    del key
    grad_fn = jax.grad(prob.loss_fn)
    updates, opt_state = tx.update(grad_fn(params, batch), opt_state, params, grad_fn=lambda p, _: grad_fn(p, batch))
    return optax.apply_updates(params, updates), opt_state, None

  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys(None))


def authors_method(prob: Problem, m: int, donate: bool = False) -> Method:
  step = authors_step_fn(prob.loss_fn, m, donate=donate)
  # A copy, so that a donating step cannot delete the problem's parameters.
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


def bsam_method(prob: Problem, m: int, impl=None, context=contextlib.nullcontext, **kwargs) -> Method:
  tx = bo.bsam(LR, N_DATA, rho=RHO)
  step = bo.bsam_step(prob.loss_fn, tx, m=m, **kwargs)
  return step_method(step, prob.params, tx.init(prob.params), prob.batch, _keys(impl), context)


# --- timing -------------------------------------------------------------------


def time_methods(methods: dict[str, Method], rounds: int, steps: int) -> dict[str, list[float]]:
  """Per-step milliseconds of every method in every round, interleaved."""
  for method in methods.values():
    method.run(2)  # warm-up: compile (already done) and first dispatches
  names = list(methods)
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      start = time.perf_counter()
      methods[name].run(steps)
      times[name].append((time.perf_counter() - start) / steps * 1e3)
  return times


def median_ratio(times, a: str, b: str) -> float:
  return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def peak_bytes(compiled) -> int:
  mem = compiled.memory_analysis()
  return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes


def mib(x: float) -> str:
  return f"{x / 2**20:.2f}"


# --- sections -----------------------------------------------------------------


def compare(prob: Problem, ms, rounds, steps, log, donate: bool = False) -> tuple[list[str], dict]:
  """The main comparison for one model: rows of the time table, and jit cache sizes.

  ``donate``: every method (baselines too) donates its parameters and state.
  """
  time_rows, extra = [], {}
  for m in ms:
    tag = f"[{prob.name} m={m}{', donated' if donate else ''}]"
    log(f"{tag} compiling")
    methods = {"adam": adam_method(prob, donate), "sam_adam": sam_adam_method(prob, m, donate)}
    if m == 1:
      methods["contrib_sam"] = contrib_sam_method(prob, donate)
    methods["authors"] = authors_method(prob, m, donate)
    methods["bsam"] = bsam_method(prob, m, donate=donate)
    methods["bsam_hash"] = bsam_method(prob, m, impl=bo.hash_prng_impl, donate=donate)
    log(f"{tag} timing {list(methods)}")
    times = time_methods(methods, rounds, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = [
      f"{med[k]:.2f}" if k in med else "—" for k in ("adam", "sam_adam", "contrib_sam", "authors", "bsam", "bsam_hash")
    ]
    ratios = []
    for b in ("bsam", "bsam_hash"):
      for a in ("adam", "sam_adam", "contrib_sam", "authors"):
        ratios.append(f"{median_ratio(times, b, a):.2f}" if a in times else "—")
    time_rows.append(f"| {prob.name} | {m} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    log(time_rows[-1])
    # No recompilation: every jitted step compiled once for all keys / states.
    extra[(prob.name, m)] = {name: method.jitted._cache_size() for name, method in methods.items()}
  return time_rows, extra


def memory_rows(prob: Problem, ms, quick: bool = False) -> list[str]:
  """Optimizer-state bytes and compiled peak memory (no run needed), against Adam's donated step.

  ``quick``: only the hash-keyed bSAM steps with donation (CI).
  """
  p_bytes = tree_bytes(prob.params)
  adam_tx, bsam_tx = optax.adam(LR), bo.bsam(LR, N_DATA, rho=RHO)
  adam_state, bsam_state = adam_tx.init(prob.params), bsam_tx.init(prob.params)
  fry, hsh = jax.random.key(0), jax.random.key(0, impl=bo.hash_prng_impl)

  def adam_step(params, opt_state, batch, key):
    del key
    updates, opt_state = adam_tx.update(jax.grad(prob.loss_fn)(params, batch), opt_state, params)
    return optax.apply_updates(params, updates), opt_state, None

  def peak(step, state, key):
    return peak_bytes(step.lower(prob.params, state, prob.batch, key).compile())

  adam_donated = peak(jax.jit(adam_step, donate_argnums=(0, 1)), adam_state, fry)
  rows = []
  for m in ms:
    entries = [
      ("adam", "—", False, tree_bytes(adam_state), peak(jax.jit(adam_step), adam_state, fry)),
      ("adam", "—", True, tree_bytes(adam_state), adam_donated),
    ]
    for donate in (False, True):
      step = bo.sam_step(prob.loss_fn, adam_tx, rho=RHO, m=m, donate=donate)
      entries.append(("sam_adam", "vmap", donate, tree_bytes(adam_state), peak(step, adam_state, fry)))
    authors = authors_init(prob.params, fry)
    authors_peak = peak_bytes(authors_step_fn(prob.loss_fn, m).lower(authors, prob.batch).compile())
    entries.append(("authors", "vmap", False, tree_bytes(authors.gm) + tree_bytes(authors.s), authors_peak))
    splits = ("vmap", "scan", "unroll") if m > 1 else ("vmap",)
    for split in splits[:2] if quick else splits:
      for name, key in (("bsam_hash", hsh),) if quick else (("bsam", fry), ("bsam_hash", hsh)):
        for donate in (True,) if quick else (False, True):
          step = bo.bsam_step(prob.loss_fn, bsam_tx, m=m, split=split, donate=donate)
          entries.append((name, split, donate, tree_bytes(bsam_state), peak(step, bsam_state, key)))
    for name, split, donate, state, peak_ in entries:
      rows.append(
        f"| {prob.name} | {m} | {name} | {split} | {'yes' if donate else 'no'} | {mib(state)} | "
        f"{state / p_bytes:.2f} | {mib(peak_)} | {(peak_ - adam_donated) / p_bytes:+.1f} | {m} |"
      )
  return rows


def compile_times(prob: Problem, m: int, repeats: int = 3) -> list[str]:
  """Lower + compile seconds of fresh steps (each a new jit object: no in-memory cache hit)."""
  rows = []
  builders = {
    "adam": lambda: adam_method(prob),
    "sam_adam": lambda: sam_adam_method(prob, m),
    "authors": lambda: authors_method(prob, m),
    "bsam": lambda: bsam_method(prob, m),
    "bsam_hash": lambda: bsam_method(prob, m, impl=bo.hash_prng_impl),
    "bsam_hash, split='unroll'": lambda: bsam_method(prob, m, impl=bo.hash_prng_impl, split="unroll"),
  }
  for name, build in builders.items():
    secs = [build().compile_s for _ in range(repeats)]
    rows.append(f"| {prob.name} | {m} | {name} | {statistics.median(secs):.2f} |")
  return rows


def host_sync_check(prob: Problem, m: int, steps: int = 20) -> str:
  """Dispatching ``steps`` steps must return long before they finish (async dispatch)."""
  tx = bo.bsam(LR, N_DATA, rho=RHO)
  step = bo.bsam_step(prob.loss_fn, tx, m=m)
  keys = _keys(bo.hash_prng_impl, steps)
  p, s = prob.params, tx.init(prob.params)
  p, s, _ = step(p, s, prob.batch, keys[0])
  jax.block_until_ready(p)
  start = time.perf_counter()
  for i in range(steps):
    p, s, _ = step(p, s, prob.batch, keys[i])
  dispatched = time.perf_counter() - start
  jax.block_until_ready(p)
  total = time.perf_counter() - start
  compiled = step.lower(p, s, prob.batch, keys[0]).compile().as_text()
  host_ops = [
    op for op in ("outfeed", "infeed", "send(", "recv(", "host_callback", "xla_python_cpu_callback") if op in compiled
  ]
  return (
    f"{prob.name}, m={m}: {steps} steps dispatched in {dispatched * 1e3:.1f} ms, finished after {total * 1e3:.1f} ms; "
    f"jit cache entries after {steps + 1} calls with fresh keys and states: {step._cache_size()}; "
    f"host-transfer ops in the compiled HLO: {host_ops or 'none'}"
  )


# --- levers ---------------------------------------------------------------------


def _flat_normal_like(key, tree):
  """The replaced draw layout: one flat vector for all leaves, sliced into them."""
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [math.prod(jnp.shape(x)) for x in leaves]
  flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, start = [], 0
  for leaf, size in zip(leaves, sizes, strict=True):
    out.append(flat[start : start + size].reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
    start += size
  return jax.tree.unflatten(treedef, out)


def _reduce_mean(x):
  return jnp.mean(x, axis=0)


# The hash-key transform before Box-Muller: M. Giles, "Approximating the erfinv
# function" (GPU Computing Gems, 2010), with log((1 - x)(1 + x)) for log1p(-x²),
# applied to jax.random.normal's uniform in [-1 + 2^-24, 1).
_ERFINV_CENTRAL = (
  2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 0.00021858087,
  -0.00125372503, -0.00417768164, 0.246640727, 1.50140941,
)  # fmt: skip
_ERFINV_TAIL = (
  -0.000200214257, 0.000100950558, 0.00134934322, -0.00367342844, 0.00573950773,
  -0.0076224613, 0.00943887047, 1.00167406, 2.83297682,
)  # fmt: skip


def _giles_normal(key, shape):
  bits = jax.random.bits(key, shape, jnp.uint32)
  unit = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
  low = np.nextafter(np.float32(-1.0), np.float32(0.0))
  x = jnp.maximum(low, unit * (1.0 - low) + low)
  w = -jnp.log((1.0 - x) * (1.0 + x))
  central = w < 5.0
  w = jnp.where(central, w - 2.5, jnp.sqrt(w) - 3.0)
  p = jnp.where(central, np.float32(_ERFINV_CENTRAL[0]), np.float32(_ERFINV_TAIL[0]))
  for a, b in zip(_ERFINV_CENTRAL[1:], _ERFINV_TAIL[1:], strict=True):
    p = jnp.where(central, np.float32(a), np.float32(b)) + p * w
  return np.float32(np.sqrt(2.0)) * p * x


def _giles_draw(key, shape, dtype):
  """``_noise._draw`` as it was before Box-Muller (hash keys: Giles' inverse CDF)."""
  if dtype == jnp.float32 and jax.random.key_impl(key) == bo.hash_prng_impl:
    return _giles_normal(key, shape)
  return jax.random.normal(key, shape, dtype)


def _library_box_muller(key, shape):
  """The kept Box-Muller with XLA's jnp.log and jnp.cos instead of the polynomials."""
  counter = _noise._counter(tuple(shape))
  data = jax.random.key_data(key)
  first, second = _noise._hash_words(data, counter, 0), _noise._hash_words(data, counter, 1)
  u = 1.0 - (first >> np.uint32(8)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-24)
  v = (second >> np.uint32(8)).astype(jnp.int32).astype(jnp.float32) * np.float32(2.0**-24)
  return jnp.sqrt(-2.0 * jnp.log(u)) * jnp.cos(np.float32(2.0 * np.pi) * v)


class patched:
  """Temporarily replaces ``module.name`` while steps are traced (they are traced at compile)."""

  def __init__(self, module, name, value):
    self.module, self.name, self.value = module, name, value

  def __enter__(self):
    self.old = getattr(self.module, self.name)
    setattr(self.module, self.name, self.value)

  def __exit__(self, *exc):
    setattr(self.module, self.name, self.old)


def _time_variants(prob, m, variants, kept, rounds, steps, log) -> list[str]:
  unique = {}
  for _, method in variants.values():
    unique.setdefault(id(method), method)
  log(f"[levers {prob.name} m={m}] timing {len(unique)} steps")
  by_id = time_methods({str(k): v for k, v in unique.items()}, rounds, steps)
  sam_id, kept_id = str(id(variants["reference: SAM-Adam"][1])), str(id(kept))
  rows = []
  for label, (lever, method) in variants.items():
    key = str(id(method))
    name = label.split(": ", 1)[1]
    ms_step = statistics.median(by_id[key])
    rows.append(
      f"| {prob.name} | {lever} | {m} | {name} | {ms_step:.2f} | {median_ratio(by_id, key, kept_id):.2f} | "
      f"{median_ratio(by_id, key, sam_id):.2f} | {mib(peak_bytes(method.compiled))} |"
    )
    log(rows[-1])
  return rows


def levers(prob: Problem, ms, rounds, steps, log, only_parts: bool = False) -> list[str]:
  """One table row per (lever, m, variant): ms per step, ratio to the kept variant and to SAM-Adam.

  ``only_parts``: just lever 6 (how the m parts are evaluated), for m > 1.
  """
  rows = []
  hash_impl = bo.hash_prng_impl
  for m in ms:
    if only_parts and m == 1:
      continue
    variants: dict[str, tuple[str, Method]] = {}

    def add(lever, name, method, variants=variants):
      variants[f"{lever}: {name}"] = (lever, method)

    log(f"[levers {prob.name} m={m}] compiling")
    add("reference", "SAM-Adam", sam_adam_method(prob, m))
    kept = bsam_method(prob, m, impl=hash_impl)
    add("reference", "bsam_step (hash key, all levers kept)", kept)
    if only_parts:
      add("6 parts", "vmap [default]", kept)
      add("6 parts", "scan", bsam_method(prob, m, impl=hash_impl, split="scan"))
      add("6 parts", "unroll", bsam_method(prob, m, impl=hash_impl, split="unroll"))
      rows += _time_variants(prob, m, variants, kept, rounds, steps, log)
      continue
    with patched(_step, "_mean_over_leading_axis", _reduce_mean), patched(_noise, "normal_like", _flat_normal_like):
      add("0 all", "threefry key, code before this work (flat draw, jnp.mean)", bsam_method(prob, m))
    if m > 1:
      with patched(_step, "_mean_over_leading_axis", _reduce_mean):
        add("1 mean over parts", "jnp.mean(axis=0) [before]", bsam_method(prob, m, impl=hash_impl))
        add("1 mean over parts", "SAM-Adam with jnp.mean(axis=0) [before]", sam_adam_method(prob, m))
      add("1 mean over parts", "pairwise sum of slices [kept]", kept)
    with patched(_noise, "normal_like", _flat_normal_like):
      add("2 draw layout (threefry)", "one flat draw, sliced [before]", bsam_method(prob, m))
      add("2 draw layout (hash)", "one flat draw, sliced [before]", bsam_method(prob, m, impl=hash_impl))
    fry = bsam_method(prob, m)
    add("0 all", "threefry key, now", fry)
    add("0 all", "hash key, now", kept)
    add("2 draw layout (threefry)", "per leaf, fused [kept]", fry)
    add("2 draw layout (hash)", "per leaf, fused [kept]", kept)
    add("3 generator", "threefry [default]", fry)
    no_partition = lambda: jax.threefry_partitionable(False)
    add("3 generator", "threefry, jax_threefry_partitionable=False", bsam_method(prob, m, context=no_partition))
    add("3 generator", "rbg", bsam_method(prob, m, impl="rbg"))
    add("3 generator", "unsafe_rbg", bsam_method(prob, m, impl="unsafe_rbg"))
    add("3 generator", "hash_prng_impl [opt-in]", kept)
    with patched(_noise, "_draw", lambda key, shape, dtype: jax.random.normal(key, shape, dtype)):
      add("4 hash bits to normals", "jax.random.normal (XLA erf_inv) [first]", bsam_method(prob, m, impl=hash_impl))
    with patched(_noise, "_draw", _giles_draw):
      add("4 hash bits to normals", "Giles erfinv with log [before]", bsam_method(prob, m, impl=hash_impl))
    add("4 hash bits to normals", "Box-Muller, polynomial log and sin [kept]", kept)
    add("5 donation", "donate=False [default]", kept)
    add("5 donation", "donate=True", bsam_method(prob, m, impl=hash_impl, donate=True))
    if m > 1:
      add("6 parts", "vmap [default]", kept)
      add("6 parts", "scan", bsam_method(prob, m, impl=hash_impl, split="scan"))
      add("6 parts", "unroll", bsam_method(prob, m, impl=hash_impl, split="unroll"))
    rows += _time_variants(prob, m, variants, kept, rounds, steps, log)
  return rows


def micro(rounds: int, log) -> list[str]:
  """The kernels behind the levers, alone: normals for the MLP's leaves, and the mean over 8 parts."""
  tree = jax.tree.map(jnp.zeros_like, make_problem("mlp").params)
  p_count = num_params(tree)
  fry, hsh = jax.random.key(0), jax.random.key(0, impl=bo.hash_prng_impl)
  plain = contextlib.nullcontext

  def per_leaf(draw):
    def fn(key):
      leaves, treedef = jax.tree.flatten(tree)
      return jax.tree.unflatten(treedef, [draw(jax.random.fold_in(key, j), x.shape) for j, x in enumerate(leaves)])

    return fn

  def like(key):
    return _noise.normal_like(key, tree)

  fns = {
    "threefry (default)": (like, fry, plain),
    "threefry, jax_threefry_partitionable=False": (like, fry, lambda: jax.threefry_partitionable(False)),
    "rbg": (like, jax.random.key(0, impl="rbg"), plain),
    "unsafe_rbg": (like, jax.random.key(0, impl="unsafe_rbg"), plain),
    "hash_prng_impl: bits only": (per_leaf(lambda k, shape: jax.random.bits(k, shape, jnp.uint32)), hsh, plain),
    "hash_prng_impl: jax.random.normal": (per_leaf(jax.random.normal), hsh, plain),
    "hash_prng_impl: Giles erfinv with log [before]": (per_leaf(_giles_normal), hsh, plain),
    "hash_prng_impl: Box-Muller with jnp.log, jnp.cos": (per_leaf(_library_box_muller), hsh, plain),
    "hash_prng_impl: normal_like (Box-Muller, polynomial log and sin) [kept]": (like, hsh, plain),
  }
  x = jax.random.normal(fry, (8, 784, 500))
  fns["mean over 8 parts of 784x500: jnp.mean(axis=0)"] = (_reduce_mean, x, contextlib.nullcontext)
  fns["mean over 8 parts of 784x500: pairwise sum (kept)"] = (_step._mean_over_leading_axis, x, contextlib.nullcontext)
  methods = {}
  for name, (fn, arg, context) in fns.items():
    jitted = jax.jit(fn)
    with context():
      jax.block_until_ready(jitted(arg))

    def run(steps, jitted=jitted, arg=arg, context=context):
      with context():
        for _ in range(steps):
          out = jitted(arg)
      jax.block_until_ready(out)

    methods[name] = Method(run, None, 0, jitted)
  log("[micro] timing")
  times = time_methods(methods, rounds, 10)
  rows = []
  for name in fns:
    ms_ = statistics.median(times[name])
    per = f"{ms_ * 1e6 / p_count:.1f}" if not name.startswith("mean") else "—"
    rows.append(f"| {name} | {ms_:.3f} | {per} |")
  return rows


# --- report ---------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--quick", action="store_true", help="CI mode: MLP only, 3 rounds of 2 steps, no levers, no file")
  parser.add_argument("--models", nargs="+", default=None, choices=["mlp", "cnn"])
  parser.add_argument("--m", nargs="+", type=int, default=[1, 8])
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps", type=int, default=None, help="steps per method per round")
  parser.add_argument(
    "--levers", action=argparse.BooleanOptionalAction, default=None, help="time the levers (default: on unless --quick)"
  )
  parser.add_argument(
    "--out", default=None, help="markdown output (default: benchmarks/results/cost.md unless --quick)"
  )
  args = parser.parse_args(argv)
  models = args.models or (["mlp"] if args.quick else ["mlp", "cnn"])
  rounds = args.rounds or (3 if args.quick else 9)
  steps = args.steps or (2 if args.quick else 5)
  do_levers = args.levers if args.levers is not None else not args.quick
  out = args.out or (None if args.quick else os.path.join(RESULTS, "cost.md"))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  command = "python benchmarks/cost.py " + " ".join(argv if argv is not None else sys.argv[1:])

  header = [
    "# Cost of a bSAM step",
    "",
    f"Command: `{command.strip()}` — {rounds} rounds x {steps} steps per method, interleaved; "
    "medians over rounds (ratios: medians of per-round ratios).",
    f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), {jax.devices()[0].platform}; "
    f"jax {jax.__version__}, optax {optax.__version__}, Python {platform.python_version()}.",
    "",
  ]
  time_table = [
    "## Step time (ms) and ratios",
    "",
    "`bsam` = `bo.bsam_step` with a default threefry key; `bsam_hash` = with a `bo.hash_prng_impl` key. "
    "`authors` = the authors' research-code approach (per-leaf threefry draws, vmap over parts, jnp.mean); "
    "`contrib_sam` has no m-sharpness (m = 1 only).",
    "",
    "| model | m | adam | sam_adam | contrib_sam | authors | bsam | bsam_hash | bsam/adam | bsam/sam_adam | "
    "bsam/contrib_sam | bsam/authors | hash/adam | hash/sam_adam | hash/contrib_sam | hash/authors |",
    "|---|---|" + "---|" * 14,
  ]
  donated_table = [
    "## Step time (ms) and ratios, every method donating",
    "",
    "As above, but every step (Adam, SAM-Adam, optax.contrib.sam, the authors' approach and bSAM) donates its "
    "parameters and optimizer state (`donate_argnums`; `bo.bsam_step(..., donate=True)`), the fair comparison "
    "for a donated bSAM step. A separate block of rounds: compare ratios within a table, not across.",
    "",
    time_table[-2],
    time_table[-1],
  ]
  mem_table = [
    "## Memory",
    "",
    "State: optimizer state without the weights (MiB; and in parameter-sized buffers P: Adam's μ, ν = 2). "
    "Peak: one compiled step's arguments + outputs + temporaries − donated (aliased) buffers, MiB. "
    "`vs adam` = (peak − Adam's donated step peak) / P; issue 5's bound with donation is one P per part (= m).",
    "",
    "| model | m | method | split | donate | state MiB | state / P | step peak MiB | vs adam (P) | bound (P) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  notes, compile_rows, lever_rows = [], [], []
  micro_rows = [] if args.quick else micro(rounds, log)
  for name in models:
    prob = make_problem(name)
    p_count = num_params(prob.params)
    notes.append(f"- {name}: {p_count:,} parameters ({mib(tree_bytes(prob.params))} MiB float32), batch {BATCH}.")
    rows, cache = compare(prob, args.m, rounds, steps, log)
    time_table += rows
    if not args.quick:
      donated_table += compare(prob, args.m, rounds, steps, log, donate=True)[0]
    log(f"[{name}] memory")
    mem_table += memory_rows(prob, args.m, quick=args.quick)
    for (model, m), sizes in cache.items():
      notes.append(f"- {model}, m={m}: jit cache entries per step after all timed calls: {sizes}.")
    m_c = max(args.m)
    if not args.quick:
      log(f"[{name}] compile times, m={m_c}")
      compile_rows += compile_times(prob, m_c)
    notes.append("- " + host_sync_check(prob, m_c))
    if do_levers:
      lever_rows += levers(prob, args.m, rounds, steps, log, only_parts=name != "mlp")

  report = header + ["Problems:", *notes, ""] + time_table + [""]
  report += [] if args.quick else donated_table + [""]
  report += mem_table + [""]
  report += (
    []
    if not compile_rows
    else [
      "## Compile time (s): lower + compile of a fresh step, median of 3",
      "",
      "| model | m | method | seconds |",
      "|---|---|---|---|",
      *compile_rows,
      "",
    ]
  )
  if micro_rows:
    report += [
      "## Kernels alone",
      "",
      "P = 545,810 standard normals in the MLP's leaves (one draw per leaf, as normal_like) per call, and the "
      "mean over the parts' gradients of the 784x500 leaf at m = 8; each jitted alone, 10 calls per round.",
      "",
      "| kernel | ms | ns per normal |",
      "|---|---|---|",
      *micro_rows,
      "",
    ]
  if lever_rows:
    report += [
      "## Levers",
      "",
      "Each row is one variant of the bSAM step; the kept variant of every lever is the reference row "
      "`bsam_step (hash key, all levers kept)` unless the lever is about the default key. "
      "`/kept` = time / kept variant's time, `/SAM-Adam` = time / SAM-Adam's time, same rounds. "
      "The CNN gets lever 6 only.",
      "",
      "| model | lever | m | variant | ms | /kept | /SAM-Adam | step peak MiB |",
      "|---|---|---|---|---|---|---|---|",
      *lever_rows,
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
