"""Does VariationalSAM's Σ grow until the Taylor approximation fails (Ujváry et al., Sec. 6)?

Trains VSAM (``bo.vsam`` + ``bo.vsam_step``, the seed's defaults: ρ = sqrt(P),
Σ₀ = (0.05² / P) I) on MNIST-1D with the MLP of ``benchmarks/uncertainty.py``
(40-128-128-10, 60 epochs, batch 128, m = 8, cosine learning rate) and tracks,
after every epoch: the median and maximum posterior std σ, the Euclidean norm
of the perturbation ‖ε‖, the training loss at μ, and the first-order check of
the seed's Eq. 2 on a fixed training batch: the actual increase
``ℓ(μ + ε) − ℓ(μ)`` against its first-order prediction ``gᵀ ε = ρ sqrt(gᵀ Σ g)``
(a ratio near 1: the Taylor approximation holds). Variants: the bound
``max_std`` on σ (two values), and for reference SAM-Adam with the radius the
bound implies (``ρ_eff = sqrt(P) max_std``). Test accuracy at the end; 3 seeds
(mean ± std).

Usage::

  python benchmarks/vsam_sigma.py              # writes benchmarks/results/vsam_sigma.md (~5 min on 2 CPU cores)
  python benchmarks/vsam_sigma.py --quick      # 1 seed, 3 epochs; prints, writes nothing
  python benchmarks/vsam_sigma.py --model cnn --max-std 1.5e-3 --out benchmarks/results/vsam_sigma_cnn.md  # the CNN
"""

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bsam_optax as bo
from bsam_optax import app
from bsam_optax.app import models as app_models

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LR, WD, BATCH, M = 1e-2, 1e-3, 128, 8


