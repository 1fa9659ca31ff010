"""The examples in the docstrings run and print what they say (``doctest``)."""

import doctest
import importlib
import pkgutil

import pytest

import bsam_optax

MODULES = sorted(
  info.name for info in pkgutil.walk_packages(bsam_optax.__path__, "bsam_optax.") if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
  assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"
