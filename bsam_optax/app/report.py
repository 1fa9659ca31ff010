"""What the main job prints and writes: the run's header, the metrics table, figures and ``metrics.json``.

Figures need matplotlib (the ``examples`` extra); it is imported when a figure is drawn.
"""

import dataclasses
import json
import math
import os
from collections.abc import Callable

import jax
import numpy as np

from bsam_optax import metrics as _metrics
from bsam_optax.app import data as _data
from bsam_optax.app.evaluate import leaf_name

__all__ = [
  "header",
  "init_scale_warning",
  "posterior_std_figure",
  "print_report",
  "reliability_figure",
  "write_outputs",
]

_COLUMNS = (("accuracy", "accuracy"), ("nll", "NLL"), ("brier", "Brier"), ("ece", "ECE"), ("auroc", "AUROC"))


def init_scale_warning(config, data) -> str | None:
  """One sentence when bSAM's scale s still remembers its initial value at the end of training, else ``None``.

  ``s ← β2 s + (1 − β2) (...)`` leaves the weight ``β2^T`` on ``s_0 = init_scale`` after ``T`` steps; above
  one half the initial scale dominates the posterior std ``1/sqrt(N s)`` (β2 = 0.999 needs T ≳ 693 steps,
  β2 = 0.99 T ≳ 69).
  """
  if config.optimizer != "bsam" or not config.b2:
    return None
  steps = config.epochs * _data.num_batches(data.train, config.batch_size)
  remaining = config.b2**steps
  if remaining <= 0.5:
    return None
  needed = math.ceil(math.log(0.5) / math.log(config.b2))
  return (
    f"warning: with b2={config.b2:g} and {steps} steps, b2**steps = {remaining:.2f} > 0.5: the initial "
    f"init_scale={config.init_scale:g} still makes {remaining:.0%} of s at the end, so the posterior std is mostly "
    f"1/sqrt(N init_scale), not learned; train for at least {needed} steps (more --epochs or a smaller --batch-size) "
    f"or lower --b2 to {0.5 ** (1 / steps):.3g} or less."
  )


def header(config, data) -> str:
  """The task, its sizes and devices; the optimizer's hyper-parameters (defaults filled in); a warning, if any.

  The warning is :func:`init_scale_warning`'s.
  """
  hyper = ", ".join(f"{k}={getattr(config, k)}" for k in ("learning_rate", "weight_decay", "rho", "b1", "b2"))
  bsam_only = f", damping={config.damping}, init_scale={config.init_scale}" if config.optimizer == "bsam" else ""
  devices = ""
  if config.data_parallel:
    devices = (
      f"; data parallel over {jax.device_count()} {jax.default_backend()} devices in {jax.process_count()} process(es)"
    )
  return (
    f"{config.optimizer} / {config.model} / {config.dataset}: {len(data.train.y)} train, {len(data.validation.y)} "
    f"validation, {len(data.test.y)} test examples; {config.epochs} epochs of batch {config.batch_size}, "
    f"m={config.m}, seed {config.seed}{devices}\n{hyper}{bsam_only}"
  ) + (f"\n{warning}" if (warning := init_scale_warning(config, data)) else "")


