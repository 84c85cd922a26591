"""The GPT-style decoder: causality, and the same logits as Hugging Face's GPT-2 with the same
weights (PyTorch on the CPU, an independent implementation)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trustjax import models


def _gpt(**kw):
  cfg = dict(vocab_size=40, max_length=12, embed_dim=16, num_layers=2, num_heads=4, mlp_dim=48)
  cfg.update(kw)
  return models.GPTDecoder(**cfg)


def test_causal_and_length_checked():
  model = _gpt()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 40, (3, 10)), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  logits = model.apply({"params": params}, tokens)
  chex.assert_shape(logits, (3, 10, 40))
  # Changing token 6 changes no logit before position 6, and changes position 6's.
  changed = tokens.at[:, 6].set((tokens[:, 6] + 1) % 40)
  other = model.apply({"params": params}, changed)
  chex.assert_trees_all_close(other[:, :6], logits[:, :6], atol=1e-6)
  assert float(jnp.abs(other[:, 6] - logits[:, 6]).max()) > 1e-3
  # Trailing tokens (padding) change nothing before them.
  chex.assert_trees_all_close(model.apply({"params": params}, tokens[:, :7]), logits[:, :7],
                              atol=1e-5)
  with pytest.raises(ValueError, match="max_length"):
    model.apply({"params": params}, jnp.zeros((1, 13), jnp.int32))


def _to_hf_state_dict(params):
  """Flax GPTDecoder parameters -> GPT2LMHeadModel's state dict (Conv1D weights are [in, out])."""
  import torch  # pylint: disable=g-import-not-at-top

  def t(x):
    return torch.tensor(np.asarray(x, np.float32))

  sd = {"transformer.wte.weight": t(params["token_embed"]["embedding"]),
        "transformer.wpe.weight": t(params["pos_embed"]["embedding"]),
        "transformer.ln_f.weight": t(params["ln_final"]["scale"]),
        "transformer.ln_f.bias": t(params["ln_final"]["bias"])}
  if "head" in params:  # untied; tied, GPT-2 shares lm_head.weight with wte.weight
    sd["lm_head.weight"] = t(np.asarray(params["head"]["kernel"]).T)
  i = 0
  while f"block_{i}" in params:
    b, pre = params[f"block_{i}"], f"transformer.h.{i}."
    a = b["attn"]
    d = a["query"]["kernel"].shape[0]
    # DenseGeneral kernels [d, heads, head_dim] -> [d, d]; GPT-2's c_attn is [q | k | v].
    w = [np.asarray(a[n]["kernel"]).reshape(d, d) for n in ("query", "key", "value")]
    bias = [np.asarray(a[n]["bias"]).reshape(d) for n in ("query", "key", "value")]
    sd[pre + "attn.c_attn.weight"] = t(np.concatenate(w, 1))
    sd[pre + "attn.c_attn.bias"] = t(np.concatenate(bias))
    sd[pre + "attn.c_proj.weight"] = t(np.asarray(a["out"]["kernel"]).reshape(d, d))
    sd[pre + "attn.c_proj.bias"] = t(a["out"]["bias"])
    for ours, theirs in (("ln_attn", "ln_1"), ("ln_mlp", "ln_2")):
      sd[pre + theirs + ".weight"] = t(b[ours]["scale"])
      sd[pre + theirs + ".bias"] = t(b[ours]["bias"])
    for ours, theirs in (("mlp_in", "c_fc"), ("mlp_out", "c_proj")):
      sd[pre + f"mlp.{theirs}.weight"] = t(b[ours]["kernel"])
      sd[pre + f"mlp.{theirs}.bias"] = t(b[ours]["bias"])
    i += 1
  return sd


def test_build_language_model_ties_the_head():
  kw = dict(vocab_size=40, max_length=12, embed_dim=16, num_layers=1, num_heads=4, mlp_dim=32,
            hidden=8)
  tokens = jnp.zeros((2, 12), jnp.int32)
  untied = models.build_language_model("gpt", **kw).init(jax.random.key(0), tokens)["params"]
  tied = models.build_language_model("gpt", **kw, tie_embeddings=True).init(
      jax.random.key(0), tokens)["params"]
  assert "head" in untied and "head" not in tied
  assert set(untied) - set(tied) == {"head"}


