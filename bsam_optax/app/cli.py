"""The ``bsam-optax`` command (also ``python -m bsam_optax``).

``bsam-optax train`` trains a small Flax model with bSAM (or a baseline) on a
data set that needs no download, shows a progress bar, prints the test metrics
of the posterior mean and of the model average and a summary of the learned
posterior std, and writes ``reliability.png``, ``posterior_std.png`` and
``metrics.json`` to ``--out``. Its flags are the fields of
:class:`~bsam_optax.app.TrainConfig` (``--field-name``, or the field's
``flag``), made here from the dataclass; their values are checked once, by
:func:`~bsam_optax.app.check_config`. Exit status: 0 done, 1 diverged or an
unreadable checkpoint, 2 bad flags, 128 + the signal's number when stopped
by SIGTERM / SIGINT (after saving a checkpoint).
"""

import argparse
import dataclasses
import sys
import time
import types

from bsam_optax import distributed as _distributed
from bsam_optax.app import report as _report
from bsam_optax.app.checkpoint import CheckpointError
from bsam_optax.app.config import ConfigError
from bsam_optax.app.config import TrainConfig
from bsam_optax.app.train import TrainingDiverged
from bsam_optax.app.train import TrainingInterrupted
from bsam_optax.app.train import train

__all__ = ["main", "make_parser"]


def _parse(kind: type):
  """An argparse type: ``kind(text)``, else "expected an integer / a number" (the value is checked by the config)."""
  what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)

  def parse(text: str):
    try:
      return kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None

  return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except ``None`` and flags (whose meaning the help text states)."""

  def _get_help_string(self, action):
    if action.default is None or isinstance(action.default, bool):
      return action.help
    return super()._get_help_string(action)


def _kind(annotation) -> type:
  """``int`` for ``int | None``, and so on."""
  if isinstance(annotation, types.UnionType):
    (annotation,) = [a for a in annotation.__args__ if a is not type(None)]
  return annotation


def _flag(field: dataclasses.Field) -> str:
  if _kind(field.type) is bool and field.default is True:
    return "--no-" + field.name.replace("_", "-")
  return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def make_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
  """The main parser and its ``train`` subparser (whose ``error`` reports bad train flags)."""
  parser = argparse.ArgumentParser(
    prog="bsam-optax",
    description="Bayesian SAM (bSAM) for JAX and optax: train a small model and measure its uncertainty.",
  )
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  train_parser = commands.add_parser(
    "train",
    help="train a small Flax model with bSAM (or a baseline) and report accuracy, NLL, ECE and AUROC",
    description=(
      "Train a small Flax classifier on a data set that needs no download, then print the test metrics of "
      "the posterior mean and of the model average over posterior samples, and write a reliability diagram "
      "and a plot of the learned posterior std. Flags left out use the optimizer's defaults where marked."
    ),
    formatter_class=_HelpFormatter,
  )
  groups: dict[str, argparse._ArgumentGroup] = {}
  for field in dataclasses.fields(TrainConfig):
    meta = field.metadata
    if meta["group"] not in groups:
      groups[meta["group"]] = train_parser.add_argument_group(meta["group"])
    group = groups[meta["group"]]
    kind = _kind(field.type)
    if kind is bool:
      # A field that is on by default is turned off: --no-progress.
      action = "store_false" if field.default else "store_true"
      help_text = ("no " if field.default else "") + meta["help"]
      group.add_argument(_flag(field), dest=field.name, action=action, help=help_text)
      continue
    group.add_argument(
      _flag(field),
      dest=field.name,
      type=_parse(kind),
      default=meta.get("cli_default", field.default),
      choices=meta.get("choices"),
      help=meta["help"],
      metavar=_flag(field).lstrip("-").upper().replace("-", "_"),
    )
  _distributed.add_launcher_arguments(train_parser)
  return parser, train_parser


def _config(args) -> TrainConfig:
  return TrainConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(TrainConfig)})


def _error(text: str) -> None:
  sys.stderr.write(f"bsam-optax train: error: {text}\n")
  sys.stderr.flush()


def _train_command(parser, args) -> int:
  import jax

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
    result = train(_config(args), log=lambda text: say(text, flush=True))
  except ConfigError as err:
    flags = {field.name: _flag(field) for field in dataclasses.fields(TrainConfig)}
    parser.error(f"argument {flags[err.field]}: {err}" if err.field in flags else str(err))
  except (CheckpointError, TrainingDiverged) as err:
    _error(str(err))
    return 1
  except TrainingInterrupted as err:
    _error(str(err))
    return 128 + err.signum
  _report.print_report(result, say)
  say(f"wall time {time.perf_counter() - start:.1f} s")
  return 0


def main(argv=None) -> int:
  """Runs the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  parser, train_parser = make_parser()
  args = parser.parse_args(argv)
  if args.command == "train":
    try:
      return _train_command(train_parser, args)
    except KeyboardInterrupt:  # without --checkpoint-dir, Ctrl-C stops at once
      _error("interrupted (give --checkpoint-dir to stop after an epoch, saved, and resume)")
      return 130
  parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks the choices


if __name__ == "__main__":
  sys.exit(main())
