"""Flax's ImageNet example step (examples/imagenet/train.py: batch_stats, pmap with axis_name, kernel-only weight
decay) with a small ResNet-like CNN on 8x8 digits over 2 devices, switched to bSAM.

Its bSAM version is _flax_example_pmap_bsam.py; tests/test_flax_examples.py counts the lines between them.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils

import bsam_optax as bo
import bsam_optax.flax as bf
import bsam_optax.metrics as bm
from bsam_optax import app


class ResNetBlockNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = True):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
    x = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))
    y = nn.relu(norm()(nn.Conv(16, (3, 3), use_bias=False)(x)))
    y = norm(scale_init=nn.initializers.zeros_init())(nn.Conv(16, (3, 3), use_bias=False)(y))
    x = nn.relu(x + y)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(10)(x)


class TrainState(bf.TrainState):
  batch_stats: Any


def get_datasets():
  data = app.load_dataset("digits")
  as_dict = lambda split: {"image": np.asarray(split.x)[..., None], "label": np.asarray(split.y)}
  return as_dict(data.train), as_dict(data.test)


def cross_entropy_loss(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def compute_metrics(logits, labels):
  metrics = {"loss": cross_entropy_loss(logits, labels), "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
  return jax.lax.pmean(metrics, axis_name="batch")


def train_step(state, batch, weight_decay=1e-3):
  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, new_model_state = state.apply_fn(variables, batch["image"], mutable=["batch_stats"])
    loss = cross_entropy_loss(logits, batch["label"])
    return loss, (new_model_state, logits)

  (_, (new_model_state, logits)), grads = bf.value_and_grad(loss_fn, 0, has_aux=True, axis_name="batch")(state)
  grads = jax.lax.pmean(grads, axis_name="batch")
  metrics = compute_metrics(logits, batch["label"])
  new_state = state.apply_gradients(grads=grads, batch_stats=jax.lax.pmean(new_model_state["batch_stats"], "batch"))
  return new_state, metrics


p_train_step = jax.pmap(train_step, axis_name="batch", devices=jax.devices()[:2])


def train_and_evaluate(epochs=10, batch_size=128, learning_rate=0.1, momentum=0.9, seed=0):
  train_ds, test_ds = get_datasets()
  rng = jax.random.key(seed)
  model = ResNetBlockNet()
  variables = model.init(rng, jnp.ones((1, 8, 8, 1)), train=False)
  tx = bo.bsam(0.5, n_data=len(train_ds["image"]), rho=0.02, b2=0.99, weight_decay=1e-3, init_scale=0.1)
  state = TrainState.create(
    apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"], tx=tx
  )
  state = jax_utils.replicate(state, devices=jax.devices()[:2])
  steps_per_epoch = len(train_ds["image"]) // batch_size
  for epoch in range(epochs):
    perms = np.random.default_rng([seed, epoch]).permutation(len(train_ds["image"]))
    for i in range(steps_per_epoch):
      batch = {
        k: v[perms[i * batch_size : (i + 1) * batch_size]].reshape((2, -1) + v.shape[1:]) for k, v in train_ds.items()
      }
      state, metrics = p_train_step(state, batch)
  state = jax_utils.unreplicate(state)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  probs = jax.nn.softmax(model.apply(variables, test_ds["image"], train=False))
  results = {"mean": bm.classification_metrics(probs, test_ds["label"])}
  probs = state.predictive(rng, test_ds["image"], apply_kwargs={"train": False}, bn_inputs=train_ds["image"][:512])
  results["model average"] = bm.classification_metrics(probs, test_ds["label"])
  return {k: {m: float(v[m]) for m in ("accuracy", "nll", "ece")} for k, v in results.items()}