def _flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def run(variant, data, model, epochs, seeds):
  """Trains ``variant`` for every seed (vmapped); returns per-epoch diagnostics and test accuracy."""
  n_train = data.train.y.shape[0]
  steps_per_epoch = app.num_batches(data.train, BATCH)
  schedule = optax.cosine_decay_schedule(LR, steps_per_epoch * epochs)

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch.x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()

  probe = app.Split(data.train.x[:256], data.train.y[:256])
  num_params = app_models.num_params(model.init(jax.random.key(0), data.train.x[:1])["params"])

  def make(variant):
    kind, max_std = variant
    if kind == "vsam":
      tx = bo.vsam(schedule, n_data=n_train, weight_decay=WD, max_std=max_std)
      return tx, bo.vsam_step(loss_fn, tx, m=M)
    rho = math.sqrt(num_params) * max_std
    tx = optax.chain(optax.add_decayed_weights(WD), optax.adam(schedule))
    return tx, bo.sam_step(loss_fn, tx, rho=rho, m=M)

  def one(seed):
    key = jax.random.key(seed)
    tx, step = make(variant)
    params = model.init(jax.random.fold_in(key, 0), data.train.x[:1])["params"]
    state = tx.init(params)

    def diagnostics(params, state):
      loss, g = jax.value_and_grad(loss_fn)(params, probe)
      if variant[0] != "vsam":
        return jnp.zeros(4)
      eps = bo.vsam_perturbation(params, state, g)
      increase = loss_fn(jax.tree.map(jnp.add, params, eps), probe) - loss
      first_order = jnp.vdot(_flat(g), _flat(eps))
      std = _flat(bo.posterior(params, state)[1])
      return jnp.stack([jnp.median(std), jnp.max(std), jnp.linalg.norm(_flat(eps)), increase / first_order])

    def epoch(carry, e):
      batches = app.epoch_batches(jax.random.fold_in(key, 100 + e), data.train, BATCH)

      def body(carry, xs):
        i, batch = xs
        params, state, info = step(*carry, batch, jax.random.fold_in(key, 1000 + i))
        return (params, state), info.loss

      carry, losses = jax.lax.scan(body, carry, (e * steps_per_epoch + jnp.arange(steps_per_epoch), batches))
      return carry, jnp.concatenate([jnp.mean(losses)[None], diagnostics(*carry)])

    (params, state), history = jax.lax.scan(epoch, (params, state), jnp.arange(epochs))
    logits = model.apply({"params": params}, data.test.x)
    return history, jnp.mean(jnp.argmax(logits, -1) == data.test.y)

  return jax.jit(jax.vmap(one))(jnp.asarray(seeds))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--out", default=os.path.join(RESULTS, "vsam_sigma.md"))
  parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="uncertainty.py's MLP or CNN")
  parser.add_argument("--max-std", type=float, nargs="+", default=[1e-3, 3e-3], help="the bounds on σ to compare")
  args = parser.parse_args(argv)
  epochs, seeds = (3, [0]) if args.quick else (60, [0, 1, 2])
  data = app.load_dataset("mnist1d")
  if args.model == "mlp":
    model = app.make_model("mlp", data.num_classes, features=(128, 128))
    description = "MLP 40-128-128-10"
  else:
    model = app.make_model("cnn", data.num_classes, channels=(16, 16, 16))
    description = "CNN 3 x conv(16, k=5, stride 2)"
  num_params = app_models.num_params(model.init(jax.random.key(0), data.train.x[:1])["params"])
  variants = [("vsam", None), *[("vsam", b) for b in args.max_std], *[("sam", b) for b in args.max_std]]
  results, start = {}, time.time()
  for variant in variants:
    t = time.time()
    history, accuracy = run(variant, data, model, epochs, seeds)
    results[variant] = (np.asarray(history), np.asarray(accuracy))
    print(f"{variant}: test accuracy {np.mean(accuracy):.3f} ({time.time() - t:.0f} s)", file=sys.stderr)
  sigma0 = 1 / math.sqrt(data.train.y.shape[0] * WD)
  lines = [
    "# VariationalSAM: does Σ grow until the Taylor approximation fails?",
    "",
    f"Command: `python benchmarks/vsam_sigma.py{''.join(' ' + a for a in (argv or sys.argv[1:]))}` "
    f"({time.time() - start:.0f} s). MNIST-1D, {description} "
    f"(P = {num_params:,}), {epochs} epochs, batch {BATCH}, m = {M}, Adam learning rate {LR} (cosine to 0), "
    f"δ = {WD} (prior std σ0 = 1/sqrt(N δ) = {sigma0:.3f}), {len(seeds)} seeds (mean ± std). VSAM: the seed's "
    f"defaults, ρ = sqrt(P) = {math.sqrt(num_params):.0f}, σ₀ = 0.05 / sqrt(P). "
    "Taylor ratio: (ℓ(μ + ε) − ℓ(μ)) / gᵀε on 256 fixed training examples (1 = the first-order "
    "approximation of Eq. 2 holds).",
    "",
    "## Test accuracy",
    "",
    "| method | test accuracy (%) |",
    "|---|---|",
  ]
  for (kind, max_std), (_, acc) in results.items():
    name = "VSAM" if kind == "vsam" else f"SAM-Adam, ρ = sqrt(P) · {max_std:g} = {math.sqrt(num_params) * max_std:.2f}"
    if kind == "vsam" and max_std is not None:
      name += f", max_std = {max_std:g}"
    lines.append(f"| {name} | {100 * acc.mean():.1f} ± {100 * acc.std():.1f} |")
  for (kind, max_std), (history, _) in results.items():
    if kind != "vsam":
      continue
    lines += [
      "",
      f"## VSAM{'' if max_std is None else f', max_std = {max_std:g}'}: per epoch (seed mean)",
      "",
      "| epoch | train loss at μ | median σ | max σ | ‖ε‖ | Taylor ratio |",
      "|---|---|---|---|---|---|",
    ]
    mean = history.mean(0)
    for e in sorted({0, 4, 9, 19, 29, 39, 49, epochs - 1} & set(range(epochs))):
      loss, med, mx, norm, ratio = mean[e]
      lines.append(f"| {e + 1} | {loss:.3f} | {med:.2e} | {mx:.2e} | {norm:.3f} | {ratio:.2f} |")
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.quick:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
