"""bsam_optax.app.report: the warning when bSAM's scale still remembers init_scale (b2 ** steps > 0.5)."""

import math

import pytest

from bsam_optax.app import TrainConfig
from bsam_optax.app import report
from bsam_optax.app.config import check_config
from bsam_optax.app.config import load_data


def _config(**kwargs):
  return check_config(TrainConfig(dataset="digits", model="mlp", progress=False, **kwargs))


@pytest.fixture(scope="module")
def data():
  return load_data(_config())


def _steps(config, data):
  return config.epochs * (len(data.train.y) // config.batch_size)


def test_warns_when_b2_to_the_steps_is_above_one_half(data):
  config = _config(b2=0.999, epochs=2)
  steps = _steps(config, data)
  assert 0.999**steps > 0.5  # the case of the issue: a few hundred steps at b2 = 0.999
  warning = report.init_scale_warning(config, data)
  assert warning.startswith("warning:") and warning.count(". ") == 0  # one sentence
  assert f"{steps} steps" in warning
  assert f"at least {math.ceil(math.log(0.5) / math.log(0.999))} steps" in warning  # 693
  assert f"lower --b2 to {0.5 ** (1 / steps):.3g}" in warning
  assert warning in report.header(config, data).splitlines()


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(b2=0.99, epochs=10),  # 0.99 ** 110 = 0.33
    dict(b2=0.999, epochs=10, optimizer="adam"),  # Adam's b2 has no init_scale
    dict(b2=0.0, epochs=1),
  ],
)
def test_no_warning_when_the_data_dominates_s_or_not_bsam(data, kwargs):
  config = _config(**kwargs)
  assert report.init_scale_warning(config, data) is None
  assert "warning" not in report.header(config, data)


def test_threshold_is_one_half(data):
  steps = _steps(_config(epochs=1), data)
  below, above = 0.5 ** (1 / steps) - 1e-4, 0.5 ** (1 / steps) + 1e-4
  assert report.init_scale_warning(_config(b2=below, epochs=1), data) is None
  assert report.init_scale_warning(_config(b2=above, epochs=1), data) is not None


def test_print_report_repeats_the_warning(data):
  import types

  config = _config(b2=0.999, epochs=1)
  values = dict(accuracy=0.9, nll=0.3, brier=0.1, ece=0.02, auroc=0.8, ood_auroc=0.7)
  result = types.SimpleNamespace(
    config=config, data=data, metrics={"point_estimate": values}, posterior_std=None, files={}
  )
  lines = []
  report.print_report(result, lines.append)
  assert report.init_scale_warning(config, data) in lines
