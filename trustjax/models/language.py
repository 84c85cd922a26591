"""Language models for next-token prediction (Shakespeare roles, federated next-character and
next-word prediction) and their losses as sums with a denominator."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from trustjax.models.classifiers import EncoderBlock, embed_with_positions
from trustjax.types import Batch, Params


class LSTMLayer(nn.Module):
  """An LSTM over a whole sequence whose recurrent weight the DP clipping rules cover.

  The input projection u_t = x_t W + b is one Dense over the sequence ("input", [I, 4H], gates
  i, f, g, o); the recurrence z_t = u_t + h_{t-1} R ("recurrent", [H, 4H]) runs in a
  `lax.scan`. Since dL/dz_t = dL/du_t, example i's gradient of R is sum_t h_{t-1}^T (dL/du_t):
  the Dense rule's form, with the layer's own outputs shifted by one step as inputs and the
  input projection's output gradients, so ghost clipping and book-keeping need no vmap for it
  (`privacy.ghost`). With the same weights it computes `torch.nn.LSTM` (tested; PyTorch's two
  biases summed in "input"'s bias). Zero initial state.

  Reference: Hochreiter and Schmidhuber, "Long Short-Term Memory", 1997 (with the forget gate of
  Gers et al., 2000).
  """

  hidden: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, length, features] -> hidden states [batch, length, hidden]."""
    h = self.hidden
    u = nn.Dense(4 * h, name="input")(x)
    r = self.param("recurrent", nn.initializers.orthogonal(), (h, 4 * h))

    def step(carry, u_t):
      h_prev, c_prev = carry
      z = u_t + h_prev @ r.astype(u_t.dtype)
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c_prev + jax.nn.sigmoid(i) * jnp.tanh(g)
      h_t = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h_t, c), h_t

    zeros = jnp.zeros(x.shape[:1] + (h,), u.dtype)
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(u, 0, 1))
    return jnp.swapaxes(hs, 0, 1)


class CharLSTM(nn.Module):
  """Embedding -> stacked LSTM -> vocabulary logits (the LEAF Shakespeare model: embedding 8,
  two LSTM layers of 256; defaults here are smaller for CPU simulation).

  `cell="flax"` (default) runs Flax's `OptimizedLSTMCell`, whose weights the DP clipping rules
  do not cover (they fall back to vmap); `cell="dp"` runs `LSTMLayer`, which they cover. The
  two have different parameter trees (and initialisations), not different functions.

  Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018; Hochreiter and
  Schmidhuber, "Long Short-Term Memory", 1997.
  """

  vocab_size: int
  embed_dim: int = 8
  hidden: int = 128
  num_layers: int = 1
  cell: str = "flax"  # flax (OptimizedLSTMCell) | dp (LSTMLayer: DP rules without vmap)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, length] -> logits [batch, length, vocab]."""
    if self.cell not in ("flax", "dp"):
      raise ValueError(f"cell must be 'flax' or 'dp', got cell={self.cell!r}")
    x = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    for i in range(self.num_layers):
      if self.cell == "dp":
        x = LSTMLayer(self.hidden, name=f"lstm_{i}")(x)
      else:
        x = nn.RNN(nn.OptimizedLSTMCell(self.hidden), name=f"lstm_{i}")(x)
    return nn.Dense(self.vocab_size, name="out")(x)


