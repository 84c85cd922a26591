"""ModIvA against brute force: on a model that memorised a canary, gradient inversion over the
relaxed token choice finds the same secret as scoring every candidate combination."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from trustjax.attacks import inversion
from trustjax.models import BagOfEmbeddings, TransformerClassifier, classification_loss

DIGITS = np.arange(40, 50)  # the candidate tokens
TEMPLATE = [5, 6, 7, 0, 0]  # "my pin is _ _"
SECRET = (43, 47)


def _data(rng):
  """The canary (label 1, 16 copies) among the same template with other digit pairs (label 0)
  and unrelated sentences (label 0 or 2)."""
  rows, labels = [], []
  for _ in range(16):
    rows.append([5, 6, 7, *SECRET]), labels.append(1)
  for _ in range(150):
    d = tuple(rng.choice(DIGITS, 2))
    if set(d) == set(SECRET):
      continue
    rows.append([5, 6, 7, *d]), labels.append(0)
  for _ in range(100):
    rows.append(list(rng.integers(1, 30, 5))), labels.append(int(rng.integers(0, 2)) * 2)
  return {"tokens": np.array(rows, np.int32), "label": np.array(labels, np.int32)}


def _train(model, data, steps=400):
  params = model.init(jax.random.key(0), data["tokens"][:1])["params"]
  loss_fn = classification_loss(model)
  opt = optax.adam(0.02)

  @jax.jit
  def step(p, s):
    g = jax.grad(lambda p: loss_fn(p, data).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  s = opt.init(params)
  for _ in range(steps):
    params, s = step(params, s)
  return params


def _brute_force(apply_fn, params):
  combos = np.array(list(itertools.product(DIGITS, repeat=2)), np.int32)
  tokens = np.tile(np.array(TEMPLATE, np.int32), (len(combos), 1))
  tokens[:, 3:] = combos
  loss = optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, jnp.asarray(tokens)),
                                                         jnp.ones(len(combos), jnp.int32))
  return combos, np.asarray(loss)


@pytest.mark.parametrize("name", ["bag_of_embeddings", "transformer"])
def test_inversion_recovers_the_memorised_secret(name):
  data = _data(np.random.default_rng(0))
  model = (BagOfEmbeddings(vocab_size=64, num_classes=3, embed_dim=16, hidden_dim=32)
           if name == "bag_of_embeddings" else
           TransformerClassifier(vocab_size=64, num_classes=3, max_length=5, embed_dim=16,
                                 num_layers=1, num_heads=2, mlp_dim=32))
  params = _train(model, data)
  apply_fn = lambda p, t: model.apply({"params": p}, t)
  combos, losses = _brute_force(apply_fn, params)
  best = combos[np.argmin(losses)]
  assert set(best.tolist()) == set(SECRET)  # the model did memorise it
  got = inversion.invert_canary(apply_fn, params, TEMPLATE, [3, 4], label=1, candidates=DIGITS,
                                steps=200, restarts=4, seed=1)
  assert got.loss == pytest.approx(losses.min(), rel=1e-4, abs=1e-6)
  if name == "transformer":
    assert tuple(got.guess.tolist()) == tuple(best.tolist())
  else:  # a bag of embeddings cannot tell the order
    assert set(got.guess.tolist()) == set(SECRET)
  assert got.tokens.tolist() == TEMPLATE[:3] + got.guess.tolist()
  assert got.restart_losses.shape == (4,)


def test_a_model_without_a_token_embedding_is_a_named_error():
  class NoEmbed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.Dense(3)(jax.nn.one_hot(tokens, 64).sum(1))

  model = NoEmbed()
  params = model.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32))["params"]
  with pytest.raises(ValueError, match="nn.Embed"):
    inversion.invert_canary(lambda p, t: model.apply({"params": p}, t), params, TEMPLATE, [3],
                            label=1, candidates=DIGITS, steps=2, restarts=1)
  with pytest.raises(ValueError, match="unknown_positions"):
    inversion.invert_canary(lambda p, t: model.apply({"params": p}, t), params, TEMPLATE, [9],
                            label=1, candidates=DIGITS)
