"""A small model and batch for privacy tests."""

import jax
import jax.numpy as jnp
import numpy as np

from trustjax import models


def tiny_transformer_problem(batch_size=8, seed=0, scale=1.0):
  model = models.TransformerClassifier(vocab_size=40, num_classes=3, max_length=6, embed_dim=8,
                                       num_layers=1, num_heads=2, mlp_dim=16)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 40, (batch_size, 6)).astype(np.int32)
  tokens[:, 4:] *= rng.integers(0, 2, (batch_size, 1))  # some rows padded
  batch = {"tokens": jnp.asarray(tokens), "label": jnp.asarray(rng.integers(0, 3, batch_size)),
           "mask": jnp.asarray(rng.random(batch_size) < 0.75)}
  params = model.init(jax.random.key(seed), batch["tokens"])["params"]
  params = jax.tree_util.tree_map(lambda p: p * scale, params)
  return models.classification_loss(model), params, batch
