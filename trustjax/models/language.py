"""Language models for next-token prediction (Shakespeare roles, federated next-character and
next-word prediction) and their losses as sums with a denominator."""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trustjax.models.classifiers import EncoderBlock, embed_with_positions
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


class GPTDecoder(nn.Module):
  """A GPT-style causal transformer language model: token and learned position embeddings,
  `num_layers` pre-LN blocks under a causal mask, a final LayerNorm and an untied linear head
  without bias (so that every parameterised layer is an Embed, Dense, DenseGeneral or LayerNorm,
  which the DP clipping rules recognise). With the same weights it computes what Hugging Face's
  `GPT2LMHeadModel` computes with `tie_word_embeddings=False` and no dropout (tested).

  Reference: Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019;
  Vaswani et al., "Attention Is All You Need", 2017.
  """

  vocab_size: int
  max_length: int
  embed_dim: int = 64
  num_layers: int = 2
  num_heads: int = 4
  mlp_dim: int = 256
  dtype: jnp.dtype = jnp.float32  # computation dtype (bfloat16 = mixed precision; params f32)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, length] -> logits [batch, length, vocab]; position t sees tokens
    0..t only, so padding after the last real token changes nothing before it."""
    x = embed_with_positions(tokens, self.vocab_size, self.max_length, self.embed_dim, self.dtype)
    causal = nn.make_causal_mask(tokens)
    for i in range(self.num_layers):
      # GPT-2's LayerNorm epsilon; the same block as the encoder's, under a causal mask.
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, layer_norm_epsilon=1e-5,
                       name=f"block_{i}")(x, causal)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_final")(x)
    return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="head")(x)


def build_language_model(name: str, *, vocab_size: int, max_length: int, embed_dim: int,
                         num_layers: int, num_heads: int, mlp_dim: int, hidden: int) -> nn.Module:
  """Builds a language model by name: "gpt" (`GPTDecoder`; `hidden` unused) or "char_lstm"
  (`CharLSTM` of width `hidden`; `num_heads`, `mlp_dim` and `max_length` unused)."""
  if name == "gpt":
    return GPTDecoder(vocab_size=vocab_size, max_length=max_length, embed_dim=embed_dim,
                      num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim)
  if name == "char_lstm":
    return CharLSTM(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden,
                    num_layers=num_layers)
  raise ValueError(f"model.name={name!r} is not a language model; expected 'gpt' or 'char_lstm'")


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


def generate(model: nn.Module, params: Params, prompts: jax.Array, prompt_lengths: jax.Array,
             key: jax.Array, *, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             suppress: Sequence[int] = (0,)) -> jax.Array:
  """Samples continuations of a batch of prompts from a causal language model, in one compiled
  program of static shape.

  The prompts are left-aligned in a buffer of `P + max_new_tokens` tokens; step t runs the model
  over the whole buffer (no key-value cache: the models here are small) and writes token t at
  position `prompt_lengths + t` of each row. A causal model's output at a position does not depend
  on what follows it, so the padding after each row's end changes nothing.

  Args:
    model, params: a causal LM, `model.apply({"params": params}, tokens[B, L]) -> [B, L, V]`,
      with `max_length >= P + max_new_tokens` where it has position embeddings.
    prompts: int32 [B, P], each row's prompt left-aligned and padded with anything.
    prompt_lengths: int32 [B], each between 1 and P.
    key: sampling key; step t uses `fold_in(key, t)`.
    max_new_tokens: tokens to generate per row.
    temperature: > 0 divides the logits; 0 means greedy (argmax).
    top_k: > 0 samples among the k most likely tokens only; 0 from the whole vocabulary.
    suppress: token ids never generated (default: padding, id 0).

  Returns:
    int32 [B, max_new_tokens]: the generated tokens.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
  if top_k < 0:
    raise ValueError(f"top_k must be >= 0 (0 = no cut), got {top_k}")
  prompts = jnp.asarray(prompts, jnp.int32)
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  if prompts.ndim != 2 or lengths.shape != prompts.shape[:1]:
    raise ValueError(f"prompts must be [B, P] and prompt_lengths [B], got {prompts.shape} and "
                     f"{lengths.shape}")
  max_length = getattr(model, "max_length", None)
  if max_length is not None and prompts.shape[1] + max_new_tokens > max_length:
    raise ValueError(f"prompt width {prompts.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                     f"the model's max_length {max_length}")
  if not jnp.all((lengths >= 1) & (lengths <= prompts.shape[1])):
    raise ValueError(f"prompt_lengths must lie in [1, {prompts.shape[1]}]")
  return _generate(model, params, prompts, lengths, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k),
                   suppress=tuple(int(i) for i in suppress))


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "suppress"))
def _generate(model, params, prompts, lengths, key, *, max_new_tokens, temperature, top_k,
              suppress):
  b, p = prompts.shape
  buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompts)
  rows = jnp.arange(b)

  def step(t, buf):
    logits = model.apply({"params": params}, buf)[rows, lengths + t - 1].astype(jnp.float32)
    if suppress:
      logits = logits.at[:, jnp.asarray(suppress)].set(-jnp.inf)
    if temperature == 0:
      tok = jnp.argmax(logits, -1)
    else:
      logits = logits / temperature
      if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
      tok = jax.random.categorical(jax.random.fold_in(key, t), logits, -1)
    return buf.at[rows, lengths + t].set(tok.astype(jnp.int32))

  buf = jax.lax.fori_loop(0, max_new_tokens, step, buf)
  return buf[rows[:, None], lengths[:, None] + jnp.arange(max_new_tokens)]
