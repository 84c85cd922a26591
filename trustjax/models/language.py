"""Language models for next-token prediction (Shakespeare roles, federated next-character and
next-word prediction) and their losses as sums with a denominator."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trustjax.types import Batch, Params


class CharLSTM(nn.Module):
  """Embedding -> stacked LSTM -> vocabulary logits (the LEAF Shakespeare model: embedding 8,
  two LSTM layers of 256; defaults here are smaller for CPU simulation).

  Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018; Hochreiter and
  Schmidhuber, "Long Short-Term Memory", 1997.
  """

  vocab_size: int
  embed_dim: int = 8
  hidden: int = 128
  num_layers: int = 1

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, length] -> logits [batch, length, vocab]."""
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    for i in range(self.num_layers):
      x = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"lstm_{i}")(x)
    return nn.Dense(self.vocab_size, name="out")(x)


def _token_terms(model: nn.Module, params: Params, batch: Batch):
  logits = model.apply({"params": params}, batch["inputs"]).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  tmask = batch["target_mask"].astype(jnp.float32)
  return logits, loss, tmask


def lm_loss(model: nn.Module) -> Callable[[Params, Batch], jax.Array]:
  """`loss_fn(params, batch) -> [B]`: each example's mean next-token cross-entropy over its real
  targets (batch: "inputs", "targets", "target_mask")."""

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    _, loss, tmask = _token_terms(model, params, batch)
    return (loss * tmask).sum(-1) / jnp.maximum(tmask.sum(-1), 1.0)

  return loss_fn


def lm_metrics(model: nn.Module) -> Callable[[Params, Batch], dict]:
  """`metrics_fn(params, batch)` -> token-level sums: loss_sum, correct, count (example mask
  `batch["mask"]` and `target_mask` both applied)."""

  def metrics_fn(params: Params, batch: Batch) -> dict:
    logits, loss, tmask = _token_terms(model, params, batch)
    if "mask" in batch:
      tmask = tmask * batch["mask"].astype(jnp.float32)[:, None]
    correct = (logits.argmax(-1) == batch["targets"]).astype(jnp.float32)
    return {"loss_sum": (loss * tmask).sum(), "correct": (correct * tmask).sum(),
            "count": tmask.sum()}

  return metrics_fn
