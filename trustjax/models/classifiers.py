"""Text classifiers in Flax Linen, built only from standard layers (Embed, Dense, DenseGeneral
through MultiHeadDotProductAttention, LayerNorm), so per-layer DP rules can recognise them.

Inputs are token ids `tokens: [batch, length]` with 0 as padding; outputs `logits: [batch, classes]`.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trustjax.types import Batch, Params


def _masked_mean(x: jax.Array, token_mask: jax.Array) -> jax.Array:
  """Mean over the length axis of `x: [B, L, D]` using `token_mask: [B, L]`."""
  m = token_mask.astype(x.dtype)[..., None]
  return (x * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


class BagOfEmbeddings(nn.Module):
  """Mean of token embeddings, one hidden layer, linear output.

  Reference: Joulin et al., "Bag of Tricks for Efficient Text Classification" (fastText), 2017.
  """

  vocab_size: int
  num_classes: int
  embed_dim: int = 64
  hidden_dim: int = 128
  pad_id: int = 0
  dtype: jnp.dtype = jnp.float32  # computation dtype (bfloat16 = mixed precision; params f32)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="embed")(tokens)
    h = _masked_mean(x, tokens != self.pad_id)
    h = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="hidden")(h))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(h)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block (self-attention + MLP with GELU in its tanh form, both
  residual). The attention mask decides encoder (padding mask) or decoder (causal mask).
  `decode=True` keeps the attention's keys and values in the "cache" collection (Flax's
  autoregressive cache: one position per call once the cache exists, the mask built from it)."""

  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  layer_norm_epsilon: float = 1e-6
  decode: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: jax.Array | None) -> jax.Array:
    d, eps = x.shape[-1], self.layer_norm_epsilon
    h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_attn")(x)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=d,
                                        dtype=self.dtype, decode=self.decode,
                                        name="attn")(h, h, mask=attn_mask)
    x = x + h
    h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="ln_mlp")(x)
    h = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(h), approximate=True)
    return x + nn.Dense(d, dtype=self.dtype, name="mlp_out")(h)


def embed_with_positions(tokens: jax.Array, vocab_size: int, max_length: int, embed_dim: int,
                         dtype: jnp.dtype, offset: jax.Array | int = 0,
                         token_embed: nn.Embed | None = None) -> jax.Array:
  """Token plus learned position embeddings ("token_embed", "pos_embed"), created in the calling
  compact module (or the caller's `token_embed`, for a model that reuses it as its output layer);
  a named error when `tokens` is longer than `max_length`. Position ids start at `offset` (a
  traced scalar in cached decoding, where `tokens` is one position)."""
  length = tokens.shape[1]
  if length > max_length:
    raise ValueError(f"sequence length {length} exceeds max_length={max_length}")
  if token_embed is None:
    token_embed = nn.Embed(vocab_size, embed_dim, dtype=dtype, name="token_embed")
  x = token_embed(tokens)
  # Position ids carry the batch axis (like token ids) so per-example DP rules see each
  # example's use of the position table.
  positions = jnp.broadcast_to(offset + jnp.arange(length), tokens.shape)
  return x + nn.Embed(max_length, embed_dim, dtype=dtype, name="pos_embed")(positions)


class TransformerClassifier(nn.Module):
  """Transformer encoder text classifier: token + learned position embeddings, `num_layers`
  pre-LN blocks, final LayerNorm, masked mean pooling, linear head.

  Reference: Vaswani et al., "Attention Is All You Need", 2017; pre-LN placement from
  Xiong et al., "On Layer Normalization in the Transformer Architecture", 2020.
  """

  vocab_size: int
  num_classes: int
  max_length: int
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  pad_id: int = 0
  dtype: jnp.dtype = jnp.float32  # computation dtype (bfloat16 = mixed precision; params f32)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    token_mask = tokens != self.pad_id
    x = embed_with_positions(tokens, self.vocab_size, self.max_length, self.embed_dim, self.dtype)
    attn_mask = nn.make_attention_mask(token_mask, token_mask)
    for i in range(self.num_layers):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, name=f"block_{i}")(x, attn_mask)
    x = nn.LayerNorm(dtype=self.dtype, name="ln_final")(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(_masked_mean(x, token_mask))


class MLPClassifier(nn.Module):
  """A ReLU multilayer perceptron on dense features `x: [batch, features]` (the MNIST-style
  784-512-512-10 network is the standard DP-SGD speed reference)."""

  hidden: tuple[int, ...] = (512, 512)
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"dense_{i}")(x))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="out")(x)


def classification_loss(model: nn.Module, input_key: str = "tokens") -> Callable[[Params, Batch], jax.Array]:
  """`loss_fn(params, batch) -> [B]` softmax cross-entropy; batch has `input_key` and "label"."""

  def loss_fn(params: Params, batch: Batch) -> jax.Array:
    logits = model.apply({"params": params}, batch[input_key])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           batch["label"])

  return loss_fn


def classification_metrics(model: nn.Module) -> Callable[[Params, Batch], dict]:
  """`metrics_fn(params, batch)` -> sums with a denominator: loss_sum, correct, count."""

  def metrics_fn(params: Params, batch: Batch) -> dict:
    logits = model.apply({"params": params}, batch["tokens"]).astype(jnp.float32)
    mask = batch.get("mask", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": (loss * mask).sum(), "correct": (correct * mask).sum(),
            "count": mask.sum()}

  return metrics_fn


def class_metrics(model: nn.Module, num_classes: int) -> Callable[[Params, Batch], dict]:
  """`metrics_fn(params, batch)` -> per-class sums [num_classes]: "class_correct" (rows of
  that label predicted right) and "class_count" (rows of that label). Their ratio is each
  class's accuracy (its recall)."""

  def metrics_fn(params: Params, batch: Batch) -> dict:
    logits = model.apply({"params": params}, batch["tokens"])
    mask = batch.get("mask", jnp.ones(logits.shape[0], bool)).astype(jnp.float32)
    onehot = jax.nn.one_hot(batch["label"], num_classes) * mask[:, None]
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    return {"class_correct": correct @ onehot, "class_count": onehot.sum(0)}

  return metrics_fn


def build_classifier(name: str, *, vocab_size: int, num_classes: int, max_length: int,
                     **kwargs) -> nn.Module:
  """Builds a classifier by name ("transformer" or "bag_of_embeddings")."""
  if name == "transformer":
    return TransformerClassifier(vocab_size=vocab_size, num_classes=num_classes,
                                 max_length=max_length, **kwargs)
  if name == "bag_of_embeddings":
    return BagOfEmbeddings(vocab_size=vocab_size, num_classes=num_classes, **kwargs)
  raise ValueError(f"unknown model {name=}; expected 'transformer' or 'bag_of_embeddings'")