@pytest.mark.parametrize("tied", [False, True])
def test_matches_huggingface_gpt2(tied):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = _gpt().clone(tie_embeddings=tied)
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 40, (3, 12)).astype(np.int32)
  params = model.init(jax.random.key(1), jnp.asarray(tokens))["params"]
  # Random LayerNorm parameters and biases too, so that a swapped or dropped one shows.
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = jax.tree_util.tree_unflatten(tree, [
      x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  cfg = transformers.GPT2Config(vocab_size=40, n_positions=12, n_embd=16, n_layer=2, n_head=4,
                                n_inner=48, activation_function="gelu_new",
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                layer_norm_epsilon=1e-5, tie_word_embeddings=tied)
  hf = transformers.GPT2LMHeadModel(cfg).eval()
  assert ("head" in params) != tied
  missing, unexpected = hf.load_state_dict(_to_hf_state_dict(params), strict=False)
  assert not unexpected
  assert all(k.endswith("attn.bias") or k.endswith("masked_bias")
             or (tied and k == "lm_head.weight") for k in missing), missing
  if tied:
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
  with torch.no_grad():
    want = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_cached_decoding_equals_the_full_model_at_every_position(tied):
  model = _gpt(tie_embeddings=tied)
  tokens = jnp.asarray(np.random.default_rng(4).integers(0, 40, (3, 12)), jnp.int32)
  params = model.init(jax.random.key(4), tokens)["params"]
  want = model.apply({"params": params}, tokens)
  decoder = model.clone(decode=True)
  _, state = decoder.apply({"params": params}, tokens, mutable=["cache"])
  cache = jax.tree.map(jnp.zeros_like, state["cache"])
  for i in range(12):  # one position at a time, each attending to the cached ones before it
    got, state = decoder.apply({"params": params, "cache": cache}, tokens[:, i:i + 1],
                               mutable=["cache"])
    cache = state["cache"]
    chex.assert_trees_all_close(got[:, 0], want[:, i], atol=2e-5, rtol=2e-5)
  assert int(cache["position"]) == 12
  with pytest.raises(ValueError, match="one position per call"):
    decoder.apply({"params": params, "cache": cache}, tokens[:, :2], mutable=["cache"])


def _loop_greedy(model, params, prompt, n):
  # Reference: grow each prompt one token at a time, the model run on the prefix alone.
  seq = list(prompt)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))  # one compile per length
  for _ in range(n):
    logits = apply(params, jnp.asarray([seq], jnp.int32))[0, -1]
    logits = logits.at[0].set(-jnp.inf)
    seq.append(int(jnp.argmax(logits)))
  return seq[len(prompt):]


