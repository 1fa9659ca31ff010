"""bSAM's ablations on MNIST-1D: ρ sensitivity, MC samples, noise, m (paper Fig. 4, Tables 3, 4, 5).

The task and the training of :mod:`uncertainty` (same data, model, epochs,
batch 128, cosine schedule). Each method starts from its configuration
selected by ``benchmarks/uncertainty.py`` (read from
``benchmarks/results/uncertainty.json`` if present, else ``DEFAULTS``) and one
thing is varied:

* **ρ** (Fig. 4 / F.4): SAM-SGD, SAM-Adam and bSAM over ``RHOS`` → table and
  ``rho_sensitivity.png`` (test accuracy and NLL against ρ);
* **MC samples** (Table 4 / F.6): bSAM's model average with S samples, and
  the posterior mean;
* **noise** (Table 3 / F.5): bSAM against bSAM without noise (first gradient
  at ω instead of θ ~ N(ω, 1/(N s)));
* **m** (Table 5 / F.7): bSAM and SAM-SGD with the batch split into m parts.

Usage::

  python benchmarks/sensitivity.py --quick     # ~1 min: 1 seed, 5 epochs, bSAM only, few values
  python benchmarks/sensitivity.py             # benchmarks/results/sensitivity.md + rho_sensitivity.png
"""

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import uncertainty as U  # noqa: E402

from bsam_optax import app  # noqa: E402

# Used when benchmarks/results/uncertainty.json has no selected configuration.
DEFAULTS = {
  "sam_sgd": {"learning_rate": 0.1, "weight_decay": 1e-3, "rho": 0.05},
  "sam_adam": {"learning_rate": 1e-2, "weight_decay": 1e-3, "rho": 0.05},
  "bsam": {"learning_rate": 0.3, "weight_decay": 1e-4, "rho": 0.02},
}
RHOS = [0.01, 0.03, 0.1, 0.3, 1.0]
QUICK_RHOS = [0.01, 0.1]
SAMPLES = [1, 2, 4, 8, 16, 32, 64]
MS = [1, 2, 4, 8, 16]
QUICK_MS = [1, 8]


def selected_configs(model: str, paths: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, float], str]:
  """The configurations selected by uncertainty.py for ``model``, the bSAM overrides, and their source.

  ``paths`` are summaries written by uncertainty.py (``*.json``); a later one
  overrides an earlier one for the methods it has (e.g. a bSAM recipe run).
  """
  configs = {k: dict(v) for k, v in DEFAULTS.items()}
  sources, bsam_fixed = [], {}
  for path in paths:
    if not os.path.exists(path):
      continue
    with open(path) as f:
      summary = json.load(f)
    rows = summary.get(model, {})
    for method in configs:
      label = U.LABELS[method] + (" (model avg)" if method in U.BAYESIAN else "")
      if label in rows:
        configs[method] = dict(rows[label]["config"])
        if method == "bsam":
          bsam_fixed = summary.get("_bsam_fixed", {})
    sources.append(os.path.relpath(path, os.path.dirname(U.RESULTS)))
  return configs, bsam_fixed, " and ".join(sources) or "DEFAULTS in benchmarks/sensitivity.py"


def runs(method, setup, data, config, seeds, fixed=None, vary=None, eval_samples_list=None):
  """Trains ``config`` (one value of ``vary``'s key per grid point) with every seed."""
  grid = {k: [v] for k, v in config.items()}
  if vary:
    grid.update(vary)
  return U.run_grid(method, setup, data, grid, seeds, fixed, eval_samples_list)


def row(label, metrics, pred, index=0):
  test = {k: v[index] for k, v in metrics[pred]["test"].items()}
  return f"| {label} | " + " | ".join(U.metric_cells(test)) + " |"


HEADER = "| {} | accuracy (%) ↑ | NLL ↓ | ECE ↓ | AUROC ↑ | OOD AUROC ↑ | conf. − acc. (%) |"
RULE = "|---|---|---|---|---|---|---|"


