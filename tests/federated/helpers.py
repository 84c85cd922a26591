"""A small float-feature problem for the federated tests."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from trustjax.federated import ClientStore, partition
from trustjax.models import MLPClassifier, classification_loss, classification_metrics

MODEL = MLPClassifier(hidden=(8,), num_classes=3)
LOSS = classification_loss(MODEL, "x")


def metrics_fn(params, batch):
  return classification_metrics(MODEL)(params, dict(batch, tokens=batch["x"]))


def arrays(n=240, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 6)).astype(np.float32)
  y = (np.argmax(x[:, :3], 1)).astype(np.int32)
  return {"x": x, "label": y}


@functools.lru_cache(maxsize=None)
def init_params(seed=0):
  return MODEL.init(jax.random.key(seed), jnp.zeros((1, 6)))["params"]


def store(sizes=(5, 9, 16, 3, 12, 7), seed=0, min_capacity=4):
  data = arrays(sum(sizes), seed)
  bounds = np.concatenate([[0], np.cumsum(sizes)])
  parts = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  return ClientStore(data, parts, min_capacity=min_capacity), data


def iid_store(num_clients, per_client, seed=0):
  data = arrays(num_clients * per_client, seed)
  return ClientStore(data, partition.iid(num_clients * per_client, num_clients, seed=seed),
                     min_capacity=per_client), data
