"""Flax's linen MNIST example (examples/mnist/train.py) with BatchNorm, shrunk to 8x8 digits, switched to bSAM.

Its bSAM version is _flax_example_linen_bsam.py; tests/test_flax_examples.py counts the lines between them.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bsam_optax as bo
import bsam_optax.flax as bf
import bsam_optax.metrics as bm
from bsam_optax import app


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(features=16, kernel_size=(3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(features=64)(x))
    return nn.Dense(features=10)(x)


class TrainState(bf.TrainState):
  batch_stats: Any


def get_datasets():
  data = app.load_dataset("digits")
  as_dict = lambda split: {"image": np.asarray(split.x)[..., None], "label": np.asarray(split.y)}
  return as_dict(data.train), as_dict(data.test)


def compute_metrics(logits, labels):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}


@jax.jit
def train_step(state, batch):
  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, (logits, updates)

  (loss, (logits, updates)), grads = bf.value_and_grad(loss_fn, 0, has_aux=True)(state)
  state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
  return state, compute_metrics(logits, batch["label"])


def train_and_evaluate(epochs=10, batch_size=128, learning_rate=0.1, momentum=0.9, seed=0):
  train_ds, test_ds = get_datasets()
  rng = jax.random.key(seed)
  variables = CNN().init(rng, jnp.ones((1, 8, 8, 1)), train=False)
  tx = bo.bsam(0.5, n_data=len(train_ds["image"]), rho=0.02, b2=0.99, weight_decay=1e-3)
  state = TrainState.create(
    apply_fn=CNN().apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
  )
  steps_per_epoch = len(train_ds["image"]) // batch_size
  for epoch in range(epochs):
    perms = np.random.default_rng([seed, epoch]).permutation(len(train_ds["image"]))
    for i in range(steps_per_epoch):
      batch = {k: v[perms[i * batch_size : (i + 1) * batch_size]] for k, v in train_ds.items()}
      state, metrics = train_step(state, batch)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  probs = jax.nn.softmax(CNN().apply(variables, test_ds["image"], train=False))
  results = {"mean": bm.classification_metrics(probs, test_ds["label"])}
  probs = state.predictive(rng, test_ds["image"], apply_kwargs={"train": False}, bn_inputs=train_ds["image"][:512])
  results["model average"] = bm.classification_metrics(probs, test_ds["label"])
  return {k: {m: float(v[m]) for m in ("accuracy", "nll", "ece")} for k, v in results.items()}
