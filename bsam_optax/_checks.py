"""Argument checks shared by the builders: each raises a TypeError or ValueError that names the argument.

Only Python numbers are range-checked: schedules and (traced) arrays, as
passed by ``optax.inject_hyperparams``, go through unchecked.
"""

import numbers


def is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_count(name: str, value, minimum: int = 1) -> None:
  """``value`` must be an int (not a bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_number(name: str, value, *, schedule: bool = False) -> None:
  """``value`` must be a number or an array (or, with ``schedule``, a callable of the step count)."""
  if value is None or isinstance(value, (str, bool)) or (callable(value) and not schedule):
    kind = "a number, a scalar array or a schedule" if schedule else "a number or a scalar array"
    raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


def check_nonnegative(name: str, value, *, schedule: bool = False) -> None:
  check_number(name, value, schedule=schedule)
  if is_python_number(value) and not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value}")


def check_positive(name: str, value, *, schedule: bool = False) -> None:
  check_number(name, value, schedule=schedule)
  if is_python_number(value) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def check_decay(name: str, value) -> None:
  """An EMA decay: a number in [0, 1)."""
  check_number(name, value)
  if is_python_number(value) and not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be in [0, 1), got {value}")