def print_report(result, print_fn: Callable[..., None] = print) -> None:
  """Prints the test metrics of a :class:`~bsam_optax.app.TrainResult`, its posterior std and its files."""
  c, data = result.config, result.data
  if "point_estimate" in result.metrics:
    rows = {"point estimate": result.metrics["point_estimate"]}
  else:
    rows = {"posterior mean": result.metrics["posterior_mean"]}
    rows[f"model average (S={c.eval_samples})"] = result.metrics["model_average"]
    tempered = result.metrics.get("model_average_tempered")
    if tempered is not None:
      rows[f"model average at T={tempered['temperature']:g}"] = tempered
  width = max(len(name) for name in rows) + 2
  header_row = "".join(f"{label:>10}" for _, label in _COLUMNS) + f"{'OOD AUROC':>11}"
  print_fn(f"\ntest metrics ({len(data.test.y)} examples; ECE with {c.num_bins} bins; AUROC = misclassification):")
  print_fn(" " * width + header_row)
  for name, values in rows.items():
    print_fn(f"{name:<{width}}" + "".join(f"{values[k]:>10.4f}" for k, _ in _COLUMNS) + f"{values['ood_auroc']:>11.4f}")
  print_fn(f"OOD set: {data.ood_description}")
  if "temperature_selection" in result.metrics:
    table = result.metrics["temperature_selection"]
    best = result.metrics["model_average_tempered"]["temperature"]
    lowest = min(table, key=table.get)
    print_fn(
      f"posterior temperature T (samples from N(ω, T/(N s))) chosen by the model average's NLL on the "
      f"{len(data.validation.y)} validation examples: T = {best:g}, the smallest T within one standard error of "
      f"the lowest (validation NLL "
      + ", ".join(f"T={t}: {v:.4f}" for t, v in table.items() if t in ("0", "1", f"{best:g}", lowest))
      + ")"
    )
  warning = init_scale_warning(c, data)
  if warning:
    print_fn(warning)
  if result.posterior_std is not None:
    summary = result.posterior_std
    size = sum(v["size"] for v in summary.values())
    mean = sum(v["mean"] * v["size"] for v in summary.values()) / size
    low, high = min(v["min"] for v in summary.values()), max(v["max"] for v in summary.values())
    n_data = c.n_data_scale * len(data.train.y)  # the examples trained on (train_subset applied)
    print_fn(
      f"\nposterior std 1/sqrt(N s) (N = {n_data:g}), {size} parameters: mean {mean:.4g}, min {low:.4g}, max {high:.4g}"
    )
    name_width = max(len(name) for name in summary) + 2
    for name, v in summary.items():
      print_fn(
        f"  {name:<{name_width}} {v['size']:>7d}  mean {v['mean']:.4g}  median {v['median']:.4g}"
        f"  min {v['min']:.4g}  max {v['max']:.4g}"
      )
  diagnostics = getattr(result, "posterior_diagnostics", None)
  if diagnostics:
    overall = diagnostics["overall"]
    print_fn(
      f"posterior diagnostics: {overall['damping_fraction']:.1%} of the scales damping-dominated (data term below "
      f"10% of δ + γ = {c.weight_decay + c.damping:g}); spread (std) of log σ {overall['log_std_spread']:.3g}"
    )
    name_width = max(len(name) for name in diagnostics) + 2
    for name, v in diagnostics.items():
      if name != "overall":
        print_fn(
          f"  {name:<{name_width}} damping-dominated {v['damping_fraction']:7.1%}"
          f"  log σ spread {v['log_std_spread']:.3g}"
        )
    if overall["damping_fraction"] > 0.5:
      print_fn(
        "warning: the posterior is set by the damping, not the data (σ ≈ 1/sqrt(N (δ + γ)) on most weights), so "
        "the samples at T = 1 are isotropic noise; predict at the selected temperature above, and treat the std as "
        "a function of N and γ, not as learned uncertainty (see benchmarks/results/posterior_scale.md)."
      )
  if result.files:
    print_fn(
      "\nwrote " + ", ".join(result.files[k] for k in ("reliability", "posterior_std", "metrics") if k in result.files)
    )


def reliability_figure(bins: dict[str, _metrics.ReliabilityBins], title: str = ""):
  """A reliability diagram (accuracy vs confidence per bin), one panel per entry of ``bins``."""
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(bins), figsize=(4 * len(bins), 4), squeeze=False)
  for ax, (name, b) in zip(axes[0], bins.items(), strict=True):
    edges = np.asarray(b.bin_edges)
    counts = np.asarray(b.counts)
    width = np.diff(edges)
    acc = np.where(counts > 0, np.asarray(b.accuracy), np.nan)
    conf = np.where(counts > 0, np.asarray(b.mean_confidence), np.nan)
    ax.bar(edges[:-1], acc, width=width, align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    ax.bar(edges[:-1], conf - acc, bottom=acc, width=width, align="edge", color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ece = np.sum(counts * np.abs(np.nan_to_num(acc) - np.nan_to_num(conf))) / max(counts.sum(), 1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=f"{name} (ECE {ece:.3f})")
    ax.legend(loc="upper left")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def posterior_std_figure(std, title: str = "posterior std per layer"):
  """Histograms of log10 of the posterior std, one panel per parameter leaf."""
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator

  leaves = jax.tree_util.tree_flatten_with_path(std)[0]
  cols = min(4, len(leaves))
  rows = -(-len(leaves) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, (path, leaf) in zip(axes.ravel(), leaves, strict=False):
    values = np.log10(np.asarray(leaf, np.float64).ravel())
    ax.hist(values, bins=40, color="tab:blue")
    ax.set_title(f"{leaf_name(path)} ({values.size})", fontsize=9)
    ax.set_xlabel("log10 std", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(leaves) :]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def write_outputs(config, metrics, bins, std, std_summary, history, wall_time) -> dict[str, str]:
  """Writes ``reliability.png``, ``posterior_std.png`` (with a ``std``) and ``metrics.json`` to ``config.out_dir``.

  Returns:
    The paths written, by name (``"reliability"``, ``"posterior_std"``, ``"metrics"``).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out_dir = os.path.abspath(config.out_dir)
  os.makedirs(out_dir, exist_ok=True)
  files = {}
  title = f"{config.optimizer} / {config.model} / {config.dataset}"
  fig = reliability_figure(bins, title)
  files["reliability"] = os.path.join(out_dir, "reliability.png")
  fig.savefig(files["reliability"], dpi=100)
  plt.close(fig)
  if std is not None:
    fig = posterior_std_figure(std, f"bSAM posterior std, 1/sqrt(N s) ({title})")
    files["posterior_std"] = os.path.join(out_dir, "posterior_std.png")
    fig.savefig(files["posterior_std"], dpi=100)
    plt.close(fig)
  files["metrics"] = os.path.join(out_dir, "metrics.json")
  with open(files["metrics"], "w") as f:
    json.dump(
      {
        "config": dataclasses.asdict(config),
        "metrics": metrics,
        "posterior_std": std_summary,
        "history": history,
        "wall_time_s": wall_time,
      },
      f,
      indent=2,
    )
  return files
