"""Three of Flax's own example patterns switched from SGD/Adam to bSAM: the lines a user changes, and that they train.

Each pattern is a pair of scripts in tests/ written as Flax writes its examples, on scikit-learn's 8x8 digits:
``_flax_example_linen_{sgd,bsam}.py`` (linen MNIST: TrainState with ``batch_stats``, dict batches),
``_flax_example_nnx_{adam,bsam}.py`` (NNX MNIST: BatchNorm, Dropout, ``nnx.Optimizer``, ``nnx.MultiMetric``) and
``_flax_example_pmap_{sgd,bsam}.py`` (ImageNet's step: ``batch_stats``, ``jax.pmap`` with ``axis_name``). The bSAM
script differs from its baseline only in what a user changes: the imports, the optimizer (and ``nnx.Optimizer``
becomes ``bsam_optax.flax.Optimizer``, Flax's ``TrainState`` base becomes ``bsam_optax.flax.TrainState``), and the
gradient line: ``jax.value_and_grad(loss_fn, ...)(state.params)`` becomes ``bf.value_and_grad(loss_fn, seed,
...)(state)``, ``nnx.value_and_grad(loss_fn, ...)`` becomes ``bf.nnx_value_and_grad(loss_fn, optimizer, seed, ...)``.
In the ImageNet step the kernels' L2 term leaves the loss for bSAM's ``weight_decay`` (the prior, which also enters
the scale). Lines after ``results = {"mean": ...`` compute the model average and its NLL/ECE (BatchNorm statistics
recomputed per sample). ``XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/test_flax_examples.py
EPOCHS`` trains all six and prints their test metrics.
"""

import difflib
import importlib
import json
import pathlib
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
PATTERNS = {
  "linen": ("_flax_example_linen_sgd", "_flax_example_linen_bsam"),
  "nnx": ("_flax_example_nnx_adam", "_flax_example_nnx_bsam"),
  "pmap": ("_flax_example_pmap_sgd", "_flax_example_pmap_bsam"),
}
# Added or changed lines (imports included, blank lines and the docstring not): (to train, for the model average).
# With make_train_step / make_nnx_train_step replacing the user's train_step they were (12, 5), (9, 4), (11, 4).
EXPECTED_CHANGES = {"linen": (5, 2), "nnx": (5, 2), "pmap": (6, 2)}


def _code(name):
  text = (HERE / f"{name}.py").read_text()
  return text[text.index('"""', 3) + 3 :].splitlines()  # without the module docstring


def changed_lines(pattern):
  """``(train, average, removed)``: lines added or changed in the bSAM script, split at the model average."""
  before, after = (_code(name) for name in PATTERNS[pattern])
  start = next(i for i, line in enumerate(after) if line.strip().startswith('results = {"mean"'))
  train, average, removed = [], [], []
  for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes():
    if tag in ("replace", "delete"):
      removed += [line for line in before[i1:i2] if line.strip()]
    if tag in ("replace", "insert"):
      for j in range(j1, j2):
        if after[j].strip():
          (average if j > start else train).append(after[j])
  return train, average, removed


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_changed_lines(pattern):
  train, average, _ = changed_lines(pattern)
  assert (len(train), len(average)) == EXPECTED_CHANGES[pattern], "\n".join(train + ["--"] + average)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_bsam_script_trains_and_reports_the_model_average(pattern):
  module = importlib.import_module(PATTERNS[pattern][1])
  results = module.train_and_evaluate(epochs=1)
  assert set(results) == {"mean", "model average"}
  for metrics in results.values():
    assert all(np.isfinite(v) for v in metrics.values())
  if pattern != "pmap":  # the ImageNet-style net trains slowly at these settings (docs/hyperparameters.md)
    assert results["mean"]["accuracy"] > 0.2, results  # 9 steps; chance is 0.1


if __name__ == "__main__":  # python tests/test_flax_examples.py EPOCHS [PATTERN ...]
  epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
  for pattern in sys.argv[2:] or sorted(PATTERNS):
    train, average, removed = changed_lines(pattern)
    print(f"## {pattern}: +{len(train)} lines to train (-{len(removed)}), +{len(average)} for the model average")
    for name in PATTERNS[pattern]:
      print(json.dumps({name: importlib.import_module(name).train_and_evaluate(epochs=epochs)}), flush=True)
