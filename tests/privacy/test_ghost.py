"""Ghost clipping and book-keeping equal the vmap reference (norms and clipped sums)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import models
from tests.privacy.helpers import clipped_grad_sum, tiny_problem


class _WithCustomParam(nn.Module):
  """A model with a parameter no rule covers (a learned per-class offset) and a 3-D Dense."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(30, 6)(tokens)  # [B, T, 6]
    x = nn.tanh(nn.Dense(5)(x))  # Dense over a sequence axis
    offset = self.param("offset", nn.initializers.normal(1.0), (3,))
    return nn.Dense(3)(x.mean(1)) + offset


@functools.lru_cache(maxsize=None)
def _problems():
  rng = np.random.default_rng(0)
  mlp = models.MLPClassifier(hidden=(7, 5), num_classes=3)
  x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  mlp_batch = {"x": x, "label": jnp.asarray(rng.integers(0, 3, 6)),
               "mask": jnp.asarray([1, 1, 0, 1, 1, 0], bool)}
  mlp_params = mlp.init(jax.random.key(0), x)["params"]
  custom = _WithCustomParam()
  tokens = jnp.asarray(rng.integers(0, 30, (6, 5)), jnp.int32)
  custom_batch = {"tokens": tokens, "label": jnp.asarray(rng.integers(0, 3, 6)),
                  "mask": jnp.asarray([1, 0, 1, 1, 1, 1], bool)}
  custom_params = custom.init(jax.random.key(1), tokens)["params"]
  lstm = models.CharLSTM(vocab_size=20, embed_dim=4, hidden=6)
  toks = jnp.asarray(rng.integers(0, 20, (5, 9)), jnp.int32)
  lstm_batch = {"inputs": toks, "targets": jnp.roll(toks, -1, 1),
                "target_mask": jnp.asarray(rng.random((5, 9)) < 0.8),
                "mask": jnp.asarray([1, 1, 0, 1, 1], bool)}
  lstm_params = lstm.init(jax.random.key(2), toks)["params"]
  gpt = models.GPTDecoder(vocab_size=20, max_length=9, embed_dim=8, num_layers=2, num_heads=2,
                          mlp_dim=16)
  gpt_params = gpt.init(jax.random.key(3), toks)["params"]
  return {
      "mlp": (models.classification_loss(mlp, input_key="x"), mlp_params, mlp_batch),
      "transformer": tiny_problem(batch_size=7, scale=2.0),
      "bag": tiny_problem(batch_size=7, seed=3, model="bag"),
      "custom_param_fallback": (models.classification_loss(custom), custom_params, custom_batch),
      # The LSTM cell's Dense layers run once per time step inside a scan: they fall back to
      # vmap; the embedding and the output layer use their rules.
      "lstm": (models.lm_loss(lstm), lstm_params, lstm_batch),
      # Causal attention (DenseGeneral projections), position embeddings, an unbiased head.
      "gpt": (models.lm_loss(gpt), gpt_params, lstm_batch),
  }


@pytest.mark.parametrize("name", list(_problems()))
@pytest.mark.parametrize("method", ["ghost", "bookkeeping"])
def test_matches_vmap_reference(name, method):
  loss_fn, params, batch = _problems()[name]
  ref_sum, ref_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=1e9)
  clip = 0.5 * float(np.median(np.asarray(ref_aux["norms"])[np.asarray(batch["mask"])]))
  ref_sum, ref_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip)
  got_sum, got_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip, method=method)
  np.testing.assert_allclose(got_aux["norms"], ref_aux["norms"], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got_aux["losses"], ref_aux["losses"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=2e-4, atol=2e-5)
  # Rules cover every feed-forward layer of the library's models; the custom parameter and the
  # recurrent cell fall back.
  expected = {"custom_param_fallback": 1, "lstm": 12}.get(name, 0)  # 12: the cell's leaves
  if name == "lstm":
    assert len(jax.tree_util.tree_leaves(params["OptimizedLSTMCell_0"])) == 12
  assert int(got_aux["vmap_fallback_leaves"]) == expected


def test_microbatched_bookkeeping_matches():
  loss_fn, params, batch = tiny_problem(batch_size=7, scale=2.0)
  ref, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.3)
  got, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.3, method="bookkeeping",
                            microbatch_size=3)
  chex.assert_trees_all_close(got, ref, rtol=2e-4, atol=2e-5)