class GPTDecoder(nn.Module):
  """A GPT-style causal transformer language model: token and learned position embeddings,
  `num_layers` pre-LN blocks under a causal mask, a final LayerNorm and a linear head without
  bias: untied by default, or with `tie_embeddings=True` the token embedding's transpose, as in
  GPT-2 (`Embed.attend`; the DP clipping rules take the embedding's two uses together). Every
  parameterised layer is an Embed, Dense, DenseGeneral or LayerNorm, which the rules recognise.
  With the same weights it computes what Hugging Face's `GPT2LMHeadModel` computes with
  `tie_word_embeddings` set alike and no dropout (tested, tied and untied).

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
  decode: bool = False  # cached decoding: see `generate` (same parameters either way)
  tie_embeddings: bool = False  # output layer = token embedding's transpose (no "head" params)

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    """tokens: int32 [batch, length] -> logits [batch, length, vocab]; position t sees tokens
    0..t only, so padding after the last real token changes nothing before it.

    With `decode=True` the first call (mutable "cache", tokens of the cache's full length)
    creates zero key-value caches; each later call takes tokens [batch, 1] at the next position
    and returns that position's logits, attending to the cached positions before it."""
    offset, mask = 0, nn.make_causal_mask(tokens)
    if self.decode:
      cached = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      if cached:
        if tokens.shape[1] != 1:
          raise ValueError(f"cached decoding takes one position per call, got {tokens.shape}")
        offset, mask = position.value, None  # the attention cache masks the unwritten rest
        position.value = position.value + 1
    token_embed = nn.Embed(self.vocab_size, self.embed_dim, dtype=self.dtype, name="token_embed")
    x = embed_with_positions(tokens, self.vocab_size, self.max_length, self.embed_dim, self.dtype,
                             offset, token_embed=token_embed)
    for i in range(self.num_layers):
      # GPT-2's LayerNorm epsilon; the same block as the encoder's, under a causal mask.
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dtype, layer_norm_epsilon=1e-5,
                       decode=self.decode, name=f"block_{i}")(x, mask)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="ln_final")(x)
    if self.tie_embeddings:
      return token_embed.attend(x)
    return nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype, name="head")(x)


def build_language_model(name: str, *, vocab_size: int, max_length: int, embed_dim: int,
                         num_layers: int, num_heads: int, mlp_dim: int, hidden: int,
                         tie_embeddings: bool = False, lstm_cell: str = "flax") -> nn.Module:
  """Builds a language model by name: "gpt" (`GPTDecoder`; `hidden` and `lstm_cell` unused) or
  "char_lstm" (`CharLSTM` of width `hidden` with `cell=lstm_cell`; `num_heads`, `mlp_dim`,
  `max_length` and `tie_embeddings` unused)."""
  if name == "gpt":
    return GPTDecoder(vocab_size=vocab_size, max_length=max_length, embed_dim=embed_dim,
                      num_layers=num_layers, num_heads=num_heads, mlp_dim=mlp_dim,
                      tie_embeddings=tie_embeddings)
  if name == "char_lstm":
    return CharLSTM(vocab_size=vocab_size, embed_dim=embed_dim, hidden=hidden,
                    num_layers=num_layers, cell=lstm_cell)
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
             suppress: Sequence[int] = (0,), use_cache: bool = True) -> jax.Array:
  """Samples continuations of a batch of prompts from a causal language model, in one compiled
  program of static shape.

  The prompts are left-aligned in a buffer of `P + max_new_tokens` tokens, and each row's token
  t goes to position `prompt_lengths + t`. A causal model's output at a position does not depend
  on what follows it, so the padding after each row's end changes nothing.

  With a key-value cache (`use_cache` and a model with a `decode` attribute, as `GPTDecoder`),
  the program feeds the buffer one position at a time to the model cloned with `decode=True`
  (Flax's autoregressive cache: each step attends to the cached keys and values of the
  positions before it): step i reads position i of every row, prompt or generated, and writes
  the token it samples at position i + 1 of the rows whose prompt has ended there. That is
  `P + max_new_tokens - 1` one-position steps. Without a cache (`use_cache=False`, or any other
  causal model such as `CharLSTM`), step t runs the model over the whole buffer and writes
  token t of every row: `max_new_tokens` steps over `P + max_new_tokens` positions each. Both
  sample from the same distributions (tested), but not the same draws: the cached program
  draws step i's tokens with `fold_in(key, i)`, the other one token t's with `fold_in(key, t)`.

  Args:
    model, params: a causal LM, `model.apply({"params": params}, tokens[B, L]) -> [B, L, V]`,
      with `max_length >= P + max_new_tokens` where it has position embeddings.
    prompts: int32 [B, P], each row's prompt left-aligned and padded with anything.
    prompt_lengths: int32 [B], each between 1 and P.
    key: sampling key.
    max_new_tokens: tokens to generate per row.
    temperature: > 0 divides the logits; 0 means greedy (argmax).
    top_k: > 0 samples among the k most likely tokens only; 0 from the whole vocabulary.
    suppress: token ids never generated (default: padding, id 0).
    use_cache: use the model's key-value cache where it has one.

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
  cached = use_cache and "decode" in {f.name for f in dataclasses.fields(model)}
  return _generate(model, params, prompts, lengths, key, max_new_tokens=max_new_tokens,
                   temperature=float(temperature), top_k=int(top_k),
                   suppress=tuple(int(i) for i in suppress), cached=cached)


def _sample(logits, key, temperature, top_k, suppress):
  """Next tokens [B] from logits [B, V]: suppressed ids out, then greedy or tempered top-k."""
  logits = logits.astype(jnp.float32)
  if suppress:
    logits = logits.at[:, jnp.asarray(suppress)].set(-jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k",
                                             "suppress", "cached"))
def _generate(model, params, prompts, lengths, key, *, max_new_tokens, temperature, top_k,
              suppress, cached):
  """The buffer (prompts left-aligned, then room for the new tokens), filled by either program,
  and each row's new tokens read back from it."""
  b, p = prompts.shape
  buf = jnp.zeros((b, p + max_new_tokens), jnp.int32).at[:, :p].set(prompts)
  sample = lambda logits, k: _sample(logits, k, temperature, top_k, suppress)
  if cached:
    buf = _fill_cached(model, params, buf, lengths, key, sample)
  else:
    buf = _fill_whole(model, params, buf, lengths, key, sample, max_new_tokens)
  return buf[jnp.arange(b)[:, None], lengths[:, None] + jnp.arange(max_new_tokens)]


