import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import models


def _models():
  return [models.TransformerClassifier(vocab_size=50, num_classes=3, max_length=10, embed_dim=16,
                                       num_layers=2, num_heads=2, mlp_dim=32),
          models.BagOfEmbeddings(vocab_size=50, num_classes=3, embed_dim=16, hidden_dim=32)]


@pytest.mark.parametrize("model", _models(), ids=["transformer", "bag"])
def test_shapes_and_padding_invariance(model):
  tokens = jnp.array([[5, 6, 7, 0, 0, 0], [9, 3, 0, 0, 0, 0]], jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  logits = model.apply({"params": params}, tokens)
  chex.assert_shape(logits, (2, 3))
  # More trailing padding changes nothing: pad tokens are masked in attention and pooling.
  longer = jnp.pad(tokens, ((0, 0), (0, 4)))
  chex.assert_trees_all_close(model.apply({"params": params}, longer), logits, atol=1e-5)


def test_transformer_uses_standard_layers():
  model = _models()[0]
  params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  blk = params["block_0"]
  assert set(blk) == {"ln_attn", "attn", "ln_mlp", "mlp_in", "mlp_out"}
  assert set(blk["attn"]) == {"query", "key", "value", "out"}  # DenseGeneral projections
  with pytest.raises(ValueError, match="max_length"):
    model.apply({"params": params}, jnp.zeros((1, 11), jnp.int32))


def test_loss_and_metrics_match_numpy():
  model = _models()[1]
  tokens = jnp.array(np.random.default_rng(0).integers(1, 50, (6, 5)), jnp.int32)
  labels = jnp.array([0, 1, 2, 0, 1, 2])
  params = model.init(jax.random.key(1), tokens)["params"]
  batch = {"tokens": tokens, "label": labels, "mask": jnp.array([1, 1, 1, 1, 0, 0], bool)}
  losses = models.classification_loss(model)(params, batch)
  logits = np.asarray(model.apply({"params": params}, tokens), np.float64)
  ref = -(logits[np.arange(6), labels] - np.log(np.exp(logits).sum(-1)))
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  m = models.classification_metrics(model)(params, batch)
  assert float(m["count"]) == 4
  np.testing.assert_allclose(m["loss_sum"], ref[:4].sum(), rtol=1e-5)
  np.testing.assert_allclose(m["correct"], (logits.argmax(-1) == labels)[:4].sum())