@pytest.mark.parametrize("name", ["gpt", "char_lstm"])
def test_generate_greedy_equals_a_prefix_loop(name):
  if name == "gpt":
    model = _gpt()
  else:  # no key-value cache: the whole buffer at every step
    model = models.CharLSTM(vocab_size=40, embed_dim=8, hidden=16)
  rng = np.random.default_rng(1)
  prompts = rng.integers(1, 40, (3, 5)).astype(np.int32)
  lengths = np.array([5, 2, 1], np.int32)
  prompts[1, 2:] = 7  # junk after a row's end must not matter
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  outs = [models.generate(model, params, prompts, lengths, jax.random.key(9), max_new_tokens=4,
                          temperature=0.0, use_cache=c) for c in (True, False)]
  for out in outs:
    chex.assert_shape(out, (3, 4))
  for i in range(3):
    want = _loop_greedy(model, params, prompts[i, :lengths[i]], 4)
    assert [o[i].tolist() for o in outs] == [want, want]


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_samples_the_model_distribution_with_top_k_and_suppression(use_cache):
  from scipy import stats  # pylint: disable=import-outside-toplevel
  model = _gpt(vocab_size=8, num_layers=1)
  params = model.init(jax.random.key(3), jnp.zeros((1, 12), jnp.int32))["params"]
  params = jax.tree.map(lambda x: 3.0 * x, params)  # a peaked distribution
  n = 20000
  prompts = np.full((n, 2), 5, np.int32)
  lengths = np.tile(np.array([1, 2], np.int32), n // 2)  # some rows sample while others read

  def probs(prefix):  # the model's next-token distribution in float64, padding out
    logits = model.apply({"params": params}, jnp.asarray([prefix], jnp.int32))[0, -1]
    z = np.asarray(logits, np.float64) / 0.7
    z[0] = -np.inf
    p = np.exp(z - z.max())
    return p / p.sum()

  def check(tokens, p):
    counts = np.bincount(tokens, minlength=8)
    assert counts[0] == 0  # padding suppressed
    keep = p > 0
    chi = stats.chisquare(counts[keep], len(tokens) * p[keep] / p[keep].sum())
    assert chi.pvalue > 1e-3, (counts, len(tokens) * p)

  out = np.asarray(models.generate(model, params, prompts, lengths, jax.random.key(0),
                                   max_new_tokens=2, temperature=0.7, use_cache=use_cache))
  check(out[lengths == 1, 0], probs([5]))
  two = out[lengths == 2]
  check(two[:, 0], probs([5, 5]))
  j = np.bincount(two[:, 0]).argmax()  # the second token after the likeliest first one
  check(two[two[:, 0] == j, 1], probs([5, 5, j]))
  logits = model.apply({"params": params}, jnp.asarray(prompts[:1]))[0, 1]
  masked = np.asarray(logits, np.float64)
  masked[[0, 1]] = -np.inf
  top = set(np.argsort(-masked)[:3].tolist())  # the 3 likeliest tokens once 0 and 1 are out
  first_k = np.asarray(models.generate(model, params, prompts[:2000], np.full(2000, 2),
                                       jax.random.key(1), max_new_tokens=1, temperature=1.0,
                                       top_k=3, suppress=(0, 1), use_cache=use_cache))[:, 0]
  seen = set(np.unique(first_k).tolist())
  assert seen <= top and len(seen) > 1, (seen, top)


def test_generate_rejects_bad_arguments():
  model = _gpt()
  params = model.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  x, ln = np.ones((2, 5), np.int32), np.array([5, 3], np.int32)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="max_length"):
    models.generate(model, params, x, ln, key, max_new_tokens=8)
  with pytest.raises(ValueError, match="prompt_lengths"):
    models.generate(model, params, x, np.array([0, 3], np.int32), key, max_new_tokens=2)
  with pytest.raises(ValueError, match="temperature"):
    models.generate(model, params, x, ln, key, max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    models.generate(model, params, x, ln, key, max_new_tokens=0)


def test_lstm_layer_matches_torch_lstm():
  """`LSTMLayer` with torch.nn.LSTM's weights (gates i, f, g, o; PyTorch's two biases summed)
  gives its outputs; CharLSTM(cell="dp") stacks it, and a bad cell name is a named error."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 7, 5)).astype(np.float32)
  lstm = torch.nn.LSTM(5, 4, batch_first=True)
  with torch.no_grad():
    for w in lstm.parameters():
      w.copy_(torch.tensor(rng.normal(scale=0.5, size=tuple(w.shape)).astype(np.float32)))
    want = lstm(torch.tensor(x))[0].numpy()
  params = {"input": {"kernel": jnp.asarray(lstm.weight_ih_l0.detach().numpy().T),
                      "bias": jnp.asarray((lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().numpy())},
            "recurrent": jnp.asarray(lstm.weight_hh_l0.detach().numpy().T)}
  layer = models.LSTMLayer(4)
  assert jax.tree.map(jnp.shape, layer.init(jax.random.key(0), jnp.asarray(x))["params"]) == (
      jax.tree.map(jnp.shape, params))
  got = layer.apply({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  tokens = jnp.zeros((2, 6), jnp.int32)
  model = models.CharLSTM(vocab_size=11, embed_dim=5, hidden=4, num_layers=2, cell="dp")
  p = model.init(jax.random.key(1), tokens)["params"]
  assert set(p) == {"embed", "lstm_0", "lstm_1", "out"}
  assert model.apply({"params": p}, tokens).shape == (2, 6, 11)
  with pytest.raises(ValueError, match="cell must be 'flax' or 'dp'"):
    models.CharLSTM(vocab_size=11, cell="gru").init(jax.random.key(1), tokens)
