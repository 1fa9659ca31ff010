"""The ``bsam-optax`` command (also ``python -m bsam_optax``).

``bsam-optax train`` trains a small Flax model with bSAM (or a baseline) on a
data set that needs no download, shows a progress bar, prints the test metrics
of the posterior mean and of the model average and a summary of the learned
posterior std, and writes ``reliability.png``, ``posterior_std.png`` and
``metrics.json`` to ``--out``. All logic lives in :mod:`bsam_optax._train`;
this module parses flags and prints.
"""

import argparse
import sys
import time

from bsam_optax import _data
from bsam_optax import _models
from bsam_optax import distributed as _distributed

__all__ = ["main"]


def _parser(cast, lower: float, what: str):
  """An argparse type: ``cast(text)``, finite and ``>= lower``, else "expected {what}"."""

  def parse(text: str):
    try:
      value = cast(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not value >= lower or value == float("inf"):
      raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
    return value

  return parse


_positive_int = _parser(int, 1, "a positive integer")
_nonnegative_int = _parser(int, 0, "an integer >= 0")
_nonnegative_float = _parser(float, 0.0, "a finite number >= 0")


def _positive_float(text: str) -> float:
  value = _nonnegative_float(text)
  if value == 0:
    raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
  return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except ``None`` (whose meaning the help text states)."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


def _parsers(optimizers) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The main parser and its ``train`` subparser (whose ``error`` reports bad train flags)."""
  from bsam_optax._train import TrainConfig

  d = TrainConfig()
  parser = argparse.ArgumentParser(
    prog="bsam-optax",
    description="Bayesian SAM (bSAM) for JAX and optax: train a small model and measure its uncertainty.",
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  train = commands.add_parser(
    "train",
    help="train a small Flax model with bSAM (or a baseline) and report accuracy, NLL, ECE and AUROC",
    description=(
      "Train a small Flax classifier on a data set that needs no download, then print the test metrics of "
      "the posterior mean and of the model average over posterior samples, and write a reliability diagram "
      "and a plot of the learned posterior std. Flags left out use the optimizer's defaults where marked."
    ),
    formatter_class=_HelpFormatter,
  )
  data = train.add_argument_group("data and model")
  data.add_argument(
    "--dataset", choices=_data.DATASETS, default=d.dataset, help="MNIST-1D (generated) or sklearn digits"
  )
  data.add_argument("--model", choices=_models.MODELS, default=d.model, help="1-D/2-D CNN or ReLU MLP")
  data.add_argument("--width", type=_positive_int, default=d.width, help="CNN channels; the MLP has 4x width units")
  data.add_argument("--batch-norm", action="store_true", help="BatchNorm after every hidden layer")
  data.add_argument(
    "--num-samples", type=_positive_int, default=None, help="MNIST-1D: sequences to generate (default: 5000)"
  )
  data.add_argument(
    "--train-subset",
    type=_positive_int,
    default=None,
    help="train on the first N training examples only (default: all)",
  )
  opt = train.add_argument_group("optimization")
  opt.add_argument("--optimizer", choices=optimizers, default=d.optimizer)
  opt.add_argument("--epochs", type=_positive_int, default=d.epochs)
  opt.add_argument("--batch-size", type=_positive_int, default=d.batch_size)
  opt.add_argument("--m", type=_positive_int, default=d.m, help="m-sharpness: parts per batch, must divide it")
  opt.add_argument(
    "--lr",
    type=_nonnegative_float,
    default=None,
    help="peak learning rate α, cosine-decayed to 0 (default: per optimizer)",
  )
  opt.add_argument(
    "--weight-decay",
    type=_nonnegative_float,
    default=None,
    help="δ for bSAM (prior precision / N), L2 otherwise (default: per optimizer)",
  )
  opt.add_argument(
    "--rho", type=_nonnegative_float, default=None, help="ρ, the perturbation radius (default: per optimizer)"
  )
  opt.add_argument("--damping", type=_nonnegative_float, default=d.damping, help="γ (bSAM)")
  opt.add_argument("--init-scale", type=_positive_float, default=d.init_scale, help="initial s (bSAM)")
  opt.add_argument("--b1", type=_nonnegative_float, default=None, help="β1, momentum (default: per optimizer)")
  opt.add_argument(
    "--b2",
    type=_nonnegative_float,
    default=None,
    help="β2, bSAM scale / Adam second-moment decay (default: per optimizer)",
  )
  opt.add_argument(
    "--n-data-scale", type=_positive_float, default=d.n_data_scale, help="N = this x train size; > 1 tempers (App. G)"
  )
  run = train.add_argument_group("evaluation and output")
  run.add_argument("--eval-samples", type=_positive_int, default=d.eval_samples, help="S, posterior samples averaged")
  run.add_argument("--seed", type=_nonnegative_int, default=d.seed, help="the one seed of init, data order and noise")
  run.add_argument("--out", default="bsam_optax_out", help="output folder (created); PNGs and metrics.json go here")
  run.add_argument("--no-progress", action="store_true", help="no progress bar")
  run.add_argument(
    "--checkpoint-dir",
    default=None,
    help="save the training state here after every epoch and resume from the latest epoch found (orbax)",
  )
  run.add_argument(
    "--data-parallel",
    action="store_true",
    help="spread each batch and its m parts over all devices (GPUs; on by itself with several processes)",
  )
  _distributed.add_launcher_arguments(train)
  return parser, train


def _config(args):
  from bsam_optax._train import TrainConfig

  return TrainConfig(
    dataset=args.dataset,
    model=args.model,
    optimizer=args.optimizer,
    epochs=args.epochs,
    batch_size=args.batch_size,
    m=args.m,
    learning_rate=args.lr,
    weight_decay=args.weight_decay,
    rho=args.rho,
    damping=args.damping,
    init_scale=args.init_scale,
    b1=args.b1,
    b2=args.b2,
    n_data_scale=args.n_data_scale,
    batch_norm=args.batch_norm,
    width=args.width,
    num_samples=args.num_samples,
    train_subset=args.train_subset,
    eval_samples=args.eval_samples,
    seed=args.seed,
    out_dir=args.out,
    progress=not args.no_progress,
    data_parallel=args.data_parallel,
    checkpoint_dir=args.checkpoint_dir,
  )


_COLUMNS = (("accuracy", "accuracy"), ("nll", "NLL"), ("brier", "Brier"), ("ece", "ECE"), ("auroc", "AUROC"))


def _print_report(result, data, print_fn=print) -> None:
  c = result.config
  if "point_estimate" in result.metrics:
    rows = {"point estimate": result.metrics["point_estimate"]}
  else:
    rows = {"posterior mean": result.metrics["posterior_mean"]}
    rows[f"model average (S={c.eval_samples})"] = result.metrics["model_average"]
  width = max(len(name) for name in rows) + 2
  header = "".join(f"{label:>10}" for _, label in _COLUMNS) + f"{'OOD AUROC':>11}"
  print_fn(f"\ntest metrics ({len(data.test.y)} examples; ECE with {c.num_bins} bins; AUROC = misclassification):")
  print_fn(" " * width + header)
  for name, values in rows.items():
    print_fn(f"{name:<{width}}" + "".join(f"{values[k]:>10.4f}" for k, _ in _COLUMNS) + f"{values['ood_auroc']:>11.4f}")
  print_fn(f"OOD set: {data.ood_description}")
  if result.posterior_std is not None:
    summary = result.posterior_std
    size = sum(v["size"] for v in summary.values())
    mean = sum(v["mean"] * v["size"] for v in summary.values()) / size
    low, high = min(v["min"] for v in summary.values()), max(v["max"] for v in summary.values())
    n_data = c.n_data_scale * len(data.train.y) if c.train_subset is None else c.n_data_scale * c.train_subset
    print_fn(
      f"\nposterior std 1/sqrt(N s) (N = {n_data:g}), {size} parameters: mean {mean:.4g}, min {low:.4g}, max {high:.4g}"
    )
    name_width = max(len(name) for name in summary) + 2
    for name, v in summary.items():
      print_fn(
        f"  {name:<{name_width}} {v['size']:>7d}  mean {v['mean']:.4g}  median {v['median']:.4g}"
        f"  min {v['min']:.4g}  max {v['max']:.4g}"
      )
  if result.files:
    print_fn(
      "\nwrote " + ", ".join(result.files[k] for k in ("reliability", "posterior_std", "metrics") if k in result.files)
    )


def _train_command(parser, args) -> int:
  import jax

  from bsam_optax import _train

  start = time.perf_counter()
  # Before anything touches JAX's devices: join a multi-process run if the flags or the environment ask for it.
  try:
    multi_process = _distributed.initialize_from_args(args)
  except (TypeError, ValueError) as err:
    hint = ""
    if "coordinator_address" in str(err) and args.coordinator is None:
      hint = " (give --coordinator HOST:PORT, process 0's address, or set JAX_COORDINATOR_ADDRESS)"
    parser.error(f"{err}{hint}")
  if multi_process:
    args.data_parallel = True
  say = print if jax.process_index() == 0 else lambda *_, **__: None
  try:
    config = _train.check_config(_config(args))
  except ValueError as err:
    parser.error(str(err))
  data = _data.load_dataset(config.dataset, num_samples=config.num_samples)
  n_train = len(data.train.y) if config.train_subset is None else min(config.train_subset, len(data.train.y))
  hyper = ", ".join(f"{k}={getattr(config, k)}" for k in ("learning_rate", "weight_decay", "rho", "b1", "b2"))
  bsam_only = f", damping={config.damping}, init_scale={config.init_scale}" if config.optimizer == "bsam" else ""
  devices = ""
  if config.data_parallel:
    devices = (
      f"; data parallel over {jax.device_count()} {jax.default_backend()} devices in {jax.process_count()} process(es)"
    )
  say(
    f"{config.optimizer} / {config.model} / {config.dataset}: {n_train} train, {len(data.validation.y)} validation, "
    f"{len(data.test.y)} test examples; {config.epochs} epochs of batch {config.batch_size}, m={config.m}, "
    f"seed {config.seed}{devices}\n{hyper}{bsam_only}",
    flush=True,
  )
  result = _train.train(config)
  _print_report(result, data, say)
  say(f"wall time {time.perf_counter() - start:.1f} s")
  return 0


def main(argv=None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  from bsam_optax._train import OPTIMIZERS

  parser, train_parser = _parsers(tuple(OPTIMIZERS))
  args = parser.parse_args(argv)
  if args.command == "train":
    return _train_command(train_parser, args)
  parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks the choices


if __name__ == "__main__":
  sys.exit(main())