def _fill_whole(model, params, buf, lengths, key, sample, max_new_tokens):
  """Step t runs the model over the whole buffer and writes token t of every row."""
  rows = jnp.arange(buf.shape[0])

  def step(t, buf):
    logits = model.apply({"params": params}, buf)[rows, lengths + t - 1]
    return buf.at[rows, lengths + t].set(sample(logits, jax.random.fold_in(key, t)))

  return jax.lax.fori_loop(0, max_new_tokens, step, buf)


def _fill_cached(model, params, buf, lengths, key, sample):
  """Step i feeds position i to the cached decoder and writes its sample at position i + 1 of
  the rows whose prompt has ended."""
  decoder = model.clone(decode=True)
  # The cache's shapes from an abstract first call; its contents start at zero.
  shapes = jax.eval_shape(
      lambda: decoder.apply({"params": params}, buf, mutable=["cache"])[1]["cache"])
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def step(i, carry):
    buf, cache = carry
    logits, updated = decoder.apply({"params": params, "cache": cache},
                                    jax.lax.dynamic_slice_in_dim(buf, i, 1, axis=1),
                                    mutable=["cache"])
    tok = sample(logits[:, 0], jax.random.fold_in(key, i))
    nxt = jax.lax.dynamic_index_in_dim(buf, i + 1, axis=1, keepdims=False)
    # Rows still inside their prompt keep it; the others take the sampled token.
    nxt = jnp.where(i + 1 >= lengths, tok, nxt)
    return jax.lax.dynamic_update_slice_in_dim(buf, nxt[:, None], i + 1, axis=1), updated["cache"]

  buf, _ = jax.lax.fori_loop(0, buf.shape[1] - 1, step, (buf, cache))
  return buf
