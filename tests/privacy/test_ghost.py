"""Ghost clipping and book-keeping equal the vmap reference (norms and clipped sums)."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import models, privacy
from tests.privacy.helpers import clipped_grad_sum, tiny_problem


class _WithCustomParam(nn.Module):
  """A model with a parameter no rule covers (a learned per-class offset) and a 3-D Dense."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(30, 6)(tokens)  # [B, T, 6]
    x = nn.tanh(nn.Dense(5)(x))  # Dense over a sequence axis
    offset = self.param("offset", nn.initializers.normal(1.0), (3,))
    return nn.Dense(3)(x.mean(1)) + offset


class _Shared(nn.Module):
  """Weight sharing the rules take together: an embedding looked up twice and tied to the output
  layer (`attend`), and a Dense and a LayerNorm applied twice, once over a sequence axis."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(30, 6, name="embed")
    dense = nn.Dense(6, name="shared_dense")
    norm = nn.LayerNorm(name="shared_norm")
    x = norm(nn.tanh(dense(embed(tokens) + embed(tokens[:, ::-1]))))  # [B, T, 6]
    x = norm(dense(x.mean(1)))  # [B, 6]
    return embed.attend(x)  # [B, 30]


class _OwnDense(nn.Dense):
  """A Dense subclass whose output is scaled: the Dense rule would be wrong for it."""

  def __call__(self, x):
    return 2.0 * super().__call__(x)


class _ReadElsewhere(nn.Module):
  """Parameters used outside the calls a rule sees: an embedding looked up and also read by the
  parent as an output layer (`embed.embedding`), and a Dense subclass. Both fall back to vmap."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(30, 6, name="embed")
    x = _OwnDense(6, name="own")(nn.tanh(embed(tokens)).mean(1))
    return nn.tanh(x) @ embed.embedding[:3].T  # [B, 3]


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
  lstm_dp = models.CharLSTM(vocab_size=20, embed_dim=4, hidden=6, num_layers=2, cell="dp")
  lstm_dp_params = lstm_dp.init(jax.random.key(7), toks)["params"]
  gpt = models.GPTDecoder(vocab_size=20, max_length=9, embed_dim=8, num_layers=2, num_heads=2,
                          mlp_dim=16)
  gpt_params = gpt.init(jax.random.key(3), toks)["params"]
  tied = gpt.clone(tie_embeddings=True)
  tied_params = tied.init(jax.random.key(4), toks)["params"]
  shared, elsewhere = _Shared(), _ReadElsewhere()
  shared_batch = dict(custom_batch, label=jnp.asarray(rng.integers(0, 30, 6)))
  return {
      "mlp": (models.classification_loss(mlp, input_key="x"), mlp_params, mlp_batch),
      "transformer": tiny_problem(batch_size=7, scale=2.0),
      "bag": tiny_problem(batch_size=7, seed=3, model="bag"),
      "custom_param_fallback": (models.classification_loss(custom), custom_params, custom_batch),
      # The LSTM cell's Dense layers run once per time step inside a scan: they fall back to
      # vmap; the embedding and the output layer use their rules.
      "lstm": (models.lm_loss(lstm), lstm_params, lstm_batch),
      # Two LSTMLayers: the recurrent weights by their own rule, no vmap.
      "lstm_dp": (models.lm_loss(lstm_dp), lstm_dp_params, lstm_batch),
      # Causal attention (DenseGeneral projections), position embeddings, an unbiased head.
      "gpt": (models.lm_loss(gpt), gpt_params, lstm_batch),
      # GPT-2's tied output layer: the token embedding is read by lookup and by `attend`.
      "gpt_tied": (models.lm_loss(tied), tied_params, lstm_batch),
      "shared": (models.classification_loss(shared),
                 shared.init(jax.random.key(5), tokens)["params"], shared_batch),
      "read_elsewhere": (models.classification_loss(elsewhere),
                         elsewhere.init(jax.random.key(6), tokens)["params"], custom_batch),
  }


