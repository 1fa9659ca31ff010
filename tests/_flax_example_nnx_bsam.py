"""Flax's NNX MNIST tutorial (BatchNorm, Dropout, nnx.Optimizer, nnx.MultiMetric) on 8x8 digits, switched to bSAM.

Its bSAM version is _flax_example_nnx_bsam.py; tests/test_flax_examples.py counts the lines between them.
"""

import jax
import numpy as np
import optax
from flax import nnx

import bsam_optax as bo
import bsam_optax.flax as bf
import bsam_optax.metrics as bm
from bsam_optax import app


class CNN(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
    self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
    self.dropout1 = nnx.Dropout(rate=0.1, rngs=rngs)
    self.linear1 = nnx.Linear(16 * 4 * 4, 64, rngs=rngs)
    self.linear2 = nnx.Linear(64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.avg_pool(nnx.relu(self.batch_norm1(self.conv1(x))), window_shape=(2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self.dropout1(nnx.relu(self.linear1(x)))
    return self.linear2(x)


def get_datasets():
  data = app.load_dataset("digits")
  as_dict = lambda split: {"image": np.asarray(split.x)[..., None], "label": np.asarray(split.y)}
  return as_dict(data.train), as_dict(data.test)


def loss_fn(model: CNN, batch):
  logits = model(batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits=logits, labels=batch["label"]).mean()
  return loss, logits


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, metrics: nnx.MultiMetric, batch):
  grad_fn = bf.nnx_value_and_grad(loss_fn, optimizer, 0, has_aux=True, m=8)
  (loss, logits), grads = grad_fn(model, batch)
  metrics.update(loss=loss, logits=logits, labels=batch["label"])
  optimizer.update(model, grads)


def train_and_evaluate(epochs=10, batch_size=128, learning_rate=0.005, momentum=0.9, seed=0):
  train_ds, test_ds = get_datasets()
  model = CNN(rngs=nnx.Rngs(seed))
  tx = bo.bsam(0.5, n_data=len(train_ds["image"]), rho=0.02, b2=0.99, weight_decay=1e-3)
  optimizer = bf.Optimizer(model, tx, wrt=nnx.Param)
  metrics = nnx.MultiMetric(accuracy=nnx.metrics.Accuracy(), loss=nnx.metrics.Average("loss"))
  steps_per_epoch = len(train_ds["image"]) // batch_size
  for epoch in range(epochs):
    model.train()
    perms = np.random.default_rng([seed, epoch]).permutation(len(train_ds["image"]))
    for i in range(steps_per_epoch):
      batch = {k: v[perms[i * batch_size : (i + 1) * batch_size]] for k, v in train_ds.items()}
      train_step(model, optimizer, metrics, batch)
    metrics.reset()
  model.eval()
  probs = jax.nn.softmax(model(test_ds["image"]))
  results = {"mean": bm.classification_metrics(probs, test_ds["label"])}
  probs = bf.nnx_predictive(model, optimizer, jax.random.key(0), test_ds["image"], bn_inputs=train_ds["image"][:512])
  results["model average"] = bm.classification_metrics(probs, test_ds["label"])
  return {k: {m: float(v[m]) for m in ("accuracy", "nll", "ece")} for k, v in results.items()}
