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


@pytest.mark.parametrize("method", ["vmap", "ghost", "bookkeeping"])
def test_sequence_model_norms_equal_opacus(method):
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 30, (6, 7))
  tokens[:, 0] = tokens[:, 3]  # repeated tokens exercise the embedding's Gram terms
  y = rng.integers(0, 3, 6)
  model = _SeqModel()
  params = model.init(jax.random.key(1), jnp.asarray(tokens, jnp.int32))["params"]
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(y),
           "mask": jnp.ones(6, bool)}
  _, aux = clipped_grad_sum(models.classification_loss(model), params, batch, l2_clip=1e9,
                            method=method)
  tm = _TorchSeq()
  tm.embed.weight.data = torch.tensor(np.asarray(params["embed"]["embedding"]).copy())
  _dense_to_torch(tm.seq, params["seq"])
  _dense_to_torch(tm.out, params["out"])
  ref = _opacus_norms(tm, torch.tensor(tokens), torch.tensor(y))
  np.testing.assert_allclose(aux["norms"], ref, rtol=1e-4)