def rho_plot(results, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for label, (rhos, metrics, pred) in results.items():
    for ax, name, scale in ((axes[0], "accuracy", 100), (axes[1], "nll", 1)):
      values = metrics[pred]["test"][name] * scale
      mean, std = values.mean(axis=1), values.std(axis=1)
      ax.errorbar(rhos, mean, yerr=std, marker="o", capsize=3, label=label)
  axes[0].set(xscale="log", xlabel="ρ", ylabel="test accuracy (%)")
  axes[1].set(xscale="log", xlabel="ρ", ylabel="test NLL")
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="1 seed, 5 epochs, fewer values (CI)")
  parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
  parser.add_argument("--seeds", type=int, default=None, help="default 3; quick 1")
  parser.add_argument("--epochs", type=int, default=None, help="default 60; quick 5")
  parser.add_argument("--parts", nargs="+", default=["rho", "samples", "noise", "m"])
  parser.add_argument(
    "--configs",
    nargs="+",
    default=[os.path.join(U.RESULTS, "uncertainty.json")],
    help="summaries of uncertainty.py to take the configurations from; later ones override earlier ones",
  )
  parser.add_argument("--out", default=None, help="markdown file (default benchmarks/results/sensitivity[_quick].md)")
  args = parser.parse_args(argv)
  quick = args.quick
  seeds = list(range(args.seeds or (1 if quick else 3)))
  epochs = args.epochs or (5 if quick else 60)
  rhos, ms = (QUICK_RHOS, QUICK_MS) if quick else (RHOS, MS)
  samples = [1, 8] if quick else SAMPLES
  out = args.out or os.path.join(U.RESULTS, "sensitivity_quick.md" if quick else "sensitivity.md")
  stem = os.path.splitext(os.path.basename(out))[0].replace("sensitivity", "rho_sensitivity")
  plot = os.path.join(os.path.dirname(os.path.abspath(out)), stem + ".png")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  configs, bsam_fixed, source = selected_configs(args.model, args.configs)
  data = app.load_dataset("mnist1d")
  setup = U.Setup(model=args.model, epochs=epochs)
  fixed = {"bsam": bsam_fixed, "bsam_no_noise": bsam_fixed}

  lines = [
    f"# bSAM ablations on MNIST-1D / {args.model.upper()} (paper Fig. 4, Tables 3, 4, 5)",
    "",
    "Command: `" + shlex.join(["python", "benchmarks/sensitivity.py", *argv]) + "`",
    "",
    f"Same task and training as `uncertainty.md` ({epochs} epochs, batch 128, m = 8 unless varied), "
    f"{len(seeds)} seed(s), test-set mean ± std. Base configurations (from {source}): "
    + "; ".join(f"{U.LABELS[k]}: {U.config_str(v)}" for k, v in configs.items())
    + (f"; bSAM overrides {bsam_fixed}" if bsam_fixed else "")
    + ".",
    "",
  ]
  times = {}

  def timed(name, fn):
    start = time.perf_counter()
    result = fn()
    times[name] = time.perf_counter() - start
    print(f"{name}: {times[name]:.0f} s", flush=True)
    return result

  base = None
  if {"samples", "noise"} & set(args.parts):
    base = timed(
      "bsam",
      lambda: runs("bsam", setup, data, configs["bsam"], seeds, fixed["bsam"], eval_samples_list=samples)[1],
    )

  if "rho" in args.parts:
    results = {}
    lines += ["## Sensitivity to ρ (Fig. 4)", "", HEADER.format("method, ρ"), RULE]
    for method in ("bsam",) if quick else ("sam_sgd", "sam_adam", "bsam"):
      _, metrics = timed(
        f"rho/{method}",
        lambda method=method: runs(method, setup, data, configs[method], seeds, fixed.get(method), vary={"rho": rhos}),
      )
      pred = "average" if method in U.BAYESIAN else "mean"
      label = U.LABELS[method] + (" (model avg)" if method in U.BAYESIAN else "")
      results[label] = (rhos, metrics, pred)
      lines += [row(f"{label}, ρ={r:g}", metrics, pred, i) for i, r in enumerate(rhos)]
      spread = metrics[pred]["test"]["accuracy"].mean(axis=1) * 100
      print(f"  {label}: accuracy over ρ {np.round(spread, 1)}", flush=True)
    lines += [
      "",
      "Spread of the mean test accuracy over the ρ grid (max − min, points): "
      + ", ".join(f"{k} {np.ptp(v[1][v[2]]['test']['accuracy'].mean(axis=1)) * 100:.1f}" for k, v in results.items())
      + f". Plot: `{os.path.basename(plot)}`.",
      "",
    ]
    rho_plot(results, plot, f"MNIST-1D / {args.model.upper()}: sensitivity to ρ ({len(seeds)} seeds)")

  if "samples" in args.parts:
    lines += ["## Number of MC samples in the model average (Table 4)", "", HEADER.format("bSAM, S"), RULE]
    lines.append(row("posterior mean ω", base, "mean"))
    lines += [row(f"model average, S={s}", base, f"average_{s}") for s in samples]
    lines.append("")

  if "noise" in args.parts:
    _, no_noise = timed(
      "bsam_no_noise", lambda: runs("bsam_no_noise", setup, data, configs["bsam"], seeds, fixed["bsam"])
    )
    lines += ["## Noise ablation (Table 3)", "", HEADER.format("method"), RULE]
    for label, metrics in (("bSAM w/o noise", no_noise), ("bSAM (Alg. 1)", base)):
      lines.append(row(f"{label}, model avg", metrics, "average"))
    for label, metrics in (("bSAM w/o noise", no_noise), ("bSAM (Alg. 1)", base)):
      lines.append(row(f"{label}, post. mean", metrics, "mean"))
    lines.append("")

  if "m" in args.parts:
    lines += ["## m-sharpness (Table 5)", "", HEADER.format("method, m"), RULE]
    for method in ("bsam",) if quick else ("bsam", "sam_sgd"):
      pred = "average" if method in U.BAYESIAN else "mean"
      for m in ms:
        if method == "bsam" and m == setup.m and base is not None:
          metrics = base  # the same runs (config, seeds, m) as the base: not trained twice
        else:
          _, metrics = timed(
            f"m/{method}/{m}",
            lambda method=method, m=m: runs(
              method, dataclasses.replace(setup, m=m), data, configs[method], seeds, fixed.get(method)
            ),
          )
        lines.append(row(f"{U.LABELS[method]}{' (model avg)' if pred == 'average' else ''}, m={m}", metrics, pred))
    lines.append("")

  lines += [
    "Wall time (compilation included): " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + ".",
    f"{U.environment()}.",
    "",
  ]
  with open(out, "w") as f:
    f.write("\n".join(lines))
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
