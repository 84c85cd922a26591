"""Per-example gradient norms equal Opacus's per-sample gradients (PyTorch, CPU, same weights)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import models
from tests.privacy.helpers import clipped_grad_sum

if os.environ.get("CI"):  # CI installs the test extra: a missing package is a failure there.
  import opacus  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
else:
  torch = pytest.importorskip("torch")
  opacus = pytest.importorskip("opacus")


class _SeqModel(nn.Module):
  """Embed -> Dense over the sequence -> tanh -> mean over positions -> Dense."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.tanh(nn.Dense(5, name="seq")(nn.Embed(30, 6, name="embed")(tokens)))
    return nn.Dense(3, name="out")(x.mean(1))


class _TorchSeq(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(30, 6)
    self.seq = torch.nn.Linear(6, 5)
    self.out = torch.nn.Linear(5, 3)

  def forward(self, tokens):
    return self.out(torch.tanh(self.seq(self.embed(tokens))).mean(1))


class _TiedModel(nn.Module):
  """An embedding tied to the output layer (`attend`): the rules take its two uses together."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(30, 6, name="embed")
    return embed.attend(nn.tanh(nn.Dense(6, name="seq")(embed(tokens))).mean(1))


class _TorchTied(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.embed = torch.nn.Embedding(30, 6)
    self.seq = torch.nn.Linear(6, 6)
    self.head = torch.nn.Linear(6, 30, bias=False)
    self.head.weight = self.embed.weight  # tied: Opacus adds both modules' per-sample grads

  def forward(self, tokens):
    return self.head(torch.tanh(self.seq(self.embed(tokens))).mean(1))


def _dense_to_torch(layer: torch.nn.Linear, p):
  layer.weight.data = torch.tensor(np.asarray(p["kernel"]).T.copy())
  layer.bias.data = torch.tensor(np.asarray(p["bias"]).copy())


def _opacus_norms(module, inputs, labels):
  gsm = opacus.GradSampleModule(module, loss_reduction="sum")
  loss = torch.nn.functional.cross_entropy(gsm(inputs), labels, reduction="sum")
  loss.backward()
  sq = sum((p.grad_sample.reshape(len(labels), -1) ** 2).sum(1) for p in gsm.parameters())
  return np.sqrt(sq.detach().numpy())


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_mlp_norms_equal_opacus(method):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 10)).astype(np.float32)
  y = rng.integers(0, 3, 8)
  model = models.MLPClassifier(hidden=(16,), num_classes=3)
  params = model.init(jax.random.key(0), jnp.asarray(x))["params"]
  batch = {"x": jnp.asarray(x), "label": jnp.asarray(y), "mask": jnp.ones(8, bool)}
  _, aux = clipped_grad_sum(models.classification_loss(model, input_key="x"), params, batch,
                            l2_clip=1e9, method=method)
  tm = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
  _dense_to_torch(tm[0], params["dense_0"])
  _dense_to_torch(tm[2], params["out"])
  ref = _opacus_norms(tm, torch.tensor(x), torch.tensor(y))
  np.testing.assert_allclose(aux["norms"], ref, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("method", ["vmap", "ghost", "bookkeeping"])
def test_sequence_model_norms_equal_opacus(method, tied):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 30, (6, 7))
  tokens[:, 0] = tokens[:, 3]  # repeated tokens exercise the embedding's Gram terms
  y = rng.integers(0, 30 if tied else 3, 6)
  model = _TiedModel() if tied else _SeqModel()
  params = model.init(jax.random.key(1), jnp.asarray(tokens, jnp.int32))["params"]
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(y),
           "mask": jnp.ones(6, bool)}
  _, aux = clipped_grad_sum(models.classification_loss(model), params, batch, l2_clip=1e9,
                            method=method)
  tm = _TorchTied() if tied else _TorchSeq()
  tm.embed.weight.data = torch.tensor(np.asarray(params["embed"]["embedding"]).copy())
  _dense_to_torch(tm.seq, params["seq"])
  if tied:
    assert tm.head.weight is tm.embed.weight
  else:
    _dense_to_torch(tm.out, params["out"])
  ref = _opacus_norms(tm, torch.tensor(tokens), torch.tensor(y))
  np.testing.assert_allclose(aux["norms"], ref, rtol=1e-4)


class _TorchAttention(torch.nn.Module):
  """Multi-head self-attention from four nn.Linear layers (batch first), the layout of Flax's
  MultiHeadDotProductAttention; Opacus computes their per-sample gradients natively. (Opacus
  1.6's DPMultiheadAttention(batch_first=True) reshapes its [batch * heads, length, head_dim]
  output straight to [batch, length, dim], mixing heads and positions, so it is not used here.)"""

  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.qlinear, self.klinear, self.vlinear, self.out_proj = (
        torch.nn.Linear(d, d) for _ in range(4))

  def forward(self, x):
    b, t, d = x.shape
    split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.qlinear(x)), split(self.klinear(x)), split(self.vlinear(x))
    a = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
    return self.out_proj((a @ v).transpose(1, 2).reshape(b, t, d))


class _TorchBlock(torch.nn.Module):
  """The pre-LN encoder block of models.EncoderBlock in PyTorch, with Opacus's attention."""

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.ln_attn = torch.nn.LayerNorm(d, eps=1e-6)
    self.attn = _TorchAttention(d, heads)
    self.ln_mlp = torch.nn.LayerNorm(d, eps=1e-6)
    self.mlp_in = torch.nn.Linear(d, mlp)
    self.mlp_out = torch.nn.Linear(mlp, d)

  def forward(self, x):
    x = x + self.attn(self.ln_attn(x))
    h = torch.nn.functional.gelu(self.mlp_in(self.ln_mlp(x)), approximate="tanh")
    return x + self.mlp_out(h)


class _TorchEncoder(torch.nn.Module):

  def __init__(self, vocab, length, d, heads, mlp, classes):
    super().__init__()
    self.tok = torch.nn.Embedding(vocab, d)
    self.pos = torch.nn.Embedding(length, d)
    self.block = _TorchBlock(d, heads, mlp)
    self.ln = torch.nn.LayerNorm(d, eps=1e-6)
    self.head = torch.nn.Linear(d, classes)

  def forward(self, tokens):
    pos = torch.arange(tokens.shape[1]).expand_as(tokens).contiguous()
    x = self.ln(self.block(self.tok(tokens) + self.pos(pos)))
    return self.head(x.mean(1))  # no padding in this test: the masked mean is the mean


def _ln_to_torch(layer, p):
  layer.weight.data = torch.tensor(np.asarray(p["scale"]).copy())
  layer.bias.data = torch.tensor(np.asarray(p["bias"]).copy())


def _qkv_to_torch(layer, p, d):
  layer.weight.data = torch.tensor(np.asarray(p["kernel"]).reshape(d, d).T.copy())
  layer.bias.data = torch.tensor(np.asarray(p["bias"]).reshape(d).copy())


@pytest.mark.parametrize("method", ["vmap", "bookkeeping"])
def test_transformer_encoder_norms_equal_opacus(method):
  """The attention encoder (Embed, LayerNorm, DenseGeneral q/k/v/out, Dense MLP and head):
  per-example norms equal Opacus's per-sample gradients of the same network in PyTorch."""
  vocab, length, d, heads, mlp = 25, 6, 8, 2, 16
  rng = np.random.default_rng(2)
  tokens = rng.integers(1, vocab, (5, length))  # no padding id
  y = rng.integers(0, 3, 5)
  model = models.TransformerClassifier(vocab_size=vocab, num_classes=3, max_length=length,
                                       embed_dim=d, num_layers=1, num_heads=heads, mlp_dim=mlp)
  params = model.init(jax.random.key(3), jnp.asarray(tokens, jnp.int32))["params"]
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # LayerNorm biases away from 0
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(y),
           "mask": jnp.ones(5, bool)}
  _, aux = clipped_grad_sum(models.classification_loss(model), params, batch, l2_clip=1e9,
                            method=method)
  tm = _TorchEncoder(vocab, length, d, heads, mlp, 3)
  tm.tok.weight.data = torch.tensor(np.asarray(params["token_embed"]["embedding"]).copy())
  tm.pos.weight.data = torch.tensor(np.asarray(params["pos_embed"]["embedding"]).copy())
  blk = params["block_0"]
  _ln_to_torch(tm.block.ln_attn, blk["ln_attn"])
  _ln_to_torch(tm.block.ln_mlp, blk["ln_mlp"])
  for name, layer in (("query", tm.block.attn.qlinear), ("key", tm.block.attn.klinear),
                      ("value", tm.block.attn.vlinear)):
    _qkv_to_torch(layer, blk["attn"][name], d)
  tm.block.attn.out_proj.weight.data = torch.tensor(
      np.asarray(blk["attn"]["out"]["kernel"]).reshape(d, d).T.copy())
  tm.block.attn.out_proj.bias.data = torch.tensor(np.asarray(blk["attn"]["out"]["bias"]).copy())
  _dense_to_torch(tm.block.mlp_in, blk["mlp_in"])
  _dense_to_torch(tm.block.mlp_out, blk["mlp_out"])
  _ln_to_torch(tm.ln, params["ln_final"])
  _dense_to_torch(tm.head, params["head"])
  logits = model.apply({"params": params}, batch["tokens"])
  np.testing.assert_allclose(tm(torch.tensor(tokens)).detach().numpy(), logits, rtol=1e-4,
                             atol=1e-5)  # same function first
  ref = _opacus_norms(tm, torch.tensor(tokens), torch.tensor(y))
  np.testing.assert_allclose(aux["norms"], ref, rtol=2e-4)