@pytest.mark.parametrize("name", list(_problems()))
@pytest.mark.parametrize("method", ["ghost", "bookkeeping"])
def test_matches_vmap_reference(name, method):
  loss_fn, params, batch = _problems()[name]
  # The reference is explicit: the default method ("auto") is book-keeping itself.
  ref_sum, ref_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=1e9, method="vmap")
  clip = 0.5 * float(np.median(np.asarray(ref_aux["norms"])[np.asarray(batch["mask"])]))
  ref_sum, ref_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip, method="vmap")
  got_sum, got_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=clip, method=method)
  np.testing.assert_allclose(got_aux["norms"], ref_aux["norms"], rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(got_aux["losses"], ref_aux["losses"], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=2e-4, atol=2e-5)
  # Rules cover every feed-forward layer of the library's models and shared layers; the custom
  # parameter, the recurrent cell and parameters read outside a rule's calls fall back.
  expected = {"custom_param_fallback": 1, "lstm": 12,  # 12: the cell's leaves
              "read_elsewhere": 3}.get(name, 0)  # the embedding, the subclass's kernel and bias
  if name == "lstm":
    assert len(jax.tree_util.tree_leaves(params["OptimizedLSTMCell_0"])) == 12
  assert int(got_aux["vmap_fallback_leaves"]) == expected


def test_microbatched_bookkeeping_matches():
  loss_fn, params, batch = tiny_problem(batch_size=7, scale=2.0)
  ref, _ = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.3, method="vmap")
  got, aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.3, method="bookkeeping",
                              microbatch_size=3)
  chex.assert_trees_all_close(got, ref, rtol=2e-4, atol=2e-5)
  assert int(aux["vmap_fallback_leaves"]) == 0  # the rules see the layers inside the scan


def test_parameters_cast_outside_the_model_keep_their_rules():
  """Mixed precision by casting the parameters before `apply`: the casts are not a use."""
  loss_fn, params, batch = _problems()["gpt_tied"]

  def cast_loss(p, b):
    return loss_fn(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), p), b)

  ref_sum, ref = clipped_grad_sum(cast_loss, params, batch, l2_clip=0.5, method="vmap")
  got_sum, got = clipped_grad_sum(cast_loss, params, batch, l2_clip=0.5, method="bookkeeping")
  assert int(got["vmap_fallback_leaves"]) == 0
  # bfloat16 forward passes: the reference and the rules round differently.
  np.testing.assert_allclose(got["norms"], ref["norms"], rtol=3e-2, atol=1e-3)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=5e-2, atol=5e-3)


def test_rules_hold_under_vmap_over_models():
  """Shadow models train under vmap: the traced coverage check sees the same calls there."""
  loss_fn, params, batch = _problems()["gpt_tied"]
  two = jax.tree_util.tree_map(lambda x: jnp.stack([x, 1.5 * x]), params)
  fn = jax.jit(jax.vmap(lambda p: clipped_grad_sum(loss_fn, p, batch, l2_clip=0.5,
                                                   method="bookkeeping")))
  sums, aux = fn(two)
  assert np.all(np.asarray(aux["vmap_fallback_leaves"]) == 0)
  for i in range(2):
    p = jax.tree_util.tree_map(lambda x: x[i], two)
    ref_sum, ref = clipped_grad_sum(loss_fn, p, batch, l2_clip=0.5, method="vmap")
    np.testing.assert_allclose(aux["norms"][i], ref["norms"], rtol=2e-4, atol=1e-6)
    chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], sums), ref_sum,
                                rtol=2e-4, atol=2e-5)


class _TimeMajor(nn.Module):
  """A Dense applied time-major ([T, B, D]): with T == B its input passes the shape checks, but
  the rule takes positions for examples. Only a numerical check can catch it."""

  @nn.compact
  def __call__(self, tokens):
    x = jnp.swapaxes(nn.Embed(30, 6)(tokens), 0, 1)  # [T, B, 6]
    x = jnp.swapaxes(nn.tanh(nn.Dense(6)(x)), 0, 1)  # the Dense sees [T, B, 6]
    return nn.Dense(3)(x.mean(1))


def test_check_rules_passes_the_library_models_and_catches_a_time_major_layer():
  loss_fn, params, batch = _problems()["gpt_tied"]
  assert privacy.check_rules(loss_fn, params, batch) < 1e-4
  model = _TimeMajor()
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 30, (5, 5)), jnp.int32)  # T == B
  batch = {"tokens": tokens, "label": jnp.arange(5) % 3, "mask": jnp.ones(5, bool)}
  params = model.init(jax.random.key(7), tokens)["params"]
  loss_fn = models.classification_loss(model)
  with pytest.raises(ValueError, match="differ from the vmap reference"):
    privacy.check_rules(loss_fn, params, batch, method="bookkeeping")
  assert privacy.check_rules(loss_fn, params, batch, method="vmap") == 0.0


