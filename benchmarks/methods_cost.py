"""Step time of every method of the library relative to Adam, measured side by side (the README's method table).

The MLP 784-500-300-10 of ``cost.py`` (545,810 parameters), batch 128 of
random data, float32, m = 1 and 8, threefry keys and the library's default
noise generator (``noise="auto"``). Every method is one compiled
``step(params, opt_state, batch, key)``; the methods interleave over
``--rounds`` rounds of ``--steps`` steps (``cost.py``'s timing: the process's
CPU time, all of XLA's threads), and the ratios are medians of per-round
ratios to Adam (robust to the load of a shared machine drifting between
rounds). The load average before and after is written beside the table.

Usage::

  python benchmarks/methods_cost.py            # writes benchmarks/results/methods_cost.md (~5 min)
  python benchmarks/methods_cost.py --quick    # m = 1, 2 rounds; prints, writes nothing
"""

import argparse
import os
import platform
import statistics
import sys

import jax
import optax

import bsam_optax as bo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost  # noqa: E402

LR, N_DATA, RHO = cost.LR, cost.N_DATA, cost.RHO


def _methods():
  adam = lambda: optax.adam(LR)
  return {
    "Adam": lambda loss, m: (bo.make_perturbation_step(loss, adam(), bo.PerturbationRule(), m=m), adam()),
    "SAM-Adam": lambda loss, m: (bo.sam_step(loss, adam(), rho=RHO, m=m), adam()),
    "ASAM-Adam": lambda loss, m: (bo.asam_step(loss, adam(), rho=0.5, eta=0.01, m=m), adam()),
    "Fisher-SAM-Adam": lambda loss, m: (bo.fisher_sam_step(loss, adam(), rho=0.1, eta=1.0, m=m), adam()),
    "RandomSAM-Adam": lambda loss, m: (bo.random_sam_step(loss, adam(), sigma=1e-3, m=m), adam()),
    "bSAM": lambda loss, m: (bo.bsam_step(loss, bo.bsam(LR, N_DATA, rho=RHO), m=m), bo.bsam(LR, N_DATA, rho=RHO)),
    "MFVI": lambda loss, m: (bo.mfvi_step(loss, bo.mfvi(LR, N_DATA), m=m), bo.mfvi(LR, N_DATA)),
    "VSAM": lambda loss, m: (bo.vsam_step(loss, bo.vsam(LR, N_DATA), m=m), bo.vsam(LR, N_DATA)),
  }


def run(ms, rounds, steps, log):
  prob = cost.make_problem("mlp")
  rows = {}
  for m in ms:
    methods = {}
    for name, make in _methods().items():
      step, tx = make(prob.loss_fn, m)
      methods[name] = cost.step_method(step, prob.params, tx.init(prob.params), prob.batch, cost._keys())
    log(f"m={m}: timing {list(methods)}")
    times = cost.time_methods(methods, rounds, steps)
    rows[m] = {
      name: (statistics.median(t), cost.median_ratio(times, name, "Adam") if name != "Adam" else 1.0)
      for name, t in times.items()
    }
    for name, (ms_, ratio) in rows[m].items():
      log(f"  {name}: {ms_:.2f} ms, {ratio:.2f}x Adam")
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--rounds", type=int, default=9)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--m", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--out", default=os.path.join(cost.RESULTS, "methods_cost.md"))
  args = parser.parse_args(argv)
  ms, rounds = ((1,), 2) if args.quick else (tuple(args.m), args.rounds)
  log = lambda s: print(s, file=sys.stderr, flush=True)
  load_before = os.getloadavg()[0]
  rows = run(ms, rounds, args.steps, log)
  load_after = os.getloadavg()[0]
  prob = cost.make_problem("mlp")
  splits = ", ".join(f"m = {m}: {bo.choose_split(prob.loss_fn, prob.params, prob.batch, m=m)}" for m in ms)
  command = " ".join(["python benchmarks/methods_cost.py", *(argv if argv is not None else sys.argv[1:])])
  lines = [
    "# Step time of every method relative to Adam",
    "",
    f"Command: `{command}` — MLP 784-500-300-10 (545,810 parameters), batch 128, "
    f"split='auto' (the default; {splits}), {rounds} rounds x {args.steps} steps per method, interleaved; "
    "ms = the process's CPU time per step (all "
    "of XLA's threads), medians over rounds (ratios: medians of per-round ratios to Adam). Machine: "
    f"{platform.machine()}, {os.cpu_count()} CPU cores (shared; 1-minute load average {load_before:.1f} before, "
    f"{load_after:.1f} after), {jax.default_backend()}; jax {jax.__version__}, optax {optax.__version__}.",
    "",
    "| method | " + " | ".join(f"m = {m}: ms | m = {m}: / Adam" for m in ms) + " |",
    "|---|" + "---|---|" * len(ms),
  ]
  for name in _methods():
    lines.append(f"| {name} | " + " | ".join(f"{rows[m][name][0]:.2f} | {rows[m][name][1]:.2f}" for m in ms) + " |")
  text = "\n".join(lines) + "\n"
  print(text)
  if not args.quick:
    with open(args.out, "w") as f:
      f.write(text)


if __name__ == "__main__":
  main()
