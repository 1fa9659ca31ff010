"""Small Flax linen classifiers of the main job, its loss and its evaluation-mode predictor.

Both take ``__call__(x, train=False)`` and return logits; with
``batch_norm=True`` they hold BatchNorm statistics in the ``"batch_stats"``
collection (use ``mutable=["batch_stats"]`` when ``train=True``).

* :class:`MLP` flattens its input and applies ``len(features)`` dense ReLU
  layers and a linear read-out.
* :class:`CNN` adds a channel axis and applies strided ReLU convolutions whose
  dimension follows the input: 1-D for MNIST-1D sequences ``(n, 40)``, 2-D for
  images ``(n, 8, 8)``; then flattens and reads out — the MNIST-1D reference
  CNN (Greydanus & Kobak, 2020) with ``padding="SAME"``.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

__all__ = ["CNN", "MLP", "MODELS", "apply_fn", "cross_entropy", "make_model", "model_for", "num_params"]


def _norm(x, train: bool, enabled: bool):
  if not enabled:
    return x
  return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


class MLP(nn.Module):
  """A ReLU multilayer perceptron on flattened inputs."""

  features: Sequence[int] = (128, 128)
  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for width in self.features:
      x = nn.Dense(width)(x)
      x = _norm(x, train, self.batch_norm)
      x = nn.relu(x)
    return nn.Dense(self.num_classes)(x)


class CNN(nn.Module):
  """Strided ReLU convolutions (1-D or 2-D, from the input's rank) and a linear read-out."""

  channels: Sequence[int] = (32, 32, 32)
  kernel_size: int = 5
  num_classes: int = 10
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x[..., None]  # one input channel
    spatial = x.ndim - 2
    for width in self.channels:
      x = nn.Conv(width, (self.kernel_size,) * spatial, strides=(2,) * spatial, padding="SAME")(x)
      x = _norm(x, train, self.batch_norm)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes)(x)


MODELS = ("mlp", "cnn")


def make_model(name: str, num_classes: int = 10, *, batch_norm: bool = False, **kwargs) -> nn.Module:
  """Builds ``"mlp"`` or ``"cnn"``; ``kwargs`` go to the module (``features=``, ``channels=`` ...).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from bsam_optax.app.models import make_model, num_params
    >>> model = make_model("mlp", 3, features=(4,))
    >>> num_params(model.init(jax.random.key(0), jnp.ones((1, 2)))["params"])
    27
  """
  if name == "mlp":
    return MLP(num_classes=num_classes, batch_norm=batch_norm, **kwargs)
  if name == "cnn":
    return CNN(num_classes=num_classes, batch_norm=batch_norm, **kwargs)
  raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def num_params(params) -> int:
  """The number of scalar parameters in a pytree."""
  return sum(jnp.size(x) for x in jax.tree.leaves(params))


def model_for(config, num_classes: int) -> nn.Module:
  """The model of a :class:`~bsam_optax.app.TrainConfig`: ``width`` channels (CNN) or 4 x ``width`` units (MLP)."""
  kwargs: dict[str, tuple[int, ...]]
  if config.model == "mlp":
    kwargs = {"features": (4 * config.width, 4 * config.width)}
  else:
    kwargs = {"channels": (config.width,) * 3}
  return make_model(config.model, num_classes, batch_norm=config.batch_norm, **kwargs)


def apply_fn(model: nn.Module, batch_stats=None):
  """``apply(params, x) -> logits`` in evaluation mode (with the running BatchNorm statistics, if any)."""

  def apply(params, x):
    variables = {"params": params}
    if batch_stats is not None:
      variables["batch_stats"] = batch_stats
    return model.apply(variables, x)

  return apply


def cross_entropy(logits: jax.Array, batch) -> jax.Array:
  """The training loss: the mean cross-entropy of ``logits`` and the labels ``batch.y``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch.y).mean()