def test_fallback_leaves_name_each_layer_left_to_vmap_and_why():
  loss_fn, params, batch = _problems()["read_elsewhere"]
  got = privacy.fallback_leaves(loss_fn, params, batch)
  assert set(got) == {"embed/embedding", "own/kernel", "own/bias"}
  assert "read outside the layer's own calls" in got["embed/embedding"]
  assert "subclass" in got["own/kernel"]
  for name in ("gpt_tied", "shared", "transformer", "mlp"):
    assert privacy.fallback_leaves(*_problems()[name]) == {}
  lstm = privacy.fallback_leaves(*_problems()["lstm"])
  assert len(lstm) == 12 and all(k.startswith("OptimizedLSTMCell_0/") for k in lstm)
  assert privacy.fallback_leaves(*_problems()["lstm_dp"]) == {}
  # A Dense inside nn.remat, and one applied time-major with T != B.
  class Remat(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      return nn.remat(nn.Dense)(3, name="inner")(nn.Embed(30, 6, name="embed")(tokens).mean(1))

  def fallback(model):
    tokens = jnp.zeros((4, 5), jnp.int32)
    return privacy.fallback_leaves(models.classification_loss(model),
                                   model.init(jax.random.key(0), tokens)["params"],
                                   {"tokens": tokens, "label": jnp.zeros(4, jnp.int32)})

  got = fallback(Remat())
  assert set(got) == {"inner/kernel", "inner/bias"}
  assert "read outside the layer's own calls" in got["inner/kernel"]
  got = fallback(_TimeMajor())
  assert set(got) == {"Dense_0/kernel", "Dense_0/bias"}
  assert "does not lead with the batch axis" in got["Dense_0/kernel"]


_FROZEN_CASES = [
    ("transformer", ("token_embed", "pos_embed", "block_0/attn/query"), 0),
    ("transformer", ("block_0/mlp_in/kernel",), 1),  # its bias alone: vmap
    ("gpt_tied", ("token_embed",), 0),  # the tied table, read by lookup and by `attend`
    ("lstm_dp", ("lstm_1", "out/bias"), 1),  # the head's kernel alone: vmap
    ("lstm_dp", ("lstm_0/input",), 1),  # the recurrent rule needs its input projection's
    ("lstm_dp", ("lstm_0/recurrent",), 0),
]


# Ghost shares the norms with book-keeping and sums by a second backward pass: two cases suffice.
@pytest.mark.parametrize("name,frozen,fallback,method",
                         [c + ("bookkeeping",) for c in _FROZEN_CASES]
                         + [c + ("ghost",) for c in _FROZEN_CASES[:2]])
def test_frozen_parameters_take_no_part_in_norms_or_sums(name, frozen, fallback, method):
  """With `training.with_frozen` the clipped sum is over the trainable parameters only: the
  reference is the full model's per-example gradients (vmap), restricted to those parameters,
  clipped by their own norm and summed."""
  from trustjax import training  # pylint: disable=import-outside-toplevel
  loss_fn, params, batch = _problems()[name]
  train, fixed = training.split_frozen(params, frozen)
  full = jax.jit(privacy.per_example_grads, static_argnums=0)(loss_fn, params, batch)
  ref = training.split_frozen(full, frozen)[0]
  norms = np.sqrt(sum(np.sum(np.square(g).reshape(g.shape[0], -1), 1)
                      for g in jax.tree_util.tree_leaves(ref)))
  mask = np.asarray(batch["mask"])
  clip = 0.5 * float(np.median(norms[mask]))
  c = np.minimum(1.0, clip / norms) * mask
  ref_sum = jax.tree_util.tree_map(lambda g: np.einsum("b,b...->...", c, g), ref)
  got_sum, aux = clipped_grad_sum(training.with_frozen(loss_fn, fixed), train, batch,
                                  l2_clip=clip, method=method)
  np.testing.assert_allclose(aux["norms"], norms * mask, rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=2e-4, atol=2e-5)
  assert int(aux["vmap_fallback_leaves"]) == fallback
  assert len(privacy.fallback_leaves(training.with_frozen(loss_fn, fixed), train, batch)) \
      == fallback
